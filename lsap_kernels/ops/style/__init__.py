"""Style normalisation into S^N, SNCD and its anchors (SPEC §4) on packed all-layer styles."""
from __future__ import annotations

import torch

from ... import backends
from .._checks import check_choice, check_tensor, describe
from . import cpu, cuda, reference, triton  # noqa: F401  (importing a backend registers it, where it can run)
from .layout import StyleLayout

REDUCTIONS = ("mean", "sum", "none")

backends.register("style_normalize", "reference", reference.style_normalize)
backends.register("sncd", "reference", reference.sncd_cosines)


def _check_layout(layout) -> StyleLayout:
    if not isinstance(layout, StyleLayout):
        raise TypeError(f"layout must be a StyleLayout (from Generator.style_space or StyleLayout.from_channels), "
                        f"got {type(layout).__name__}")
    return layout


def style_normalize(styles: torch.Tensor, layout: StyleLayout, *, eps: float = 1e-8,
                    backend: str | None = None) -> torch.Tensor:
    """Project every layer's style vector onto the unit sphere: ŝ_l = s_l / max(||s_l||, eps).

    styles: [B, C_total] packed by ``layout``. Returns the same shape and dtype.
    """
    _check_layout(layout).check_styles("styles", styles)
    _, fn = backends.select("style_normalize", styles.device, styles.dtype, backend)
    return fn(styles, layout, eps)


def sncd(styles: torch.Tensor, anchors: torch.Tensor, layout: StyleLayout, layer_reduction: str = "mean",
         batch_reduction: str = "mean", *, eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    """S^N cosine distance 1 − ŝ_bl·μ_l, reduced over layers then batch ("mean" | "sum" | "none").

    styles [B, C_total]; anchors [C_total] packed like the styles. Result in float32 (float64 for float64
    styles): [] for two reductions, [B] with ``batch_reduction="none"``, [L] with ``layer_reduction="none"``,
    [B, L] with both "none".
    """
    _check_layout(layout).check_styles("styles", styles)
    check_tensor("anchors", anchors, ndim=1)
    if anchors.shape[0] != layout.total_channels or anchors.device != styles.device:
        raise ValueError(f"anchors must have shape [{layout.total_channels}] on {styles.device} (packed like the "
                         f"styles), got {describe(anchors)}")
    check_choice("layer_reduction", layer_reduction, REDUCTIONS)
    check_choice("batch_reduction", batch_reduction, REDUCTIONS)
    _, fn = backends.select("sncd", styles.device, styles.dtype, backend)
    dist = 1 - fn(styles, anchors, layout, eps)  # [B, L]
    if layer_reduction != "none":
        dist = dist.mean(1) if layer_reduction == "mean" else dist.sum(1)
    if batch_reduction != "none":
        dist = dist.mean(0) if batch_reduction == "mean" else dist.sum(0)
    return dist


@torch.no_grad()
def style_anchors(generator, n_samples: int = 100_000, layers: str = "lsap", batch_size: int = 4096,
                  seed: int = 0, *, eps: float = 1e-8) -> torch.Tensor:
    """μ = mean over ``n_samples`` synthetic codes (z ~ N(0, I) from a CPU generator seeded by ``seed``) of
    the normalised styles, packed like ``generator.style_space(w, layers)``; float32 [C_total].

    Accumulated in float64 chunk by chunk, so 1e5+ samples do not drift.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got n_samples={n_samples}, batch_size={batch_size}")
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    total = None
    for start in range(0, n_samples, batch_size):
        n = min(batch_size, n_samples - start)
        z = torch.randn(n, generator.style_dim, generator=rng).to(device)
        styles, layout = generator.style_space(generator.mapping(z), layers=layers)
        part = style_normalize(styles, layout, eps=eps).sum(0, dtype=torch.float64)
        total = part if total is None else total + part
    return (total / n_samples).float()
