"""Loading and saving rosinality-format generator checkpoints ({'g_ema': state_dict, 'latent_avg': w}); NVIDIA
``.pkl`` network snapshots load too, read as data (``nvidia_pkl``)."""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import torch

from ..ops.modconv.reference import fir_kernel
from .stylegan2 import Generator, config_f_channels


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # argparse.Namespace: rosinality's training checkpoints store their 'args' that way; it is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read checkpoint {path} as a torch.save file with weights only "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); expected a "
                         "rosinality-format dict {'g_ema': state_dict, 'latent_avg': tensor}") from exc
    if isinstance(ckpt, dict) and "g_ema" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and "style.1.weight" in ckpt:  # a bare generator state_dict
        return {"g_ema": ckpt}
    keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"checkpoint {path} holds no generator: expected a dict with 'g_ema' (rosinality format) "
                     f"or a generator state_dict, got {keys}")


def infer_config(state: dict) -> dict:
    """size, style_dim, n_mlp, channel table (and channel_multiplier when it is config-f's) from a state_dict."""
    try:
        style_dim = state["style.1.weight"].shape[1]
        n_mlp = sum(1 for k in state if re.fullmatch(r"style\.\d+\.weight", k))
        n_rgbs = sum(1 for k in state if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
        channels = {4: state["conv1.conv.weight"].shape[1]}
        for j in range(n_rgbs):
            channels[2 ** (j + 3)] = state[f"convs.{2 * j}.conv.weight"].shape[1]
    except KeyError as exc:
        raise ValueError(f"not a rosinality StyleGAN2 generator state_dict: missing {exc}") from None
    size = 2 ** (n_rgbs + 2)
    cfg = {"size": size, "style_dim": style_dim, "n_mlp": n_mlp}
    cm = channels[64] // 256 if 64 in channels else 2
    if all(config_f_channels(cm)[r] == c for r, c in channels.items()):
        cfg["channel_multiplier"] = cm
    else:
        cfg["channels"] = channels
    return cfg


def load_generator(path: str | os.PathLike, size: int | None = None, *, style_dim: int | None = None,
                   n_mlp: int | None = None, channel_multiplier: int | None = None, lr_mlp: float | None = None,
                   device: str | torch.device = "cpu", key: str = "g_ema") -> Generator:
    """Load a rosinality-format checkpoint (``torch.load(weights_only=True)``) or an NVIDIA stylegan2-ada/stylegan3
    ``.pkl`` snapshot (read as data, no code from the file runs; ``key`` "g_ema"/"G_ema" or "G") into a ``Generator``.

    The architecture is inferred from the weights; any argument given must agree with them (``lr_mlp``, which
    rosinality files do not record, defaults to 0.01).
    """
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        from .nvidia_pkl import read_nvidia_pickle

        ckpt, key = read_nvidia_pickle(path, {"g_ema": "G_ema", "g": "G"}.get(key, key)), "g_ema"
    else:
        ckpt = _read(path)
    if key not in ckpt:
        raise ValueError(f"checkpoint {path} has no {key!r} entry (it has {sorted(ckpt)})")
    state = ckpt[key]
    cfg = {**infer_config(state), **ckpt.get("lsap_config", {})}
    given = {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": channel_multiplier,
             "lr_mlp": lr_mlp}
    for name, value in given.items():
        if value is not None and cfg.get(name, value) != value:
            raise ValueError(f"checkpoint {path} is a generator with {name}={cfg[name]}, but {name}={value} was asked for")
    cfg.setdefault("lr_mlp", 0.01 if lr_mlp is None else lr_mlp)
    g = Generator(**cfg)
    expected = g.state_dict()
    bad = ([f"missing {k}" for k in expected if k not in state] + [f"unexpected {k}" for k in state if k not in expected]
           + [f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and v.shape != expected[k].shape])
    if bad:
        raise ValueError(f"checkpoint {path} does not match Generator({cfg}): " + ", ".join(bad[:10]) +
                         (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    g.load_state_dict(state)
    for name, buf in g.named_buffers():
        if name.endswith(".kernel") and not torch.allclose(buf, fir_kernel(1, buf.dtype, buf.device)[0, 0]):
            raise ValueError(f"checkpoint {path}: {name} is not the [1,3,3,1] up-sampling FIR these ops implement")
    if "latent_avg" in ckpt:
        g.latent_avg.copy_(ckpt["latent_avg"].reshape(-1))
    return g.to(device).eval()


def save_generator(generator: Generator, path: str | os.PathLike) -> None:
    """Write ``{'g_ema', 'latent_avg', 'lsap_config'}`` atomically (temporary file, then rename)."""
    path = Path(path)
    cfg = {"size": generator.size, "style_dim": generator.style_dim, "n_mlp": generator.n_mlp,
           "channels": dict(generator.channels), "lr_mlp": generator.lr_mlp, "conv_clamp": generator.conv_clamp}
    payload = {"g_ema": generator.state_dict(), "latent_avg": generator.latent_avg.detach().cpu(), "lsap_config": cfg}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
