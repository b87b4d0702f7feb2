"""style_normalize / sncd / style_anchors: every backend against independent float64 formulas (SPEC §4, §5)."""
import math

import numpy as np
import pytest
import torch

import lsap_kernels as L
from helpers import TOL, device_for, rel_err
from lsap_kernels import StyleLayout
from lsap_kernels.ops.style import reference

BACKENDS = ["reference", "cpu", "triton", "cuda"]
KERNEL_BACKENDS = ["cpu", "triton", "cuda"]
EPS = 1e-8


def need(backend, dtype=torch.float32):
    if not L.available_backends()[backend]:
        pytest.skip(f"backend {backend!r} not available here")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton backend takes fp32/bf16/fp16")


def layout_mixed():
    return StyleLayout.from_channels([1, 3, 7, 512, 4096])


def layout_random(seed):
    g = torch.Generator().manual_seed(seed)
    return StyleLayout.from_channels(torch.randint(1, 300, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                   generator=g).tolist())


def formula_cos(styles, anchors, layout):
    """c[b, l] = s_bl·μ_l / max(||s_bl||, eps), by plain numpy loops in float64."""
    s, mu = styles.detach().double().cpu().numpy(), anchors.detach().double().cpu().numpy()
    out = np.empty((s.shape[0], layout.n_layers))
    for b in range(s.shape[0]):
        for l, (lo, hi) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            out[b, l] = np.dot(s[b, lo:hi], mu[lo:hi]) / max(np.linalg.norm(s[b, lo:hi]), EPS)
    return torch.from_numpy(out)


def formula_normalize(styles, layout):
    s = styles.detach().double().cpu().numpy()
    out = np.empty_like(s)
    for b in range(s.shape[0]):
        for lo, hi in zip(layout.offsets[:-1], layout.offsets[1:]):
            out[b, lo:hi] = s[b, lo:hi] / max(np.linalg.norm(s[b, lo:hi]), EPS)
    return torch.from_numpy(out)


def random_inputs(layout, batch, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    styles = (torch.randn(batch, layout.total_channels, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    anchors = (torch.randn(layout.total_channels, generator=g) * 0.1).to(device)
    return styles, anchors


# ---------------------------------------------------------------------------------------------------------
# reference vs formulas
@pytest.mark.parametrize("layer_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch_reduction", ["mean", "sum", "none"])
def test_reference_reductions_match_formula(layer_reduction, batch_reduction):
    layout = layout_random(1)
    styles, anchors = random_inputs(layout, 5, torch.float64, "cpu")
    d = 1 - formula_cos(styles, anchors, layout)  # [B, L]
    if layer_reduction != "none":
        d = d.mean(1) if layer_reduction == "mean" else d.sum(1)
    if batch_reduction != "none":
        d = d.mean(0) if batch_reduction == "mean" else d.sum(0)
    out = L.sncd(styles, anchors, layout, layer_reduction, batch_reduction, backend="reference")
    assert out.shape == d.shape
    assert rel_err(out, d) < 1e-12


def test_reference_normalize_matches_formula():
    layout = layout_mixed()
    styles, _ = random_inputs(layout, 3, torch.float64, "cpu")
    assert rel_err(L.style_normalize(styles, layout, backend="reference"), formula_normalize(styles, layout)) < 1e-12


def test_reference_gradcheck():
    layout = StyleLayout.from_channels([1, 3, 7, 16])
    styles, anchors = random_inputs(layout, 3, torch.float64, "cpu")
    styles.requires_grad_(True)
    anchors = anchors.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, a: L.sncd(s, a, layout, "none", "none", backend="reference"),
                                    (styles, anchors))
    assert torch.autograd.gradcheck(lambda s: L.style_normalize(s, layout, backend="reference"), (styles,))
    assert torch.autograd.gradgradcheck(lambda s: L.sncd(s, anchors.detach(), layout, backend="reference"), (styles,))


# ---------------------------------------------------------------------------------------------------------
# every backend
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,layout_id", [(1, "mixed"), (64, "mixed"), (7, "random")])
def test_forward_matches_formula(backend, dtype, batch, layout_id, poisoned):
    need(backend, dtype)
    device = device_for(backend)
    if backend == "triton" and device == "cpu" and batch == 64:
        batch = 16  # the interpreter is slow; big batches run on the GPU
    layout = layout_mixed() if layout_id == "mixed" else layout_random(batch)
    styles, anchors = random_inputs(layout, batch, dtype, device, seed=batch)
    cos = 1 - L.sncd(styles, anchors, layout, "none", "none", backend=backend)
    assert cos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(cos, formula_cos(styles, anchors, layout)) < TOL[dtype]
    hat = L.style_normalize(styles, layout, backend=backend)
    assert hat.dtype == dtype and hat.shape == styles.shape
    assert rel_err(hat, formula_normalize(styles, layout)) < TOL[dtype]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reductions", [("mean", "mean"), ("sum", "none"), ("none", "sum"), ("none", "none")])
def test_gradients_match_reference(backend, dtype, reductions, poisoned):
    need(backend, dtype)
    device = device_for(backend)
    layout = layout_mixed()
    batch = 4 if device == "cpu" else 64
    styles, anchors = random_inputs(layout, batch, dtype, device, seed=3)
    ref_styles = styles.detach().double().cpu().requires_grad_(True)
    styles.requires_grad_(True)
    out = L.sncd(styles, anchors, layout, *reductions, backend=backend)
    # fp16 gradients of a mean over many channels underflow: scale the loss as AMP does.
    weights = torch.rand(out.shape, dtype=torch.float64) * (1e3 if dtype == torch.float16 else 1.0)
    (g,) = torch.autograd.grad((out.double().cpu() * weights).sum(), styles)
    ref = reference.sncd_cosines(ref_styles, anchors.double().cpu(), layout, EPS)
    ref_out = L.sncd(ref_styles, anchors.double().cpu(), layout, *reductions, backend="reference")
    (g_ref,) = torch.autograd.grad((ref_out * weights).sum(), ref_styles)
    assert ref.shape[0] == batch
    assert g.dtype == dtype
    assert rel_err(g, g_ref) < TOL[dtype]

    grad_hat = torch.randn(styles.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(L.style_normalize(styles, layout, backend=backend), styles, grad_hat.to(device, dtype))
    (g_ref,) = torch.autograd.grad(L.style_normalize(ref_styles, layout, backend="reference"), ref_styles, grad_hat)
    assert rel_err(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_gradcheck_float64(backend):
    need(backend, torch.float64)
    device = device_for(backend)
    layout = StyleLayout.from_channels([1, 3, 7, 20])
    styles, anchors = random_inputs(layout, 3, torch.float64, device)
    styles.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: L.sncd(s, anchors, layout, "none", "none", backend=backend), (styles,))
    assert torch.autograd.gradcheck(lambda s: L.style_normalize(s, layout, backend=backend), (styles,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_norms(backend):
    """Segments with ||s|| < eps divide by eps (no projection), forward and backward, like the reference."""
    need(backend)
    device = device_for(backend)
    layout = StyleLayout.from_channels([4, 5, 6])
    styles, anchors = random_inputs(layout, 3, torch.float32, device)
    styles[0, 0:4] = 0
    styles[1, 4:9] = 1e-10
    styles.requires_grad_(True)
    ref_styles = styles.detach().double().cpu().requires_grad_(True)
    for fn in (lambda s, b: L.sncd(s, anchors.to(s.device), layout, "none", "none", backend=b),
               lambda s, b: L.style_normalize(s, layout, backend=b) * torch.arange(15, device=s.device)):
        out, ref = fn(styles, backend), fn(ref_styles, "reference")
        assert rel_err(out, ref) < 1e-5
        (g,) = torch.autograd.grad(out.sum(), styles)
        (g_ref,) = torch.autograd.grad(ref.sum(), ref_styles)
        assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    need(backend)
    device = device_for(backend)
    layout = StyleLayout.from_channels([3, 8, 5])
    styles, anchors = random_inputs(layout, 2, torch.float32, device)
    styles[0, 4] = float("nan")
    styles[1, 0] = float("inf")
    styles.requires_grad_(True)
    cos = 1 - L.sncd(styles, anchors, layout, "none", "none", backend=backend)
    expect_nan = torch.zeros(2, 3, dtype=torch.bool)
    expect_nan[0, 1] = expect_nan[1, 0] = True
    assert torch.equal(cos.isnan().cpu(), expect_nan)
    hat = L.style_normalize(styles, layout, backend=backend)
    # IEEE: the whole NaN segment is NaN; in the Inf segment the Inf element is (inf/inf), the rest x/inf = 0.
    assert hat[0, 3:11].isnan().all() and hat[1, 0].isnan() and not hat[1, 1:3].isnan().any()
    assert torch.isfinite(hat[0, :3]).all() and torch.isfinite(hat[1, 3:]).all()
    (g,) = torch.autograd.grad(cos.nansum(), styles)
    assert g[0, 3:11].isnan().all() and torch.isfinite(g[0, :3]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    need(backend)
    device = device_for(backend)
    layout = StyleLayout.from_channels([1, 3, 7, 33])
    styles, anchors = random_inputs(layout, 3, torch.float32, device)
    offsets = layout.offsets_tensor(device)
    styles.requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.lsap, f"sncd_{backend}").default, (styles, anchors, offsets, EPS))
    torch.library.opcheck(getattr(torch.ops.lsap, f"style_normalize_{backend}").default, (styles, offsets, EPS))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    need(backend)
    device = device_for(backend)
    layout = StyleLayout.from_channels([1, 3, 7, 33])
    styles, anchors = random_inputs(layout, 3, torch.float32, device)

    def loss(s):
        return L.sncd(L.style_normalize(s, layout, backend=backend) * 2, anchors, layout, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    s1, s2 = styles.clone().requires_grad_(True), styles.clone().requires_grad_(True)
    out1, out2 = loss(s1), compiled(s2)
    assert torch.allclose(out1, out2)
    out1.backward()
    out2.backward()
    assert torch.allclose(s1.grad, s2.grad)


def test_double_backward_raises_on_kernels():
    need("cpu")
    layout = StyleLayout.from_channels([3, 4])
    styles, anchors = random_inputs(layout, 2, torch.float64, "cpu")
    styles.requires_grad_(True)
    (g,) = torch.autograd.grad(L.sncd(styles, anchors, layout, backend="cpu"), styles, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


def test_cpu_bits_do_not_depend_on_thread_count():
    need("cpu")
    layout = layout_random(7)
    styles, anchors = random_inputs(layout, 33, torch.float32, "cpu")
    grad_hat = torch.randn_like(styles)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            s = styles.clone().requires_grad_(True)
            cos = L.sncd(s, anchors, layout, "none", "none", backend="cpu")
            (g_cos,) = torch.autograd.grad(cos.sum(), s)
            hat = L.style_normalize(s, layout, backend="cpu")
            (g_hat,) = torch.autograd.grad(hat, s, grad_hat)
            results.append((cos, g_cos, hat, g_hat))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---------------------------------------------------------------------------------------------------------
# bad inputs
def test_bad_inputs_are_named():
    layout = StyleLayout.from_channels([3, 4])
    styles, anchors = random_inputs(layout, 2, torch.float32, "cpu")
    with pytest.raises(TypeError, match="layout must be a StyleLayout"):
        L.sncd(styles, anchors, [3, 4])
    with pytest.raises(ValueError, match=r"styles must have shape \[B, 7\].*got shape \(2, 8\)"):
        L.sncd(torch.randn(2, 8), anchors, layout)
    with pytest.raises(ValueError, match=r"styles must have 2 dimensions"):
        L.style_normalize(torch.randn(7), layout)
    with pytest.raises(TypeError, match="styles must be a floating tensor.*int64"):
        L.style_normalize(torch.ones(2, 7, dtype=torch.long), layout)
    with pytest.raises(ValueError, match=r"anchors must have shape \[7\]"):
        L.sncd(styles, torch.randn(6), layout)
    with pytest.raises(ValueError, match=r"anchors must have shape \[7\] on cpu"):
        L.sncd(styles, anchors.to("meta"), layout)
    with pytest.raises(ValueError, match="layer_reduction must be one of"):
        L.sncd(styles, anchors, layout, layer_reduction="max")
    with pytest.raises(ValueError, match="offsets .* are not the cumulative sums"):
        StyleLayout(names=("a", "b"), channels=(3, 4), offsets=(0, 3, 8), w_index=(0, 1))
    with pytest.raises(ValueError, match=">= 1 channel"):
        StyleLayout.from_channels([3, 0])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kernel_checks_raise_python_errors(device):
    """The C++ kernels' own checks, reached by calling lsap_kernels._C directly (the public ops validate first):
    a RuntimeError naming the argument, never a crash, and the module still works afterwards. The CUDA entry points
    are checked with CPU tensors, so this runs wherever the extension was built with CUDA."""
    need("cpu")
    from lsap_kernels import _ext

    C = _ext.module()
    if device == "cuda" and not C.WITH_CUDA:
        pytest.skip("lsap_kernels._C was built without CUDA")
    layout = StyleLayout.from_channels([3, 4])
    styles, anchors = random_inputs(layout, 2, torch.float32, "cpu")
    offsets = torch.tensor(layout.offsets, dtype=torch.int64)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="sncd_fwd_cuda: styles must be a CUDA tensor, got one on cpu"):
            C.sncd_fwd_cuda(styles, anchors, offsets, EPS)
        with pytest.raises(RuntimeError, match="styles must be a CUDA tensor"):
            C.style_normalize_bwd_cuda(styles, styles, styles, offsets, EPS)
        return
    with pytest.raises(RuntimeError, match=r"anchors must have shape \[7\]"):
        C.sncd_fwd_cpu(styles, anchors[:6], offsets, EPS)
    with pytest.raises(RuntimeError, match=r"anchors must be a CPU tensor of dtype Float \(the accumulation dtype"):
        C.sncd_fwd_cpu(styles, anchors.double(), offsets, EPS)
    with pytest.raises(RuntimeError, match="offsets must be a 1-D int64 CPU tensor"):
        C.style_normalize_fwd_cpu(styles, offsets.int(), EPS)
    cos, _ = C.sncd_fwd_cpu(styles, anchors, offsets, EPS)
    assert torch.allclose(cos.double(), formula_cos(styles, anchors, layout), rtol=1e-5, atol=1e-6)


def test_kernel_backend_refuses_anchor_gradients():
    need("cpu")
    layout = StyleLayout.from_channels([3, 4])
    styles, anchors = random_inputs(layout, 2, torch.float32, "cpu")
    with pytest.raises(L.BackendError, match="no gradient for the anchors"):
        L.sncd(styles, anchors.requires_grad_(True), layout, backend="cpu")


# ---------------------------------------------------------------------------------------------------------
# anchors and compatibility with the public LSAP formulation
def small_generator(seed=0):
    torch.manual_seed(seed)
    return L.Generator(16, style_dim=32, n_mlp=2, channels={4: 16, 8: 12, 16: 8})


def test_style_anchors_is_the_mean_of_normalised_samples():
    g = small_generator()
    n, chunk = 1000, 300
    mu = L.style_anchors(g, n_samples=n, layers="all", batch_size=chunk, seed=5)
    rng = torch.Generator().manual_seed(5)
    zs = torch.cat([torch.randn(min(chunk, n - i), 32, generator=rng) for i in range(0, n, chunk)])
    styles, layout = g.double().style_space(g.mapping(zs.double()), "all")
    expect = formula_normalize(styles, layout).mean(0)
    assert mu.shape == (layout.total_channels,) and mu.dtype == torch.float32
    assert rel_err(mu, expect) < 1e-6


def test_sncd_sum_equals_lsap_reference_loss_up_to_L():
    """GANInverter's LSAP loss: per layer normalise, anchor = mean of normalised samples,
    loss = −Σ_l mean_b(ŝ_bl·μ_l). Then sncd(layer_reduction="sum") = L + loss."""
    g = small_generator(1).double().requires_grad_(False)
    torch.manual_seed(2)
    with torch.no_grad():
        samples = g.mapping(torch.randn(500, 32, dtype=torch.float64))
        codes = g.mapping(torch.randn(6, 32, dtype=torch.float64)).unsqueeze(1).repeat(1, g.n_latent, 1)
        codes += 0.3 * torch.randn_like(codes)
    names = ["conv1"] + [f"convs.{i}" for i in range(len(g.convs))] + [f"to_rgbs.{len(g.to_rgbs) - 1}"]
    loss, anchors = 0.0, []
    for i, name in enumerate(names):  # one layer per W+ entry, in order
        affine = g.get_submodule(name).conv.modulation
        s_samples = affine(samples)
        mu = (s_samples / s_samples.norm(dim=1, keepdim=True)).mean(0)
        s = affine(codes[:, i])
        loss = loss - ((s / s.norm(dim=1, keepdim=True)) * mu).sum(1).mean()
        anchors.append(mu)
    styles, layout = g.style_space(codes, "lsap")
    assert layout.names == tuple(names) and layout.w_index == tuple(range(len(names)))
    for backend in ("reference", "cpu"):
        if L.available_backends()[backend]:
            ours = L.sncd(styles, torch.cat(anchors), layout, layer_reduction="sum", batch_reduction="mean",
                          backend=backend)
            assert abs((ours - layout.n_layers).item() - loss.item()) < 1e-6 * max(1.0, abs(loss.item()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_all_layout_1024(backend):
    """The real shape: "all" 1024 layout, batch 256, fp32 and bf16, forward and gradient."""
    need(backend)
    with torch.device("meta"):
        layout = L.Generator(1024).style_layout("all")
    for dtype in (torch.float32, torch.bfloat16):
        styles, anchors = random_inputs(layout, 256, dtype, "cuda")
        styles.requires_grad_(True)
        out = L.sncd(styles, anchors, layout, backend=backend)
        (g,) = torch.autograd.grad(out, styles)
        ref_s = styles.detach().double().requires_grad_(True)
        ref = L.sncd(ref_s, anchors.double(), layout, backend="reference")
        (g_ref,) = torch.autograd.grad(ref, ref_s)
        assert rel_err(out, ref) < TOL[dtype] and rel_err(g, g_ref) < TOL[dtype]
        assert math.isfinite(out.item())
