"""NVIDIA stylegan2-ada-pytorch / stylegan3 network pickles (``.pkl``) read as data, never as code.

NVIDIA's own loader rebuilds every network object by executing the Python source stored in the file
(``module_src``). Here a restricted unpickler resolves only an explicit allow-list of globals, each to a small
function of ours that builds plain data (tensors, dicts, numbers); the persistence reconstructor returns the
object's recorded ``__dict__`` as a :class:`PersistentObject` and never touches ``module_src``. Any other global
is refused before anything is called. :func:`read_nvidia_pickle` then maps a StyleGAN2 ``G_ema`` onto our
rosinality-layout state_dict (same weights, same lr-multiplier and gain conventions: no rescaling).
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch


class NetworkPickleError(ValueError):
    """A ``.pkl`` we cannot (or will not) read as a StyleGAN2 network snapshot; the message names file and field."""


class PersistentObject:
    """One NVIDIA ``@persistent_class`` object as data: its class name and its ``__dict__`` (``state``)."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r}, modules={sorted(self.modules)})"

    @property
    def modules(self) -> dict:
        return self.state.get("_modules") or {}

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and buffers of this object and its submodules, by dotted name (like ``state_dict``)."""
        out = {}
        for group in ("_parameters", "_buffers"):
            out.update({prefix + k: v for k, v in (self.state.get(group) or {}).items() if v is not None})
        for name, sub in self.modules.items():
            if isinstance(sub, PersistentObject):
                out.update(sub.tensors(f"{prefix}{name}."))
        return out


# ---- the allow-list: every global a genuine snapshot names, each resolved to a data-only function --------------
def _refuse(what: str):
    raise NetworkPickleError(what)


def _persistent_obj(meta):
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: ``module_src`` is never used."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        _refuse("malformed persistent object (expected meta with type='class', class_name and a state dict)")
    return PersistentObject(meta["class_name"], dict(meta["state"]))


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dict (its attributes live in its items)."""

    def __setstate__(self, state):
        pass


def _load_from_bytes(blob):
    """``torch.storage._load_from_bytes``: each storage is a legacy ``torch.save`` blob; read with weights only."""
    if not isinstance(blob, bytes):
        _refuse(f"tensor storage must be bytes, got {type(blob).__name__}")
    try:
        storage = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        _refuse(f"refusing global {found.group(1)} inside a tensor storage" if found else
                f"a tensor storage is not plain weights ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if not isinstance(storage, torch.storage.TypedStorage):
        _refuse(f"a tensor storage blob holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` without hooks: a view of the storage (bounds checked by ``set_``)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        _refuse(f"tensor built from a {type(storage).__name__}, not a storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not isinstance(data, torch.Tensor):
        _refuse(f"parameter built from a {type(data).__name__}, not a tensor")
    return data


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        _refuse(f"numpy.dtype({spec!r}) is not a plain dtype")
    return np.dtype(spec, bool(align), True)  # always a copy: BUILD then sets its state, never a shared singleton


def _np_scalar(dtype, data=None):
    if not (isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        _refuse(f"numpy scalar of dtype {dtype!r} is not plain data")
    return np.frombuffer(data, dtype)[0]


_NDARRAY = object()  # "numpy.ndarray" resolves to this marker: usable only as _reconstruct's first argument


def _np_reconstruct(cls, shape, typecode):
    """numpy's ``_reconstruct``: an empty array that BUILD then fills from bytes (StyleGAN3 files store some)."""
    if cls is not _NDARRAY:
        _refuse("numpy _reconstruct is allowed only for numpy.ndarray")
    return np.ndarray((0,), np.uint8)


def _latin1(text, encoding="utf-8"):  # protocol 2 writes bytes as _codecs.encode(str, 'latin1')
    if not (isinstance(text, str) and encoding == "latin1"):
        _refuse("_codecs.encode is allowed only for protocol-2 bytes (str, 'latin1')")
    return text.encode("latin1")


def _set(items=()):
    return set(items)


def _frozenset(items=()):
    return frozenset(items)


def _bytes(*args):
    if args:
        _refuse("builtins.bytes is allowed only without arguments (protocol-2 empty bytes)")
    return b""


ALLOWED_GLOBALS = {
    "torch_utils.persistence._reconstruct_persistent_obj": _persistent_obj,
    "dnnlib.util.EasyDict": _EasyDict,
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch.storage._load_from_bytes": _load_from_bytes,
    "numpy.dtype": _np_dtype,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.ndarray": _NDARRAY,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    # protocol 2 spells these as globals (later protocols have opcodes)
    "_codecs.encode": _latin1, "builtins.set": _set, "builtins.frozenset": _frozenset, "builtins.bytes": _bytes,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # protocol 2 names (we bypass fix_imports)
        fn = ALLOWED_GLOBALS.get(f"{module}.{name}")
        if fn is None:
            hint = (" (a TensorFlow-era StyleGAN pickle: convert it with NVIDIA's legacy.py first)"
                    if module.startswith("dnnlib.tflib") else "")
            _refuse(f"refusing global {module}.{name}: not plain network data{hint}; nothing from the file was run")
        return fn

    def persistent_load(self, pid):
        _refuse(f"refusing persistent id {str(pid)[:60]!r}")


def load_network_pickle(path: str | Path) -> dict:
    """The top-level dict of an NVIDIA snapshot, with every network as a :class:`PersistentObject` tree."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network pickle not found: {path}")
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
            data = _DataUnpickler(f).load()
    except NetworkPickleError as exc:
        raise NetworkPickleError(f"NVIDIA network pickle {path}: {exc}") from None
    except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, RuntimeError from set_, ...
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise NetworkPickleError(f"could not read {path} as an NVIDIA network pickle ({type(exc).__name__}: {msg})"
                                 ) from exc
    if not isinstance(data, dict):
        raise NetworkPickleError(f"{path}: expected a snapshot dict with 'G_ema', got {type(data).__name__}")
    return data


# ---- G_ema -> rosinality layout ---------------------------------------------------------------------------------
_FIR = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64  # NVIDIA's setup_filter([1,3,3,1])


def read_nvidia_pickle(path: str | Path, key: str = "G_ema") -> dict:
    """An NVIDIA StyleGAN2 snapshot as a rosinality-format checkpoint ``{'g_ema', 'latent_avg', 'lsap_config'}``.

    ``key``: which network ("G_ema", the one to invert, or "G"). Conditional, non-'skip', non-RGB and StyleGAN3
    generators are refused; every architectural attribute the conversion relies on is checked.
    """
    path = Path(path)
    data = load_network_pickle(path)
    nets = [k for k, v in data.items() if isinstance(v, PersistentObject)]
    if not isinstance(data.get(key), PersistentObject):
        raise NetworkPickleError(f"{path} has no network {key!r} (networks in it: {nets}, "
                                 f"keys: {sorted(map(str, data))})")
    try:
        return _convert(data[key])
    except NetworkPickleError as exc:
        raise NetworkPickleError(f"{path} [{key}]: {exc}") from None


def _num(obj: PersistentObject, attr: str, where: str):
    v = obj.state.get(attr)
    if v is None:
        return None
    if not isinstance(v, (int, float, np.number)) or isinstance(v, bool):
        _refuse(f"{where}.{attr} is {v!r}, expected a number")
    return float(v)


def _expect(cond: bool, msg: str):
    if not cond:
        _refuse(msg)


def _convert(g: PersistentObject) -> dict:
    _expect(g.class_name == "Generator", f"network is a {g.class_name!r}, not a Generator")
    syn, mp = g.modules.get("synthesis"), g.modules.get("mapping")
    _expect(isinstance(syn, PersistentObject) and isinstance(mp, PersistentObject),
            "Generator without 'synthesis' and 'mapping' submodules")
    if "input" in syn.modules or "layer_names" in syn.state:
        _refuse("a StyleGAN3 ('T'/'R' config) generator: it has no StyleGAN2/rosinality equivalent")
    c_dim = _num(g, "c_dim", "G") or _num(mp, "c_dim", "mapping") or 0
    _expect(c_dim == 0 and mp.modules.get("embed") is None,
            f"a conditional generator (c_dim={c_dim:g}): rosinality's StyleGAN2 has no label input")
    _expect((_num(g, "img_channels", "G") or 3) == 3, f"img_channels={g.state.get('img_channels')}, expected 3 (RGB)")
    t = g.tensors()
    need = lambda name: t[name] if name in t else _refuse(f"missing {name}")  # noqa: E731

    # mapping: fc0..fc{n-1}, lrelu, one lr multiplier (bias_gain = lr, weight_gain = lr/sqrt(in))
    n_mlp = sum(1 for k in mp.modules if re.fullmatch(r"fc\d+", k))
    _expect(n_mlp > 0 and all(f"fc{i}" in mp.modules for i in range(n_mlp)), "mapping has no fc0..fcN layers")
    style_dim = need("mapping.fc0.weight").shape[1]
    lrs = set()
    for i in range(n_mlp):
        fc, where = mp.modules[f"fc{i}"], f"mapping.fc{i}"
        _expect(fc.state.get("activation") == "lrelu", f"{where}.activation is {fc.state.get('activation')!r}, "
                                                       "rosinality's mapping uses 'lrelu'")
        _expect(tuple(need(f"{where}.weight").shape) == (style_dim, style_dim),
                f"{where}.weight has shape {tuple(t[f'{where}.weight'].shape)}; rosinality needs z_dim = w_dim = "
                f"layer_features = {style_dim}")
        lr = _num(fc, "bias_gain", where)
        _expect(lr is not None and math.isclose(_num(fc, "weight_gain", where) or 0, lr / math.sqrt(style_dim),
                                                rel_tol=1e-6), f"{where} has an unexpected weight_gain/bias_gain")
        lrs.add(lr)
    _expect(len(lrs) == 1, f"mapping layers use different lr multipliers {sorted(lrs)}")

    # synthesis: blocks b4..b{size}, 'skip' architecture, [1,3,3,1] filters, 3x3 convs, 1x1 toRGB
    res = sorted(int(k[1:]) for k in syn.modules if re.fullmatch(r"b\d+", k))
    _expect(len(res) >= 2 and res == [2**i for i in range(2, len(res) + 2)], f"synthesis blocks {res}, expected b4..bN")
    for name, v in t.items():
        if name.endswith("resample_filter"):
            _expect(v.shape == (4, 4) and torch.allclose(v.float(), _FIR), f"{name} is not the [1,3,3,1] FIR")
    for r in res:
        arch = syn.modules[f"b{r}"].state.get("architecture", "skip")
        _expect(arch == "skip", f"synthesis.b{r}.architecture is {arch!r}: only 'skip' (config-f) generators have a "
                                "rosinality equivalent")
    clamps, sd, channels, noise_i = set(), {}, {}, 0

    def module(r: int, name: str):
        obj = syn.modules[f"b{r}"].modules.get(name)
        _expect(isinstance(obj, PersistentObject), f"missing layer synthesis.b{r}.{name}")
        clamps.add(_num(obj, "conv_clamp", f"synthesis.b{r}.{name}"))
        return obj, f"synthesis.b{r}.{name}"

    def affine(obj: PersistentObject, src: str, dst: str):
        aff = obj.modules.get("affine")
        _expect(isinstance(aff, PersistentObject) and _num(aff, "bias_gain", f"{src}.affine") == 1.0
                and aff.state.get("activation", "linear") == "linear",
                f"{src}.affine must be a linear FullyConnectedLayer with lr multiplier 1")
        sd[f"{dst}.conv.modulation.weight"] = need(f"{src}.affine.weight")
        sd[f"{dst}.conv.modulation.bias"] = need(f"{src}.affine.bias")

    def conv(r: int, name: str, dst: str, up: int) -> int:
        nonlocal noise_i
        obj, src = module(r, name)
        _expect(obj.state.get("activation") == "lrelu" and _num(obj, "up", src) == up,
                f"{src}: expected activation 'lrelu' and up={up}")
        w = need(f"{src}.weight")
        _expect(w.shape[-2:] == (3, 3), f"{src}.weight has shape {tuple(w.shape)}, expected 3x3 kernels")
        affine(obj, src, dst)
        sd[f"{dst}.conv.weight"] = w[None]
        sd[f"{dst}.activate.bias"] = need(f"{src}.bias")
        if obj.state.get("use_noise", True):
            sd[f"{dst}.noise.weight"] = need(f"{src}.noise_strength").reshape(1)
            sd[f"noises.noise_{noise_i}"] = need(f"{src}.noise_const")[None, None]
        else:  # no noise input: strength 0 reproduces it exactly
            sd[f"{dst}.noise.weight"], sd[f"noises.noise_{noise_i}"] = torch.zeros(1), torch.zeros(1, 1, r, r)
        noise_i += 1
        return w.shape[0]

    def torgb(r: int, dst: str):
        obj, src = module(r, "torgb")
        w = need(f"{src}.weight")
        _expect(w.shape[0] == 3 and w.shape[-2:] == (1, 1),
                f"{src}.weight has shape {tuple(w.shape)}, expected [3, C, 1, 1]")
        _expect(math.isclose(_num(obj, "weight_gain", src) or 0, 1 / math.sqrt(w.shape[1]), rel_tol=1e-6),
                f"{src}.weight_gain is not 1/sqrt(in_channels)")
        affine(obj, src, dst)
        sd[f"{dst}.conv.weight"] = w[None]  # NVIDIA scales the style by 1/sqrt(Cin), rosinality the weight: same
        sd[f"{dst}.bias"] = need(f"{src}.bias").reshape(1, 3, 1, 1)

    for i in range(n_mlp):
        sd[f"style.{i + 1}.weight"] = need(f"mapping.fc{i}.weight")
        sd[f"style.{i + 1}.bias"] = need(f"mapping.fc{i}.bias")
    sd["input.input"] = need("synthesis.b4.const")[None]
    channels[4] = conv(4, "conv1", "conv1", 1)
    torgb(4, "to_rgb1")
    for j, r in enumerate(res[1:]):
        conv(r, "conv0", f"convs.{2 * j}", 2)
        channels[r] = conv(r, "conv1", f"convs.{2 * j + 1}", 1)
        torgb(r, f"to_rgbs.{j}")
    _expect(len(clamps) == 1, f"layers use different conv_clamp values {sorted(clamps, key=str)}")
    # rosinality's up-sampling FIR buffers (not stored by NVIDIA; checked equal above)
    fir = _FIR * 4
    sd.update({f"convs.{2 * j}.conv.blur.kernel": fir.clone() for j in range(len(res) - 1)})
    sd.update({f"to_rgbs.{j}.upsample.kernel": fir.clone() for j in range(len(res) - 1)})
    for k, v in sd.items():
        _expect(v.is_floating_point(), f"tensor for {k} has dtype {v.dtype}")
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
    latent_avg = t.get("mapping.w_avg", torch.zeros(style_dim)).detach().to(torch.float32).reshape(-1).clone()
    cfg = {"size": res[-1], "style_dim": style_dim, "n_mlp": n_mlp, "lr_mlp": lrs.pop(), "channels": channels,
           "conv_clamp": clamps.pop()}
    return {"g_ema": state, "latent_avg": latent_avg, "lsap_config": cfg}
