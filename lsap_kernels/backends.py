"""Which implementation runs each op.

Every op has a ``reference`` backend (plain PyTorch, any device, float64-capable) and, where built, ``cpu``
(the C++ extension), ``cuda`` (the CUDA part of the extension) and ``triton``. The choice is automatic by
device, dtype and availability; ``use_backend`` or the ``LSAP_BACKEND`` environment variable force one, and a
forced backend that cannot run the call is an error, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Automatic choice, first match wins. Triton on CPU tensors (TRITON_INTERPRET=1) is for tests: never automatic.
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendError(RuntimeError):
    """A requested backend does not exist, is not available here, or cannot run this call."""


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: tuple[str, ...] | None  # device types it runs on; None: any
    dtypes: tuple[torch.dtype, ...]


_registry: dict[str, dict[str, Impl]] = {}
_forced: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("lsap_backend", default=None)


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...] | None = None,
             dtypes: tuple[torch.dtype, ...] = _ALL_FLOATS) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (``devices=None``: any device)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _registry.setdefault(op, {})[backend] = Impl(fn, devices, dtypes)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> dict[str, bool]:
    """Backend name -> whether it can run anything in this process."""
    return {
        "reference": True,
        "cpu": _ext.cpu_available(),
        "cuda": _ext.cuda_available() and torch.cuda.is_available(),
        "triton": _triton_available(),
    }


def _parse(spec: str) -> dict[str, str]:
    """``"cpu"`` (every op) or ``"sncd=cpu,modulated_conv2d=reference"`` (per op) -> {op or "*": backend}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, _, name = part.rpartition("=")
        out[op.strip() or "*"] = name.strip()
    return out


def _check_name(name: str, origin: str) -> None:
    if name not in BACKENDS:
        raise BackendError(f"{origin}: unknown backend {name!r}; expected one of {BACKENDS}")
    if not available_backends()[name]:
        raise BackendError(f"{origin}: backend {name!r} is not available here ({_why_unavailable(name)})")


def _why_unavailable(name: str) -> str:
    if name == "cpu":
        return f"the C++ extension did not load: {_ext.load_error() or 'unknown reason'}"
    if name == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return "the extension was built without CUDA" if _ext.cpu_available() else f"the C++ extension did not load: {_ext.load_error()}"
    if name == "triton":
        return "needs the triton package and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return "?"


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside the block: ``use_backend("reference")`` for every op, or per op:
    ``use_backend(sncd="cpu")``. Raises ``BackendError`` at once if a named backend is unknown or unavailable,
    and at the call if the forced backend cannot run that op on its device/dtype."""
    spec = dict(per_op)
    if name is not None:
        spec["*"] = name
    for op, backend in spec.items():
        _check_name(backend, f"use_backend({op if op != '*' else ''}{'=' if op != '*' else ''}{backend!r})")
    global _forced_key
    token, outer_key = _forced.set(spec), _forced_key
    _forced_key = repr(sorted(spec.items()))
    try:
        yield
    finally:
        _forced.reset(token)
        _forced_key = outer_key


# torch.compile cannot trace ContextVar.get, so the lookup below is a constant to dynamo, and `select` passes it
# `_forced_key` (the innermost use_backend's spec, a module global) so that dynamo guards on it: entering or leaving
# use_backend recompiles instead of reusing a graph traced for another backend. (Threads that compile one function
# under different use_backend specs at the same time can still share a graph: both backends compute the same op.)
_forced_key = ""


@torch.compiler.assume_constant_result
def _forced_for(op: str, key: str = "") -> tuple[str | None, str]:
    spec = _forced.get()
    origin = "use_backend"
    if spec is None:
        env = os.environ.get("LSAP_BACKEND", "").strip()
        if not env:
            return None, ""
        spec, origin = _parse(env), f"LSAP_BACKEND={env!r}"
    return spec.get(op, spec.get("*")), origin


def select(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device`` with ``dtype``.

    ``backend`` (an op's ``backend=`` argument) beats ``use_backend``, which beats ``LSAP_BACKEND``.
    """
    impls = _registry[op]
    origin = f"{op}(backend={backend!r})"
    if backend is None:
        backend, origin = _forced_for(op, _forced_key)
    if backend is not None:
        _check_name(backend, origin)
        impl = impls.get(backend)
        if impl is None:
            raise BackendError(f"{origin}: op {op!r} has no {backend!r} backend; it has {sorted(impls)}")
        if impl.devices is not None and device.type not in impl.devices:
            raise BackendError(f"{origin}: backend {backend!r} of {op!r} runs on {impl.devices} tensors, got {device}")
        if dtype not in impl.dtypes:
            raise BackendError(f"{origin}: backend {backend!r} of {op!r} takes dtypes {impl.dtypes}, got {dtype}")
        return backend, impl.fn
    available = available_backends()
    for name in _PREFERENCE.get(device.type, ("reference",)):
        impl = impls.get(name)
        if impl is not None and available[name] and (impl.devices is None or device.type in impl.devices) and dtype in impl.dtypes:
            return name, impl.fn
    return "reference", impls["reference"].fn


def chosen_backend(op: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The backend ``op`` would run on for tensors of this device and dtype (for logs and demos)."""
    return select(op, torch.device(device), dtype)[0]
