"""Latent editing hook: move inverted codes along a W direction (InterfaceGAN boundaries, GANSpace components)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DIRECTION_KEYS = ("direction", "boundary", "lat_comp", "components")


def load_direction(path: str | os.PathLike, index: int | None = None) -> torch.Tensor:
    """A direction from ``.npy`` / ``.npz`` / ``.pt``: [D], [1, D] (InterfaceGAN boundary), [n_latent, D] (a W+
    direction), or a stack of K directions [K, D] / [K, 1, D] (GANSpace ``lat_comp``) from which ``index`` picks one.
    A ``.pt`` / ``.npz`` may hold a dict; the first of the keys direction, boundary, lat_comp, components is used.
    The direction is used as stored (InterfaceGAN and GANSpace store unit vectors): the strength is in its units.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"direction file not found: {path}")
    try:
        if path.suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: npz[k] for k in npz.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read direction file {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        key = next((k for k in DIRECTION_KEYS if k in obj), None)
        if key is None:
            raise ValueError(f"direction file {path} holds a dict without any of {DIRECTION_KEYS} (keys: {sorted(obj)})")
        obj = obj[key]
    t = torch.as_tensor(np.asarray(obj) if not isinstance(obj, torch.Tensor) else obj)
    if not t.is_floating_point() or t.dim() not in (1, 2, 3) or t.numel() == 0:
        raise ValueError(f"direction in {path} must be a float array [D], [1, D], [n_latent, D] or [K, (1,) D], "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.dim() == 3:
        if t.shape[1] != 1:
            raise ValueError(f"direction stack in {path} must be [K, 1, D], got {tuple(t.shape)}")
        t = t[:, 0]
    if index is not None:
        if t.dim() != 2 or not -t.shape[0] <= index < t.shape[0]:
            raise ValueError(f"direction index {index} out of range for {path} with shape {tuple(t.shape)}")
        t = t[index]
    return t.float()


def parse_layers(spec, n_latent: int) -> list[int]:
    """W+ layer indices from None (all), an int, a slice/range/list, or a string like "0-5", "0:6", "3,4,7"."""
    if spec is None:
        return list(range(n_latent))
    if isinstance(spec, int):
        idx = [spec]
    elif isinstance(spec, slice):
        idx = list(range(n_latent))[spec]
    elif isinstance(spec, str):
        idx = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                if ":" in part:  # Python slice, end exclusive
                    a, b = part.split(":", 1)
                    idx += list(range(n_latent))[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]
                elif "-" in part[1:]:  # inclusive range
                    a, b = part.split("-", 1)
                    idx += list(range(int(a), int(b) + 1))
                else:
                    idx.append(int(part))
            except ValueError:
                raise ValueError(f"layers {spec!r}: cannot read {part!r} (use e.g. '0-5', '0:6' or '3,4,7')") from None
    else:
        idx = [int(i) for i in spec]
    bad = [i for i in idx if not 0 <= i < n_latent]
    if bad or not idx:
        raise ValueError(f"layers {spec!r} must select W+ entries in 0..{n_latent - 1}, got {bad or 'none'}")
    return sorted(set(idx))


def apply_direction(latents: torch.Tensor, direction: torch.Tensor, strength: float | Sequence[float] | torch.Tensor,
                    layers=None) -> torch.Tensor:
    """``latents + strength · direction`` on the chosen W+ entries (InterfaceGAN / GANSpace-style editing).

    latents: W+ [B, n_latent, D], or W [B, D] (then without ``layers``: the code moves as a whole);
    direction: [D] / [1, D] (a W direction, the same for every selected layer) or [n_latent, D] (per layer);
    strength: a number, or one per image [B]; layers: None (every entry), an int, a slice, a list of indices,
    or a string "0-5" (inclusive range), "0:6" (Python slice), "3,4,7". Returns a new tensor; the input is
    unchanged. ``strength`` may be negative (the other way along the direction).
    """
    if not isinstance(latents, torch.Tensor) or latents.dim() not in (2, 3):
        raise ValueError(f"latents must be W [B, D] or W+ [B, n_latent, D], got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    w_plus = latents[:, None] if latents.dim() == 2 else latents
    batch, n_latent, dim = w_plus.shape
    d = torch.as_tensor(direction).to(latents.device, latents.dtype)
    if d.dim() == 2 and d.shape[0] == 1:
        d = d[0]
    if d.shape not in ((dim,), (n_latent, dim)) or (latents.dim() == 2 and d.dim() == 2):
        raise ValueError(f"direction must have shape [{dim}] or [1, {dim}]" +
                         (f" or [{n_latent}, {dim}]" if latents.dim() == 3 else "") + f", got {tuple(d.shape)}")
    s = torch.as_tensor(strength, dtype=latents.dtype, device=latents.device)
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] != batch):
        raise ValueError(f"strength must be a number or one per image [{batch}], got shape {tuple(s.shape)}")
    if latents.dim() == 2:
        if layers is not None:
            raise ValueError("layers needs W+ latents [B, n_latent, D] (expand the W code first)")
        return latents + (s.reshape(-1, 1) if s.dim() == 1 else s) * d
    s = s.reshape(-1, 1, 1) if s.dim() == 1 else s
    delta = s * (d if d.dim() == 2 else d[None])  # [B or 1, n or 1, D]
    mask = torch.zeros(w_plus.shape[1], 1, dtype=latents.dtype, device=latents.device)
    mask[parse_layers(layers, w_plus.shape[1])] = 1
    return w_plus + delta * mask
