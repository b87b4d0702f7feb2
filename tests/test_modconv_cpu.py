"""The C++ `cpu` backend of modulated_conv2d (csrc/modconv_cpu.cpp): every stage kernel and the whole op, forward
and backward, against float64 references (SPEC §3, §5); gradcheck; determinism across thread counts; custom-op
registration (opcheck); double backward; bad inputs; the Generator on this backend against the reference backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import lsap_kernels as L
from helpers import TOL, at_thread_counts, rel_err
from lsap_kernels.ops.modconv import reference as R
from test_modconv import formula, tensor_case

pytestmark = pytest.mark.skipif(not L.available_backends()["cpu"], reason="the C++ extension is not built")

if L.available_backends()["cpu"]:
    from lsap_kernels import _ext
    from lsap_kernels.ops.modconv import cpu as modconv_cpu

    C = _ext.module()

VARIANTS = {
    "3x3": dict(k=3, up=1),
    "3x3-up2": dict(k=3, up=2),
    "1x1-up2": dict(k=1, up=2),
    "5x5-up2": dict(k=5, up=2),
    "torgb": dict(k=1, up=1, demodulate=False, activation="linear", skip=True),
}
# batch, Cin, Cout, H=W: odd sizes, Cin 3/5, Cout 1/7, batch 1/5
SHAPES = [(1, 3, 1, 4), (5, 5, 7, 5), (2, 3, 7, 9), (1, 5, 1, 9)]
TENSOR_ARGS = ("x", "weight", "styles", "noise", "noise_strength", "bias", "skip")


def run(tensors, opts, dtype, backend, grad_seed=1):
    """Forward + backward of ``modulated_conv2d`` on ``backend`` with inputs cast to ``dtype``: (out, grads)."""
    leaves = {n: t.detach().to(dtype).requires_grad_(True) for n, t in tensors.items()}
    out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"],
                             **{n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}, **opts,
                             backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(dtype))
    return out, {n: t.grad for n, t in leaves.items()}


def run_formula(tensors, opts):
    """The independent per-sample-weight formula in float64 with autograd: (out, grads)."""
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in tensors.items()}
    kw = {n: leaves[n] for n in leaves if n not in ("x", "weight", "styles")}
    out = formula(leaves["x"], leaves["weight"], leaves["styles"], **kw, **opts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g)
    return out, {n: t.grad for n, t in leaves.items()}


def assert_close(out, grads, ref_out, ref_grads, tol):
    assert out.is_contiguous(memory_format=torch.channels_last)
    errs = {"out": rel_err(out, ref_out)}
    for n, g in ref_grads.items():
        assert grads[n] is not None, f"no gradient for {n}"
        errs[n] = rel_err(grads[n], g)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# ---- the whole op against the float64 formula -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_formula(shape, variant, dtype, poisoned):
    v = dict(VARIANTS[variant])
    batch, cin, cout, size = shape
    skip = v.pop("skip", False)
    if skip and size % 2:
        size += 1
    tensors = tensor_case(batch, cin, cout, size, v.pop("k"), v["up"], skip=skip, seed=sum(shape))
    out, grads = run(tensors, v, dtype, "cpu")
    assert out.dtype == dtype
    ref_out, ref_grads = run_formula(tensors, v)
    assert_close(out, grads, ref_out, ref_grads, 1e-12 if dtype == torch.float64 else TOL[dtype])


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("noise,bias,noise_batch", [(True, True, None), (False, False, None), (True, False, 1)])
@pytest.mark.parametrize("activation,clamp", [("lrelu", None), ("linear", None), ("lrelu", 0.5), ("linear", 0.4)])
@pytest.mark.parametrize("up", [1, 2])
def test_cpu_options(up, demodulate, noise, bias, noise_batch, activation, clamp):
    tensors = tensor_case(3, 4, 5, 6, 3, up, noise=noise, bias=bias, noise_batch=noise_batch, seed=3)
    opts = dict(demodulate=demodulate, activation=activation, clamp=clamp, up=up)
    out, grads = run(tensors, opts, torch.float64, "cpu")
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, 1e-12)
    if clamp is not None:  # the clamp must have engaged for the comparison to mean something
        assert (formula(**{k: t for k, t in tensors.items()}, **{**opts, "clamp": None}).abs() > clamp).any()


@pytest.mark.parametrize("conv_bf16", [False, True], ids=["fp32-conv", "bf16-conv"])
@pytest.mark.parametrize("variant", ["3x3", "3x3-up2", "torgb"])
def test_cpu_bfloat16(variant, conv_bf16, monkeypatch):
    """bf16 activations and weights with fp32 accumulation.

    Where the convolution runs in fp32 (no oneDNN bf16: this CPU) everything is within 2e-2. Where it runs in bf16,
    its output is rounded to bf16 before the leaky-ReLU; the pre-activations that change sign then flip the slope
    (1 vs 0.2), and random-sign gradient sums amplify that: the reference backend in bf16 shows the same 3-7 %
    gradient errors. That mode is held to the output tolerance and to the reference backend's own bf16 errors."""
    monkeypatch.setattr(modconv_cpu, "FORCE_CONV_BF16", conv_bf16)
    v = dict(VARIANTS[variant])
    skip = v.pop("skip", False)
    tensors = tensor_case(2, 16, 8, 8, v.pop("k"), v["up"], skip=skip, seed=4)
    tensors = {n: t.to(torch.bfloat16).double() for n, t in tensors.items()}  # the formula sees the rounded inputs
    out, grads = run(tensors, v, torch.bfloat16, "cpu")
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    ref_out, ref_grads = run_formula(tensors, v)
    if not conv_bf16:
        assert_close(out, grads, ref_out, ref_grads, TOL[torch.bfloat16])
        return
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    _, plain_grads = run(tensors, v, torch.bfloat16, "reference")
    for n, g in ref_grads.items():
        assert rel_err(grads[n], g) < max(TOL[torch.bfloat16], 1.5 * rel_err(plain_grads[n], g)), n


def test_number_noise_strength_and_no_optional_inputs():
    tensors = tensor_case(2, 3, 4, 5, 3, 1, seed=8)
    strength = tensors.pop("noise_strength")
    out = L.modulated_conv2d(**tensors, noise_strength=0.3, backend="cpu")
    assert rel_err(out, formula(**tensors, noise_strength=strength)) < 1e-12
    bare = {n: tensors[n] for n in ("x", "weight", "styles")}
    assert rel_err(L.modulated_conv2d(**bare, backend="cpu"), formula(**bare)) < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_gradcheck(variant):
    v = dict(VARIANTS[variant])
    tensors = tensor_case(2, 3, 2, 4, v.pop("k"), v["up"], skip=v.pop("skip", False), seed=5)
    names = list(tensors)

    def fn(*ts):
        d = dict(zip(names, ts))
        return L.modulated_conv2d(d.pop("x"), d.pop("weight"), d.pop("styles"), **d, **v, backend="cpu")

    inputs = tuple(t.clone().requires_grad_(True) for t in tensors.values())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("variant", ["3x3", "3x3-up2", "torgb"])
def test_frozen_weight_paths_and_workspace_reuse(variant):
    """Inversion's case: the weight does not require grad (toRGB then runs our fused 1×1 pass both ways). Run
    twice: the second call reuses the op's workspace buffers and must give the same bits."""
    v = dict(VARIANTS[variant])
    tensors = tensor_case(3, 6, 5, 8, v.pop("k"), v["up"], skip=v.pop("skip", False), seed=13)
    weight = tensors.pop("weight")

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        leaves = {n: t.detach().to(dtype).requires_grad_(True) for n, t in tensors.items()}
        kw = {n: leaves[n] for n in leaves if n not in ("x", "styles")}
        out = L.modulated_conv2d(leaves["x"], weight.to(dtype), leaves["styles"], **kw, **v, backend="cpu")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out.backward(g.to(dtype))
        ref_out, ref_grads = run_formula({**tensors, "weight": weight}, v)
        ref_grads.pop("weight")
        assert_close(out, {n: t.grad for n, t in leaves.items()}, ref_out, ref_grads, tol)
        again = {n: t.detach().requires_grad_(True) for n, t in leaves.items()}
        out2 = L.modulated_conv2d(again["x"], weight.to(dtype), again["styles"],
                                  **{n: again[n] for n in again if n not in ("x", "styles")}, **v, backend="cpu")
        out2.backward(g.to(dtype))
        assert torch.equal(out, out2)
        assert all(torch.equal(leaves[n].grad, again[n].grad) for n in leaves)


@pytest.mark.parametrize("conv", ["onednn", "winograd"])
@pytest.mark.parametrize("up", [1, 2])
def test_weight_derived_tensors_follow_the_weight(up, conv, monkeypatch):
    """What the op derives from a weight alone (oneDNN layouts, up-sampling phase taps, Winograd transforms, Σ w²) is
    kept between calls (csrc/weight_cache_cpu.cpp): a new view of the same weight reuses it, while an in-place
    update of the weight, and another weight — also one allocated where a freed one was — get their own; every
    result checked against the reference backend, forward and input gradients."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", conv)
    gen = torch.Generator().manual_seed(21)
    x0, s0 = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, generator=gen)
    g = torch.randn(2, 24, 8 * up, 8 * up, generator=gen)

    def run(weight, backend="cpu"):
        x, styles = (t.to(weight.dtype, copy=True).requires_grad_(True) for t in (x0, s0))
        out = L.modulated_conv2d(x, weight, styles, up=up, backend=backend)
        out.backward(g.to(weight.dtype))
        return out.detach(), x.grad, styles.grad

    def check(weight):
        got, ref = run(weight), run(weight.double(), "reference")
        for a, b in zip(got, ref):
            assert rel_err(a, b) < 1e-5
        return got

    modconv_cpu.clear_workspace()
    param = torch.randn(1, 24, 16, 3, 3, generator=gen)  # the Generator's layout: layers pass param[0], a new view
    first = check(param[0])
    entries = C.modconv_weight_cache_size_cpu()
    assert entries > 0
    again = run(param[0])
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and C.modconv_weight_cache_size_cpu() == entries
    with torch.no_grad():
        param[0, :, :, 1, 1] *= -3.0  # in place: the weight's version counter moves
    updated = check(param[0])
    assert not torch.equal(updated[0], first[0])
    param.data.mul_(0.5).add_(0.1)  # through .data (its own version counter), as rosinality's EMA update writes
    check(param[0])
    trained = param.clone().requires_grad_(True)  # a weight being trained is not kept
    before = C.modconv_weight_cache_size_cpu()
    check(trained[0].detach().requires_grad_(True))
    assert C.modconv_weight_cache_size_cpu() == before
    for _ in range(3):  # freed weights, and new ones where they were
        del param
        param = torch.randn(1, 24, 16, 3, 3, generator=gen)
        check(param[0])
    assert C.modconv_weight_cache_size_cpu() <= entries  # entries of freed or outdated weights are dropped
    modconv_cpu.clear_workspace()
    assert C.modconv_weight_cache_size_cpu() == 0


def test_torgb_op_bit_identical_across_thread_counts():
    """With a frozen weight the toRGB op is all ours (fused 1×1 pass, epilogue, skip): same bits, 1 or 2 threads."""
    batch, cin, size = 2, 24, 48
    tensors = {"x": _rand(batch, cin, size, size, seed=1).float(), "styles": _rand(batch, cin, seed=2).float(),
               "bias": _rand(3, seed=3).float(), "skip": _rand(batch, 3, size // 2, size // 2, seed=4).float()}
    weight = _rand(3, cin, 1, 1, seed=5).float()
    g = _rand(batch, 3, size, size, seed=6).float()

    def run_once():
        leaves = {n: t.clone().requires_grad_(True) for n, t in tensors.items()}
        out = L.modulated_conv2d(leaves["x"], weight, leaves["styles"], demodulate=False, activation="linear",
                                 bias=leaves["bias"], skip=leaves["skip"], backend="cpu")
        out.backward(g)
        return [out] + [t.grad for t in leaves.values()]

    one, two = at_thread_counts(run_once)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_weight_gradient_work_only_when_asked():
    """Frozen weights (inversion): no weight gradient and no recomputation of the conv input in the backward."""
    from torch.profiler import profile

    tensors = tensor_case(2, 4, 5, 6, 3, 2, seed=9)

    def backward_scale_passes(weight_grad):
        leaves = {n: t.detach().float().requires_grad_(n != "weight" or weight_grad) for n, t in tensors.items()}
        out = L.modulated_conv2d(**leaves, up=2, backend="cpu")
        with profile() as prof:
            out.sum().backward()
        assert (leaves["weight"].grad is not None) == weight_grad
        return sum(e.name == "modconv::scale" for e in prof.events())

    assert backward_scale_passes(False) == 0
    assert backward_scale_passes(True) == 1


@pytest.mark.parametrize("up", [1, 2])
def test_frozen_weight_runs_no_weight_gradient_convolution(up, capfd, monkeypatch):
    """oneDNN's own log (verbose mode) of the backward: the input-gradient convolution runs either way, the
    weight-gradient convolution only when the weight requires grad."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", "onednn")  # the input gradient on oneDNN too, so that it logs
    tensors = tensor_case(2, 8, 6, 8, 3, up, seed=14)

    def onednn_backward_kinds(weight_grad):
        leaves = {n: t.detach().float().requires_grad_(n != "weight" or weight_grad) for n, t in tensors.items()}
        out = L.modulated_conv2d(**leaves, up=up, backend="cpu")
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            out.sum().backward()
        lines = [ln for ln in capfd.readouterr().out.splitlines()  # up=2's backward: oneDNN "deconvolution"
                 if ",exec," in ln and (",convolution," in ln or ",deconvolution," in ln)]
        return {kind for kind in ("backward_data", "backward_weights") if any(f",{kind}," in ln for ln in lines)}

    assert onednn_backward_kinds(True) == {"backward_data", "backward_weights"}
    assert onednn_backward_kinds(False) == {"backward_data"}


def test_pointwise_demodulated_op_bit_identical_across_thread_counts():
    """A 1×1 convolution with few outputs and a frozen weight runs only our passes (pointwise forward and backward,
    demodulation, epilogue with broadcast noise, style gradient with its demodulation term): same bits with 1 and
    2 threads, several work items each."""
    batch, cin, cout, size = 3, 80, 5, 40
    tensors = {"x": _rand(batch, cin, size, size, seed=1).float(), "styles": _rand(batch, cin, seed=2).float(),
               "noise": _rand(1, 1, size, size, seed=3).float(), "noise_strength": torch.tensor(0.3),
               "bias": _rand(cout, seed=4).float()}
    weight = _rand(cout, cin, 1, 1, seed=5).float()
    g = _rand(batch, cout, size, size, seed=6).float()

    def run_once():
        leaves = {n: t.clone().requires_grad_(True) for n, t in tensors.items()}
        out = L.modulated_conv2d(leaves["x"], weight, leaves["styles"], noise=leaves["noise"],
                                 noise_strength=leaves["noise_strength"], bias=leaves["bias"], clamp=2.0,
                                 backend="cpu")
        out.backward(g)
        return [out] + [t.grad for t in leaves.values()]

    one, two = at_thread_counts(run_once)
    names = ["out", *tensors]
    assert all(t is not None and torch.isfinite(t).all() for t in one)
    for name, a, b in zip(names, one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_double_backward_raises():
    tensors = tensor_case(2, 3, 4, 5, 3, 1, seed=10)
    leaves = {n: t.detach().requires_grad_(True) for n, t in tensors.items()}
    out = L.modulated_conv2d(**leaves, backend="cpu")
    (gx,) = torch.autograd.grad(out.square().sum(), leaves["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
    # the reference backend supports it
    with L.use_backend("reference"):
        out = L.modulated_conv2d(**leaves)
        (gx,) = torch.autograd.grad(out.square().sum(), leaves["x"], create_graph=True)
        gx.sum().backward()


@pytest.mark.parametrize("variant", ["3x3", "3x3-up2", "torgb"])
def test_opcheck(variant):
    v = dict(VARIANTS[variant])
    k = v.pop("k")
    tensors = tensor_case(2, 3, 4, 4, k, v["up"], skip=v.pop("skip", False), seed=11)
    t = {n: x.float().requires_grad_(True) for n, x in tensors.items()}
    args = (t["x"], t["weight"], t["styles"], t["noise"], t["noise_strength"], t["bias"], t.get("skip"),
            1 / math.sqrt(3 * k * k), v.get("demodulate", True), v["up"], v.get("activation", "lrelu") == "lrelu",
            math.sqrt(2), 0.8, 1e-8, False)
    torch.library.opcheck(torch.ops.lsap.modulated_conv2d_cpu.default, args)
    out, conv_out, d = torch.ops.lsap.modulated_conv2d_cpu(*args)
    bargs = (torch.randn_like(out), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]],
             conv_out, d, *args[7:], [True] * 6 + [t.get("skip") is not None])
    torch.library.opcheck(torch.ops.lsap.modulated_conv2d_backward_cpu.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_traces_the_op():
    """torch.compile(fullgraph=True) of forward and backward: the same values and gradients as the reference."""
    tensors = tensor_case(2, 3, 4, 4, 3, 2, seed=12)
    fn = torch.compile(lambda *a: L.modulated_conv2d(*a, up=2, backend="cpu"), fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, lambda *a: L.modulated_conv2d(*a, up=2, backend="reference")):
        args = [tensors[n].detach().requires_grad_(True) for n in ("x", "weight", "styles")]
        out = f(*args)
        out.square().sum().backward()
        results.append([out.detach()] + [a.grad for a in args])
    for got, ref in zip(*results):
        assert rel_err(got, ref) < 1e-12


# ---- the stage kernels against float64 references ---------------------------------------------------------------

def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _fir(t, k):
    """The up path's blur of a transposed-conv output (rosinality's pads) in plain torch."""
    p = 3 - k
    pad0, pad1 = (p + 1) // 2 + 1, p // 2 + 1
    t = F.pad(t, (pad0, pad1, pad0, pad1))
    return F.conv2d(t, R.fir_kernel(t.shape[1], t.dtype, t.device), groups=t.shape[1])


def _epilogue(conv_out, d, noise, strength, bias, skip, up, k, lrelu, gain, clamp):
    z = _fir(conv_out, k) if up == 2 else conv_out
    a = z * d[:, :, None, None] + strength * noise + bias[None, :, None, None]
    out = (F.leaky_relu(a, 0.2) if lrelu else a) * gain
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out + R.upsample_fir(skip) if skip is not None else out


EPI_CASES = [(1, 3, False, None), (2, 3, True, 0.7), (2, 1, True, None), (2, 5, False, 0.9)]  # up, k, skip, clamp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("up,k,skip,clamp", EPI_CASES)
def test_epilogue_kernels(up, k, skip, clamp, dtype, poisoned):
    batch, ch, h = 3, 6, 7  # output 7 (up=1) or 14 (up=2)
    ho = h * up if up == 2 else 8
    conv_hw = 2 * h + k - 2 if up == 2 else ho
    t = {"conv_out": _rand(batch, ch, conv_hw, conv_hw, seed=1), "d": _rand(batch, ch, seed=2).abs() + 0.5,
         "noise": _rand(batch, 1, ho, ho, seed=3), "strength": torch.tensor(0.3, dtype=torch.float64),
         "bias": _rand(ch, seed=4), "skip": _rand(batch, ch, ho // 2, ho // 2, seed=5) if skip else None}
    ref = _epilogue(**t, up=up, k=k, lrelu=True, gain=1.4, clamp=clamp)
    low = {n: (v.to(dtype) if v is not None and n not in ("d", "strength") else v) for n, v in t.items()}
    low["d"] = t["d"].to(torch.float64 if dtype == torch.float64 else torch.float32)
    args = (low["conv_out"], low["d"], low["noise"], low["strength"], low["bias"])
    out = C.modconv_epilogue_fwd_cpu(*args, low["skip"], up, k, True, 1.4, clamp, dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert rel_err(out, ref) < tol
    if clamp is not None:
        assert (_epilogue(**t, up=up, k=k, lrelu=True, gain=1.4, clamp=None).abs() > clamp).any()
    # backward (skip excluded: its gradient is modconv_skip_bwd_cpu)
    leaves = {n: t[n].clone().requires_grad_(True) for n in ("conv_out", "d", "noise", "strength", "bias")}
    g = _rand(*ref.shape, seed=6)
    _epilogue(**leaves, skip=None, up=up, k=k, lrelu=True, gain=1.4, clamp=clamp).backward(g)
    g_conv, gd, S, gbias = C.modconv_epilogue_bwd_cpu(g.to(dtype), *args, up, k, True, 1.4, clamp, True)
    assert rel_err(g_conv, leaves["conv_out"].grad) < tol
    assert rel_err(gd, leaves["d"].grad) < tol
    assert rel_err(gbias, leaves["bias"].grad) < tol
    assert rel_err(0.3 * S.unsqueeze(1), leaves["noise"].grad) < tol
    assert rel_err((S.unsqueeze(1) * t["noise"]).sum(), leaves["strength"].grad) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_scale_skip_demod_kernels(dtype, poisoned):
    x, s, g = _rand(3, 5, 6, 7, seed=1), _rand(3, 5, seed=2), _rand(3, 5, 6, 7, seed=3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    u = C.modconv_scale_cpu(x.to(dtype), s.to(acc), False)
    assert rel_err(u, x * s[:, :, None, None]) < tol
    dx, r = C.modconv_scale_bwd_cpu(g.to(dtype), x.to(dtype), s.to(acc), True, True)
    assert rel_err(dx, g * s[:, :, None, None]) < tol and rel_err(r, (g * x).sum((2, 3))) < tol
    skip = _rand(2, 3, 4, 5, seed=4).requires_grad_(True)
    gs = _rand(2, 3, 8, 10, seed=5)
    R.upsample_fir(skip).backward(gs)
    assert rel_err(C.modconv_skip_bwd_cpu(gs.to(dtype)), skip.grad) < tol
    w = _rand(4, 5, 3, 3, seed=6)
    assert rel_err(C.modconv_demod_cpu(w.to(dtype), s.to(dtype), 0.3, 1e-8), R.demodulation(w, s, 0.3, 1e-8)) < tol


def test_kernels_bit_identical_across_thread_counts():
    """Our kernels' reductions use fixed chunks: the same bits with 1 and 2 threads (several work items each)."""
    batch, ch, h = 3, 20, 40
    x, g = _rand(batch, ch, h, h, seed=1).float(), _rand(batch, ch, h, h, seed=2).float()
    t = _rand(batch, ch, 2 * h + 1, 2 * h + 1, seed=3).float()
    gu = _rand(batch, ch, 2 * h, 2 * h, seed=4).float()
    s, d = _rand(batch, ch, seed=5).float(), _rand(batch, ch, seed=6).float().abs() + 0.5
    noise, bias, strength = _rand(batch, 1, 2 * h, 2 * h, seed=7).float(), _rand(ch, seed=8).float(), torch.tensor(0.3)
    skip = _rand(batch, ch, h, h, seed=9).float()
    w = _rand(ch, ch, 3, 3, seed=10).float()

    def everything():
        return [C.modconv_scale_cpu(x, s, False), *C.modconv_scale_bwd_cpu(g, x, s, True, True),
                C.modconv_demod_cpu(w, s, 0.1, 1e-8),
                C.modconv_epilogue_fwd_cpu(x, d, noise[..., :h, :h], strength, bias, None, 1, 3, True, 1.4, 0.9,
                                           torch.float32),
                C.modconv_epilogue_fwd_cpu(t, d, noise, strength, bias, skip, 2, 3, True, 1.4, None, torch.float32),
                *C.modconv_epilogue_bwd_cpu(g, x, d, noise[..., :h, :h].contiguous(), strength, bias, 1, 3, True,
                                            1.4, 0.9, True),
                *C.modconv_epilogue_bwd_cpu(gu, t, d, noise, strength, bias, 2, 3, True, 1.4, None, True),
                C.modconv_skip_bwd_cpu(gu)]

    one, two = at_thread_counts(everything)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


# ---- errors ------------------------------------------------------------------------------------------------------

def test_bad_inputs_on_cpu_backend():
    tensors = tensor_case(2, 4, 5, 6, 3, 1, seed=6)
    x, w, s = tensors["x"], tensors["weight"], tensors["styles"]
    with L.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"styles must have shape \[2, 4\]"):
            L.modulated_conv2d(x, w, s[:1])
        with pytest.raises(ValueError, match=r"noise must have shape \[2 or 1, 1, 12, 12\]"):
            L.modulated_conv2d(x, w, s, up=2, noise=tensors["noise"])
        with pytest.raises(TypeError, match="weight must have dtype torch.float64"):
            L.modulated_conv2d(x, w.float(), s)
    with pytest.raises(L.BackendError, match="takes dtypes"):
        L.modulated_conv2d(x.half(), w.half(), s.half(), backend="cpu")
    # the C++ checks stay as a backstop behind the public validation
    with pytest.raises(RuntimeError, match="styles must be a CPU tensor"):
        C.modconv_fwd_cpu(x, w, s[:1], None, None, None, None, 0.1, True, 1, True, 1.4, None, 1e-8, False)
    with pytest.raises(RuntimeError, match="up must be 1 or 2"):
        C.modconv_fwd_cpu(x, w, s, None, None, None, None, 0.1, True, 3, True, 1.4, None, 1e-8, False)
    with pytest.raises(RuntimeError, match="noise must be"):
        C.modconv_epilogue_fwd_cpu(x, None, x, None, None, None, 1, 3, True, 1.4, None, torch.float64)


# ---- the Generator on the cpu backend ----------------------------------------------------------------------------

def _generator_grads(g, w_plus, noise, backend, dtype):
    w = w_plus.detach().to(dtype).requires_grad_(True)
    ns = [n.detach().to(dtype).requires_grad_(True) for n in noise]
    with L.use_backend(backend):
        img = g.synthesis(w, ns)
    target = torch.linspace(-1, 1, img.numel(), dtype=torch.float64).reshape(img.shape)
    (img.double() - target).square().mean().backward()
    return img, w.grad, [n.grad for n in ns]


def test_cpu_is_the_default_backend_on_cpu():
    assert L.chosen_backend("modulated_conv2d", "cpu", torch.float32) == "cpu"
    assert L.chosen_backend("modulated_conv2d", "cpu", torch.bfloat16) == "cpu"
    with L.use_backend("reference"):
        assert L.chosen_backend("modulated_conv2d", "cpu", torch.float32) == "reference"


@pytest.mark.parametrize("size,channels,batch", [(32, {4: 32, 8: 24, 16: 16, 32: 8}, 2), (256, None, 1)],
                         ids=["small-32", "config-f-256"])
def test_generator_gradients_match_reference(size, channels, batch):
    """Image, W+ and noise gradients of an inversion loss: cpu backend (fp32) against the reference backend (float64
    for the small model; fp32 for config-f 256, where float64 would take half a minute).

    At 256 the noise gradients of the high-resolution layers are sums over channels of random-sign terms: measured
    against float64, both fp32 backends are 3e-4 to 2e-3 off there (image and W+ ~1e-5), so two fp32 results can
    differ by that much; the per-map bound is 1e-2 and the whole noise gradient 1e-3."""
    torch.manual_seed(0)
    g = L.Generator(size, channels=channels).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and noise strengths, as in a trained model
        for name, p in g.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")) or name.startswith("to_rgb"):
                p.add_(0.1 * torch.randn_like(p))
    w_plus = g.mapping(torch.randn(batch, g.style_dim)).unsqueeze(1).repeat(1, g.n_latent, 1)
    w_plus = w_plus + 0.1 * torch.randn_like(w_plus)
    noise = g.make_noise(batch)
    img, gw, gn = _generator_grads(g, w_plus, noise, "cpu", torch.float32)
    ref_dtype = torch.float64 if size <= 64 else torch.float32
    ref = g.to(ref_dtype)
    rimg, rgw, rgn = _generator_grads(ref, w_plus, noise, "reference", ref_dtype)
    tol = 1e-5 if ref_dtype == torch.float64 else 1e-4
    assert rel_err(img, rimg) < tol
    assert rel_err(gw, rgw) < tol
    errs = [rel_err(a, b) for a, b in zip(gn, rgn)]
    assert max(errs) < (tol if ref_dtype == torch.float64 else 1e-2), errs
    assert rel_err(torch.cat([n.flatten() for n in gn]), torch.cat([n.flatten() for n in rgn])) < max(tol, 1e-3)


# ---- the stride-1 3×3 convolution: oneDNN and Winograd F(2×2, 3×3) (csrc/winograd_cpu.cpp) -----------------------

# batch, Cin, Cout, H, W: odd and even sides 4…9, channels 1/3/5/17, batch 1/5
CONV_SHAPES = [(1, 1, 3, 4, 5), (5, 3, 17, 7, 4), (1, 17, 5, 9, 9), (5, 5, 1, 6, 8), (1, 17, 17, 5, 7)]


def _conv_case(batch, cin, cout, h, w, seed=0):
    """A 3×3 layer's inputs at generator scale: x after leaky-ReLU·√2, N(0, 1) weights, styles around 1."""
    x = F.leaky_relu(_rand(batch, cin, h, w, seed=seed), 0.2) * math.sqrt(2)
    return {"x": x, "weight": _rand(cout, cin, 3, 3, seed=seed + 1),
            "styles": 1 + 0.3 * _rand(batch, cin, seed=seed + 2), "noise": _rand(batch, 1, h, w, seed=seed + 3),
            "noise_strength": torch.tensor(0.3, dtype=torch.float64), "bias": _rand(cout, seed=seed + 4)}


@pytest.mark.parametrize("conv", ["onednn", "winograd"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_3x3_conv_paths_match_formula(shape, conv, monkeypatch, poisoned):
    """Both convolution paths of the up=1 3×3 layer, forced through LSAP_MODCONV_CONV: output and every gradient
    (the weight's too: there the forward and input gradient are Winograd's, the weight gradient oneDNN's) against
    the float64 formula. One input channel: no demodulation (it would make the output independent of the style,
    whose gradient is then zero up to rounding)."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", conv)
    tensors = _conv_case(*shape)
    opts = {"demodulate": shape[1] > 1}
    out, grads = run(tensors, opts, torch.float32, "cpu")
    ref_out, ref_grads = run_formula(tensors, opts)
    assert_close(out, grads, ref_out, ref_grads, TOL[torch.float32])


def test_winograd_accuracy_at_generator_width(monkeypatch):
    """Winograd at 256 channels (the sums over channels are long, as in the generator): output and the gradients
    the convolution feeds (x, styles) with a frozen weight within SPEC §5's float32 bound of the float64 formula."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", "winograd")
    tensors = _conv_case(2, 256, 256, 10, 11, seed=20)
    weight = tensors.pop("weight")
    leaves = {n: t.float().requires_grad_(True) for n, t in tensors.items()}
    out = L.modulated_conv2d(leaves["x"], weight.float(), leaves["styles"],
                             **{n: leaves[n] for n in ("noise", "noise_strength", "bias")}, backend="cpu")
    g = _rand(*out.shape, seed=30)
    out.backward(g.float())
    ref_leaves = {n: t.clone().requires_grad_(True) for n, t in tensors.items()}
    ref = formula(ref_leaves["x"], weight, ref_leaves["styles"],
                  **{n: ref_leaves[n] for n in ("noise", "noise_strength", "bias")})
    ref.backward(g)
    assert rel_err(out, ref) < TOL[torch.float32]
    for n in ("x", "styles"):
        assert rel_err(leaves[n].grad, ref_leaves[n].grad) < TOL[torch.float32], n


def test_winograd_op_bit_identical_across_thread_counts(monkeypatch):
    """With a frozen weight a Winograd 3×3 layer runs only our code (demodulation, Winograd forward and input
    gradient, epilogue, style gradient): the same bits with 1 and 2 threads, several chunks of tiles each."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", "winograd")
    tensors = {n: t.float() for n, t in _conv_case(3, 20, 24, 41, 40, seed=40).items()}
    weight = tensors.pop("weight")
    g = _rand(3, 24, 41, 40, seed=50).float()

    def run_once():
        leaves = {n: t.clone().requires_grad_(True) for n, t in tensors.items()}
        out = L.modulated_conv2d(leaves["x"], weight, leaves["styles"],
                                 **{n: leaves[n] for n in ("noise", "noise_strength", "bias")}, backend="cpu")
        out.backward(g)
        return [out] + [t.grad for t in leaves.values()]

    one, two = at_thread_counts(run_once)
    assert all(t is not None and torch.isfinite(t).all() for t in one)
    for name, a, b in zip(["out", *tensors], one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_generator_gradients_match_reference_on_winograd(monkeypatch):
    """The small Generator with every 3×3 up=1 convolution on Winograd (its channels are below the default rule's
    threshold) against the float64 reference backend."""
    monkeypatch.setenv("LSAP_MODCONV_CONV", "winograd")
    test_generator_gradients_match_reference(32, {4: 32, 8: 24, 16: 16, 32: 8}, 2)


def test_bad_conv_path_env(monkeypatch):
    monkeypatch.setenv("LSAP_MODCONV_CONV", "fft")
    t = {n: v.float() for n, v in _conv_case(1, 3, 3, 8, 8).items()}
    with pytest.raises(RuntimeError, match="LSAP_MODCONV_CONV must be unset, 'onednn' or 'winograd', got 'fft'"):
        L.modulated_conv2d(t["x"], t["weight"], t["styles"], backend="cpu")
