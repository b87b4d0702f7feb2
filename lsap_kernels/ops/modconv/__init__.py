"""StyleGAN2 modulated convolution with its epilogue (SPEC §3): one public function, one backend per kernel."""
from __future__ import annotations

import math

import torch

from ... import backends
from .._checks import check_choice, check_shape, check_tensor, describe
from . import reference

backends.register("modulated_conv2d", "reference", reference.modulated_conv2d)
from . import cpu  # noqa: E402,F401  (registers the "cpu" backend where the C++ extension loaded)
from . import triton  # noqa: E402,F401  (registers the "triton" backend where triton imports)

ACTIVATIONS = ("lrelu", "linear")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Backends whose kernels read float32 parameters next to 16-bit activations, converting them as they load: no cast
# launch (and its autograd node) per parameter and call. The others get the parameters cast to x's dtype here.
READS_FP32_PARAMETERS = ("triton",)


def as_parameter(t: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """``t`` (weight, styles, noise, noise strength or bias) as ``modulated_conv2d`` takes it next to activations
    of ``x_dtype``: as it is where its dtype is accepted (x's, or float32 with 16-bit x), else cast to x's."""
    return t if t.dtype == x_dtype or (t.dtype == torch.float32 and x_dtype in HALF_DTYPES) else t.to(x_dtype)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, weight_gain: float | None = None,
                     demodulate: bool = True, up: int = 1, noise: torch.Tensor | None = None,
                     noise_strength: float | torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     activation: str = "lrelu", gain: float | None = None, clamp: float | None = None,
                     eps: float = 1e-8, skip: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """out = clamp(gain · act(d ⊙ conv(x ⊙ s, g·W) + strength·noise + bias)) + upsample_fir(skip).

    x [B,Cin,H,W]; weight [Cout,Cin,k,k] (k odd); styles [B,Cin]; weight_gain g defaults to 1/sqrt(Cin·k²);
    d = demodulation coefficients (when ``demodulate``); ``up=2``: transposed conv stride 2 then the [1,3,3,1]
    FIR (rosinality/NVIDIA); noise [B or 1, 1, H·up, W·up] times ``noise_strength`` (default 1); bias [Cout];
    activation "lrelu" (slope 0.2, gain √2 by default) or "linear" (gain 1); clamp to ±clamp; skip
    [B, Cout, H·up/2, W·up/2] is FIR-upsampled ×2 and added last (toRGB).

    Output and skip have x's dtype. The parameters (weight, styles, noise, noise_strength, bias) have x's dtype
    or, with float16/bfloat16 x, float32 (``as_parameter``): mixed precision without a cast per call; each
    gradient comes back in its input's dtype.
    """
    check_tensor("x", x, ndim=4)
    batch, cin, h, w = x.shape
    param_dtypes = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    check_tensor("weight", weight, ndim=4, like=x, dtypes=param_dtypes)
    cout, k = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != cin or weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"weight must have shape [Cout, {cin}, k, k] with odd k (Cin from x {describe(x)}), "
                         f"got {describe(weight)}")
    check_tensor("styles", styles, ndim=2, like=x, dtypes=param_dtypes)
    check_shape("styles", styles, (batch, cin), "one scale per sample and input channel")
    check_choice("up", up, (1, 2))
    check_choice("activation", activation, ACTIVATIONS)
    ho, wo = h * up, w * up
    if noise is not None:
        check_tensor("noise", noise, ndim=4, like=x, dtypes=param_dtypes)
        if noise.shape[0] not in (1, batch) or noise.shape[1:] != (1, ho, wo):
            raise ValueError(f"noise must have shape [{batch} or 1, 1, {ho}, {wo}] (the output size), got {describe(noise)}")
    if noise_strength is None:
        noise_strength = 1.0
    elif isinstance(noise_strength, torch.Tensor) and noise_strength.numel() != 1:
        raise ValueError(f"noise_strength must be a number or a one-element tensor, got {describe(noise_strength)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=x, dtypes=param_dtypes)
        check_shape("bias", bias, (cout,), "one per output channel")
    if skip is not None:
        check_tensor("skip", skip, ndim=4, like=x)
        if ho % 2 or wo % 2:
            raise ValueError(f"skip needs an even output size, got {ho}x{wo}")
        check_shape("skip", skip, (batch, cout, ho // 2, wo // 2), "half the output size, up-sampled and added")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be None or > 0, got {clamp!r}")
    if weight_gain is None:
        weight_gain = 1.0 / math.sqrt(cin * k * k)
    if gain is None:
        gain = math.sqrt(2.0) if activation == "lrelu" else 1.0
    if isinstance(noise_strength, torch.Tensor):
        noise_strength = noise_strength.reshape(())
    name, fn = backends.select("modulated_conv2d", x.device, x.dtype, backend)
    if name not in READS_FP32_PARAMETERS and x.dtype in HALF_DTYPES:
        weight, styles = weight.to(x.dtype), styles.to(x.dtype)
        noise, bias = (None if t is None else t.to(x.dtype) for t in (noise, bias))
        if isinstance(noise_strength, torch.Tensor):
            noise_strength = noise_strength.to(x.dtype)
    return fn(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias, activation, gain, clamp,
              eps, skip)
