"""Turns one backend's four style kernels into registered custom ops with hand-written backward.

A backend supplies, on contiguous inputs (offsets int64 [L+1] on the styles' device; anchors, norm, cos and
grad_cos in the accumulation dtype: float32, or float64 for float64 styles):

    normalize_fwd(styles, offsets, eps) -> (styles_hat, norm [B, L])     one launch
    normalize_bwd(grad_hat, styles, norm, offsets, eps) -> grad_styles   one launch
    sncd_fwd(styles, anchors, offsets, eps) -> (cos [B, L], norm [B, L]) one launch
    sncd_bwd(grad_cos, styles, anchors, cos, norm, offsets, eps) -> grad_styles   one launch

``norm`` is the unclamped ||s_bl||: where ``norm < eps`` the backward is the plain scaling by 1/eps.
Each becomes ``lsap::<name>_<backend>`` (torch.library custom op + fake + autograd), so torch.compile traces it
without graph breaks. The backward ops have no derivative of their own: double backward raises.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ... import backends
from .._autograd import fast_call, register_autograd
from .layout import StyleLayout


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bl_like(styles: Tensor, offsets: Tensor) -> Tensor:
    return styles.new_empty((styles.shape[0], offsets.shape[0] - 1), dtype=acc_dtype(styles.dtype))


def register_style_kernels(backend: str, normalize_fwd: Callable, normalize_bwd: Callable, sncd_fwd: Callable,
                           sncd_bwd: Callable, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    """Register ``backend``'s kernels as custom ops and as its ``style_normalize`` / ``sncd`` implementations."""

    @torch.library.custom_op(f"lsap::style_normalize_{backend}", mutates_args=())
    def normalize_op(styles: Tensor, offsets: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return normalize_fwd(styles, offsets, eps)

    @normalize_op.register_fake
    def _(styles, offsets, eps):
        return torch.empty_like(styles), _bl_like(styles, offsets)

    @torch.library.custom_op(f"lsap::style_normalize_backward_{backend}", mutates_args=())
    def normalize_bwd_op(grad_hat: Tensor, styles: Tensor, norm: Tensor, offsets: Tensor, eps: float) -> Tensor:
        return normalize_bwd(grad_hat, styles, norm, offsets, eps)

    @normalize_bwd_op.register_fake
    def _(grad_hat, styles, norm, offsets, eps):
        return torch.empty_like(styles)

    normalize_backward_op = fast_call(normalize_bwd_op)

    def normalize_setup(ctx, inputs, output):
        styles, offsets, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(styles, output[1], offsets)
        ctx.eps = eps

    def normalize_backward(ctx, grad_hat, _grad_norm):
        styles, norm, offsets = ctx.saved_tensors
        return normalize_backward_op(grad_hat.contiguous(), styles, norm, offsets, ctx.eps), None, None

    normalize = register_autograd(normalize_op, normalize_backward, normalize_setup)

    @torch.library.custom_op(f"lsap::sncd_{backend}", mutates_args=())
    def sncd_op(styles: Tensor, anchors: Tensor, offsets: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return sncd_fwd(styles, anchors, offsets, eps)

    @sncd_op.register_fake
    def _(styles, anchors, offsets, eps):
        return _bl_like(styles, offsets), _bl_like(styles, offsets)

    @torch.library.custom_op(f"lsap::sncd_backward_{backend}", mutates_args=())
    def sncd_bwd_op(grad_cos: Tensor, styles: Tensor, anchors: Tensor, cos: Tensor, norm: Tensor, offsets: Tensor,
                    eps: float) -> Tensor:
        return sncd_bwd(grad_cos, styles, anchors, cos, norm, offsets, eps)

    @sncd_bwd_op.register_fake
    def _(grad_cos, styles, anchors, cos, norm, offsets, eps):
        return torch.empty_like(styles)

    sncd_backward_op = fast_call(sncd_bwd_op)

    def sncd_setup(ctx, inputs, output):
        styles, anchors, offsets, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(styles, anchors, output[0], output[1], offsets)
        ctx.eps = eps

    def sncd_backward(ctx, grad_cos, _grad_norm):
        styles, anchors, cos, norm, offsets = ctx.saved_tensors
        return sncd_backward_op(grad_cos.contiguous(), styles, anchors, cos, norm, offsets, ctx.eps), None, None, None

    sncd_cos = register_autograd(sncd_op, sncd_backward, sncd_setup)

    def style_normalize(styles: Tensor, layout: StyleLayout, eps: float) -> Tensor:
        return normalize(styles.contiguous(), layout.offsets_tensor(styles.device), eps)[0]

    def sncd_cosines(styles: Tensor, anchors: Tensor, layout: StyleLayout, eps: float) -> Tensor:
        if anchors.requires_grad and torch.is_grad_enabled():
            raise backends.BackendError(
                f"sncd backend {backend!r} has no gradient for the anchors (they are constants of the metric); "
                "detach them, or use backend='reference' to differentiate through them")
        anchors = anchors.to(acc_dtype(styles.dtype)).contiguous()
        return sncd_cos(styles.contiguous(), anchors, layout.offsets_tensor(styles.device), eps)[0]

    backends.register("style_normalize", backend, style_normalize, devices=devices, dtypes=dtypes)
    backends.register("sncd", backend, sncd_cosines, devices=devices, dtypes=dtypes)
