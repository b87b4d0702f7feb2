"""Triton kernels of the style ops (SPEC §4): the contract of kernel_ops.py, same math and edge cases as
csrc/style_cpu.cpp.

One launch per direction over a (sample, layer) grid: each program owns one segment of one row, reduces it in
BLOCK-sized chunks in a fixed order (fp32 accumulation, no atomics: bitwise deterministic), then writes its
outputs. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .kernel_ops import register_style_kernels

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or broken: this backend simply does not register
    triton = None

if triton is not None:
    from .._triton_launch import cdiv, fast_jit, next_power_of_2

    @triton.jit
    def _segment(off_ptr, width):
        # Row offset and length of segment (b, l) = (program_id(0), program_id(1)); int64 so B·C_total may pass 2^31.
        b = tl.program_id(0).to(tl.int64)
        l = tl.program_id(1)
        lo = tl.load(off_ptr + l)
        n = tl.load(off_ptr + l + 1) - lo
        return b, l, b * width + lo, lo, n

    @fast_jit
    def _normalize_fwd_kernel(s_ptr, out_ptr, norm_ptr, off_ptr, width, n_layers, eps, BLOCK: tl.constexpr):
        b, l, row, lo, n = _segment(off_ptr, width)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            x = tl.load(s_ptr + row + idx, mask=idx < n, other=0.0).to(tl.float32)
            acc += x * x
        norm = tl.sqrt_rn(tl.sum(acc, axis=0))
        tl.store(norm_ptr + b * n_layers + l, norm)
        inv = 1.0 / tl.where(norm < eps, eps, norm)  # `<` so a NaN norm stays NaN instead of clamping to eps
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            x = tl.load(s_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row + idx, (x * inv).to(out_ptr.dtype.element_ty), mask=mask)

    @fast_jit
    def _normalize_bwd_kernel(g_ptr, s_ptr, norm_ptr, out_ptr, off_ptr, width, n_layers, eps, BLOCK: tl.constexpr):
        b, l, row, lo, n = _segment(off_ptr, width)
        nr = tl.load(norm_ptr + b * n_layers + l)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            g = tl.load(g_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(s_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            acc += g * x
        clamped = nr < eps  # ŝ = s/eps there: a plain scaling, no projection (NaN norms take the other branch)
        inv = 1.0 / tl.where(clamped, eps, nr)
        proj = tl.where(clamped, 0.0, tl.sum(acc, axis=0) * inv * inv)  # (g·ŝ)/||s||
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            g = tl.load(g_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(s_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row + idx, ((g - proj * x) * inv).to(out_ptr.dtype.element_ty), mask=mask)

    @fast_jit
    def _sncd_fwd_kernel(s_ptr, mu_ptr, cos_ptr, norm_ptr, off_ptr, width, n_layers, eps, BLOCK: tl.constexpr):
        b, l, row, lo, n = _segment(off_ptr, width)
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            x = tl.load(s_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + lo + idx, mask=mask, other=0.0)
            sq += x * x
            dot += x * mu
        norm = tl.sqrt_rn(tl.sum(sq, axis=0))
        tl.store(norm_ptr + b * n_layers + l, norm)
        tl.store(cos_ptr + b * n_layers + l, tl.sum(dot, axis=0) / tl.where(norm < eps, eps, norm))

    @fast_jit
    def _sncd_bwd_kernel(gc_ptr, s_ptr, mu_ptr, cos_ptr, norm_ptr, out_ptr, off_ptr, width, n_layers, eps,
                         BLOCK: tl.constexpr):
        b, l, row, lo, n = _segment(off_ptr, width)
        item = b * n_layers + l
        nr = tl.load(norm_ptr + item)
        clamped = nr < eps  # c = s·μ/eps there: gradient g·μ/eps
        inv = 1.0 / tl.where(clamped, eps, nr)
        g_inv = tl.load(gc_ptr + item) * inv
        cs = tl.where(clamped, 0.0, tl.load(cos_ptr + item) * inv)  # ∂c/∂s = (μ − c·ŝ)/||s||
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            x = tl.load(s_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + lo + idx, mask=mask, other=0.0)
            tl.store(out_ptr + row + idx, (g_inv * (mu - cs * x)).to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(kernel, styles: torch.Tensor, offsets: torch.Tensor, eps: float, *args) -> None:
        # BLOCK from the mean segment length C_total / L (known from shapes: no device sync, no per-layout cache):
        # a power of two in [128, 1024], so at most 4 compilations per kernel and dtype. Longer segments loop.
        batch, width = styles.shape
        n_layers = offsets.shape[0] - 1
        if batch == 0 or n_layers == 0:
            return
        block = min(max(next_power_of_2(cdiv(width, n_layers)), 128), 1024)
        # Triton launches on the current CUDA device, not the tensors': guard for multi-GPU callers.
        with torch.cuda.device(styles.device) if styles.is_cuda else contextlib.nullcontext():
            kernel[(batch, n_layers)](*args, offsets, width, n_layers, eps, BLOCK=block,
                                      num_warps=max(1, block // 256))

    def _bl(styles: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.empty((styles.shape[0], offsets.shape[0] - 1), dtype=torch.float32, device=styles.device)

    def normalize_fwd(styles, offsets, eps):
        out, norm = torch.empty_like(styles), _bl(styles, offsets)
        _launch(_normalize_fwd_kernel, styles, offsets, eps, styles, out, norm)
        return out, norm

    def normalize_bwd(grad_hat, styles, norm, offsets, eps):
        out = torch.empty_like(styles)
        _launch(_normalize_bwd_kernel, styles, offsets, eps, grad_hat, styles, norm, out)
        return out

    def sncd_fwd(styles, anchors, offsets, eps):
        cos, norm = _bl(styles, offsets), _bl(styles, offsets)
        _launch(_sncd_fwd_kernel, styles, offsets, eps, styles, anchors, cos, norm)
        return cos, norm

    def sncd_bwd(grad_cos, styles, anchors, cos, norm, offsets, eps):
        out = torch.empty_like(styles)
        _launch(_sncd_bwd_kernel, styles, offsets, eps, grad_cos, styles, anchors, cos, norm, out)
        return out

    register_style_kernels("triton", normalize_fwd, normalize_bwd, sncd_fwd, sncd_bwd,
                           devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
                           dtypes=(torch.float16, torch.bfloat16, torch.float32))
