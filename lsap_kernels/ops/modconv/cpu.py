"""C++ CPU backend of ``modulated_conv2d`` (csrc/modconv_cpu.cpp): custom ops with a hand-written backward.

``lsap::modulated_conv2d_cpu`` returns (out, conv_out, d): the result plus what the backward reads (the conv output
— for up=2 the transposed conv's output, before the FIR — and the demodulation coefficients). Outputs are
channels_last. ``lsap::modulated_conv2d_backward_cpu`` returns the seven input gradients (x, weight, styles, noise,
noise_strength, bias, skip), empty where not asked for: no weight-gradient work unless the weight requires grad.
Double backward raises.

Convolutions: large 3×3 same-resolution layers (fp32 math) run as Winograd F(2×2, 3×3) in our own C++
(csrc/winograd_cpu.cpp: 2.25× fewer multiplies, the style scaling folded into its input transform); the others,
and every weight gradient, through oneDNN. ``LSAP_MODCONV_CONV=onednn`` forces oneDNN everywhere (comparisons).

bfloat16: activations, weights and the op's outputs are bf16; accumulation is fp32. Where oneDNN has bf16 kernels
(AVX512-BF16/AMX) the oneDNN convolutions run in bf16; elsewhere the operand is converted to fp32 as it is scaled
(in the Winograd input transform, or the style-scaling pass) and the convolution runs in fp32, so bf16 then saves
memory, not time.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ... import _ext, backends
from ._autograd import register_modconv_autograd

# Tests set this to force (True) or forbid (False) the bf16 convolution; None = what oneDNN supports here.
FORCE_CONV_BF16: bool | None = None

_GRAD_NAMES = ("x", "weight", "styles", "noise", "noise_strength", "bias", "skip")


@functools.cache
def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def conv_bf16(dtype: torch.dtype) -> bool:
    """Whether the convolution of a ``dtype`` call runs in bf16 (else in the activations' dtype, or fp32)."""
    if dtype != torch.bfloat16:
        return False
    return _onednn_bf16() if FORCE_CONV_BF16 is None else FORCE_CONV_BF16


def clear_workspace() -> None:
    """Return the memory the C++ op keeps for reuse to the OS. Its large tensors (outputs and temporaries) come from
    a small caching pool — at most LSAP_MODCONV_WORKSPACE_MB of freed blocks are kept (default 2048; 0 disables) —
    because first-touch page faults of fresh large tensors cost about as much as the pass that writes them, and an
    inversion allocates the same sizes every step. What the op derives from a frozen weight (oneDNN layouts, phase
    taps, Winograd transforms, Σ w²: rebuilding them cost as much as a small layer's convolution) is kept too, at
    most LSAP_MODCONV_WEIGHT_CACHE_MB (default 1024; 0 disables), and rebuilt when the weight changes (an in-place
    update, or new values written through ``.data``: see csrc/weight_cache_cpu.h). Tensors in use are not
    affected."""
    if _ext.cpu_available():
        _ext.module().modconv_workspace_clear_cpu()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv_dtype(dtype: torch.dtype, bf16: bool) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 and not bf16 else dtype


def _cl_empty(shape, dtype, device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


if _ext.cpu_available():
    _C = _ext.module()

    @torch.library.custom_op("lsap::modulated_conv2d_cpu", mutates_args=())
    def modconv_op(x: Tensor, weight: Tensor, styles: Tensor, noise: Optional[Tensor],
                   noise_strength: Optional[Tensor], bias: Optional[Tensor], skip: Optional[Tensor],
                   weight_gain: float, demodulate: bool, up: int, lrelu: bool, gain: float, clamp: Optional[float],
                   eps: float, conv_bf16: bool) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(_C.modconv_fwd_cpu(x, weight, styles, noise, noise_strength, bias, skip, weight_gain, demodulate,
                                        up, lrelu, gain, clamp, eps, conv_bf16))

    @modconv_op.register_fake
    def _(x, weight, styles, noise, noise_strength, bias, skip, weight_gain, demodulate, up, lrelu, gain, clamp, eps,
          conv_bf16):
        batch, _, h, w = x.shape
        cout, k = weight.shape[0], weight.shape[-1]
        conv_hw = (h, w) if up == 1 else (2 * h + k - 2, 2 * w + k - 2)
        return (_cl_empty((batch, cout, h * up, w * up), x.dtype, x.device),
                _cl_empty((batch, cout, *conv_hw), _conv_dtype(x.dtype, conv_bf16), x.device),
                x.new_empty((batch, cout), dtype=_acc(x.dtype)))

    @torch.library.custom_op("lsap::modulated_conv2d_backward_cpu", mutates_args=())
    def modconv_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, styles: Tensor, noise: Optional[Tensor],
                       noise_strength: Optional[Tensor], bias: Optional[Tensor], conv_out: Tensor, d: Tensor,
                       weight_gain: float, demodulate: bool, up: int, lrelu: bool, gain: float,
                       clamp: Optional[float], eps: float, conv_bf16: bool, mask: list[bool]) -> list[Tensor]:
        return _C.modconv_bwd_cpu(grad, x, weight, styles, noise, noise_strength, bias, conv_out, d, weight_gain,
                                  demodulate, up, lrelu, gain, clamp, eps, conv_bf16, list(mask))

    @modconv_bwd_op.register_fake
    def _(grad, x, weight, styles, noise, noise_strength, bias, conv_out, d, weight_gain, demodulate, up, lrelu, gain,
          clamp, eps, conv_bf16, mask):
        batch, cout, ho, wo = grad.shape
        strength_like = noise_strength if noise_strength is not None else x.new_empty((), dtype=_acc(x.dtype))
        shapes = [
            lambda: _cl_empty(x.shape, x.dtype, x.device),
            lambda: weight.new_empty(weight.shape),
            lambda: styles.new_empty(styles.shape),
            lambda: noise.new_empty(noise.shape) if noise is not None else None,
            lambda: strength_like.new_empty(()) if noise is not None else None,
            lambda: bias.new_empty(bias.shape) if bias is not None else None,
            lambda: _cl_empty((batch, cout, ho // 2, wo // 2), grad.dtype, grad.device),
        ]
        out = []
        for want, make in zip(mask, shapes):
            t = make() if want else None
            out.append(t if t is not None else x.new_empty((0,)))
        return out

    modconv = register_modconv_autograd(modconv_op, modconv_bwd_op, "cpu")

    def modulated_conv2d(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias, activation,
                         gain, clamp, eps, skip):
        """The ``cpu`` backend (arguments already validated by the public ``modulated_conv2d``)."""
        if noise is None:
            noise_strength = None
        elif not isinstance(noise_strength, Tensor):
            noise_strength = torch.tensor(float(noise_strength), dtype=x.dtype)
        out, _, _ = modconv(x, weight, styles, noise, noise_strength, bias, skip, float(weight_gain),
                               bool(demodulate), int(up), activation == "lrelu", float(gain),
                               None if clamp is None else float(clamp), float(eps), conv_bf16(x.dtype))
        return out

    backends.register("modulated_conv2d", "cpu", modulated_conv2d, devices=("cpu",),
                      dtypes=(torch.float32, torch.float64, torch.bfloat16))
