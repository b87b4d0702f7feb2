"""Image files: tensors in [-1, 1] to PNG (atomically) and image grids."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile [N, 3, H, W] images into one uint8 [rows·(H+pad)+pad, ncol·(W+pad)+pad, 3] picture."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    return out


def save_png(picture: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 [H, W, 3] array as PNG via a temporary file and a rename: never a half-written file."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(picture).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
