"""Triton forward kernels of ``modulated_conv2d`` (SPEC §3) and the jit helpers the backward kernels share.

Implicit GEMM per sample: M = output pixels of sample b, N = Cout, K = Cin·taps. The style scale s[b,i]·g
multiplies the activation tile (or, for narrow output tiles, the weight tile) as it is loaded, so per-sample weights
never exist in memory. Tiles never straddle samples:
the scale is one vector per tile and the backward's per-sample reductions are plain tile sums.

up=2 (rosinality/NVIDIA: transposed conv stride 2, then the [1,3,3,1] FIR) runs as
  1. the transposed conv T as 4 output phases (row/column parity of T): each phase is an ordinary conv of the
     input with a subset of the taps (2×2, 2×1, 1×2, 1×1 for k=3), so no zero-inserted MACs;
  2. one pass that blurs T with the 4×4 FIR and applies the whole epilogue. Demodulation is a per-(b, o) scale and
     the blur is linear per channel, so d·FIR(T) = FIR(d·T): the epilogue may apply d after the blur. That pass
     also stores the blurred z for the backward (T, the same size, is then freed): the backward reads z instead of
     re-blurring T (16 taps per element; the H200 profile of 2026-11-26 put that at 2.2 of its 3.4 ms).
Folding the FIR into 6×6 polyphase weights would be exact too, at ~4× the MACs of the transposed conv.

Tensors are addressed through their strides (NCHW or channels_last inputs both work); everything the op allocates
is channels_last, so the GEMM tiles read channel-contiguous rows.

A GEMM tile's pixels are BM consecutive ones of the row-major grid, or (config TX > 0) a block of BM/TX rows × TX
columns (pixel_tile). A flat tile of a wide image lies in one row, so its 3×3 taps touch 3 rows of BM+2 pixels,
about 3× its own bytes, which L2 serves again unless L1 still holds them; an 8×16 block touches 10×18 pixels, 1.4×.
The autotuner chooses per shape. The FIR pass is separable: each program walks down a strip of columns, filters
every row of T once along x and combines the last four rows along y (_fir_epilogue_kernel).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or broken: the backend does not register (see triton.py)
    triton = None

from .._triton_launch import cdiv, next_power_of_2  # noqa: F401  (triton_bwd and bench import them from here)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    from .._triton_launch import fast_jit

    # The interpreter's cost is per program and per op, not per element: wide pixel tiles (fewer programs), and
    # 16-wide channel tiles so the small test channel counts still cross tile boundaries.
    INTERPRET_BLOCKS = {"BM": 64, "BN": 16, "BK": 16}

    # LSAP_TRITON_AUTOTUNE: "0" one config per shape (the tests), unset at most 4, "wide" every fitting config of
    # longer lists (bench/tune_modconv.py, whose choices triton_tuning.py commits per GPU). Read at import.
    WIDE = os.environ.get("LSAP_TRITON_AUTOTUNE") == "wide"

    class CachedAutotuner(triton.runtime.Autotuner):
        """Triton's Autotuner with a cheaper cache hit and a table of committed configs. Its own key walks dicts of
        every argument (~50 here: 42 µs a launch on a 2-core EPYC, more than the JIT's binder); here a launch looks
        up one tuple of the key arguments and the tensors' dtypes, filled at the key's first launch from ``table``
        or else from the Autotuner's own choice, so pruning and benchmarking stay Triton's.

        ``table`` (triton_tuning.seed) maps ``table_key``s to configs: the key arguments and the dtype of the first
        tensor argument, the activations' (x, T or a gradient of them) in every kernel here. Not the other tensors'
        dtypes, which the Autotuner's key holds: float32 or 16-bit parameters (styles, noise, bias) are a few loads
        per tile, not what picks a tile, and a table keyed on them stopped matching when callers' parameter dtypes
        changed (tests/test_modconv_triton_tuning.py runs the committed table's layers)."""

        def __init__(self, fn, configs, key, **kwargs):
            super().__init__(fn, fn.arg_names, configs, key, None, None, **kwargs)
            self.key_at = [(k, self.arg_names.index(k)) for k in self.keys]
            self.tensors_at = [i for i, name in enumerate(self.arg_names) if name.endswith("_ptr")]
            self.chosen = {}
            self.table = {}

        def table_key(self, key) -> tuple:
            """The table's key of an Autotuner key (key arguments, then the tensor arguments' dtypes as strings)."""
            return tuple(key[:len(self.keys) + 1])

        @staticmethod
        def launch_table_key(key) -> tuple:
            """The table's key of a ``chosen`` key (key arguments, tensor arguments' dtypes)."""
            return (*key[0], str(key[1][0]))

        def run(self, *args, **kwargs):
            if len(self.configs) == 1:  # nothing to choose (the interpreter; a test's pinned config)
                return super().run(*args, **kwargs)
            # (list comprehensions: generator expressions cost ~0.7 µs more per launch on a 2-core EPYC)
            key = (tuple([kwargs[k] if k in kwargs else args[i] for k, i in self.key_at]),
                   tuple([getattr(args[i], "dtype", None) for i in self.tensors_at]))
            hit = self.chosen.get(key)
            if hit is None:
                config = self.table.get(self.launch_table_key(key))
                if config is None:
                    launched = super().run(*args, **kwargs)
                    self.chosen[key] = self.best_config, self.best_config.all_kwargs()
                    return launched
                hit = self.chosen[key] = config, config.all_kwargs()
            self.best_config = hit[0]
            return self.fn.run(*args, **kwargs, **hit[1])

    def tuned(configs: list, key: list[str], prune=None, interpret=INTERPRET_BLOCKS):
        """Autotune over ``configs`` on a GPU (results cached on disk per shape key and dtypes; known shapes come
        from triton_tuning's table); under the interpreter the one config ``interpret`` and no benchmarking.
        The batch size is in no key: tiles never straddle samples, so the best tile is that of the per-sample
        problem, and a new batch size (a job's last, partial batch) does not benchmark every kernel again."""
        if INTERPRET:
            return triton.autotune(configs=[triton.Config(dict(interpret), num_warps=1)], key=[])
        return lambda fn: CachedAutotuner(fn, configs, key, cache_results=True,
                                          prune_configs_by={"early_config_prune": prune} if prune else None)

    def block_configs(names: tuple, shapes, wide=()) -> list:
        """Configs from (block sizes named ``names``..., warps[, stages]) tuples; ``wide`` ones in wide mode only."""
        def make(t):  # Config(kwargs, num_warps[, num_stages])
            return triton.Config(dict(zip(names, t[:len(names)])), *t[len(names):])
        extra = [make(t) for t in wide] if WIDE else []
        for c in extra:
            c.wide_only = True  # marked on the object: Configs compare by value, and a wide one may equal another
        return [make(t) for t in shapes] + extra

    def gemm_configs(shapes, wide=()) -> list:
        return block_configs(("BM", "BN", "BK"), shapes, wide)

    # (BM, BN, BK, warps, stages), preferred first: large tiles for the 512-channel layers, narrow ones for Cout
    # 3-128 and for the 4×4/8×8 layers (16-64 pixels per sample), where a 128-row tile would be mostly masked.
    GEMM_SHAPES = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                   (128, 32, 32, 4, 4), (64, 32, 64, 4, 3), (32, 64, 64, 4, 3), (128, 16, 32, 4, 3),
                   (64, 16, 64, 4, 3), (16, 64, 64, 4, 3), (16, 128, 64, 4, 3)]
    # tried by the tuning run only: deeper K tiles and wider tiles for Hopper, more pixels for the few-channel layers,
    # and unpipelined ones (1 stage) for those: an sm_90 compile shows pipelined tile loads as cp.async.cg, which
    # bypasses L1, so each of the 9 taps re-reads its (mostly shared) rows from L2; plain loads can hit L1 instead
    GEMM_WIDE = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                 (256, 32, 32, 8, 3), (128, 32, 64, 4, 3), (64, 32, 32, 2, 4), (128, 32, 32, 4, 1),
                 (256, 32, 32, 8, 1), (128, 64, 32, 4, 1), (256, 16, 32, 4, 2), (512, 16, 32, 8, 1)]  # + toRGB
    # (BM, BN, BK, TX, warps, stages): 2-D pixel tiles, unpipelined only (the pipelined cp.async.cg loads bypass L1:
    # there every tap re-reads from L2 whatever the tile's shape). Unmeasured so far: the tuning run decides.
    GEMM_WIDE_2D = [(128, 32, 32, 16, 4, 1), (128, 64, 32, 16, 4, 1), (256, 32, 32, 16, 8, 1), (128, 16, 32, 16, 4, 1),
                    (512, 32, 32, 32, 8, 1)]
    # (BM, BN, BK, TX, CA, warps, stages): pipelined and through L1. With CA = 1 the shifted operand's loads (x's
    # tiles; the data gradient's g_z tiles) are declared contiguous in 8-byte runs only: Triton then pipelines them
    # as cp.async.ca, 8 bytes, which allocates in L1, instead of 16-byte cp.async.cg (an sm_90 compile;
    # tests/test_modconv_triton.py checks both). Twice the copy instructions, for the taps' L1 hits. Unmeasured so
    # far: the tuning run decides.
    GEMM_WIDE_CA = [(128, 32, 32, 16, 1, 4, 3), (128, 64, 32, 16, 1, 4, 3), (128, 32, 32, 0, 1, 4, 4),
                    (256, 32, 32, 16, 1, 8, 3), (128, 128, 32, 16, 1, 8, 3)]

    def prune_mn(m_arg: str, n_arg: str, w_arg: str | None = None):
        """Keep the configs whose M and N tiles fit the problem (at most its size rounded up to a power of two, at
        least 16; an N tile narrower than 16 only where it holds all of N) and whose 2-D pixel tiles are at most as
        wide as the image (``w_arg``), in list order, at most 4 of them — each is one more compilation per shape on
        first use — or only the first with LSAP_TRITON_AUTOTUNE=0; with =wide those 4 and every fitting wide one.
        None fits: the one with the smallest tiles."""
        def prune(configs, nargs, **kwargs):
            m_cap = max(16, next_power_of_2(nargs[m_arg]))
            n_pow2 = next_power_of_2(nargs[n_arg])
            kept = [c for c in configs if c.kwargs.get("BM", 0) <= m_cap and c.kwargs["BN"] <= max(16, n_pow2)
                    and (c.kwargs["BN"] >= 16 or c.kwargs["BN"] >= n_pow2)
                    and (w_arg is None or c.kwargs.get("TX", 0) <= nargs[w_arg])]
            if not kept:
                kept = [min(configs, key=lambda c: c.kwargs.get("BM", 1) * c.kwargs["BN"])]
            mode = os.environ.get("LSAP_TRITON_AUTOTUNE")
            base = [c for c in kept if not getattr(c, "wide_only", False)]
            if mode == "wide":
                return base[:4] + [c for c in kept if getattr(c, "wide_only", False)]
            return base[:1 if mode == "0" else 4]
        return prune

    # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits: there, GEMM operands are upcast to
    # fp32 first (exact, so the products and the fp32 accumulation are those of the 16-bit MMA). Inlined at each
    # tl.dot: the interpreter re-patches triton.language on every jit-function call, ~1 ms each.
    INTERPRETED = tl.constexpr(INTERPRET)

    @triton.jit
    def pixel_tile(pid_m, MH, MW, BM: tl.constexpr, TX: tl.constexpr):
        """(row, column, in range) of the BM pixels of tile pid_m of an MH×MW grid: consecutive ones in row-major
        order (TX = 0), or a block of BM/TX rows × TX columns (tiles row-major); see the module docstring."""
        r = tl.arange(0, BM)
        if TX == 0:
            offs = pid_m * BM + r
            my, mx, ok = offs // MW, offs % MW, offs < MH * MW
        else:  # (the compiler does not prune code after a constexpr-guarded return)
            n_tx = tl.cdiv(MW, TX)
            my = (pid_m // n_tx) * (BM // TX) + r // TX
            mx = (pid_m % n_tx) * TX + r % TX
            ok = (my < MH) & (mx < MW)
        return my, mx, ok

    @triton.jit
    def left_half(t, BM: tl.constexpr, W: tl.constexpr):
        """t[:, :W/2] of a [BM, W] tile (Triton has no slicing)."""
        left, _ = tl.split(tl.permute(tl.reshape(t, [BM, 2, W // 2]), [0, 2, 1]))
        return left

    @triton.jit
    def leading_columns(t, BM: tl.constexpr, BN: tl.constexpr, NO: tl.constexpr):
        """t[:, :NO] of a [BM, BN] tile, NO and BN powers of 2 with BN/NO <= 16. The epilogue's per-element work
        (skip gathers, masks, 2-byte stores of 3-channel rows) was most of the toRGB forward's instructions
        (sm_90 SASS: 76 scalar loads and 16 stores per thread at BN = 16)."""
        if BN // NO >= 2:
            t = left_half(t, BM, BN)
        if BN // NO >= 4:
            t = left_half(t, BM, BN // 2)
        if BN // NO >= 8:
            t = left_half(t, BM, BN // 4)
        if BN // NO >= 16:
            t = left_half(t, BM, BN // 8)
        return t

    @triton.jit
    def fir_row(t_ptr, t_base, ty, ox, offs_c, mask_x, mask_c, TH, TW, stc, sth, stw, PAD0: tl.constexpr,
                TX: tl.constexpr, BN: tl.constexpr):
        """h[x] = Σ_jx f[jx]·T[ty, ox + jx − PAD0] for one row ty of TX pixels × BN channels, fp32, zero outside T
        (rosinality's FIR padding). f = [1,3,3,1]/4, f[j] = (1 + j(3 − j))/4: the 2-D FIR [1,3,3,1]⊗[1,3,3,1]/64·4
        is f⊗f, so z[y] = Σ_jy f[jy]·h[y + jy − PAD0] (_fir_epilogue_kernel)."""
        h = tl.zeros([TX, BN], dtype=tl.float32)
        ok_y = (ty >= 0) & (ty < TH)
        row = t_ptr + t_base + ty * sth + offs_c[None, :] * stc
        for jx in tl.static_range(4):
            tx = ox + jx - PAD0
            ok = mask_x & (tx >= 0) & (tx < TW) & ok_y
            v = tl.load(row + (tx * stw)[:, None], mask=ok[:, None] & mask_c[None, :], other=0.0)
            h += v.to(tl.float32) * ((1 + jx * (3 - jx)) / 4)
        return h

    @triton.jit
    def preactivation(z, b, oy, ox, offs_o, mask_m, mask_o, Cout, d_ptr, noise_ptr, strength_ptr, bias_ptr,
                      snb, snh, snw, DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """a = d·z + strength·noise + bias (fp32)."""
        a = z
        if DEMOD:
            a = a * tl.load(d_ptr + b * Cout + offs_o, mask=mask_o, other=0.0)[None, :]
        if HAS_NOISE:
            n = tl.load(noise_ptr + b * snb + oy * snh + ox * snw, mask=mask_m, other=0.0).to(tl.float32)
            a = a + tl.load(strength_ptr).to(tl.float32) * n[:, None]
        if HAS_BIAS:
            a = a + tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        return a

    @triton.jit
    def activate(a, gain, clamp, LRELU: tl.constexpr, HAS_CLAMP: tl.constexpr):
        if LRELU:
            v = tl.where(a >= 0, a, 0.2 * a) * gain
        else:
            v = a * gain
        if HAS_CLAMP:
            v = tl.minimum(tl.maximum(v, -clamp), clamp)
        return v

    @triton.jit
    def skip_upsampled(skip_ptr, b, oy, ox, offs_o, mask_m, mask_o, SH, SW, skb, skc, skh, skw):
        """upfirdn2d(skip, FIR, up=2, pad=(2,1)) at output pixels (oy, ox): per axis, an even output 2m takes
        ¾·s[m] + ¼·s[m−1], an odd one 2m+1 takes ¾·s[m] + ¼·s[m+1]."""
        my, mx = oy // 2, ox // 2
        ny, nx = my - 1 + 2 * (oy % 2), mx - 1 + 2 * (ox % 2)
        col = skip_ptr + b * skb + offs_o[None, :] * skc
        cm = mask_o[None, :]
        ok_ny = (ny >= 0) & (ny < SH)
        ok_nx = (nx >= 0) & (nx < SW)
        v = 0.5625 * tl.load(col + (my * skh + mx * skw)[:, None], mask=mask_m[:, None] & cm, other=0.0).to(tl.float32)
        v += 0.1875 * tl.load(col + (ny * skh + mx * skw)[:, None], mask=(mask_m & ok_ny)[:, None] & cm,
                              other=0.0).to(tl.float32)
        v += 0.1875 * tl.load(col + (my * skh + nx * skw)[:, None], mask=(mask_m & ok_nx)[:, None] & cm,
                              other=0.0).to(tl.float32)
        v += 0.0625 * tl.load(col + (ny * skh + nx * skw)[:, None], mask=(mask_m & ok_ny & ok_nx)[:, None] & cm,
                              other=0.0).to(tl.float32)
        return v

    @tuned(gemm_configs(GEMM_SHAPES, GEMM_WIDE) + block_configs(("BM", "BN", "BK", "TX"), [], GEMM_WIDE_2D)
           + block_configs(("BM", "BN", "BK", "TX", "CA"), [], GEMM_WIDE_CA),
           key=["Cin", "Cout", "H", "W", "K", "UP", "PRECISION", "PRESCALED"], prune=prune_mn("PIXELS", "Cout", "W"))
    @fast_jit
    def _modconv_fwd_kernel(x_ptr, w_ptr, s_ptr, d_ptr, noise_ptr, strength_ptr, bias_ptr, skip_ptr, out_ptr, z_ptr,
                            B, Cin, Cout, H, W, HO, WO, PIXELS,
                            sxb, sxc, sxh, sxw, ssb, ssi, snb, snh, snw, skb, skc, skh, skw, sob, soc, soh, sow,
                            wgain, gain, clamp,
                            K: tl.constexpr, UP: tl.constexpr, DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, LRELU: tl.constexpr,
                            HAS_CLAMP: tl.constexpr, STORE_Z: tl.constexpr, PRECISION: tl.constexpr,
                            PRESCALED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            NARROW: tl.constexpr = 0, TX: tl.constexpr = 0, CA: tl.constexpr = 0):
        """UP=1: out = epilogue(conv(x·sg, W)) [+ z = the conv]; UP=2: out = T, phase program_id(2) % 4 of the
        transposed conv (HO×WO = T's size). w_ptr: W as [k, k, Cin, Cout] contiguous; s_ptr: the styles [B, Cin]
        (any dtype and strides), scaled by wgain = g in fp32 as they are loaded. PRESCALED: x is u = x·s·g already
        (prescale), the loop scales nothing. CA: x's tiles in 8-byte runs (see GEMM_WIDE_CA)."""
        pid_m, pid_n, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if UP == 1:
            b, py, px = pid_z, 0, 0
            MH, MW, n_th, n_tw = HO, WO, K, K
        else:
            b, py, px = pid_z // 4, (pid_z % 4) // 2, pid_z % 2
            MH, MW = (HO - py + 1) // 2, (WO - px + 1) // 2  # T rows/cols of this parity
            n_th, n_tw = (K - py + 1) // 2, (K - px + 1) // 2  # taps kh ≡ py (mod 2)
        b = b.to(tl.int64)  # B·C·H·W may pass 2^31
        my, mx, mask_m = pixel_tile(pid_m, MH, MW, BM, TX)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < Cout
        offs_k = tl.arange(0, BK)
        x_base = x_ptr + b * sxb
        n_kc = tl.cdiv(Cin, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        row_off = my * sxh + mx * sxw  # each tap adds one scalar offset to these
        c0, jh, jw = 0, 0, 0  # this iteration's first channel and tap (row, column among this phase's taps)
        # one flat loop over (tap, channel chunk) so the GPU pipelines across taps, not only within one
        for t in range(0, n_th * n_tw * n_kc):
            i = c0 + offs_k
            mask_i = i < Cin
            if UP == 1:
                kh, kw = jh, jw
                dy, dx = kh - K // 2, kw - K // 2
            else:  # T[2m+py] = Σ_j u[m−j]·W[py+2j]
                kh, kw = py + 2 * jh, px + 2 * jw
                dy, dx = -jh, -jw
            iy, ix = my + dy, mx + dx
            ok = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xi = tl.max_contiguous(i, 64 // x_ptr.dtype.element_ty.primitive_bitwidth) if CA else i
            xt = tl.load(x_base + (row_off + (dy * sxh + dx * sxw))[:, None] + xi[None, :] * sxc,
                         mask=ok[:, None] & mask_i[None, :], other=0.0)
            wt = tl.load(w_ptr + ((kh * K + kw) * Cin + i)[:, None] * Cout + offs_n[None, :],
                         mask=mask_i[:, None] & mask_n[None, :], other=0.0)
            # the next (tap, chunk) by scalar counters: dividing t by the runtime chunk count cost ~30 integer
            # instructions per iteration (sm_90 SASS), as much as the tile loads' own address math
            c0 += BK
            wrap = c0 >= Cin
            c0 = tl.where(wrap, 0, c0)
            jw = tl.where(wrap, jw + 1, jw)
            wrap = jw >= n_tw
            jw = tl.where(wrap, 0, jw)
            jh = tl.where(wrap, jh + 1, jh)
            # scale the smaller operand tile. W's (BN < BM, the few-channel layers): x then feeds the MMA straight
            # from shared memory (an sm_90 compile: wgmma with both operands as smem descriptors, 78 registers
            # instead of 122 for 128×32 tiles); else x's, and W's tile stays in shared memory. Scaling a square
            # tile is most of the loop's instructions (sm_90 SASS, 128×128×32: ~90 of 226, issue-bound against
            # the MMA), hence PRESCALED for the wide layers
            if PRESCALED:
                ut = xt
            else:
                sc = tl.load(s_ptr + b * ssb + i * ssi, mask=mask_i, other=0.0).to(tl.float32) * wgain
                if BN < BM:
                    ut = xt
                    wt = (wt.to(tl.float32) * sc[:, None]).to(w_ptr.dtype.element_ty)
                else:
                    ut = (xt.to(tl.float32) * sc[None, :]).to(w_ptr.dtype.element_ty)
            if INTERPRETED:
                ut, wt = ut.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(ut, wt, acc, input_precision=PRECISION)
        oy, ox = UP * my + py, UP * mx + px
        if NARROW > 0:  # Cout <= NARROW < BN (toRGB's 3 of the MMA's 16): the epilogue on NARROW columns only
            acc = leading_columns(acc, BM, BN, NARROW)
            offs_n = tl.arange(0, NARROW)
            mask_n = offs_n < Cout
        out_off = b * sob + (oy * soh + ox * sow)[:, None] + offs_n[None, :] * soc
        mask = mask_m[:, None] & mask_n[None, :]
        if UP == 2:
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if STORE_Z:  # z has out's shape and strides
                z = acc.to(z_ptr.dtype.element_ty)
                tl.store(z_ptr + out_off, z, mask=mask)
                # the backward recomputes a from the stored (16-bit) z: the epilogue starts from the same rounded z,
                # so leaky-ReLU's slope and the clamp mask there are exactly those of this forward
                acc = z.to(tl.float32)
            a = preactivation(acc, b, oy, ox, offs_n, mask_m, mask_n, Cout, d_ptr, noise_ptr, strength_ptr, bias_ptr,
                              snb, snh, snw, DEMOD, HAS_NOISE, HAS_BIAS)
            v = activate(a, gain, clamp, LRELU, HAS_CLAMP)
            if HAS_SKIP:
                v += skip_upsampled(skip_ptr, b, oy, ox, offs_n, mask_m, mask_n, HO // 2, WO // 2, skb, skc, skh, skw)
            tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=mask)

    @fast_jit
    def _weight_prep_kernel(w_ptr, wt_ptr, Cout, Cin, KK: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
        """W [Cout, Cin, KK] -> its taps-major copy [KK, Cin, Cout] in wt's dtype."""
        offs_o = tl.program_id(0) * BO + tl.arange(0, BO)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        mask = (offs_o < Cout)[:, None] & (offs_i < Cin)[None, :]
        for t in tl.static_range(KK):
            v = tl.load(w_ptr + (offs_o[:, None] * Cin + offs_i[None, :]) * KK + t, mask=mask, other=0.0)
            tl.store(wt_ptr + (t * Cin + offs_i[None, :]) * Cout + offs_o[:, None], v, mask=mask)

    @fast_jit
    def _weight_demod_kernel(w_ptr, wt_ptr, q_ptr, s_ptr, d_ptr, B, Cout, Cin, ssb, ssi, wgain, eps,
                             KK: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BB: tl.constexpr):
        """The forward's weight prep and demodulation for BO output channels, in one launch: W [Cout, Cin, KK] ->
        W [KK, Cin, Cout] and Q = Σ_t W² [Cout, Cin] fp32 (both written in the first pass, for the backward too)
        and d[b, o] = rsqrt(Σ_i (s[b, i]·g)²·Q[o, i] + eps), fp32, BB samples per pass over W (Q is recomputed
        per pass rather than read back: W comes from L2). Each sum runs in one fixed order: the same bits every
        run."""
        offs_o = tl.program_id(0) * BO + tl.arange(0, BO)
        mask_o = offs_o < Cout
        for b0 in range(0, B, BB):
            offs_b = b0 + tl.arange(0, BB)
            mask_b = offs_b < B
            acc = tl.zeros([BB, BO], dtype=tl.float32)
            for i0 in range(0, Cin, BI):
                offs_i = i0 + tl.arange(0, BI)
                mask_i = offs_i < Cin
                mask = mask_o[:, None] & mask_i[None, :]
                q = tl.zeros([BO, BI], dtype=tl.float32)
                for t in tl.static_range(KK):
                    v = tl.load(w_ptr + (offs_o[:, None] * Cin + offs_i[None, :]) * KK + t, mask=mask, other=0.0)
                    q += v.to(tl.float32) * v.to(tl.float32)
                    tl.store(wt_ptr + (t * Cin + offs_i[None, :]) * Cout + offs_o[:, None], v, mask=mask & (b0 == 0))
                tl.store(q_ptr + offs_o[:, None] * Cin + offs_i[None, :], q, mask=mask & (b0 == 0))
                s = tl.load(s_ptr + offs_b.to(tl.int64)[:, None] * ssb + offs_i[None, :] * ssi,
                            mask=mask_b[:, None] & mask_i[None, :], other=0.0).to(tl.float32) * wgain
                acc = tl.dot(s * s, tl.trans(q), acc, input_precision="ieee")
            tl.store(d_ptr + offs_b.to(tl.int64)[:, None] * Cout + offs_o[None, :], tl.rsqrt(acc + eps),
                     mask=mask_b[:, None] & mask_o[None, :])

    @fast_jit
    def _prescale_kernel(x_ptr, s_ptr, u_ptr, Cin, W, PIXELS, sxb, sxc, sxh, sxw, ssb, ssi, wgain,
                         BM: tl.constexpr, BC: tl.constexpr):
        """u = x·s·g in x's dtype (fp32 product, one rounding: the GEMM's own ut), written channels_last."""
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2).to(tl.int64)
        mask = (offs_m < PIXELS)[:, None] & (offs_c < Cin)[None, :]
        xy = (offs_m // W) * sxh + (offs_m % W) * sxw
        v = tl.load(x_ptr + b * sxb + xy[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(s_ptr + b * ssb + offs_c * ssi, mask=offs_c < Cin, other=0.0).to(tl.float32) * wgain
        tl.store(u_ptr + (b * PIXELS + offs_m)[:, None] * Cin + offs_c[None, :],
                 (v * sc[None, :]).to(u_ptr.dtype.element_ty), mask=mask)

    # elementwise-like kernels (the skip's backward): tiles of pixels × channels, (BM, BN, TX, warps). First,
    # 4-channel tiles for the toRGB skip's 3 (prune_mn keeps a tile narrower than 16 only where it spans every channel)
    EW_SHAPES = [(256, 4, 0, 4), (256, 4, 16, 4), (512, 4, 0, 4),
                 (64, 64, 0, 4), (64, 64, 8, 4), (128, 32, 0, 4), (128, 32, 16, 4), (32, 128, 0, 4), (256, 16, 0, 4),
                 (256, 16, 16, 4), (128, 64, 0, 8)]
    EW_WIDE = [(256, 32, 0, 8), (64, 32, 0, 2), (128, 128, 0, 8), (512, 16, 0, 8), (256, 32, 16, 8), (512, 16, 32, 8)]

    def ew_configs():
        return block_configs(("BM", "BN", "TX"), EW_SHAPES, EW_WIDE)

    # the FIR passes: (TX columns, BN channels, RY rows per program, warps)
    FIR_SHAPES = [(32, 32, 16, 4), (16, 64, 16, 4), (64, 16, 16, 4), (32, 64, 8, 4), (32, 128, 8, 8), (64, 32, 32, 4),
                  (8, 128, 8, 4)]  # the last for 8-pixel-wide maps (convs.0)
    FIR_WIDE = [(64, 64, 16, 8), (128, 32, 16, 8), (32, 32, 32, 4), (16, 32, 16, 2), (32, 32, 64, 4)]

    def fir_configs():
        return block_configs(("TX", "BN", "RY"), FIR_SHAPES, FIR_WIDE)

    @tuned(fir_configs(), key=["Cout", "HO", "WO", "PAD0"], prune=prune_mn("PIXELS", "Cout", "WO"),
           interpret={"TX": 16, "BN": 16, "RY": 8})
    @fast_jit
    def _fir_epilogue_kernel(t_ptr, d_ptr, noise_ptr, strength_ptr, bias_ptr, skip_ptr, out_ptr, z_ptr,
                             B, Cout, TH, TW, HO, WO, PIXELS,
                             stb, stc, sth, stw, snb, snh, snw, skb, skc, skh, skw, sob, soc, soh, sow,
                             gain, clamp,
                             PAD0: tl.constexpr, DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_SKIP: tl.constexpr, LRELU: tl.constexpr, HAS_CLAMP: tl.constexpr,
                             STORE_Z: tl.constexpr, TX: tl.constexpr, BN: tl.constexpr, RY: tl.constexpr):
        """out[y, x] = epilogue(z), z = Σ_{jy,jx} f[jy]·f[jx]·T[y + jy − PAD0, x + jx − PAD0] over HO×WO
        [+ z, with out's shape and strides]. With every epilogue flag off and gain 1: the FIR alone (the backward's
        adjoint, FIRᵀ = the FIR with the other pad). Each program walks RY rows of a strip of TX columns × BN
        channels, filters each T row horizontally once (fir_row) and keeps the last four: 4 loads and 8 FMAs per
        element instead of 16 and 16 (the 2-D gather was issue-bound: ~70 sm_90 instructions per element)."""
        pid, pid_n = tl.program_id(0), tl.program_id(1)
        n_tx, n_ry = tl.cdiv(WO, TX), tl.cdiv(HO, RY)
        rest = pid // n_tx
        b = (rest // n_ry).to(tl.int64)
        y0 = (rest % n_ry) * RY
        ox = (pid % n_tx) * TX + tl.arange(0, TX)
        mask_x = ox < WO
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < Cout
        t_base = b * stb
        h0 = fir_row(t_ptr, t_base, y0 - PAD0, ox, offs_n, mask_x, mask_n, TH, TW, stc, sth, stw, PAD0, TX, BN)
        h1 = fir_row(t_ptr, t_base, y0 + 1 - PAD0, ox, offs_n, mask_x, mask_n, TH, TW, stc, sth, stw, PAD0, TX, BN)
        h2 = fir_row(t_ptr, t_base, y0 + 2 - PAD0, ox, offs_n, mask_x, mask_n, TH, TW, stc, sth, stw, PAD0, TX, BN)
        for r in range(RY):
            oy = y0 + r
            h3 = fir_row(t_ptr, t_base, oy + 3 - PAD0, ox, offs_n, mask_x, mask_n, TH, TW, stc, sth, stw, PAD0, TX,
                         BN)
            z = (h0 + h3) * 0.25 + (h1 + h2) * 0.75
            h0, h1, h2 = h1, h2, h3
            mask_m = mask_x & (oy < HO)
            out_off = b * sob + oy * soh + (ox * sow)[:, None] + offs_n[None, :] * soc
            mask = mask_m[:, None] & mask_n[None, :]
            if STORE_Z:  # as in _modconv_fwd_kernel: the epilogue starts from the stored (rounded) z
                z16 = z.to(z_ptr.dtype.element_ty)
                tl.store(z_ptr + out_off, z16, mask=mask)
                z = z16.to(tl.float32)
            a = preactivation(z, b, oy, ox, offs_n, mask_m, mask_n, Cout, d_ptr, noise_ptr, strength_ptr, bias_ptr,
                              snb, snh, snw, DEMOD, HAS_NOISE, HAS_BIAS)
            v = activate(a, gain, clamp, LRELU, HAS_CLAMP)
            if HAS_SKIP:
                v += skip_upsampled(skip_ptr, b, oy, ox, offs_n, mask_m, mask_n, HO // 2, WO // 2, skb, skc, skh, skw)
            tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=mask)


def fir(t: torch.Tensor, out: torch.Tensor, pad0: int, epilogue_args=None, epilogue_strides=(0,) * 7,
        scalars=(1.0, 0.0), z=None, **flags) -> None:
    """out = epilogue(FIR(t)) over out's grid (_fir_epilogue_kernel); without ``epilogue_args`` the FIR alone."""
    batch, cout, th, tw = t.shape
    ho, wo = out.shape[-2:]
    grid = lambda meta: (cdiv(wo, meta["TX"]) * cdiv(ho, meta["RY"]) * batch,  # noqa: E731
                         cdiv(cout, meta["BN"]))
    flags = {n: flags.get(n, False) for n in ("DEMOD", "HAS_NOISE", "HAS_BIAS", "HAS_SKIP", "LRELU", "HAS_CLAMP")}
    _fir_epilogue_kernel[grid](t, *(epilogue_args or (out,) * 5), out, out if z is None else z, batch, cout, th, tw,
                               ho, wo, ho * wo, *t.stride(), *epilogue_strides, *out.stride(), *scalars, PAD0=pad0,
                               STORE_Z=z is not None, **flags)


def pixel_programs(h: int, w: int, meta: dict) -> int:
    """Programs along an h×w pixel grid for a config's BM and TX (pixel_tile)."""
    tx = meta.get("TX", 0)
    return cdiv(h * w, meta["BM"]) if tx == 0 else cdiv(h, meta["BM"] // tx) * cdiv(w, tx)


def cl_empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(b, c, h, w) strides; zeros for an absent tensor."""
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def fir_pad0(k: int) -> int:
    """Leading pad of the up=2 blur over T (rosinality: p = 4 − 2 − (k − 1), pad0 = (p + 1)//2 + 1)."""
    return (3 - k + 1) // 2 + 1


def needs_conv_out(demodulate: bool, lrelu: bool, clamp: float | None) -> bool:
    """Whether the backward reads the conv output z (for g_d = Σ g_a·z, or to recompute a for act'/clamp)."""
    return demodulate or lrelu or clamp is not None


def prepare_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [Cout, Cin, k, k] -> its taps-major copy [k, k, Cin, Cout] in ``dtype`` (the activations'), so the GEMM
    tiles of W are rows of the forward's N dimension (Cout) and of the data gradient's K dimension: the forward of a
    layer without demodulation makes it, the backward reuses it."""
    cout, cin, k, _ = weight.shape
    weight = weight.contiguous()
    w_taps = torch.empty((k, k, cin, cout), dtype=dtype, device=weight.device)
    blocks = 16 if INTERPRET else 32
    _weight_prep_kernel[(cdiv(cout, blocks), cdiv(cin, blocks))](weight, w_taps, cout, cin, KK=k * k,
                                                                                BO=blocks, BI=blocks)
    return w_taps


def weight_and_demodulation(weight: torch.Tensor, styles: torch.Tensor, weight_gain: float, eps: float,
                            dtype: torch.dtype):
    """The forward's (W taps-major [k, k, Cin, Cout] in ``dtype`` (prepare_weight's), d = rsqrt((s·g)² @ Qᵀ + eps)
    fp32 [B, Cout], Q = Σ_taps W² fp32 [Cout, Cin] (for the backward)) in one launch: a small layer's time on a GPU
    is host time per launch."""
    cout, cin, k, _ = weight.shape
    batch = styles.shape[0]
    weight = weight.contiguous()
    w_taps = torch.empty((k, k, cin, cout), dtype=dtype, device=weight.device)
    d = torch.empty((batch, cout), dtype=torch.float32, device=weight.device)
    q = torch.empty((cout, cin), dtype=torch.float32, device=weight.device)
    # 16 channels a program: 32 programs at 512 channels, each reading 16·Cin·k² weights per pass over the batch in
    # 64-channel chunks (the k² tap loads of a chunk in flight together); up to 64 samples a pass
    bb = min(64, max(16, next_power_of_2(batch)))
    _weight_demod_kernel[(cdiv(cout, 16),)](weight, w_taps, q, styles, d, batch, cout, cin, *styles.stride(),
                                                   float(weight_gain), float(eps), KK=k * k, BO=16, BI=64, BB=bb)
    return w_taps, d, q


# Layers with at least this many output channels get x·s·g from one elementwise pass (2 bytes per element read and
# written) instead of the GEMM scaling a square tile in every iteration (see _modconv_fwd_kernel): the pass costs
# elt/(9·Cout) bytes per GEMM FLOP, ~4 % of the GEMM's time at Cout 512 and ~17 % at 128 on an H100, against the
# ~90 of 226 instructions per iteration it saves (sm_90 SASS). Measured on an H200 (2026-11-26, 512→512 at 64²,
# batch 16, bf16): forward GEMM 0.726 ms after a 0.032 ms pass, 1.012 ms without. 128 channels not yet A/B'd.
PRESCALE_MIN_COUT = int(os.environ.get("LSAP_TRITON_PRESCALE_MIN_COUT", "256"))


# Layers with at most this many output channels (toRGB) run the forward's epilogue on that many columns of the tile.
NARROW = 4


def prescale(x: torch.Tensor, styles: torch.Tensor, weight_gain: float) -> torch.Tensor:
    """u = x·s·g [B, Cin, H, W] channels_last, in x's dtype; x may be any strides (a batch-broadcast x too)."""
    batch, cin, h, w = x.shape
    u = cl_empty(x.shape, x.dtype, x.device)
    bm, bc = (64, 16) if INTERPRET else (64, 64)
    _prescale_kernel[(cdiv(h * w, bm), cdiv(cin, bc), batch)](
        x, styles, u, cin, w, h * w, *x.stride(), *styles.stride(), float(weight_gain), BM=bm, BC=bc)
    return u


def forward(x, w_t, styles, weight_gain: float, d, noise, strength, bias, skip, up: int, demodulate: bool,
            lrelu: bool, gain: float, clamp: float | None, precision: str, z_from_out: bool = False):
    """Launch the forward. ``w_t``: W as [k, k, Cin, Cout] (prepare_weight); the kernel scales the styles by
    ``weight_gain`` as it reads them. Returns (out, conv_out): conv_out is z, the conv output before the epilogue
    (for up=2 the blurred transposed conv), or an empty tensor when the backward does not need it or recovers it
    from out (``z_from_out``). ``d`` fp32 [B, Cout] (None without demodulation)."""
    batch, cin, h, w = x.shape
    k, cout = w_t.shape[0], w_t.shape[-1]
    ho, wo = h * up, w * up
    out = cl_empty((batch, cout, ho, wo), x.dtype, x.device)
    keep = needs_conv_out(demodulate, lrelu, clamp) and not z_from_out
    if out.numel() == 0:
        return out, x.new_empty((0,))

    def ptr(t):  # absent optional inputs: any tensor (its flag is off, the kernel never reads it)
        return out if t is None else t

    epilogue_args = (ptr(d), ptr(noise), ptr(strength), ptr(bias), ptr(skip))
    epilogue_strides = (*noise_strides(noise), *strides4(skip))
    flags = dict(DEMOD=demodulate, HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, HAS_SKIP=skip is not None,
                 LRELU=lrelu, HAS_CLAMP=clamp is not None)
    scalars = (float(weight_gain), float(gain), 0.0 if clamp is None else float(clamp))
    z = cl_empty(out.shape, x.dtype, x.device) if keep else None
    prescaled = cout >= PRESCALE_MIN_COUT
    if prescaled:
        x = prescale(x, styles, weight_gain)
    if up == 1:
        grid = lambda meta: (pixel_programs(h, w, meta), cdiv(cout, meta["BN"]), batch)  # noqa: E731
        _modconv_fwd_kernel[grid](x, w_t, styles, *epilogue_args, out, ptr(z), batch, cin, cout, h, w, ho, wo, h * w,
                                  *x.stride(), *styles.stride(), *epilogue_strides, *out.stride(), *scalars,
                                  K=k, UP=1, STORE_Z=keep, PRECISION=precision, PRESCALED=prescaled,
                                  NARROW=NARROW if cout <= NARROW else 0, **flags)
        return out, z if keep else x.new_empty((0,))
    th, tw = 2 * h + k - 2, 2 * w + k - 2
    t = cl_empty((batch, cout, th, tw), x.dtype, x.device)
    ph, pw = (th + 1) // 2, (tw + 1) // 2  # the largest phase (even rows, even columns)
    grid = lambda meta: (pixel_programs(ph, pw, meta), cdiv(cout, meta["BN"]), batch * 4)  # noqa: E731
    _modconv_fwd_kernel[grid](x, w_t, styles, out, out, out, out, out, t, out, batch, cin, cout, h, w, th, tw,
                              ph * pw, *x.stride(), *styles.stride(), *(0,) * 7, *t.stride(),
                              float(weight_gain), 1.0, 0.0,
                              K=k, UP=2, STORE_Z=False, PRECISION=precision, PRESCALED=prescaled, NARROW=0,
                              **{n: False for n in flags})
    fir(t, out, fir_pad0(k), epilogue_args, epilogue_strides, scalars[1:], z if keep else None, **flags)
    return out, z if keep else x.new_empty((0,))


def noise_strides(noise: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, h, w) strides of noise [B or 1, 1, H, W]; batch stride 0 when one map is shared by the batch."""
    if noise is None:
        return (0, 0, 0)
    sb, _, sh, sw = noise.stride()
    return (0 if noise.shape[0] == 1 else sb, sh, sw)
