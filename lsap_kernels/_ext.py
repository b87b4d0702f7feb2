"""The compiled extension ``lsap_kernels._C``, loaded once and never built at import time.

If it is missing or fails to load, the package still works on the reference backend and says so once.
``LSAP_DISABLE_EXT=1`` skips loading it (to run or test the pure-PyTorch path on a machine that has it).
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None


def _load() -> None:
    global _module, _error
    if os.environ.get("LSAP_DISABLE_EXT") == "1":
        _error = "disabled by LSAP_DISABLE_EXT=1"
        return
    try:
        _module = importlib.import_module("lsap_kernels._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch version mismatch
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "lsap_kernels: the C++ extension lsap_kernels._C could not be loaded "
            f"({_error}); the 'cpu' and 'cuda' backends are unavailable and ops run on 'reference'. "
            "Rebuild it with `pip install --no-build-isolation -e .` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )


def module() -> ModuleType:
    if _module is None:
        raise RuntimeError(f"lsap_kernels._C is not loaded: {_error}")
    return _module


def cpu_available() -> bool:
    return _module is not None


def cuda_available() -> bool:
    return _module is not None and bool(getattr(_module, "WITH_CUDA", False))


def load_error() -> str | None:
    return _error


_load()
