"""Triton backend of ``modulated_conv2d``: custom ops ``lsap::modulated_conv2d_triton`` (+ ``_backward_triton``)
with a hand-written backward (kernels in triton_fwd.py / triton_bwd.py).

The forward op returns (out, conv_out, d, w_t, q): conv_out is z, the conv output before the epilogue (for up=2 the
blurred transposed conv), when the backward needs it and cannot recover it from out (a clamp or a skip add), else
empty; d the fp32 demodulation coefficients; w_t the GEMMs' taps-major copy of W [k, k, Cin, Cout] in x's dtype and
Q = Σ_taps W² [Cout, Cin] fp32, which the backward reuses. w_t, d = rsqrt((s·g)² @ Qᵀ + eps) and Q come from one
small kernel (weight_and_demodulation; without demodulation, prepare_weight makes w_t); the kernels scale the
styles by g as they read them, and the backward's per-tile partial sums end in one small kernel too (the styles'
gradient), so a layer costs few launches: a small layer's time on a GPU is host time.

fp32 runs the GEMMs in true fp32 unless ``ALLOW_TF32`` (or ``LSAP_TRITON_TF32=1``) is set; bf16/fp16 run them on
the 16-bit inputs with fp32 accumulation. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
Double backward raises.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from ... import backends
from ._autograd import register_modconv_autograd
from .triton_fwd import INTERPRET, cl_empty, needs_conv_out, triton

# TF32 tensor cores for fp32 calls (SPEC §5: < 5e-3 instead of < 1e-5). Read at each call.
ALLOW_TF32: bool = os.environ.get("LSAP_TRITON_TF32", "") == "1"
# The backward recovers z from the layer's output where it can (see z_from_out); False (LSAP_TRITON_STORE_Z=1): the
# forward stores z. Read at each call.
RECOVER_Z: bool = os.environ.get("LSAP_TRITON_STORE_Z", "") != "1"

_GRAD_NAMES = ("x", "weight", "styles", "noise", "noise_strength", "bias", "skip")


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if tf32 and dtype == torch.float32 and not INTERPRET else "ieee"


if triton is not None:
    from . import triton_bwd, triton_fwd, triton_tuning

    def _on_device(x: Tensor):
        # Triton launches on the current CUDA device, not the tensors': guard for multi-GPU callers
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    @torch.library.custom_op("lsap::modulated_conv2d_triton", mutates_args=())
    def modconv_op(x: Tensor, weight: Tensor, styles: Tensor, noise: Optional[Tensor],
                   noise_strength: Optional[Tensor], bias: Optional[Tensor], skip: Optional[Tensor],
                   weight_gain: float, demodulate: bool, up: int, lrelu: bool, gain: float, clamp: Optional[float],
                   eps: float, tf32: bool, z_from_out: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        triton_tuning.seed_for(x.device)
        with _on_device(x):
            if demodulate:
                w_t, d, q = triton_fwd.weight_and_demodulation(weight, styles, weight_gain, eps, x.dtype)
            else:
                w_t = triton_fwd.prepare_weight(weight, x.dtype)
                d, q = (x.new_empty((0,), dtype=torch.float32) for _ in range(2))  # outputs may not alias
            out, conv_out = triton_fwd.forward(x, w_t, styles, weight_gain, d if demodulate else None, noise,
                                               noise_strength, bias, skip, up, demodulate, lrelu, gain, clamp,
                                               _precision(x.dtype, tf32), z_from_out)
        return out, conv_out, d, w_t, q

    @modconv_op.register_fake
    def _(x, weight, styles, noise, noise_strength, bias, skip, weight_gain, demodulate, up, lrelu, gain, clamp, eps,
          tf32, z_from_out):
        batch, _, h, w = x.shape
        cout = weight.shape[0]
        out = cl_empty((batch, cout, h * up, w * up), x.dtype, x.device)
        if needs_conv_out(demodulate, lrelu, clamp) and not z_from_out:
            conv_out = cl_empty(out.shape, x.dtype, x.device)
        else:
            conv_out = x.new_empty((0,))
        cin, k = weight.shape[1], weight.shape[-1]
        d = x.new_empty((batch, cout) if demodulate else (0,), dtype=torch.float32)
        w_t = x.new_empty((k, k, cin, cout))
        q = x.new_empty((cout, cin) if demodulate else (0,), dtype=torch.float32)
        return out, conv_out, d, w_t, q

    @torch.library.custom_op("lsap::modulated_conv2d_backward_triton", mutates_args=())
    def modconv_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, styles: Tensor, noise: Optional[Tensor],
                       noise_strength: Optional[Tensor], bias: Optional[Tensor], conv_out: Tensor, d: Tensor,
                       w_t: Tensor, q: Tensor, weight_gain: float, demodulate: bool, up: int, lrelu: bool, gain: float,
                       clamp: Optional[float], eps: float, tf32: bool, z_from_out: bool,
                       mask: list[bool]) -> list[Tensor]:
        need = dict(zip(_GRAD_NAMES, mask))
        with _on_device(x):
            grads = triton_bwd.backward(
                grad, x, weight, w_t, q, styles, weight_gain, d if demodulate else None, noise, noise_strength, bias,
                conv_out, up=up, demodulate=demodulate, lrelu=lrelu, gain=gain, clamp=clamp,
                precision=_precision(x.dtype, tf32), z_from_out=z_from_out,
                need_x=need["x"], need_w=need["weight"], need_s=need["styles"], need_noise=need["noise"],
                need_strength=need["noise_strength"], need_bias=need["bias"], need_skip=need["skip"])
        like = (x, weight, styles, noise, noise_strength, bias, grad)
        return [g.to(t.dtype) if need[n] else x.new_empty((0,)) for n, g, t in zip(_GRAD_NAMES, grads, like)]

    @modconv_bwd_op.register_fake
    def _(grad, x, weight, styles, noise, noise_strength, bias, conv_out, d, w_t, q, weight_gain, demodulate, up, lrelu,
          gain, clamp, eps, tf32, z_from_out, mask):
        batch, cout, ho, wo = grad.shape
        shapes = {
            "x": lambda: cl_empty(x.shape, x.dtype, x.device),
            "weight": lambda: weight.new_empty(weight.shape),
            "styles": lambda: styles.new_empty(styles.shape),
            "noise": lambda: noise.new_empty(noise.shape),
            "noise_strength": lambda: noise_strength.new_empty(()),
            "bias": lambda: bias.new_empty(bias.shape),
            "skip": lambda: cl_empty((batch, cout, ho // 2, wo // 2), grad.dtype, grad.device),
        }
        return [shapes[n]() if want else x.new_empty((0,)) for n, want in zip(_GRAD_NAMES, mask)]

    modconv = register_modconv_autograd(modconv_op, modconv_bwd_op, "triton",
                                        backward_reads_out=lambda args: args[-1])  # z_from_out, the last scalar

    def modulated_conv2d(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias, activation,
                         gain, clamp, eps, skip):
        """The ``triton`` backend (arguments already validated by the public ``modulated_conv2d``)."""
        if noise is None:
            noise_strength = None
        elif isinstance(noise_strength, Tensor):
            noise_strength = noise_strength.to(device=x.device)  # differentiable; the kernels read it on-device
        else:
            noise_strength = torch.tensor(float(noise_strength), dtype=torch.float32, device=x.device)
        # the GEMMs read channel-contiguous rows: Triton pipelines those loads (cp.async) but not NCHW ones (an
        # sm_90 compile keeps the NCHW x load synchronous). Our layers' outputs are channels_last already (no copy).
        x = x.contiguous(memory_format=torch.channels_last)
        lrelu = activation == "lrelu"
        out, *_ = modconv(x, weight, styles, noise, noise_strength, bias, skip, float(weight_gain),
                          bool(demodulate), int(up), lrelu, float(gain), None if clamp is None else float(clamp),
                          float(eps), bool(ALLOW_TF32), z_from_out(demodulate, lrelu, gain, clamp, skip))
        return out

    def z_from_out(demodulate: bool, lrelu: bool, gain: float, clamp, skip) -> bool:
        """Whether the backward recovers z from the output instead of the forward storing it: out = act(a)·gain is
        invertible without a clamp or a skip add (and gain ≠ 0), and a = d·z + strength·noise + bias with d > 0.
        That saves a write of the layer's output size in the forward and as much memory until the backward (out
        itself is kept anyway, as the next layer's input). Accuracy: z then carries out's rounding, relative to a
        rather than to d·z: in 16 bits the demodulation gradient (styles, weight) loses accuracy where the bias or
        noise term is many times d·z (10×: about 1.5× the error; StyleGAN2's are smaller than d·z). RECOVER_Z."""
        return (RECOVER_Z and needs_conv_out(demodulate, lrelu, clamp) and clamp is None and skip is None
                and gain != 0)

    backends.register("modulated_conv2d", "triton", modulated_conv2d,
                      devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                      dtypes=(torch.float16, torch.bfloat16, torch.float32))
