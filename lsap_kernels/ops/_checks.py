"""Argument checks shared by the public ops: every error names the argument, what it got and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndim: int | None = None, like: torch.Tensor | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """``t`` is a floating tensor with ``ndim`` dims, on ``like``'s device with ``like``'s dtype (or one of
    ``dtypes``, where given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {describe(t)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like the other inputs, got {describe(t)}")
        allowed = dtypes or (like.dtype,)
        if t.dtype not in allowed:
            what = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name} must have dtype {what} (x has {like.dtype}), got {describe(t)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    """``expected`` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {shown} ({what}), got {describe(t)}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
