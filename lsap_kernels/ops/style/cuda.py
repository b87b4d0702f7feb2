"""CUDA kernels of the style ops (csrc/style_cuda.cu, wrapped by csrc/style_cuda_aten.cpp): one launch per direction
over all (sample, layer) segments, one warp per segment, deterministic (fixed reduction order, no atomics).
Registered only where the extension was built with CUDA."""
import torch

from ... import _ext
from .kernel_ops import register_style_kernels

if _ext.cuda_available():
    _C = _ext.module()
    register_style_kernels("cuda", _C.style_normalize_fwd_cuda, _C.style_normalize_bwd_cuda, _C.sncd_fwd_cuda,
                           _C.sncd_bwd_cuda, devices=("cuda",),
                           dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
