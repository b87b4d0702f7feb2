"""Plain-PyTorch modulated convolution (SPEC §3): the ground truth every kernel is tested against.

Input scaling (u = x ⊙ s, one shared weight), never per-sample weights; autograd gives every gradient,
double backward included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rosinality/NVIDIA up-sampling FIR: [1,3,3,1] ⊗ [1,3,3,1] / 64, times up² = 4 to keep the DC gain.
FIR_1D = (1.0, 3.0, 3.0, 1.0)


def fir_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 4×4 up-sampling FIR as a depthwise weight [channels, 1, 4, 4]."""
    k1 = torch.tensor(FIR_1D, dtype=dtype, device=device)
    k2 = torch.outer(k1, k1) * (4.0 / k1.sum() ** 2)
    return k2.expand(channels, 1, 4, 4)


def upsample_fir(x: torch.Tensor) -> torch.Tensor:
    """upfirdn2d(x, FIR, up=2, pad=(2, 1)): zero-insertion ×2 then the FIR; [B,C,H,W] -> [B,C,2H,2W].

    As a strided transposed convolution: out[o] = Σ_i x[i]·K[o + 1 − 2i] (K symmetric, so no flip).
    """
    c = x.shape[1]
    return F.conv_transpose2d(x, fir_kernel(c, x.dtype, x.device), stride=2, padding=1, groups=c)


def conv_up(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Transposed conv stride 2 with ``w`` [Cout,Cin,k,k], then the FIR with rosinality's pads; -> [B,Cout,2H,2W]."""
    k = w.shape[-1]
    z = F.conv_transpose2d(u, w.transpose(0, 1), stride=2)  # [B, Cout, 2H+k-2, 2W+k-2]
    p = 3 - k  # len(FIR) - up - (k - 1)
    pad0, pad1 = (p + 1) // 2 + 1, p // 2 + 1
    z = F.pad(z, (pad0, pad1, pad0, pad1))
    return F.conv2d(z, fir_kernel(z.shape[1], z.dtype, z.device), groups=z.shape[1])


def demodulation(weight: torch.Tensor, styles: torch.Tensor, weight_gain: float, eps: float) -> torch.Tensor:
    """d[b,o] = (g² Σ_i s[b,i]² Q[o,i] + eps)^(-1/2), Q[o,i] = Σ_k W[o,i,k]²: one small GEMM, [B, Cout]."""
    q = weight.square().sum((2, 3))
    return torch.rsqrt(weight_gain**2 * (styles.square() @ q.t()) + eps)


def modulated_conv2d(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias, activation,
                     gain, clamp, eps, skip):
    k = weight.shape[-1]
    w = weight * weight_gain
    u = x * styles[:, :, None, None]
    z = F.conv2d(u, w, padding=k // 2) if up == 1 else conv_up(u, w)
    a = z * demodulation(weight, styles, weight_gain, eps)[:, :, None, None] if demodulate else z
    if noise is not None:
        a = a + noise_strength * noise
    if bias is not None:
        a = a + bias[None, :, None, None]
    out = F.leaky_relu(a, 0.2) if activation == "lrelu" else a
    if gain != 1:
        out = out * gain
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    if skip is not None:
        out = out + upsample_fir(skip)
    return out

