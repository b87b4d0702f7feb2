"""Run an existing rosinality-style StyleGAN2 on ``modulated_conv2d``, in place: ``patch_stylegan2(model)``.

rosinality's layers are recognised by class name (``StyledConv``, ``ToRGB``, ``ModulatedConv2d``) and checked by
structure: children, parameters, forward signature, demodulation eps, FIR kernels and pads, leaky-ReLU slope. Their
instance ``forward`` is then set to one that computes the same thing with one fused call (StyledConv: modulation,
demodulation, conv, FIR up-sampling, noise·weight, bias, leaky-ReLU·scale; ToRGB: 1×1 conv, bias, FIR-up-sampled
skip) from the module's own parameters, so weights, state_dict, optimisers and hooks on the patched modules stay as
they are. Anything that does not match is refused with the module's path before any module is touched: a silently
different image is the one failure a drop-in must not have. No import of rosinality's code is needed.
"""
from __future__ import annotations

import inspect
import numbers
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from . import backends
from .models import stylegan2 as ours
from .ops.modconv import as_parameter, modulated_conv2d
from .ops.modconv.reference import fir_kernel

PATCHABLE = ("StyledConv", "ToRGB", "ModulatedConv2d")
DEMOD_EPS = 1e-8  # rosinality adds a literal 1e-8 inside the demodulation rsqrt
_STATE = "_lsap_patch"  # instance attribute of a patched module


# ---- the [1,3,3,1] FIR ---------------------------------------------------------------------------------
def fir_problem(kernel) -> str | None:
    """Why ``kernel`` is not the up-sampling FIR the fused op applies, or None when it is."""
    if not isinstance(kernel, torch.Tensor):
        return f"its FIR kernel is a {type(kernel).__name__}, not a tensor"
    if kernel.shape != (4, 4):
        return f"its FIR kernel has shape {tuple(kernel.shape)}; the fused op applies only the 4×4 [1,3,3,1] FIR"
    fir = fir_kernel(1, torch.float64, torch.device("cpu"))[0, 0]
    if kernel.is_meta or not torch.equal(kernel.detach().to("cpu", torch.float64), fir):
        return ("its FIR kernel is not make_kernel([1,3,3,1])·4 (blur_kernel other than [1,3,3,1]); "
                "the fused op applies only that FIR")
    return None


def refuse_other_fir(key: str):
    """A load_state_dict pre-hook refusing a state_dict whose ``prefix + key`` FIR kernel is not [1,3,3,1]: the
    fused op ignores the buffer, so loading another kernel would silently change nothing."""

    def hook(module, state_dict, prefix, *_):
        value = state_dict.get(prefix + key)
        why = None if value is None else fir_problem(value)
        if why is not None:
            raise ValueError(f"state_dict entry {prefix + key!r} for {type(module).__name__}: {why}")

    return hook


# ---- structural checks: the reason a module is not the rosinality layer we can fuse, or None -----------------------
def _children(m: nn.Module) -> set[str]:
    return {n for n, c in m.named_children() if c is not None}


def _params(m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters(recurse=False) if p is not None}


def _signature_problem(m: nn.Module, required: int, optional: str | None) -> str | None:
    """rosinality's forwards take ``required`` positional arguments plus, for StyledConv/ToRGB/NoiseInjection, one
    optional one named ``optional`` with default None; a variant with other arguments computes something else."""
    try:
        sig = inspect.signature(type(m).forward)
    except (TypeError, ValueError):
        return f"{type(m).__name__}.forward has no inspectable signature"
    params = list(sig.parameters.values())[1:]
    ok = len(params) == required + (optional is not None)
    ok = ok and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    ok = ok and all(p.default is p.empty for p in params[:required])
    if ok and optional is not None:
        ok = params[-1].name == optional and params[-1].default is None
    if not ok:
        want = ", ".join(["self", *(f"arg{i}" for i in range(required))] + ([f"{optional}=None"] if optional else []))
        return f"{type(m).__name__}.forward{sig} differs from rosinality's forward({want})"
    return None


def _modconv_problem(m: nn.Module) -> str | None:
    if _children(m) - {"modulation", "blur"} or "modulation" not in _children(m):
        return f"its children are {sorted(_children(m))}; expected modulation (and blur when upsampling)"
    if _params(m) != {"weight"} or dict(m.named_buffers(recurse=False)):
        return "its own parameters/buffers are not exactly `weight`"
    weight = m.weight
    if weight.dim() != 5 or weight.shape[0] != 1 or weight.shape[3] != weight.shape[4] or weight.shape[3] % 2 == 0:
        return f"weight has shape {tuple(weight.shape)}; expected [1, Cout, Cin, k, k] with odd k"
    if getattr(m, "downsample", False):
        return "downsample=True is not supported (the fused op convolves at the same resolution or up-samples ×2)"
    for name in ("upsample", "demodulate"):
        if not isinstance(getattr(m, name, None), bool):
            return f"its `{name}` attribute is {getattr(m, name, 'missing')!r}; expected a bool"
    if not isinstance(getattr(m, "scale", None), numbers.Real):
        return f"its `scale` attribute is {getattr(m, 'scale', 'missing')!r}; expected a number"
    if getattr(m, "eps", DEMOD_EPS) != DEMOD_EPS:
        return f"eps = {m.eps!r}; rosinality's demodulation uses 1e-8"
    k = weight.shape[3]
    if getattr(m, "padding", k // 2) != k // 2:
        return f"padding = {m.padding!r}; expected kernel_size // 2 = {k // 2}"
    if m.upsample:
        blur = getattr(m, "blur", None)
        if type(blur).__name__ != "Blur":
            return f"upsample=True but its blur is a {type(blur).__name__}; expected rosinality's Blur"
        p = 3 - k  # len(FIR) - factor - (k - 1), as rosinality pads after the stride-2 transposed conv
        pad = ((p + 1) // 2 + 1, p // 2 + 1)
        if tuple(getattr(blur, "pad", ())) != pad:
            return f"blur.pad = {getattr(blur, 'pad', None)!r}; rosinality's up-sampling uses {pad} for k={k}"
        why = fir_problem(getattr(blur, "kernel", None))
        if why:
            return f"blur: {why}"
    elif "blur" in _children(m):
        return "it has a blur but upsample=False"
    return _signature_problem(m, 2, None)


def _styled_conv_problem(m: nn.Module) -> str | None:
    if _children(m) != {"conv", "noise", "activate"} or _params(m) or dict(m.named_buffers(recurse=False)):
        return (f"its children are {sorted(_children(m))} (own parameters {sorted(_params(m))}); "
                "expected exactly conv, noise, activate")
    conv, noise, act = m.conv, m.noise, m.activate
    if type(conv).__name__ != "ModulatedConv2d":  # checked on its own path as a ModulatedConv2d
        return f"conv is a {type(conv).__name__}; expected ModulatedConv2d"
    if type(noise).__name__ != "NoiseInjection" or _params(noise) != {"weight"} or noise.weight.numel() != 1:
        return "noise is not a NoiseInjection with a one-element `weight`"
    why = _signature_problem(noise, 1, "noise")
    if why:
        return f"noise: {why}"
    if type(act).__name__ != "FusedLeakyReLU" or _children(act):
        return f"activate is a {type(act).__name__}; expected FusedLeakyReLU"
    if getattr(act, "negative_slope", None) != 0.2:
        return (f"activate.negative_slope = {getattr(act, 'negative_slope', None)!r}; "
                "the fused op's leaky ReLU has slope 0.2")
    if not isinstance(getattr(act, "scale", None), numbers.Real):
        return f"activate.scale = {getattr(act, 'scale', None)!r}; expected a number"
    bias = getattr(act, "bias", None)
    if bias is not None and bias.shape != (conv.weight.shape[1],):
        return f"activate.bias has shape {tuple(bias.shape)}; expected [{conv.weight.shape[1]}]"
    return _signature_problem(m, 2, "noise")


def _to_rgb_problem(m: nn.Module) -> str | None:
    if _children(m) - {"conv", "upsample"} or "conv" not in _children(m) or _params(m) != {"bias"}:
        return (f"its children are {sorted(_children(m))} and parameters {sorted(_params(m))}; "
                "expected conv (and upsample) and bias")
    conv = m.conv
    if type(conv).__name__ != "ModulatedConv2d":  # checked on its own path as a ModulatedConv2d
        return f"conv is a {type(conv).__name__}; expected ModulatedConv2d"
    if m.bias.shape != (1, conv.weight.shape[1], 1, 1):
        return f"bias has shape {tuple(m.bias.shape)}; expected [1, {conv.weight.shape[1]}, 1, 1]"
    if "upsample" in _children(m):
        up = m.upsample
        if type(up).__name__ != "Upsample" or getattr(up, "factor", None) != 2:
            return "upsample is not rosinality's Upsample with factor 2"
        if tuple(getattr(up, "pad", ())) != (2, 1):
            return f"upsample.pad = {getattr(up, 'pad', None)!r}; rosinality's [1,3,3,1] up-sampling uses (2, 1)"
        why = fir_problem(getattr(up, "kernel", None))
        if why:
            return f"upsample: {why}"
    return _signature_problem(m, 2, "skip")


_PROBLEM = {"StyledConv": _styled_conv_problem, "ToRGB": _to_rgb_problem, "ModulatedConv2d": _modconv_problem}


# ---- the fused forwards (set as instance methods of the patched modules) -------------------------------------------
def _conv_inputs(conv: nn.Module, x: torch.Tensor, style: torch.Tensor):
    """(x, weight, styles) and the conv's keyword arguments; parameters as modulated_conv2d takes them next to x."""
    dt = x.dtype
    return ((x, as_parameter(conv.weight[0], dt), as_parameter(conv.modulation(style), dt)),
            dict(weight_gain=conv.scale, demodulate=conv.demodulate, up=2 if conv.upsample else 1, eps=DEMOD_EPS))


def _modconv_forward(self, input, style):
    args, kw = _conv_inputs(self, input, style)
    return modulated_conv2d(*args, **kw, activation="linear", backend=getattr(self, _STATE).backend)


def _styled_conv_forward(self, input, style, noise=None):
    args, kw = _conv_inputs(self.conv, input, style)
    dt = input.dtype
    if noise is None:  # NoiseInjection's draw: same shape, dtype and device, so the same random stream
        b, _, h, w = input.shape
        noise = input.new_empty(b, 1, h * kw["up"], w * kw["up"]).normal_()
    bias = self.activate.bias
    return modulated_conv2d(*args, **kw, noise=as_parameter(noise, dt),
                            noise_strength=as_parameter(self.noise.weight, dt),
                            bias=None if bias is None else as_parameter(bias, dt), activation="lrelu",
                            gain=float(self.activate.scale), backend=getattr(self, _STATE).backend)


def _to_rgb_forward(self, input, style, skip=None):
    state = getattr(self, _STATE)
    if skip is not None and "upsample" not in self._modules:
        raise ValueError(f"{state.path}: got a skip but this ToRGB was built with upsample=False "
                         f"(rosinality's forward fails here too); skip {tuple(skip.shape)}")
    args, kw = _conv_inputs(self.conv, input, style)
    dt = input.dtype
    return modulated_conv2d(*args, **kw, bias=as_parameter(self.bias.view(-1), dt), activation="linear",
                            skip=None if skip is None else skip.to(dt), backend=state.backend)


_FORWARD = {"StyledConv": _styled_conv_forward, "ToRGB": _to_rgb_forward, "ModulatedConv2d": _modconv_forward}
_FIR_KEYS = {"ModulatedConv2d": "blur.kernel", "ToRGB": "upsample.kernel"}


# ---- patch / unpatch ------------------------------------------------------------------------------------------
@dataclass
class _Patched:
    path: str
    backend: str | None
    forward: types.MethodType
    owner: "StyleGAN2Patch"
    hooks: list = field(default_factory=list)


class StyleGAN2Patch:
    """What ``patch_stylegan2`` did: ``modules`` (paths of the patched modules), ``backend``; ``unpatch()``
    restores the original forwards (also on leaving a ``with`` block)."""

    def __init__(self, model: nn.Module, modules: tuple[str, ...], backend: str | None):
        self.model, self.modules, self.backend = model, modules, backend

    def unpatch(self) -> None:
        """Restore the modules this handle patched and that are still patched by it (a second call does nothing)."""
        for path in self.modules:
            m = self.model.get_submodule(path)
            state = m.__dict__.get(_STATE)
            if state is not None and state.owner is self:
                _restore(m, state)

    def __enter__(self) -> "StyleGAN2Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"StyleGAN2Patch({len(self.modules)} modules, backend={self.backend!r})"


def _where(model: nn.Module, path: str) -> str:
    return path or f"<{type(model).__name__}>"


def patch_stylegan2(model: nn.Module, backend: str | None = None) -> StyleGAN2Patch:
    """Make every rosinality-style StyledConv, ToRGB and ModulatedConv2d in ``model`` run on ``modulated_conv2d``.

    Same parameters, same outputs and gradients (latents, noise, weights); in place. ``backend``: force one for these
    calls (default: automatic, or ``use_backend``/``LSAP_BACKEND``). Returns a handle whose ``unpatch()`` (or
    ``unpatch_stylegan2(model)``) restores the original forwards. Raises ValueError, naming each module path, when a
    matching module is a variant the fused op does not compute (downsample, another FIR, another slope, other
    children or forward signature) or is already patched; nothing is patched then. A patched StyledConv/ToRGB
    no longer calls its ``conv`` child, so hooks on that child do not fire; hooks on the patched modules do.
    state_dict and deepcopy are unaffected; unpatch before pickling the whole module object.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("model must be a torch.nn.Module (a rosinality-style StyleGAN2 Generator), "
                        f"got {type(model).__name__}")
    if backend is not None:
        if backend not in backends.BACKENDS:
            raise backends.BackendError(f"patch_stylegan2(backend={backend!r}): unknown backend; "
                                        f"expected one of {backends.BACKENDS}")
        if not backends.available_backends()[backend]:
            raise backends.BackendError(f"patch_stylegan2(backend={backend!r}): backend is not available here")
    found, problems, own = [], [], []
    for path, m in model.named_modules():
        if isinstance(m, (ours.StyledConv, ours.ToRGB)):
            own.append(path)
            continue
        kind = type(m).__name__
        if kind not in PATCHABLE:
            continue
        if _STATE in m.__dict__:
            problems.append(f"{_where(model, path)}: already patched by patch_stylegan2 (unpatch_stylegan2 first)")
        elif "forward" in m.__dict__:
            problems.append(f"{_where(model, path)}: its forward is already replaced on the instance by other code")
        else:
            why = _PROBLEM[kind](m)
            if why:
                problems.append(f"{_where(model, path)} ({kind}): {why}")
        found.append((path, m, kind))
    if problems:
        raise ValueError("patch_stylegan2: cannot run these modules on the fused op (nothing was patched):\n  "
                         + "\n  ".join(problems))
    if not found:
        what = (f"its StyledConv/ToRGB layers ({', '.join(own[:3])}{', …' if len(own) > 3 else ''}) are lsap_kernels' "
                "own and already run on modulated_conv2d" if own else
                f"expected modules of class {', '.join(PATCHABLE)} as in rosinality's stylegan2-pytorch model.py")
        raise ValueError(f"patch_stylegan2: {type(model).__name__} has no rosinality-style layers to patch; {what}")
    handle = StyleGAN2Patch(model, tuple(p for p, _, _ in found), backend)
    for path, m, kind in found:
        state = _Patched(_where(model, path), backend, types.MethodType(_FORWARD[kind], m), handle)
        if kind in _FIR_KEYS:
            state.hooks.append(m.register_load_state_dict_pre_hook(refuse_other_fir(_FIR_KEYS[kind])))
        m.__dict__[_STATE] = state
        m.forward = state.forward
    return handle


def _restore(m: nn.Module, state: _Patched) -> None:
    if m.__dict__.get("forward") is not state.forward:
        raise RuntimeError(f"{state.path}: its forward was replaced after patch_stylegan2; not restoring over it")
    del m.__dict__["forward"]  # the class's own forward shows through again
    for hook in state.hooks:
        hook.remove()
    del m.__dict__[_STATE]


def unpatch_stylegan2(model: nn.Module) -> tuple[str, ...]:
    """Restore the original forward of every module of ``model`` that ``patch_stylegan2`` patched; returns their
    paths. Raises ValueError when none is patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched = [(path, m) for path, m in model.named_modules() if _STATE in m.__dict__]
    if not patched:
        raise ValueError(f"unpatch_stylegan2: no module of {type(model).__name__} is patched")
    for _, m in patched:
        _restore(m, m.__dict__[_STATE])
    return tuple(p for p, _ in patched)
