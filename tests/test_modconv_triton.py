"""The Triton backend of modulated_conv2d (ops/modconv/triton*.py): forward and every gradient of each StyleGAN2
variant against the float64 per-sample-weight formula (SPEC §3, §5), odd sizes, options, low precision, custom-op
registration (opcheck), torch.compile of a small Generator, double backward, and compilation for an sm_90 target.
On CPU the kernels run under TRITON_INTERPRET=1 (tiles of 16), so shapes are tiny; `gpu` tests take real shapes."""
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lsap_kernels as L
from lsap_kernels import backends
from helpers import TOL, device_for, rel_err
from test_modconv import formula, tensor_case

pytestmark = pytest.mark.skipif(not L.available_backends()["triton"], reason="triton is not usable here")

if L.available_backends()["triton"]:
    from lsap_kernels.ops.modconv import triton as modconv_triton
    from lsap_kernels.ops.modconv import triton_bwd

@pytest.fixture(autouse=True, scope="module")
def _fast_kernels():
    """Interpreter: it checks every int32 add/sub/mul for overflow (~3 ms each, half of these tests' time); the
    shapes here are far from 2^31, so that is off for this module. GPU: one block config per shape
    (LSAP_TRITON_AUTOTUNE=0), since each autotuned config is one more compilation and these tests are about values."""
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("TRITON_INTERPRET") == "1":
            import triton.runtime.interpreter as interp

            builder = interp.interpreter_builder
            mp.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=False))
        else:
            mp.setenv("LSAP_TRITON_AUTOTUNE", "0")
        yield


DEVICE = device_for("triton")
VARIANTS = {
    "3x3": dict(k=3, up=1),
    "3x3-up2": dict(k=3, up=2),
    "torgb": dict(k=1, up=1, demodulate=False, activation="linear", skip=True),
}
# batch, Cin, Cout, H=W: batch 1 and 5, channel counts below, at and across the interpreter's 16-wide tiles
SHAPES = [(1, 5, 17, 4), (5, 17, 7, 5), (1, 3, 1, 9), (2, 6, 3, 8)]
GRAD_NAMES = ("x", "weight", "styles", "noise", "noise_strength", "bias", "skip")


def split_variant(name):
    v = dict(VARIANTS[name])
    return v.pop("k"), v.pop("skip", False), v


def run(tensors, opts, dtype, backend="triton", requires_grad=GRAD_NAMES, grad_seed=1):
    """Forward + backward on ``backend`` with inputs cast to ``dtype`` on DEVICE: (out, {name: grad})."""
    leaves = {n: t.detach().to(DEVICE, dtype).requires_grad_(n in requires_grad) for n, t in tensors.items()}
    out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"],
                             **{n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}, **opts,
                             backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(DEVICE, dtype))
    return out, {n: t.grad for n, t in leaves.items()}


def run_formula(tensors, opts, grad_dtype=torch.float64, slope_positive=None):
    """The independent float64 formula (rosinality's per-sample weights) with autograd: (out, grads). The upstream
    gradient is run()'s, rounded to ``grad_dtype`` as run() rounds it. ``slope_positive``: take leaky-ReLU's slope
    from this mask instead of from the sign of the float64 pre-activation."""
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in tensors.items()}
    kw = {n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}
    if slope_positive is None:
        out = formula(leaves["x"], leaves["weight"], leaves["styles"], **kw, **opts)
    else:
        a = formula(leaves["x"], leaves["weight"], leaves["styles"], **kw, **{**opts, "activation": "linear"})
        out = math.sqrt(2) * torch.where(slope_positive.cpu(), a, 0.2 * a)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.to(grad_dtype).double())
    return out, {n: t.grad for n, t in leaves.items()}


def assert_close(out, grads, ref_out, ref_grads, tol, names=None):
    errs = {"out": rel_err(out, ref_out)}
    for n in names or ref_grads:
        assert grads[n] is not None, f"no gradient for {n}"
        assert grads[n].dtype == out.dtype, (n, grads[n].dtype)
        errs[n] = rel_err(grads[n], ref_grads[n])
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# ---- forward and every gradient against the float64 formula --------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_formula(shape, variant, poisoned):
    k, skip, opts = split_variant(variant)
    batch, cin, cout, size = shape
    size += size % 2 if skip else 0  # the skip branch needs an even output
    tensors = tensor_case(batch, cin, cout, size, k, opts["up"], skip=skip, seed=sum(shape))
    out, grads = run(tensors, opts, torch.float32)
    assert out.dtype == torch.float32 and out.device.type == DEVICE
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])


def one_config(**blocks) -> list:
    """A kernel's config list pinned to these block sizes (a single config: no benchmarking, on a GPU too)."""
    import triton
    return [triton.Config(blocks, num_warps=1 if DEVICE == "cpu" else 4)]


@pytest.mark.parametrize("variant", ["3x3", "3x3-up2"])
def test_square_tiles_scale_the_activations(variant, monkeypatch, poisoned):
    """The forward GEMM scales W's tile where BN < BM (the interpreter's 64×16 tiles: every other test) and x's tile
    otherwise: that branch here, with 16×16 tiles and channels across them."""
    from lsap_kernels.ops.modconv import triton_fwd
    monkeypatch.setattr(triton_fwd._modconv_fwd_kernel, "configs", one_config(BM=16, BN=16, BK=16))
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 20, 18, 5, k, opts["up"], skip=skip, seed=21)
    out, grads = run(tensors, opts, torch.float32)
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])


@pytest.mark.parametrize("variant", VARIANTS)
def test_pixel_block_tiles(variant, monkeypatch, poisoned):
    """Configs with TX > 0 tile the pixels in blocks of BM/TX rows × TX columns (pixel_tile): every kernel that
    takes them at once (forward GEMM, skip backward; the data gradient through LSAP_TRITON_DGRAD_TX), and the FIR
    passes' strips with other widths and row counts than the interpreter's default, on maps whose height and width
    are no multiple of the block's, so blocks are cut on both edges."""
    from lsap_kernels.ops.modconv import triton_fwd
    monkeypatch.setattr(triton_bwd, "DGRAD_TX", 8)  # its tile: 64 pixels (interpreter) or 128, 8 columns wide
    block = {"BM": 32, "BN": 16, "TX": 8}  # 4 rows × 8 columns
    monkeypatch.setattr(triton_fwd._modconv_fwd_kernel, "configs", one_config(**block, BK=16))
    monkeypatch.setattr(triton_bwd._skip_bwd_kernel, "configs", one_config(**block))
    # the FIR passes (forward and adjoint): strips 8 columns wide, 4 rows per program
    monkeypatch.setattr(triton_fwd._fir_epilogue_kernel, "configs", one_config(TX=8, BN=16, RY=4))
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 6, 18, 10 if skip else 11, k, opts["up"], skip=skip, seed=23)
    assert triton_bwd.dgrad_tile_width(triton_bwd.pixel_block(11 * 11), 11) == 8
    out, grads = run(tensors, opts, torch.float32)
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiles_in_8_byte_runs(variant, monkeypatch, poisoned):
    """CA = 1 (GEMM_WIDE_CA: the forward's x tiles and the data gradient's g_z tiles declared contiguous in 8-byte
    runs, so a GPU pipelines them through L1) changes which copy instructions load the tiles, never the values: both
    kernels with it, against the formula (the instructions: test_8_byte_runs_load_through_l1_on_sm90)."""
    from lsap_kernels.ops.modconv import triton_fwd
    monkeypatch.setattr(triton_fwd._modconv_fwd_kernel, "configs", one_config(BM=32, BN=16, BK=16, CA=1))
    monkeypatch.setattr(triton_bwd._dgrad_kernel, "configs", one_config(BN=16, BK=16, CA=1))
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 20, 18, 6, k, opts["up"], skip=skip, seed=24)
    for dtype in (torch.float32, torch.bfloat16):  # runs of 2 and 4 elements
        rounded = {n: t.to(dtype).double() for n, t in tensors.items()}
        out, grads = run(rounded, opts, dtype)
        lrelu = opts.get("activation", "lrelu") == "lrelu"
        # 16 bits: leaky-ReLU's slope where the kernel took it (see test_low_precision)
        positive = out.detach() > 0 if lrelu and dtype != torch.float32 else None
        ref_out, ref_grads = run_formula(rounded, opts, grad_dtype=dtype, slope_positive=positive)
        assert_close(out, grads, ref_out, ref_grads, TOL[dtype])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prescaled_activations(variant, monkeypatch, poisoned):
    """Wide layers (Cout ≥ PRESCALE_MIN_COUT) get x·s·g from one elementwise pass and a GEMM that scales nothing:
    that path for every variant (the threshold lowered to reach it at test sizes), and a batch-broadcast x."""
    from lsap_kernels.ops.modconv import triton_fwd
    monkeypatch.setattr(triton_fwd, "PRESCALE_MIN_COUT", 1)
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(3, 20, 18, 6, k, opts["up"], skip=skip, seed=22)
    out, grads = run(tensors, opts, torch.float32)
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])
    x = tensors["x"][:1].to(DEVICE, torch.float32).expand(3, -1, -1, -1)  # the Generator's constant input
    out = L.modulated_conv2d(x, *(tensors[n].to(DEVICE, torch.float32) for n in ("weight", "styles")),
                             up=opts["up"], backend="triton")
    ref = formula(x.cpu().double(), tensors["weight"].double(), tensors["styles"].double(), up=opts["up"])
    assert rel_err(out, ref) < TOL[torch.float32]


def test_prescale_reads_any_strides():
    """prescale (u = x·s·g, channels_last) against torch for an x with padded rows (a column slice) and one with
    batch stride 0: the op may be called directly with any layout."""
    from lsap_kernels.ops.modconv.triton_fwd import prescale
    gen = torch.Generator().manual_seed(5)
    styles = torch.randn(3, 20, generator=gen).to(DEVICE)
    padded_rows = torch.randn(3, 20, 5, 9, generator=gen)[..., 1:8]
    for x in (padded_rows, torch.randn(1, 20, 5, 7, generator=gen).expand(3, -1, -1, -1)):
        u = prescale(x.to(DEVICE), styles, 0.3)
        assert u.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(u, x.double() * styles.cpu().double()[:, :, None, None] * 0.3) < 1e-6


@pytest.mark.parametrize("k", [1, 5])
def test_other_kernel_sizes_up2(k, poisoned):
    """The up path for k = 1 and 5: other T sizes, FIR pads and phase tap counts (k=1: odd phases have no taps)."""
    tensors = tensor_case(2, 5, 6, 5, k, 2, seed=20 + k)
    out, grads = run(tensors, dict(up=2), torch.float32)
    ref_out, ref_grads = run_formula(tensors, dict(up=2))
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])


# (up, demodulate, noise, bias, noise batch, activation, clamp): every option on and off, each kernel path
OPTIONS = [
    (1, False, False, False, None, "linear", None),  # bare conv: backward needs no conv output, g_z = G
    (1, True, True, False, 1, "lrelu", 0.5),  # one noise map for the batch, clamp engaged
    (1, False, True, True, None, "lrelu", None),  # lrelu without demodulation: z saved for act' only
    (1, True, False, True, None, "linear", 0.4),
    (2, False, True, True, None, "linear", 0.4),
    (2, True, False, True, 1, "lrelu", None),
    (2, False, False, False, None, "linear", None),
    (2, True, True, False, 1, "lrelu", 0.6),
]


@pytest.mark.parametrize("up,demodulate,noise,bias,noise_batch,activation,clamp", OPTIONS)
def test_options(up, demodulate, noise, bias, noise_batch, activation, clamp, poisoned):
    tensors = tensor_case(3, 4, 5, 5, 3, up, noise=noise, bias=bias, noise_batch=noise_batch, seed=3)
    opts = dict(demodulate=demodulate, activation=activation, clamp=clamp, up=up)
    out, grads = run(tensors, opts, torch.float32)
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])
    if clamp is not None:  # the clamp must have engaged for the comparison to mean something
        assert (formula(**tensors, **{**opts, "clamp": None}).abs() > clamp).any()


@pytest.mark.parametrize("up,cout", [(1, 1), (1, 4), (2, 3)])
def test_few_output_channels(up, cout, poisoned):
    """Cout <= 4 with a clamp, so z is stored too: up=1 runs the forward's epilogue on 4 of the MMA tile's columns
    (NARROW), up=2 the FIR pass on a mostly masked channel tile."""
    tensors = tensor_case(2, 5, cout, 6, 3, up, seed=31 + cout)
    opts = dict(demodulate=True, activation="lrelu", clamp=0.3, up=up)
    out, grads = run(tensors, opts, torch.float32)
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])
    assert (formula(**tensors, **{**opts, "clamp": None}).abs() > 0.3).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision(variant, dtype, poisoned):
    """16-bit inputs, outputs and gradients, fp32 accumulation: within 2e-2 of the float64 formula on the same rounded
    inputs and upstream gradient.

    Leaky-ReLU's slope jumps at a = 0. Where 16-bit rounding puts a pre-activation on the other side (a few elements
    in thousands), that one flipped slope moves the random-sign gradient sums (bias, noise, strength, and through
    them the rest) by percents; the reference backend in 16 bits shows the same. So the formula takes the slope where
    the kernel took it, and at most 0.5 % of the elements may disagree with the float64 sign."""
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 20, 9, 6, k, opts["up"], skip=skip, seed=4)
    tensors = {n: t.to(dtype).double() for n, t in tensors.items()}  # the formula sees the rounded inputs
    out, grads = run(tensors, opts, dtype)
    assert out.dtype == dtype
    positive = None
    if opts.get("activation", "lrelu") == "lrelu":
        positive = out.detach() > 0  # out = √2·lrelu(a): the kernel's sign of a
        exact = formula(**tensors, **{**opts, "activation": "linear"}) > 0
        assert (positive.cpu() != exact).double().mean() < 5e-3
    ref_out, ref_grads = run_formula(tensors, opts, grad_dtype=dtype, slope_positive=positive)
    assert_close(out, grads, ref_out, ref_grads, TOL[dtype])


ACTIVATIONS_16 = ("x", "skip")  # in the 16-bit dtype; the other inputs are parameters, float32


class _LaunchDtypes:
    """Stands in for a kernel and records, per launch, the dtype of each tensor argument by name."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            self.launches.append({n: v.dtype for n, v in named.items() if isinstance(v, torch.Tensor)})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_parameters_with_16bit_activations(variant, dtype, backend, monkeypatch, poisoned):
    """Mixed precision as the bf16 Generator runs it: x and skip in 16 bits, weight, styles, noise, its strength and
    bias float32 (the triton kernels read them as they are; the public op casts them for the reference). Output and
    the activations' gradients in x's dtype, every parameter's gradient float32, all within 2e-2 of the float64
    formula on the same inputs (x rounded to 16 bits, the parameters not); the slope as in test_low_precision; the
    GEMMs' weight copies in x's dtype."""
    from lsap_kernels.ops.modconv import triton_fwd
    fwd, dgrad = _LaunchDtypes(triton_fwd._modconv_fwd_kernel), _LaunchDtypes(triton_bwd._dgrad_kernel)
    monkeypatch.setattr(triton_fwd, "_modconv_fwd_kernel", fwd)
    monkeypatch.setattr(triton_bwd, "_dgrad_kernel", dgrad)
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 20, 9, 6, k, opts["up"], skip=skip, seed=5)
    tensors = {n: t.to(dtype if n in ACTIVATIONS_16 else torch.float32).double() for n, t in tensors.items()}
    leaves = {n: t.to(DEVICE, dtype if n in ACTIVATIONS_16 else torch.float32).requires_grad_(True)
              for n, t in tensors.items()}
    out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"],
                             **{n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}, **opts,
                             backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.to(DEVICE, dtype))
    assert out.dtype == dtype
    for n, t in leaves.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, (n, t.grad)
    positive = out.detach() > 0 if opts.get("activation", "lrelu") == "lrelu" else None
    ref_out, ref_grads = run_formula(tensors, opts, grad_dtype=dtype, slope_positive=positive)
    errs = {"out": rel_err(out, ref_out), **{n: rel_err(t.grad, ref_grads[n]) for n, t in leaves.items()}}
    assert all(e < TOL[dtype] for e in errs.values()), errs
    # both GEMM operands in x's dtype, as tl.dot needs on a GPU (the interpreter upcasts them: it would not fail)
    if backend == "triton":
        assert [(a["x_ptr"], a["w_ptr"]) for a in fwd.launches] == [(dtype, dtype)]
        assert [(a["gz_ptr"], a["w_ptr"]) for a in dgrad.launches] == [(dtype, dtype)]


class _Launches:
    """Stands in for a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("variant", VARIANTS)
def test_inversion_gradients_only(variant, monkeypatch, poisoned):
    """Inversion: weight and bias frozen, gradients for x, styles, noise (and skip): right values, and no weight-
    gradient kernel is launched."""
    k, skip, opts = split_variant(variant)
    tensors = tensor_case(2, 6, 5, 6, k, opts["up"], skip=skip, seed=13)
    wanted = ("x", "styles", "noise", "skip")
    from lsap_kernels.ops.modconv import triton_fwd
    wgrad = _Launches(triton_bwd._wgrad_kernel)
    monkeypatch.setattr(triton_bwd, "_wgrad_kernel", wgrad)
    leaves = {n: t.to(DEVICE, torch.float32).requires_grad_(n in wanted) for n, t in tensors.items()}
    out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"],
                             **{n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}, **opts,
                             backend="triton")
    # the backward reuses the forward's weight copy (and Σ w²): no weight kernel runs in it
    prep = [_Launches(getattr(triton_fwd, n)) for n in ("_weight_prep_kernel", "_weight_demod_kernel")]
    for p in prep:
        monkeypatch.setattr(triton_fwd, p.kernel.fn.__name__, p)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out))
    assert [p.count for p in prep] == [0, 0]
    out, grads = run(tensors, opts, torch.float32, requires_grad=wanted)
    assert wgrad.count == 0
    assert grads["weight"] is None and grads["bias"] is None and grads["noise_strength"] is None
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32], names=[n for n in wanted if n in tensors])
    run(tensors, opts, torch.float32)
    assert wgrad.count == 1


def test_number_noise_strength_and_no_optional_inputs():
    tensors = {n: t.to(DEVICE) for n, t in tensor_case(2, 3, 4, 5, 3, 1, seed=8).items()}
    strength = tensors.pop("noise_strength")
    out = L.modulated_conv2d(**{n: t.float() for n, t in tensors.items()}, noise_strength=0.3, backend="triton")
    assert rel_err(out, formula(**tensors, noise_strength=strength)) < TOL[torch.float32]
    bare = {n: tensors[n] for n in ("x", "weight", "styles")}
    out = L.modulated_conv2d(**{n: t.float() for n, t in bare.items()}, backend="triton")
    assert rel_err(out, formula(**bare)) < TOL[torch.float32]


@pytest.mark.parametrize("layout", ["channels_last", "batch-broadcast"])
def test_strided_inputs(layout):
    """Strided tensors are read in place: channels_last x, a batch-broadcast x (the Generator's constant input, batch
    stride 0), and a non-contiguous output gradient."""
    tensors = tensor_case(3, 5, 4, 6, 3, 1, seed=14)
    if layout == "batch-broadcast":
        tensors["x"] = tensors["x"][:1]
    leaves = {n: t.to(DEVICE, torch.float32).requires_grad_(True) for n, t in tensors.items()}
    ref_leaves = {n: t.detach().double().requires_grad_(True) for n, t in tensors.items()}

    def x_of(t):
        if layout == "batch-broadcast":
            return t.expand(3, -1, -1, -1)
        return t.contiguous(memory_format=torch.channels_last)

    kw = ("noise", "noise_strength", "bias")
    out = L.modulated_conv2d(x_of(leaves["x"]), leaves["weight"], leaves["styles"], **{n: leaves[n] for n in kw},
                             backend="triton")
    ref_out = formula(x_of(ref_leaves["x"]), ref_leaves["weight"], ref_leaves["styles"],
                      **{n: ref_leaves[n] for n in kw})
    g = torch.randn(ref_out.shape[::-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.to(DEVICE, torch.float32).permute(3, 2, 1, 0))
    ref_out.backward(g.permute(3, 2, 1, 0))
    assert_close(out, {n: t.grad for n, t in leaves.items()}, ref_out, {n: t.grad for n, t in ref_leaves.items()},
                 TOL[torch.float32])


def kernel_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` converted to ``dtype`` as a kernel converts it: rounded to nearest even on a GPU (torch's cast), but
    truncated where Triton 3.6's interpreter narrows fp32 to bf16 (it drops the low 16 bits)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and dtype == torch.bfloat16:
        return (t.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: the low bits are zero
    return t.to(dtype)


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv and next_power_of_2 (triton's are jit functions, ~5 µs a host call) give
    triton's values."""
    import triton
    from lsap_kernels.ops._triton_launch import cdiv, next_power_of_2
    for n in range(1, 2100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        assert all(cdiv(n, b) == triton.cdiv(n, b) for b in (1, 3, 16, 64, 128))


# (parameters' dtype, activations' dtype): the copy is made in the activations' (fp32 weights of a bf16 layer)
WEIGHT_COPY_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                      (torch.float32, torch.float16)]


@pytest.mark.parametrize("dtype, copy_dtype", WEIGHT_COPY_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(17, 5, 3), (3, 33, 1), (1, 1, 5)], ids=lambda s: "x".join(map(str, s)))
def test_prepare_weight_matches_torch(shape, dtype, copy_dtype):
    """The weight prep without demodulation: the taps-major copy bit-equal to torch's permute and the kernels' cast
    (kernel_cast); channel counts across the tile edges, k = 1, 3, 5."""
    from lsap_kernels.ops.modconv.triton_fwd import prepare_weight
    cout, cin, k = shape
    weight = torch.randn(cout, cin, k, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    assert torch.equal(prepare_weight(weight, copy_dtype), kernel_cast(weight, copy_dtype).permute(2, 3, 1, 0))


@pytest.mark.parametrize("dtype, copy_dtype", WEIGHT_COPY_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [3, 70])
def test_weight_and_demodulation_match_torch(batch, dtype, copy_dtype):
    """The forward's weight copy, Q = Σ_taps W² and d = rsqrt((s·g)² @ Qᵀ + eps) in one launch, against torch and
    float64: the copy
    bit-equal to the kernels' cast (written once however many passes over the batch: 70 samples take two), channel
    counts across the tile edges, the styles a strided view read in place."""
    from lsap_kernels.ops.modconv.triton_fwd import weight_and_demodulation
    gen = torch.Generator().manual_seed(batch)
    weight = torch.randn(37, 70, 3, 3, generator=gen).to(DEVICE, dtype)
    styles = torch.randn(batch, 2 * 70, generator=gen).to(DEVICE, dtype)[:, ::2]
    w_io, d, q = weight_and_demodulation(weight, styles, 0.3, 1e-8, copy_dtype)
    assert torch.equal(w_io, kernel_cast(weight, copy_dtype).permute(2, 3, 1, 0))
    ref_q = weight.double().square().sum((2, 3))
    assert q.dtype == torch.float32 and q.shape == (37, 70) and rel_err(q, ref_q) < 1e-6
    ref = torch.rsqrt((styles.double() * 0.3).square() @ ref_q.t() + 1e-8)
    assert d.dtype == torch.float32 and d.shape == (batch, 37) and rel_err(d, ref) < 1e-6


@pytest.mark.parametrize("tiles, demodulate, dtype", [(1, True, torch.float32), (40, True, torch.float32),
                                                      (40, False, torch.float32), (100, True, torch.float32),
                                                      (5, True, torch.bfloat16)])
def test_style_gradient_matches_torch(tiles, demodulate, dtype):
    """The styles' gradient from the per-tile partial sums, g·(Σ ds − sg·(Σ gd·d³) @ Q), in one launch: several
    row chunks, more tiles than it reads directly (100: torch sums them first), partial buffers of different tile
    counts (up=2), channel counts across the tile edges, strided styles, the result in the styles' dtype."""
    from lsap_kernels.ops.modconv.triton_bwd import style_gradient
    gen = torch.Generator().manual_seed(tiles)
    batch, cin, cout, wg = 3, 70, 37, 0.3
    ds, gd = torch.randn(batch, tiles, cin, generator=gen), torch.randn(batch, tiles + 3, cout, generator=gen)
    d, q = torch.rand(batch, cout, generator=gen) + 0.5, torch.rand(cout, cin, generator=gen)
    styles = torch.randn(batch, 2 * cin, generator=gen).to(DEVICE, dtype)[:, ::2]
    out = style_gradient(ds.to(DEVICE), gd.to(DEVICE) if demodulate else None, d.to(DEVICE), q.to(DEVICE), styles, wg)
    ref = ds.double().sum(1)
    if demodulate:
        ref = ref - styles.double().cpu() * wg * ((gd.double().sum(1) * d.double() ** 3) @ q.double())
    assert out.dtype == dtype and out.shape == styles.shape
    assert rel_err(out, ref * wg) < (1e-6 if dtype == torch.float32 else 4e-3)


# ---- custom op, autograd, backend registry -------------------------------------------------------------------------

OPCHECK_CASES = [(v, False, False) for v in VARIANTS] + [("3x3", True, False), ("3x3-up2", True, False),
                                                          ("3x3", True, True), ("torgb", False, True)]


@pytest.mark.parametrize("variant, z_from_out, mixed", OPCHECK_CASES)
def test_opcheck(variant, z_from_out, mixed):
    """Both ops; with a clamp the forward stores z, without one (z_from_out) the backward reads the output.
    ``mixed``: bf16 activations with float32 parameters (the bf16 Generator's calls)."""
    k, skip, opts = split_variant(variant)
    t = {n: x.to(DEVICE, torch.bfloat16 if mixed and n in ACTIVATIONS_16 else torch.float32).requires_grad_(True)
         for n, x in tensor_case(1, 3, 4, 4, k, opts["up"], skip=skip, seed=11).items()}
    args = (t["x"], t["weight"], t["styles"], t["noise"], t["noise_strength"], t["bias"], t.get("skip"),
            1 / math.sqrt(3 * k * k), opts.get("demodulate", True), opts["up"],
            opts.get("activation", "lrelu") == "lrelu", math.sqrt(2), None if z_from_out else 0.8, 1e-8, False,
            z_from_out)
    torch.library.opcheck(torch.ops.lsap.modulated_conv2d_triton.default, args)
    out, conv_out, d, w_t, q = torch.ops.lsap.modulated_conv2d_triton(*args)
    assert (conv_out.numel() == 0) == z_from_out or variant == "torgb"
    bargs = (torch.randn_like(out), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]],
             out.detach() if z_from_out else conv_out, d, w_t, q, *args[7:], [True] * 6 + [skip])
    torch.library.opcheck(torch.ops.lsap.modulated_conv2d_backward_triton.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_z_recovered_from_the_output_matches_stored_z(monkeypatch):
    """Without a clamp or skip the forward stores no z (the backward recovers it from the output); storing it
    (RECOVER_Z off) gives the same gradients to fp32 rounding."""
    assert modconv_triton.z_from_out(True, True, math.sqrt(2), None, None)
    assert not modconv_triton.z_from_out(True, True, math.sqrt(2), 256.0, None)  # a clamp is not invertible
    assert not modconv_triton.z_from_out(True, True, math.sqrt(2), None, torch.zeros(1))
    assert not modconv_triton.z_from_out(False, False, 1.0, None, None)  # toRGB: z not needed at all
    tensors = tensor_case(3, 5, 6, 5, 3, 2, seed=13)
    for gain in (math.sqrt(2), -1.3):  # a negative gain flips the output's sign: the slope follows a's
        grads = {}
        for recover in (True, False):
            monkeypatch.setattr(modconv_triton, "RECOVER_Z", recover)
            leaves = {n: t.to(DEVICE, torch.float32).requires_grad_(True) for n, t in tensors.items()}
            out = L.modulated_conv2d(**leaves, up=2, gain=gain, backend="triton")
            out.backward(torch.ones_like(out))
            grads[recover] = {n: t.grad for n, t in leaves.items()}
        for n in grads[True]:
            assert rel_err(grads[True][n], grads[False][n]) < 1e-5, (gain, n)


def test_changing_the_output_in_place_makes_backward_raise():
    """Without a clamp the backward recovers z from the output it saved: an in-place change of that output must
    make backward fail (autograd's version check), not read the changed values."""
    leaves = {n: t.to(DEVICE, torch.float32).requires_grad_(True)
              for n, t in tensor_case(2, 3, 4, 4, 3, 1, seed=12).items()}
    out = L.modulated_conv2d(**leaves, backend="triton")
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_double_backward_raises():
    tensors = tensor_case(2, 3, 4, 4, 3, 1, seed=10)
    leaves = {n: t.to(DEVICE, torch.float32).requires_grad_(True) for n, t in tensors.items()}
    out = L.modulated_conv2d(**leaves, backend="triton")
    (gx,) = torch.autograd.grad(out.square().sum(), leaves["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_registry():
    tensors = tensor_case(2, 3, 4, 4, 3, 1, seed=6)
    with pytest.raises(L.BackendError, match="takes dtypes"):  # float64 stays on the reference/cpu backends
        L.modulated_conv2d(tensors["x"].to(DEVICE), tensors["weight"].to(DEVICE), tensors["styles"].to(DEVICE),
                           backend="triton")
    # the interpreter runs only when asked for; CUDA tensors take triton unless a cuda kernel of this op is there
    assert L.chosen_backend("modulated_conv2d", "cpu", torch.float32) != "triton"
    if DEVICE == "cuda" and not _cuda_modconv():
        assert L.chosen_backend("modulated_conv2d", "cuda", torch.float32) == "triton"
        assert L.chosen_backend("modulated_conv2d", "cuda", torch.bfloat16) == "triton"


def _cuda_modconv() -> bool:
    return L.available_backends()["cuda"] and "cuda" in backends._registry["modulated_conv2d"]


def _small_generator(size=16, precision="fp32"):
    torch.manual_seed(0)
    g = L.Generator(size, 8, 1, channels={4: 6, 8: 5, 16: 4}, precision=precision).to(DEVICE).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and noise strengths, as in a trained model
        for name, p in g.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")) or name.startswith("to_rgb"):
                p.add_(0.1 * torch.randn_like(p))
    return g


def test_bf16_generator_reads_fp32_parameters(monkeypatch):
    """precision="bf16" on the triton backend: the float32 weights, styles, noise maps and biases go into the kernels
    as they are, and each layer's affine scale into the op's weight gain, so the aten casts and multiplies of a
    synthesis and its backward do not grow with the number of layers (the 16² generator has 3 more than the 8² one);
    image and W+/noise gradients near the float64 reference generator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.casts += func in (torch.ops.aten._to_copy.default, torch.ops.aten.mul.Tensor,
                                   torch.ops.aten.mul.Scalar)
            return func(*args, **(kwargs or {}))

    def run(g, backend, dtype=torch.float32):
        gen = torch.Generator().manual_seed(2)
        w = torch.randn(2, g.n_latent, 8, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(True)
        noise = [torch.randn(2, 1, h, w_, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(True)
                 for h, w_ in g.noise_shapes()]
        counter = CountCasts()
        with L.use_backend(modulated_conv2d=backend), counter:
            img = g.synthesis(w, noise)
            img.square().mean().backward()
        return img, w.grad, [n.grad for n in noise], counter.casts

    casts = [run(_small_generator(size, "bf16"), "triton")[-1] for size in (8, 16)]
    assert casts[0] == casts[1], casts
    g = _small_generator(16, "bf16")
    img, gw, gn, _ = run(g, "triton")
    assert img.dtype == gw.dtype == torch.float32
    g64 = _small_generator(16).double()
    ref_img, ref_gw, ref_gn, _ = run(g64, "reference", torch.float64)
    assert rel_err(img, ref_img) < 0.05 and rel_err(gw, ref_gw) < 0.15
    assert all(rel_err(a, b) < 0.15 for a, b in zip(gn, ref_gn))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_generator_matches_eager(precision):
    """torch.compile(fullgraph=True) of a small Generator's synthesis on the triton backend: traced without graph
    breaks, same image and W+/noise gradients as eager (and near the reference backend). bf16: the fake kernels
    give the dtypes of mixed precision (fp32 parameters, their gradients fp32, 16-bit activations)."""
    g = _small_generator(precision=precision)
    gen = torch.Generator().manual_seed(1)
    w_plus = torch.randn(2, g.n_latent, 8, generator=gen).to(DEVICE)
    noise = [torch.randn(2, 1, h, w, generator=gen).to(DEVICE) for h, w in g.noise_shapes()]

    def image_and_grads(fn):
        w = w_plus.clone().requires_grad_(True)
        ns = [n.clone().requires_grad_(True) for n in noise]
        img = fn(w, ns)
        img.square().mean().backward()
        return img, w.grad, [n.grad for n in ns]

    compiled = torch.compile(g.synthesis, fullgraph=True, backend="aot_eager")
    with L.use_backend(modulated_conv2d="triton"):
        img, gw, gn = image_and_grads(compiled)
        eager_img, eager_gw, eager_gn = image_and_grads(g.synthesis)
    assert rel_err(img, eager_img) < 1e-6 and rel_err(gw, eager_gw) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(gn, eager_gn))
    with L.use_backend("reference"):
        ref_img, ref_gw, _ = image_and_grads(g.synthesis)
    tol_img, tol_grad = (1e-5, 1e-4) if precision == "fp32" else (0.05, 0.15)
    assert rel_err(img, ref_img) < tol_img and rel_err(gw, ref_gw) < tol_grad


# ---- compiled for a real GPU target without a GPU ------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from lsap_kernels.ops.modconv import triton_bwd as B, triton_fwd as F

    FLAGS = dict(DEMOD=True, HAS_NOISE=True, HAS_BIAS=True, HAS_SKIP=True, LRELU=True, HAS_CLAMP=True)
    # float32 parameters read next to 16-bit activations (the bf16 Generator's calls): "+f32" on the element type
    PARAMS = ("s_ptr", "noise_ptr", "strength_ptr", "bias_ptr", "gn_ptr")
    WEIGHT = ("w_ptr", "s_ptr")  # the weight-prep kernels' inputs (their copy is in the activations' dtype)
    KERNELS = [  # (kernel, element type, constexprs[, fp32 pointers]): every kernel, the GEMMs in 16 bits, TF32 and
                 # true fp32
        (F._modconv_fwd_kernel, "bf16", dict(K=3, UP=1, STORE_Z=True, PRECISION="ieee", PRESCALED=False, BM=128,
                                             BN=128, BK=32, **FLAGS)),
        (F._modconv_fwd_kernel, "bf16", dict(K=3, UP=1, STORE_Z=False, PRECISION="ieee", PRESCALED=True, BM=128,
                                             BN=128, BK=32, **FLAGS)),
        (F._prescale_kernel, "bf16", dict(BM=64, BC=64)),
        (F._modconv_fwd_kernel, "fp32", dict(K=3, UP=2, STORE_Z=False, PRECISION="tf32", PRESCALED=False, BM=64,
                                             BN=64, BK=32, **FLAGS)),
        # BN < BM: the weight tile is the scaled one
        (F._modconv_fwd_kernel, "bf16", dict(K=3, UP=1, STORE_Z=False, PRECISION="ieee", PRESCALED=False, BM=128,
                                             BN=32, BK=32, **FLAGS), PARAMS[:4]),
        (F._modconv_fwd_kernel, "fp32", dict(K=3, UP=1, STORE_Z=False, PRECISION="tf32", PRESCALED=False, BM=128,
                                             BN=32, BK=32, **FLAGS)),
        # toRGB: 3 output channels, the epilogue on 4 columns of the 16-wide MMA tile
        (F._modconv_fwd_kernel, "bf16", dict(K=1, UP=1, STORE_Z=False, PRECISION="ieee", PRESCALED=False, BM=128,
                                             BN=16, BK=32, NARROW=4, **{**FLAGS, "DEMOD": False, "LRELU": False})),
        # 2-D pixel tiles (TX columns; the others take TX = 0, their default)
        (F._modconv_fwd_kernel, "bf16", dict(K=3, UP=2, STORE_Z=False, PRECISION="ieee", PRESCALED=False, BM=128,
                                             BN=32, BK=32, TX=16, **FLAGS)),
        (F._fir_epilogue_kernel, "bf16", dict(PAD0=1, STORE_Z=True, TX=32, BN=32, RY=16, **FLAGS), PARAMS[1:4]),
        (F._weight_prep_kernel, "bf16", dict(KK=9, BO=32, BI=32), WEIGHT),
        (F._weight_demod_kernel, "bf16", dict(KK=9, BO=16, BI=64, BB=16), WEIGHT),
        (B._epilogue_bwd_kernel, "fp16", dict(NEED_Z=True, Z_FROM_OUT=True, STORE_GZ=True, WANT_GD=True,
                                              WANT_BIAS=True, STORE_GN=True, WANT_STRENGTH=True, BM=64, BN=64,
                                              **{n: v for n, v in FLAGS.items() if n != "HAS_SKIP"}), PARAMS[1:5]),
        (B._skip_bwd_kernel, "fp32", dict(BM=256, BN=4, TX=16)),  # toRGB's 4-channel tile
        (B._dgrad_kernel, "bf16", dict(K=3, UP=2, NEED_DX=True, NEED_DS=True, PRECISION="ieee", BM=128, BN=64, BK=32,
                                       TX=16), PARAMS[:1]),
        (B._dgrad_kernel, "fp32", dict(K=3, UP=1, NEED_DX=True, NEED_DS=True, PRECISION="ieee", BM=64, BN=64, BK=32)),
        (B._wgrad_kernel, "fp16", dict(K=3, UP=1, PRECISION="ieee", BM=64, BN=64, BK=64)),
        (B._style_grad_kernel, "bf16", dict(DEMOD=True, BR=16, BI=64, BO=32), ("s_ptr", "out_ptr")),
    ]
    target = GPUTarget("cuda", 90, 32)
    for kernel, elem, consts, *fp32_params in KERNELS:
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        fp32_params = fp32_params[0] if fp32_params else ()
        consts = {**{n: 0 for n in ("TX", "NARROW") if n in fn.arg_names}, **consts}  # their defaults
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n.endswith("_ptr"):
                fp32_buffer = n.startswith(("d_", "gd_", "gb_", "gs_", "ds_", "part", "q_"))
                sig[n] = "*fp32" if fp32_buffer or n in fp32_params else f"*{elem}"
            else:
                sig[n] = "fp32" if n in ("gain", "clamp", "wgain", "eps") else "i32"
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                                  options={"num_warps": 4, "num_stages": 3})
        assert compiled.asm["cubin"], fn.__name__
        tensor_cores = elem != "fp32" or consts.get("PRECISION") == "tf32"
        elem += "+f32" if fp32_params else ""
        print(fn.__name__, elem, consts.get("PRECISION", "-"), "mma" in compiled.asm["ptx"], tensor_cores)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every kernel is compiled by the tests themselves")
def test_kernels_compile_for_sm90():
    """Every kernel through Triton's whole NVIDIA pipeline (TTIR → PTX → cubin via the bundled ptxas) for sm_90,
    without a GPU: catches what the interpreter accepts but the compiler rejects. The 16-bit and TF32 GEMMs must
    use tensor-core MMA; true fp32 must not (it would not be fp32)."""
    env = {**os.environ, "LSAP_DISABLE_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [line.split() for line in res.stdout.splitlines()]
    assert len(lines) == 17, res.stdout
    gemms = [line for line in lines if line[0] in ("_modconv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel")]
    assert len(gemms) == 10 and all(uses_mma == expected for *_, uses_mma, expected in gemms), res.stdout


_LAUNCH_PATH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "bench")
    import launch_overhead  # unsets TRITON_INTERPRET, one block config per shape
    from triton.runtime.driver import driver
    record = []
    driver.set_active(launch_overhead.StandInDriver(record))
    import torch
    from triton.runtime.jit import JITFunction
    from lsap_kernels.ops import _triton_launch
    from lsap_kernels.ops.modconv import triton as T

    gen = torch.Generator().manual_seed(0)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)

    def describe(a):  # a launch argument, with a tensor the op allocates compared by its kind
        return (a.dtype, a.shape, a.stride(), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else (type(a), a)

    VARIANTS = [  # name, Cin, Cout, size, k, up, demodulate, lrelu, skip, dtype: float32 parameters throughout
        ("3x3-up2 bf16", 64, 32, 16, 3, 2, True, True, False, torch.bfloat16),
        ("torgb bf16", 32, 3, 16, 1, 1, False, False, True, torch.bfloat16),
        ("3x3 fp16", 128, 128, 8, 3, 1, True, True, False, torch.float16),
        ("3x3 tf32", 64, 64, 8, 3, 1, True, True, False, torch.float32),
    ]
    for name, cin, cout, size, k, up, demod, lrelu, skip_on, dt in VARIANTS:
        x = cl(torch.randn(4, cin, size, size, generator=gen).to(dt))
        w, s = torch.randn(cout, cin, k, k, generator=gen), torch.randn(4, cin, generator=gen)
        ho = size * up
        noise = None if skip_on else torch.randn(4, 1, ho, ho, generator=gen)
        strength = None if skip_on else torch.tensor(0.1)
        bias = torch.randn(cout, generator=gen)
        skip = cl(torch.randn(4, cout, ho // 2, ho // 2, generator=gen).to(dt)) if skip_on else None
        z_from_out = lrelu and not skip_on
        scalars = (0.1, demod, up, lrelu, 2 ** 0.5 if lrelu else 1.0, None, 1e-8, dt == torch.float32, z_from_out)
        grad = cl(torch.randn(4, cout, ho, ho, generator=gen).to(dt))
        mask = [True, True, True, noise is not None, noise is not None, True, skip_on]  # every gradient

        def layer():
            out, conv_out, d, w_t, q = T.modconv_op._init_fn(x, w, s, noise, strength, bias, skip, *scalars)
            T.modconv_bwd_op._init_fn(grad, x, w, s, noise, strength, bias, out if z_from_out else conv_out, d, w_t,
                                      q, *scalars, mask)

        layer()  # compiles
        launches = {}
        for fast in (True, False):  # the fast launch path (keys filled by the call above) against Triton's own
            _triton_launch.FAST_LAUNCH = fast
            del record[:]
            layer()
            launches[fast] = [(launcher, args[:3], [describe(a) for a in args[9:]]) for launcher, args in record]
        assert launches[True] == launches[False], name
        print(name)

    calls = []
    run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: calls.append(self) or run(self, *a, **k)
    _triton_launch.FAST_LAUNCH = True
    layer()
    print("through JITFunction.run", len(calls))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every kernel is compiled by the tests themselves")
def test_every_variant_compiles_on_the_launch_path_for_sm90():
    """Forward and every gradient of each variant (fp32 parameters with bf16/fp16 activations, TF32) through
    Triton's real launch path, the argument specialisation of actual calls included, compiled for sm_90: a stand-in
    driver (bench/launch_overhead.py) replaces only the launch itself. Catches a kernel the interpreter runs but the
    compiler rejects for the dtypes and alignments the launchers really pass. Then each call again, through our fast
    launch path and through Triton's: the same kernels, grids and arguments."""
    env = {**os.environ, "LSAP_DISABLE_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _LAUNCH_PATH_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    # and each launch of the fast launch path (every kernel's, second call on) is Triton's own (test_triton_launch.py)
    assert res.stdout.split() == ["3x3-up2", "bf16", "torgb", "bf16", "3x3", "fp16", "3x3", "tf32",
                                  "through", "JITFunction.run", "0"], res.stdout


_CA_SCRIPT = textwrap.dedent("""
    import re
    import sys
    sys.path.insert(0, "bench")
    import launch_overhead  # unsets TRITON_INTERPRET
    from triton.runtime.driver import driver
    driver.set_active(launch_overhead.StandInDriver())
    import torch
    import triton
    from lsap_kernels.ops.modconv import triton as T, triton_bwd as B, triton_fwd as F

    gen = torch.Generator().manual_seed(0)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    # convs.15's channels (32 → 32, bf16) and so its specialisation: unit channel strides, the others multiples of 16
    x = cl(torch.randn(2, 32, 16, 16, generator=gen).to(torch.bfloat16))
    w, s = torch.randn(32, 32, 3, 3, generator=gen), torch.randn(2, 32, generator=gen)
    noise, strength, bias = torch.randn(2, 1, 16, 16, generator=gen), torch.tensor(0.1), torch.randn(32, generator=gen)
    grad = cl(torch.randn(2, 32, 16, 16, generator=gen).to(torch.bfloat16))
    scalars = (0.1, True, 1, True, 2 ** 0.5, None, 1e-8, False, True)

    def compiled(kernel):
        return {id(k): k for cache, *_ in kernel.fn.device_caches.values() for k in cache.values()}

    for ca in (0, 1):
        F._modconv_fwd_kernel.configs = [triton.Config(dict(BM=128, BN=32, BK=32, TX=16, CA=ca), 4, 3)]
        B._dgrad_kernel.configs = [triton.Config(dict(BN=32, BK=32, CA=ca), 4, 4)]
        before = {name: compiled(k) for name, k in (("forward", F._modconv_fwd_kernel), ("dgrad", B._dgrad_kernel))}
        out, _, d, w_t, q = T.modconv_op._init_fn(x, w, s, noise, strength, bias, None, *scalars)
        T.modconv_bwd_op._init_fn(grad, x, w, s, noise, strength, bias, out, d, w_t, q, *scalars, [True] * 6 + [False])
        for name, kernel in (("forward", F._modconv_fwd_kernel), ("dgrad", B._dgrad_kernel)):
            new = [k for i, k in compiled(kernel).items() if i not in before[name]]
            assert len(new) == 1, (name, ca, len(new))
            copies = re.findall(r"cp\\.async\\.(c[ag])\\.shared\\.global \\[[^\\]]*\\], \\[[^\\]]*\\], (0x[0-9a-f]+)",
                                new[0].asm["ptx"].replace("\\t", " "))
            print(name, ca, copies.count(("cg", "0x10")), copies.count(("ca", "0x8")))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the instructions, not the values: CPU only (no GPU time)")
def test_8_byte_runs_load_through_l1_on_sm90():
    """What CA = 1 is for (GEMM_WIDE_CA), in the PTX of a 32-channel bf16 layer's forward and data gradient compiled
    for sm_90 on the launch path (the argument specialisation of real calls): Triton pipelines the tap-shifted
    tiles as 16-byte cp.async.cg (L2 only, so each of the 9 taps re-reads its rows from L2) by default, and with
    CA = 1 as 8-byte cp.async.ca (cached in L1). A Triton that changes either shows here."""
    env = {**os.environ, "LSAP_DISABLE_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _CA_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    counts = {(name, int(ca)): (int(cg16), int(ca8)) for name, ca, cg16, ca8 in map(str.split, res.stdout.splitlines())}
    for name in ("forward", "dgrad"):
        (cg16_off, ca8_off), (cg16_on, ca8_on) = counts[name, 0], counts[name, 1]
        assert ca8_off == 0 and cg16_off > 0, res.stdout
        assert ca8_on > 0 and cg16_on < cg16_off, res.stdout  # the weight tiles stay 16-byte cp.async.cg


# ---- real shapes on a GPU ------------------------------------------------------------------------------------------

# config-f layers (Cin, Cout, input size, k, up): at 256² and at 1024², each with its toRGB
CONFIG_F_LAYERS = {
    "256-up": (256, 128, 128, 3, 2), "256-conv": (128, 128, 256, 3, 1), "256-torgb": (128, 3, 256, 1, 1),
    "1024-up": (64, 32, 512, 3, 2), "1024-conv": (32, 32, 1024, 3, 1), "1024-torgb": (32, 3, 1024, 1, 1),
}


def _reference_in_chunks(tensors, opts, grad, slope_positive=None, chunk=4):
    """The float64 reference backend, a few samples at a time (batch 16 at 1024² in float64 would not fit
    comfortably): (out, grads, sign of the float64 pre-activation or None), per-sample results concatenated and
    parameter gradients summed. ``slope_positive``: leaky-ReLU's slope from this mask (see test_low_precision)."""
    outs, signs, grads = [], [], {n: [] for n in tensors}
    per_sample = {"x", "styles", "noise", "skip"}
    for lo in range(0, grad.shape[0], chunk):
        leaves = {n: (t[lo:lo + chunk] if n in per_sample else t).detach().double().requires_grad_(True)
                  for n, t in tensors.items()}
        kw = {n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}
        if slope_positive is None:
            out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"], **kw, **opts,
                                     backend="reference")
        else:
            a = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"], **kw,
                                   **{**opts, "activation": "linear"}, backend="reference")
            signs.append(a.detach() > 0)
            out = math.sqrt(2) * torch.where(slope_positive[lo:lo + chunk], a, 0.2 * a)
        out.backward(grad[lo:lo + chunk].double())
        outs.append(out.detach())
        for n, t in leaves.items():
            grads[n].append(t.grad)
    grads = {n: torch.cat(g) if n in per_sample else sum(g) for n, g in grads.items()}
    return torch.cat(outs), grads, torch.cat(signs) if signs else None


def check_layer(tensors, opts, dtype, tol, max_flips):
    """The triton backend on ``tensors`` (float64, already representable in ``dtype``) against the chunked float64
    reference: forward, every gradient, leaky-ReLU slopes taken where the kernel took them (at most a fraction
    ``max_flips`` of them on the other side of 0 than in float64), and the same bits on a second run."""
    leaves = {n: t.to(dtype).requires_grad_(True) for n, t in tensors.items()}

    def triton_run(ts, grad):
        out = L.modulated_conv2d(ts["x"], ts["weight"], ts["styles"],
                                 **{n: ts[n] for n in ts if n not in ("x", "weight", "styles")}, **opts,
                                 backend="triton")
        out.backward(grad)
        return out

    x = tensors["x"]
    g = torch.Generator(x.device).manual_seed(1)
    shape = (x.shape[0], tensors["weight"].shape[0], opts["up"] * x.shape[2], opts["up"] * x.shape[3])
    grad = torch.randn(shape, device=x.device, dtype=torch.float64, generator=g).to(dtype)
    out = triton_run(leaves, grad)
    positive = out.detach() > 0 if opts.get("activation", "lrelu") == "lrelu" else None  # out = √2·lrelu(a)
    ref_out, ref_grads, exact_positive = _reference_in_chunks(tensors, opts, grad, slope_positive=positive)
    if positive is not None:
        assert (positive != exact_positive).double().mean().item() <= max_flips
    assert_close(out, {n: t.grad for n, t in leaves.items()}, ref_out, ref_grads, tol)
    again = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    out2 = triton_run(again, grad)
    assert torch.equal(out, out2) and all(torch.equal(leaves[n].grad, again[n].grad) for n in leaves)


def gpu_case(batch, cin, cout, size, k, up, dtype, torgb, seed):
    """Random inputs drawn on the GPU (a CPU draw of 2^29 float64 values takes seconds), rounded to ``dtype``."""
    g = torch.Generator("cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64).to(dtype).double()

    t = dict(x=rnd(batch, cin, size, size), weight=rnd(cout, cin, k, k), styles=rnd(batch, cin) * 0.5 + 1,
             bias=rnd(cout))
    if torgb:
        t["skip"] = rnd(batch, cout, size * up // 2, size * up // 2)
    else:
        t["noise"], t["noise_strength"] = rnd(batch, 1, size * up, size * up), rnd(()) * 0.1 + 0.3
    return t


# every layer in bf16 (what inversion runs), the three kinds of layer in fp32
GPU_CASES = [(layer, torch.bfloat16) for layer in CONFIG_F_LAYERS] + [
    ("256-up", torch.float32), ("1024-conv", torch.float32), ("1024-torgb", torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("layer,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_config_f_layers_on_gpu(layer, dtype):
    """Batch 16, noise and bias (toRGB: bias and skip); 16-bit rounding may flip 0.5 % of the slopes, fp32 none."""
    cin, cout, size, k, up = CONFIG_F_LAYERS[layer]
    torgb = cout == 3
    opts = dict(up=up, **(dict(demodulate=False, activation="linear") if torgb else {}))
    tensors = gpu_case(16, cin, cout, size, k, up, dtype, torgb, seed=7)
    check_layer(tensors, opts, dtype, TOL[dtype], 5e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.gpu
def test_tf32_flag_on_gpu(monkeypatch):
    """ALLOW_TF32: fp32 GEMMs on TF32 tensor cores, within SPEC §5's 5e-3; off by default (covered above)."""
    monkeypatch.setattr(modconv_triton, "ALLOW_TF32", True)
    check_layer(gpu_case(4, 256, 256, 32, 3, 2, torch.float32, False, seed=9), dict(up=2), torch.float32, 5e-3, 5e-3)
