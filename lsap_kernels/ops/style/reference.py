"""Plain-PyTorch style normalisation and SNCD (SPEC §4): the ground truth every kernel is tested against.

Differentiable by autograd (double backward included), any device, any floating dtype; float32 accumulation
for half inputs.
"""
from __future__ import annotations

import torch

from .layout import StyleLayout


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_norms(styles: torch.Tensor, layout: StyleLayout, eps: float) -> list[torch.Tensor]:
    """Per layer: (that layer's columns in the accumulation dtype, ||s|| clamped at eps as [B, 1])."""
    s = styles.to(_acc_dtype(styles.dtype))
    segs = torch.split(s, layout.channels, dim=1)
    return [(seg, torch.linalg.vector_norm(seg, dim=1, keepdim=True).clamp_min(eps)) for seg in segs]


def style_normalize(styles: torch.Tensor, layout: StyleLayout, eps: float = 1e-8) -> torch.Tensor:
    """ŝ_l = s_l / max(||s_l||, eps) for every layer of the packed styles; same shape and dtype."""
    out = torch.cat([seg / norm for seg, norm in segment_norms(styles, layout, eps)], dim=1)
    return out.to(styles.dtype)


def sncd_cosines(styles: torch.Tensor, anchors: torch.Tensor, layout: StyleLayout, eps: float = 1e-8) -> torch.Tensor:
    """c[b, l] = ŝ_bl · μ_l as [B, L] in the accumulation dtype."""
    mus = torch.split(anchors.to(_acc_dtype(styles.dtype)), layout.channels)
    return torch.cat([(seg * mu).sum(1, keepdim=True) / norm
                      for (seg, norm), mu in zip(segment_norms(styles, layout, eps), mus)], dim=1)
