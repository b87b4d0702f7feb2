"""LPIPS (Zhang et al. 2018, v0.1) in plain PyTorch, with weights from local files only.

The ``lpips`` package builds its backbone through torchvision, and PyPI's torchvision wheels are built against
a CUDA torch of one exact version (they fail to import next to the CPU torch this project pins). So this module
re-implements the network — the same layers, the same input scaling, feature normalisation, linear heads and
spatial average — and loads the two published weight files as they are:

- the backbone: torchvision's ImageNet state_dict (``features.N.weight`` / ``features.N.bias``; the classifier
  is ignored), e.g. ``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth`` from download.pytorch.org/models/,
  or a full state_dict of ``lpips.LPIPS`` (``net.sliceK.N.*``, with or without the heads);
- the linear heads: the ``lpips`` package's ``weights/v0.1/{vgg,alex}.pth`` (``lin{k}.model.1.weight``), shipped
  inside its wheel: ``pip download lpips==0.1.4 --no-deps`` then unzip ``lpips/weights/v0.1/vgg.pth``.

Nothing is downloaded at run time: paths are arguments or ``$LSAP_LPIPS_BACKBONE`` / ``$LSAP_LPIPS_LIN``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

# torchvision's ``features`` (indices matter: they are the state_dict names) and LPIPS's taps (lpips
# pretrained_networks: the ReLU outputs ending each slice).
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
NETS = {
    "vgg": {"taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512), "file": "vgg16-397923af.pth"},
    "alex": {"taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256), "file": "alexnet-owt-7be5be79.pth"},
}


def _features(net: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    if net == "vgg":
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
    else:  # alex
        layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
                  nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
                  nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers[: NETS[net]["taps"][-1] + 1])


class _Lin(nn.Module):
    """lpips' NetLinLayer: ``model`` = (Dropout, 1×1 conv to one channel without bias) -> key ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """``LPIPS(net)(x, y)`` -> per-image distance [B] for images [B, 3, H, W] in [-1, 1] (lpips v0.1).

    Build it untrained and load weights with ``load_lpips``; ``state_dict`` names are torchvision's for the
    backbone (``features.*``) and lpips' for the heads (``lin{k}.model.1.weight``).
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net, self.name = net, f"lpips-{net}"
        self.features = _features(net)
        for k, c in enumerate(NETS[net]["channels"]):
            self.add_module(f"lin{k}", _Lin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, out = set(NETS[self.net]["taps"]), []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two image batches [B, 3, H, W] of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if self.net == "alex" and min(x.shape[-2:]) < 32:
            raise ValueError(f"LPIPS-alex needs images of at least 32x32, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        feats = self.taps(torch.cat([x, y]).sub(self.shift).div(self.scale))
        total = 0
        for k, f in enumerate(feats):
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)  # a zero norm has zero gradient
            diff = (f[:b] - f[b:]).square()
            total = total + getattr(self, f"lin{k}")(diff).mean((1, 2, 3))
        return total


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS {what} weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read LPIPS {what} weights {path} as a torch state_dict "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"LPIPS {what} weights {path} must be a state_dict of tensors, got {type(obj).__name__}")
    return obj


def _backbone_state(state: dict) -> dict:
    """``features.N.*`` (torchvision) or ``net.sliceK.N.*`` (lpips.LPIPS) -> ``features.N.*``."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        m = re.fullmatch(r"(?:features|net\.slice\d+)\.(\d+)\.(weight|bias)", k)
        if m:
            out[f"features.{m[1]}.{m[2]}"] = v
    return out


def _lin_state(state: dict) -> dict:
    """``lin{k}.model.{0,1}.weight`` or ``lins.{k}.model.{0,1}.weight`` -> ``lin{k}.model.1.weight``."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"(?:module\.)?lins?\.?(\d+)\.model\.[01]\.weight", k)
        if m:
            out[f"lin{m[1]}.model.1.weight"] = v
    return out


def load_lpips(net: str = "vgg", backbone: str | os.PathLike | None = None, lin: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with the ``net`` backbone ("vgg" or "alex") from local weight files (see the module docstring).

    ``backbone`` defaults to ``$LSAP_LPIPS_BACKBONE``; ``lin`` to ``$LSAP_LPIPS_LIN``, else to the backbone file
    when it also holds the heads (a full ``lpips.LPIPS`` state_dict). Every weight must be present with the
    right shape, or a ``ValueError`` names what is wrong.
    """
    model = LPIPS(net)
    backbone = backbone or os.environ.get("LSAP_LPIPS_BACKBONE")
    lin = lin or os.environ.get("LSAP_LPIPS_LIN")
    if not backbone:
        raise ValueError(f"LPIPS needs local weights (nothing is downloaded): pass the backbone file (torchvision's "
                         f"{NETS[net]['file']}) and the heads (lpips' weights/v0.1/{net}.pth), or set "
                         "$LSAP_LPIPS_BACKBONE and $LSAP_LPIPS_LIN; see the README (perceptual loss)")
    raw = _read(Path(backbone), "backbone")
    state = _backbone_state(raw)
    heads = _lin_state(raw)
    if lin:
        heads = _lin_state(_read(Path(lin), "linear-head"))
        if not heads:
            raise ValueError(f"LPIPS head weights {lin} hold no lin{{k}}.model.1.weight entries (lpips' "
                             f"weights/v0.1/{net}.pth has them)")
    if not heads:
        raise ValueError(f"LPIPS needs the linear heads: pass lin= (lpips' weights/v0.1/{net}.pth) or set $LSAP_LPIPS_LIN")
    state.update(heads)
    expected = model.state_dict()
    bad = [f"missing {k}" for k in expected if k not in state]
    bad += [f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}" for k, v in state.items()
            if k in expected and v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"LPIPS-{net} weights ({backbone}{', ' + str(lin) if lin else ''}) do not match the "
                         f"{net} network: " + ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    model.load_state_dict({k: state[k] for k in expected})
    return model.to(device).eval().requires_grad_(False)
