"""C++ CPU kernels of the style ops (csrc/style_cpu.cpp): one parallel pass per direction, deterministic for any
thread count."""
import torch

from ... import _ext
from .kernel_ops import register_style_kernels

if _ext.cpu_available():
    _C = _ext.module()
    register_style_kernels("cpu", _C.style_normalize_fwd_cpu, _C.style_normalize_bwd_cpu, _C.sncd_fwd_cpu,
                           _C.sncd_bwd_cpu, devices=("cpu",),
                           dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
