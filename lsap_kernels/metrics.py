"""SNCD as a metric with cached anchors, and as a loss module (LSAP_O inversion, LSAP_E encoder training)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .ops.style import sncd, style_anchors


def weights_hash(generator: nn.Module) -> str:
    """sha256 over the generator's state_dict (names, dtypes, shapes and bytes, in order): the anchors' key."""
    h = hashlib.sha256()
    for name, t in generator.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSAP_CACHE_DIR", Path.home() / ".cache" / "lsap_kernels"))


def cached_anchors(generator: nn.Module, layers: str = "lsap", n_samples: int = 100_000, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, batch_size: int = 4096) -> torch.Tensor:
    """``style_anchors`` computed once per (generator weights, layers, n_samples, seed) and kept in
    ``cache_dir`` (default ``$LSAP_CACHE_DIR`` or ``~/.cache/lsap_kernels``); ``cache_dir=False`` disables it."""
    device = next(generator.parameters()).device
    path = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / f"anchors-{weights_hash(generator)[:32]}-{layers}-n{n_samples}-seed{seed}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)["anchors"].to(device)
    anchors = style_anchors(generator, n_samples=n_samples, layers=layers, batch_size=batch_size, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"anchors": anchors.cpu(), "layers": layers, "n_samples": n_samples, "seed": seed}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return anchors


class SNCDLoss(nn.Module):
    """λ-free SNCD of W+ (or W) codes against fixed anchors: differentiable w.r.t. the codes (and the generator's
    affine layers), reduced per ``layer_reduction`` / ``batch_reduction``.

    ``SNCDLoss(generator)`` computes (or loads cached) anchors; pass ``anchors=`` to reuse a tensor.
    """

    def __init__(self, generator: nn.Module, layers: str = "lsap", anchors: torch.Tensor | None = None,
                 layer_reduction: str = "mean", batch_reduction: str = "mean", n_samples: int = 100_000,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__()
        self.__dict__["generator"] = generator  # used, not owned: not a submodule, so not in parameters()
        self.layers, self.layer_reduction, self.batch_reduction = layers, layer_reduction, batch_reduction
        self.layout = generator.style_layout(layers)
        if anchors is None:
            anchors = cached_anchors(generator, layers, n_samples, cache_dir=cache_dir)
        if anchors.shape != (self.layout.total_channels,):
            raise ValueError(f"anchors must have shape [{self.layout.total_channels}] for layers={layers!r}, "
                             f"got {tuple(anchors.shape)}")
        # on the generator's device from the start: a per-call host-to-device copy would stall every step
        device = next(generator.parameters()).device
        self.register_buffer("anchors", anchors.detach().to(device, torch.float32, copy=True), persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        styles, layout = self.generator.style_space(codes, self.layers)
        return sncd(styles, self.anchors.to(styles.device), layout, self.layer_reduction, self.batch_reduction)


class SNCD(SNCDLoss):
    """The metric: ``SNCD(generator)(codes)`` -> per-code SNCD [B] (mean over layers), without gradients."""

    def __init__(self, generator: nn.Module, layers: str = "lsap", **kwargs):
        kwargs.setdefault("batch_reduction", "none")
        super().__init__(generator, layers, **kwargs)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(codes)
