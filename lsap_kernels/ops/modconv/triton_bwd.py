"""Triton backward kernels of ``modulated_conv2d`` (SPEC §3), with sg = s·g folded into the conv input u = x·sg:

    g_a = G·gain·act'(a)·[|v| ≤ clamp]    d_bias = Σ_{b,p} g_a    d_noise = strength·Σ_o g_a
    d_strength = Σ g_a·noise             g_z = g_a·d              g_d[b,o] = Σ_p g_a·z
    g_u = conv_transpose(g_z, W)         d_x = g_u·sg             d_s = g·(Σ_p g_u·x − sg·Σ_o g_d·d³·Q)
    d_W = Σ_{b,p} g_z ⋆ u − W·Σ_b g_d·d³·sg²

z (for up=2 the blur FIR(T)) is stored by the forward, or recovered here from the layer's output (z_from_out).
up=2: g_T = FIRᵀ(g_z) feeds both convolution gradients (the transposed conv's data gradient is an ordinary strided
gather of g_T, its weight gradient a GEMM over input pixels).

Reductions are deterministic: each program writes fp32 partial sums for its tile, summed in a fixed order by one
small kernel (the styles' gradient, which also applies the demodulation term) or by torch; no atomics. The partial
buffers are sized by the pixel tile, so the kernels that write them take BM from a shape heuristic
(``pixel_block``) and autotune only the other block sizes.
"""
from __future__ import annotations

import os

import torch

from .triton_fwd import (INTERPRET, cdiv, cl_empty, fir, fir_pad0, needs_conv_out, next_power_of_2, noise_strides,
                         triton)

if triton is not None:
    import triton.language as tl

    from .._triton_launch import fast_jit
    from .triton_fwd import (INTERPRETED, activate, block_configs, ew_configs, gemm_configs, pixel_programs,
                              pixel_tile, preactivation, prune_mn, tuned)

    @triton.jit
    def preactivation_inverse(a, b, oy, ox, offs_o, mask_m, mask_o, Cout, d_ptr, noise_ptr, strength_ptr, bias_ptr,
                              snb, snh, snw, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """z = (a − strength·noise − bias) / d (fp32; d > 0), as a product with 1/d per channel: per element, a
        division compiles to a reciprocal, range checks and rescaling (sm_90 SASS)."""
        z = a
        if HAS_NOISE:
            n = tl.load(noise_ptr + b * snb + oy * snh + ox * snw, mask=mask_m, other=0.0).to(tl.float32)
            z = z - tl.load(strength_ptr).to(tl.float32) * n[:, None]
        if HAS_BIAS:
            z = z - tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        return z * (1.0 / tl.load(d_ptr + b * Cout + offs_o, mask=mask_o, other=1.0))[None, :]

    @fast_jit
    def _epilogue_bwd_kernel(g_ptr, z_ptr, d_ptr, noise_ptr, strength_ptr, bias_ptr, gz_ptr, gd_part_ptr,
                             gb_part_ptr, gn_ptr, gs_part_ptr,
                             Cout, HO, WO, n_m,
                             sgb, sgc, sgh, sgw, szb, szc, szh, szw, snb, snh, snw, sob, soc, soh, sow,
                             gain, clamp,
                             DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             LRELU: tl.constexpr, HAS_CLAMP: tl.constexpr, NEED_Z: tl.constexpr,
                             Z_FROM_OUT: tl.constexpr, STORE_GZ: tl.constexpr, WANT_GD: tl.constexpr,
                             WANT_BIAS: tl.constexpr, STORE_GN: tl.constexpr, WANT_STRENGTH: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr):
        """One program: BM output pixels of sample b, every channel (so Σ_o g_a per pixel is complete here).
        Writes g_z, the noise gradient strength·Σ_o g_a per pixel (in gn's dtype), and per-tile partials of g_d,
        d_bias and d_strength. z_ptr: z, or with Z_FROM_OUT the output out = act(a)·gain, from which a and z are
        recovered."""
        WANT_NOISE: tl.constexpr = STORE_GN or WANT_STRENGTH
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < HO * WO
        oy, ox = offs_m // WO, offs_m % WO
        part_row = (b * n_m + pid_m) * Cout
        noise_acc = tl.zeros([BM], dtype=tl.float32)
        for o0 in range(0, Cout, BN):
            offs_o = o0 + tl.arange(0, BN)
            mask_o = offs_o < Cout
            mask = mask_m[:, None] & mask_o[None, :]
            pix = (oy * sgh + ox * sgw)[:, None]
            g = tl.load(g_ptr + b * sgb + pix + offs_o[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
            ga = g * gain
            z = ga  # only read when NEED_Z
            if NEED_Z:
                t = tl.load(z_ptr + b * szb + (oy * szh + ox * szw)[:, None] + offs_o[None, :] * szc, mask=mask,
                            other=0.0).to(tl.float32)
                if Z_FROM_OUT:  # t = out: no clamp, no skip, gain ≠ 0; leaky ReLU keeps the sign (slope 0.2)
                    a = t * (1.0 / gain)  # = act(a), whatever gain's sign
                    if LRELU:
                        a = tl.where(a > 0, a, 5.0 * a)
                    if WANT_GD:  # a = d·z + strength·noise + bias
                        z = preactivation_inverse(a, b, oy, ox, offs_o, mask_m, mask_o, Cout, d_ptr, noise_ptr,
                                                  strength_ptr, bias_ptr, snb, snh, snw, HAS_NOISE, HAS_BIAS)
                else:
                    z = t
                    a = preactivation(z, b, oy, ox, offs_o, mask_m, mask_o, Cout, d_ptr, noise_ptr, strength_ptr,
                                      bias_ptr, snb, snh, snw, DEMOD, HAS_NOISE, HAS_BIAS)
                if LRELU:
                    ga = tl.where(a > 0, ga, 0.2 * ga)
                if HAS_CLAMP:
                    v = activate(a, gain, clamp, LRELU, False)
                    ga = tl.where((v >= -clamp) & (v <= clamp), ga, 0.0)
            if STORE_GZ:
                gz = ga
                if DEMOD:
                    gz = ga * tl.load(d_ptr + b * Cout + offs_o, mask=mask_o, other=0.0)[None, :]
                tl.store(gz_ptr + b * sob + (oy * soh + ox * sow)[:, None] + offs_o[None, :] * soc,
                         gz.to(gz_ptr.dtype.element_ty), mask=mask)
            if WANT_GD:
                tl.store(gd_part_ptr + part_row + offs_o, tl.sum(ga * z, axis=0), mask=mask_o)
            if WANT_BIAS:
                tl.store(gb_part_ptr + part_row + offs_o, tl.sum(ga, axis=0), mask=mask_o)
            if WANT_NOISE:
                noise_acc += tl.sum(ga, axis=1)
        if STORE_GN:
            strength = tl.load(strength_ptr).to(tl.float32)
            tl.store(gn_ptr + b * HO * WO + offs_m, (noise_acc * strength).to(gn_ptr.dtype.element_ty), mask=mask_m)
        if WANT_STRENGTH:
            n = tl.load(noise_ptr + b * snb + oy * snh + ox * snw, mask=mask_m, other=0.0).to(tl.float32)
            tl.store(gs_part_ptr + b * n_m + pid_m, tl.sum(noise_acc * n, axis=0))

    @tuned(ew_configs(), key=["Cout", "SH", "SW"], prune=prune_mn("PIXELS", "Cout", "SW"),
           interpret={"BM": 64, "BN": 4})  # 4-channel tiles, as for toRGB on a GPU (16: test_pixel_block_tiles)
    @fast_jit
    def _skip_bwd_kernel(g_ptr, out_ptr, Cout, SH, SW, PIXELS, sgb, sgc, sgh, sgw, sob, soc, soh, sow,
                         BM: tl.constexpr, BN: tl.constexpr, TX: tl.constexpr = 0):
        """d_skip[m] = Σ_{j=0..3} G[2m − 1 + j]·f[j] per axis: the adjoint of the skip's FIR up-sampling."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        my, mx, mask_m = pixel_tile(pid_m, SH, SW, BM, TX)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < Cout
        col = g_ptr + b * sgb + offs_n[None, :] * sgc
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for jy in tl.static_range(4):
            gy = 2 * my - 1 + jy
            ok_y = mask_m & (gy >= 0) & (gy < 2 * SH)
            for jx in tl.static_range(4):
                gx = 2 * mx - 1 + jx
                ok = ok_y & (gx >= 0) & (gx < 2 * SW)
                v = tl.load(col + (gy * sgh + gx * sgw)[:, None], mask=ok[:, None] & mask_n[None, :], other=0.0)
                acc += v.to(tl.float32) * ((1 + jy * (3 - jy)) * (1 + jx * (3 - jx)) / 16)  # f[jy]·f[jx]
        tl.store(out_ptr + b * sob + (my * soh + mx * sow)[:, None] + offs_n[None, :] * soc,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # data gradient: BM is fixed by pixel_block (the d_s partials are per pixel tile); N = Cin, K = Cout·taps
    # (32, 32) last: in the 4 autotuned for Cin <= 32 only (1024² layers: 1.75-3× faster than (32, 64) on an H200).
    # Wide: BK = 16 for toRGB's 3 channels (half the scalar loads of 3-channel rows, but ~250 more instructions in
    # the sm_90 SASS than BK = 32: the tuning run decides)
    DGRAD_CONFIGS = block_configs(("BN", "BK"), [(64, 32, 4, 4), (128, 32, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                                                 (128, 64, 8, 3), (16, 64, 4, 3), (32, 32, 4, 4)],
                                  [(128, 64, 4, 4), (64, 64, 8, 4), (128, 128, 8, 3), (32, 128, 4, 3),
                                   (32, 32, 4, 1), (64, 32, 4, 1), (32, 16, 4, 1)])  # 1 stage: L1 reuse (GEMM_WIDE)
    # (BN, BK, CA, warps, stages): g_z's tiles pipelined through L1 (triton_fwd.GEMM_WIDE_CA)
    DGRAD_CONFIGS += block_configs(("BN", "BK", "CA"), [], [(32, 32, 1, 4, 4), (64, 32, 1, 4, 3), (64, 64, 1, 4, 3),
                                                            (128, 64, 1, 8, 3)])

    @tuned(DGRAD_CONFIGS, key=["Cin", "Cout", "H", "W", "K", "UP", "BM", "PRECISION"],
           prune=prune_mn("PIXELS", "Cin"), interpret={"BN": 16, "BK": 16})
    @fast_jit
    def _dgrad_kernel(gz_ptr, w_ptr, s_ptr, x_ptr, dx_ptr, ds_part_ptr,
                      B, Cin, Cout, H, W, GH, GW, PIXELS, n_m,
                      sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, ssb, ssi, wgain,
                      K: tl.constexpr, UP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DS: tl.constexpr,
                      PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      TX: tl.constexpr, CA: tl.constexpr = 0):
        """g_u = conv_transpose(g_z, W) at input pixels q (UP=1: g_z[q − kh + k//2]; UP=2: g_T[2q + kh]), then
        d_x = g_u·sg (sg = styles·wgain) and per-tile partials Σ_q g_u·x. w_ptr: W as [k, k, Cin, Cout]
        contiguous (the forward's copy), so a weight tile [BK of Cout, BN of Cin] is contiguous along K. CA: g_z's
        tiles in 8-byte runs (triton_fwd.GEMM_WIDE_CA)."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        qy, qx, mask_m = pixel_tile(pid_m, H, W, BM, TX)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < Cin
        offs_k = tl.arange(0, BK)
        g_base = gz_ptr + b * sgb
        n_kc = tl.cdiv(Cout, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if UP == 1:  # g_z's row at tap (kh, kw): (q − (kh, kw) + k//2); the tap adds one scalar offset to these
            gy0, gx0 = qy + K // 2, qx + K // 2
        else:
            gy0, gx0 = 2 * qy, 2 * qx
        row_off = gy0 * sgh + gx0 * sgw
        # scalar counters (see _modconv_fwd_kernel), inlined: a jit helper called per iteration costs the
        # interpreter ~1 ms a call (see triton_fwd.INTERPRETED)
        c0, kh, kw = 0, 0, 0
        for t in range(0, K * K * n_kc):
            o = c0 + offs_k
            mask_o = o < Cout
            if UP == 1:
                dy, dx = -kh, -kw
            else:
                dy, dx = kh, kw
            gy, gx = gy0 + dy, gx0 + dx
            ok = mask_m & (gy >= 0) & (gy < GH) & (gx >= 0) & (gx < GW)
            go = tl.max_contiguous(o, 64 // gz_ptr.dtype.element_ty.primitive_bitwidth) if CA else o
            gt = tl.load(g_base + (row_off + (dy * sgh + dx * sgw))[:, None] + go[None, :] * sgc,
                         mask=ok[:, None] & mask_o[None, :], other=0.0)
            wt = tl.load(w_ptr + ((kh * K + kw) * Cin + offs_n)[None, :] * Cout + o[:, None],
                         mask=mask_o[:, None] & mask_n[None, :], other=0.0)
            c0 += BK
            wrap = c0 >= Cout
            c0 = tl.where(wrap, 0, c0)
            kw = tl.where(wrap, kw + 1, kw)
            wrap = kw >= K
            kw = tl.where(wrap, 0, kw)
            kh = tl.where(wrap, kh + 1, kh)
            gt = gt.to(w_ptr.dtype.element_ty)
            if INTERPRETED:  # see triton_fwd.INTERPRETED
                gt, wt = gt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(gt, wt, acc, input_precision=PRECISION)
        mask = mask_m[:, None] & mask_n[None, :]
        if NEED_DX:
            sc = tl.load(s_ptr + b * ssb + offs_n * ssi, mask=mask_n, other=0.0).to(tl.float32) * wgain
            tl.store(dx_ptr + b * sdb + (qy * sdh + qx * sdw)[:, None] + offs_n[None, :] * sdc,
                     (acc * sc[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DS:
            xt = tl.load(x_ptr + b * sxb + (qy * sxh + qx * sxw)[:, None] + offs_n[None, :] * sxc, mask=mask,
                         other=0.0)
            tl.store(ds_part_ptr + (b * n_m + pid_m) * Cin + offs_n, tl.sum(acc * xt.to(tl.float32), axis=0),
                     mask=mask_n)

    # weight gradient: M = Cout, N = Cin, one tap per program_id(1), K = pixels split into SPLIT fixed ranges
    WGRAD_CONFIGS = gemm_configs([(64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (32, 32, 128, 4, 3),
                                  (32, 64, 64, 4, 3), (16, 32, 128, 4, 3), (16, 64, 64, 4, 3)],
                                 [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4)])

    @tuned(WGRAD_CONFIGS, key=["Cin", "Cout", "H", "W", "K", "UP", "SPLIT", "PRECISION"],
           prune=prune_mn("Cout", "Cin"), interpret={"BM": 16, "BN": 16, "BK": 64})
    @fast_jit
    def _wgrad_kernel(gz_ptr, x_ptr, s_ptr, part_ptr, B, Cin, Cout, H, W, GH, GW, SPLIT,
                      sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, ssb, ssi, wgain,
                      K: tl.constexpr, UP: tl.constexpr, PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """part[split, tap, o, i] = Σ over this split's pixel chunks of g_z(tap-shifted) ⋆ (x·sg), sg =
        styles·wgain. Chunks never straddle samples, so each has one scale vector."""
        pid, tap, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_tn = tl.cdiv(Cin, BN)
        offs_o = (pid // n_tn) * BM + tl.arange(0, BM)
        offs_i = (pid % n_tn) * BN + tl.arange(0, BN)
        mask_o, mask_i = offs_o < Cout, offs_i < Cin
        kh, kw = tap // K, tap % K
        n_qc = tl.cdiv(H * W, BK)
        total = B * n_qc
        per = tl.cdiv(total, SPLIT)
        start = split * per
        end = tl.minimum(start + per, total)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for c in range(start, end):
            b = (c // n_qc).to(tl.int64)
            q = (c % n_qc) * BK + tl.arange(0, BK)
            mask_q = q < H * W
            qy, qx = q // W, q % W
            if UP == 1:
                gy, gx = qy - kh + K // 2, qx - kw + K // 2
            else:
                gy, gx = 2 * qy + kh, 2 * qx + kw
            ok = mask_q & (gy >= 0) & (gy < GH) & (gx >= 0) & (gx < GW)
            gt = tl.load(gz_ptr + b * sgb + offs_o[:, None] * sgc + (gy * sgh + gx * sgw)[None, :],
                         mask=mask_o[:, None] & ok[None, :], other=0.0)
            xt = tl.load(x_ptr + b * sxb + (qy * sxh + qx * sxw)[:, None] + offs_i[None, :] * sxc,
                         mask=mask_q[:, None] & mask_i[None, :], other=0.0)
            sc = tl.load(s_ptr + b * ssb + offs_i * ssi, mask=mask_i, other=0.0).to(tl.float32) * wgain
            ut = (xt.to(tl.float32) * sc[None, :]).to(x_ptr.dtype.element_ty)
            gt = gt.to(x_ptr.dtype.element_ty)
            if INTERPRETED:  # see triton_fwd.INTERPRETED
                gt, ut = gt.to(tl.float32), ut.to(tl.float32)
            acc = tl.dot(gt, ut, acc, input_precision=PRECISION)
        tl.store(part_ptr + ((split * K * K + tap) * Cout + offs_o)[:, None] * Cin + offs_i[None, :], acc,
                 mask=mask_o[:, None] & mask_i[None, :])


    @triton.jit
    def partial_sum(ptr, b, n, offs, mask, C, BR: tl.constexpr, BC: tl.constexpr):
        """Σ_r part[b, r, offs] over the n per-tile rows of part [B, n, C] (fp32): a [BR, BC] tile accumulated
        elementwise, reduced once (a fixed order)."""
        acc = tl.zeros([BR, BC], dtype=tl.float32)
        for r0 in range(0, n, BR):
            rows = r0 + tl.arange(0, BR)
            acc += tl.load(ptr + (b * n + rows)[:, None] * C + offs[None, :], mask=(rows < n)[:, None] & mask[None, :],
                           other=0.0)
        return tl.sum(acc, axis=0)

    @fast_jit
    def _style_grad_kernel(ds_ptr, gd_ptr, d_ptr, q_ptr, s_ptr, out_ptr, n_ds, n_gd, Cin, Cout, ssb, ssi, sob, soi,
                           wgain, DEMOD: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr):
        """d_s[b, i] = g·(Σ_r ds[b, r, i] − sg[b, i]·Σ_o gd[b, o]·d[b, o]³·Q[o, i]), gd[b, o] = Σ_r gd_part[b, r, o],
        sg = s·g: the per-tile partials of d_s and g_d summed and the demodulation term applied, stored in out's
        dtype."""
        b = tl.program_id(0).to(tl.int64)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        mask_i = offs_i < Cin
        dsg = partial_sum(ds_ptr, b, n_ds, offs_i, mask_i, Cin, BR, BI)
        if DEMOD:
            corr = tl.zeros([BO, BI], dtype=tl.float32)
            for o0 in range(0, Cout, BO):
                offs_o = o0 + tl.arange(0, BO)
                mask_o = offs_o < Cout
                d = tl.load(d_ptr + b * Cout + offs_o, mask=mask_o, other=0.0)
                gdd3 = partial_sum(gd_ptr, b, n_gd, offs_o, mask_o, Cout, BR, BO) * d * d * d
                q = tl.load(q_ptr + offs_o[:, None] * Cin + offs_i[None, :], mask=mask_o[:, None] & mask_i[None, :],
                            other=0.0)
                corr += gdd3[:, None] * q
            sg = tl.load(s_ptr + b * ssb + offs_i * ssi, mask=mask_i, other=0.0).to(tl.float32) * wgain
            dsg = dsg - sg * tl.sum(corr, axis=0)
        tl.store(out_ptr + b * sob + offs_i * soi, (dsg * wgain).to(out_ptr.dtype.element_ty), mask=mask_i)


# The styles' gradient kernel reads per-tile partials directly up to this many tiles per sample (the small, host-bound
# layers); above, torch first sums them over the tiles (one wide reduction: a program per sample would be slow).
DIRECT_PARTIAL_ROWS = 64


def style_gradient(ds_part, gd_part, d, q, styles, weight_gain: float) -> torch.Tensor:
    """d_styles (styles' dtype) from the per-tile partials ds_part [B, tiles, Cin] of Σ_p g_u·x and, with
    demodulation, gd_part [B, tiles', Cout] of g_d, with d [B, Cout] and Q [Cout, Cin]: one launch (torch took nine
    small ops) after, for many tiles, torch's sum over them."""
    def rows(part):
        return part if part.shape[1] <= DIRECT_PARTIAL_ROWS else part.sum(1, keepdim=True)

    batch, cin = styles.shape
    ds_part = rows(ds_part)
    demod = gd_part is not None
    gd_part = rows(gd_part) if demod else ds_part
    out = torch.empty(styles.shape, dtype=styles.dtype, device=styles.device)
    bi = 16 if INTERPRET else 64
    _style_grad_kernel[(batch, cdiv(cin, bi))](
        ds_part, gd_part, d if demod else ds_part, q if demod else ds_part, styles, out, ds_part.shape[1],
        gd_part.shape[1], cin, gd_part.shape[2], *styles.stride(), *out.stride(), float(weight_gain), DEMOD=demod,
        BR=16, BI=bi, BO=16 if INTERPRET else 32)
    return out


def pixel_block(pixels: int) -> int:
    """Pixel tile of the kernels that write per-tile partials: the sample's pixel count rounded up to a power of
    two, between 16 (tl.dot's minimum) and 128 (64 under the interpreter: see INTERPRET_BLOCKS)."""
    return min(64 if INTERPRET else 128, max(16, next_power_of_2(pixels)))


# The data gradient's pixel tiles as blocks DGRAD_TX wide where the image is at least that wide and the tile holds
# 2 rows of it (pixel_tile; 0: flat). Chosen on the host with BM, since the partials' count depends on it: not
# autotuned. Not yet timed on a GPU, hence off by default (the A/B, each side with its best block sizes:
# bench/gpu_check.sh tune_ab).
DGRAD_TX = int(os.environ.get("LSAP_TRITON_DGRAD_TX", "0"))


def dgrad_tile_width(bm: int, w: int) -> int:
    return DGRAD_TX if 0 < DGRAD_TX <= min(w, bm // 2) else 0


def _wgrad_split(batch: int, pixels: int, tiles: int, device: torch.device) -> int:
    """How many pixel ranges the weight gradient is split into: enough programs to fill the GPU (4 per SM),
    at most one range per 64 pixels. A function of shape and device only, so results are reproducible."""
    if INTERPRET or device.type != "cuda":
        return 2
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target // tiles, batch * cdiv(pixels, 64)))


def backward(grad, x, weight, w_t, q, styles, weight_gain: float, d, noise, strength, bias, conv_out, *, up: int,
             demodulate: bool, lrelu: bool, gain: float, clamp: float | None, precision: str, need_x: bool,
             need_w: bool, need_s: bool, need_noise: bool, need_strength: bool, need_bias: bool, need_skip: bool,
             z_from_out: bool = False):
    """The requested input gradients (None where not requested): (d_x, d_W fp32, d_styles in styles' dtype, d_noise
    in noise's shape and dtype, d_strength fp32 0-dim, d_bias fp32, d_skip). conv_out: z, or the forward's output
    with ``z_from_out`` (see triton.z_from_out); w_t, q: the forward's taps-major weight copy [k, k, Cin, Cout] and,
    with demodulation, Q = Σ_taps W² [Cout, Cin]."""
    batch, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[-1]
    ho, wo = grad.shape[-2:]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    style_args = (*styles.stride(), float(weight_gain))
    need_conv = need_x or need_s or need_w
    need_z = needs_conv_out(demodulate, lrelu, clamp)
    want_gd = demodulate and (need_s or need_w)
    gz_is_grad = not need_z and not demodulate and gain == 1.0  # linear, no clamp, no demod, unit gain: g_z = G
    store_gz = need_conv and not gz_is_grad
    gz = gd_part = gbias = dnoise = gstrength = None
    if store_gz or want_gd or need_bias or need_noise or need_strength:
        bm = pixel_block(ho * wo)
        bn = 16 if INTERPRET else min(128, max(16, next_power_of_2(cout)), 4096 // bm)
        n_m = cdiv(ho * wo, bm)
        gz = cl_empty(grad.shape, x.dtype, dev) if store_gz else None
        gd_part = torch.empty((batch, n_m, cout), **f32) if want_gd else None
        gb_part = torch.empty((batch, n_m, cout), **f32) if need_bias else None
        # the noise gradient is final as the kernel stores it, unless one map is shared by the batch (summed here)
        shared_noise = noise is not None and noise.shape[0] == 1
        dnoise = torch.empty((batch, 1, ho, wo), **(f32 if shared_noise else dict(dtype=noise.dtype, device=dev))) \
            if need_noise else None
        gs_part = torch.empty((batch, n_m), **f32) if need_strength else None
        dummy = grad
        z_or_out = conv_out if need_z else dummy
        _epilogue_bwd_kernel[(n_m, batch)](
            grad, z_or_out, d if demodulate else dummy, noise if noise is not None else dummy,
            strength if strength is not None else dummy, bias if bias is not None else dummy,
            gz if store_gz else dummy, gd_part if want_gd else dummy, gb_part if need_bias else dummy,
            dnoise if need_noise else dummy, gs_part if need_strength else dummy,
            cout, ho, wo, n_m, *grad.stride(), *(z_or_out.stride() if need_z else (0,) * 4),
            *noise_strides(noise), *(gz.stride() if store_gz else (0,) * 4), float(gain),
            0.0 if clamp is None else float(clamp),
            DEMOD=demodulate, HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, LRELU=lrelu,
            HAS_CLAMP=clamp is not None, NEED_Z=need_z, Z_FROM_OUT=need_z and z_from_out, STORE_GZ=store_gz,
            WANT_GD=want_gd, WANT_BIAS=need_bias, STORE_GN=need_noise, WANT_STRENGTH=need_strength, BM=bm, BN=bn,
            num_warps=1 if INTERPRET else 4)
        gbias = gb_part.sum((0, 1)) if need_bias else None
        gstrength = gs_part.sum() if need_strength else None
        if need_noise and shared_noise:
            dnoise = dnoise.sum(0, keepdim=True).to(noise.dtype)
        if gz_is_grad:
            gz = grad
    elif need_conv:
        gz = grad

    dx = dw = dstyles = None
    if need_conv:
        if up == 2:  # g_T[t] = Σ_j g_z[t − j + PAD0]·f[j] = Σ_j g_z[t + j − (3 − PAD0)]·f[j] (f symmetric): the
            th, tw = 2 * h + k - 2, 2 * w + k - 2  # forward's FIR with the other pad, from g_z's grid onto T's
            gt = cl_empty((batch, cout, th, tw), x.dtype, dev)
            fir(gz, gt, 3 - fir_pad0(k))
            gz = gt
        gh, gw = gz.shape[-2:]
        if need_x or need_s:
            bm = pixel_block(h * w)
            tx = dgrad_tile_width(bm, w)
            n_m = pixel_programs(h, w, {"BM": bm, "TX": tx})
            dx = cl_empty(x.shape, x.dtype, dev) if need_x else None
            ds_part = torch.empty((batch, n_m, cin), **f32) if need_s else None
            grid = lambda meta: (n_m, cdiv(cin, meta["BN"]), batch)  # noqa: E731
            _dgrad_kernel[grid](gz, w_t, styles, x, dx if need_x else x, ds_part if need_s else x,
                                batch, cin, cout, h, w, gh, gw, h * w, n_m, *gz.stride(), *x.stride(),
                                *(dx.stride() if need_x else (0,) * 4), *style_args,
                                K=k, UP=up, NEED_DX=need_x, NEED_DS=need_s, PRECISION=precision, BM=bm, TX=tx)
            if need_s:
                dstyles = style_gradient(ds_part, gd_part if want_gd else None, d, q, styles, weight_gain)
        if need_w:
            split = _wgrad_split(batch, h * w, cdiv(cout, 64) * cdiv(cin, 64) * k * k, dev)
            part = torch.empty((split, k * k, cout, cin), **f32)
            grid = lambda meta: (cdiv(cout, meta["BM"]) * cdiv(cin, meta["BN"]),  # noqa: E731
                                 k * k, split)
            _wgrad_kernel[grid](gz, x, styles, part, batch, cin, cout, h, w, gh, gw, split, *gz.stride(),
                                *x.stride(), *style_args, K=k, UP=up, PRECISION=precision)
            dw = part.sum(0).view(k, k, cout, cin).permute(2, 3, 0, 1).contiguous()
            if want_gd:  # demodulation: ∂d[b,o]/∂W[o,i,t] = −d³·sg²·W
                sg = styles.float() * weight_gain
                gdd3 = gd_part.sum(1) * d.pow(3)
                dw = dw - weight.float() * (gdd3.t() @ sg.square())[:, :, None, None]

    dskip = None
    if need_skip:
        sh, sw = ho // 2, wo // 2
        dskip = cl_empty((batch, cout, sh, sw), grad.dtype, dev)
        grid = lambda meta: (pixel_programs(sh, sw, meta), cdiv(cout, meta["BN"]), batch)  # noqa: E731
        _skip_bwd_kernel[grid](grad, dskip, cout, sh, sw, sh * sw, *grad.stride(), *dskip.stride())
    return dx, dw, dstyles, dnoise, gstrength, gbias, dskip
