"""patch_stylegan2 / unpatch_stylegan2 and lsap_kernels.nn on a rosinality-style generator
(tests/stylegan2_rosinality.py: rosinality's module structure and state_dict, plain torch)."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import lsap_kernels as L
import lsap_kernels.patch as patch_module
import stylegan2_rosinality as ros
from helpers import TOL, rel_err
from lsap_kernels import backends

STYLE_DIM = 16
TABLE = {4: 12, 8: 10, 16: 7, 32: 6}  # small channel table: fast, same structure
BACKENDS = ("reference", "cpu", "triton")
DTYPES = (torch.float64, torch.float32)


def rosinality_generator(dtype=torch.float64, size=16, seed=0, **kw):
    """A rosinality-style generator with randomised weights (noise strengths and biases start at 0: randomise them
    so they matter)."""
    torch.manual_seed(seed)
    g = ros.Generator(size, STYLE_DIM, 2, channels=TABLE, **kw).to(dtype)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return g


def needs_backend(name: str, dtype: torch.dtype) -> None:
    try:
        backends.select("modulated_conv2d", torch.device("cpu"), dtype, name)
    except L.BackendError as e:
        pytest.skip(f"modulated_conv2d backend {name!r} cannot run on CPU here: {e}")


def inputs(g, batch=3, seed=1, dtype=torch.float64):
    """W+ latents, per-sample noise maps and a fixed random projection of the image (the loss)."""
    gen = torch.Generator().manual_seed(seed)
    w_plus = torch.randn(batch, g.n_latent, g.style_dim, generator=gen, dtype=dtype)
    noise = [torch.randn(batch, 1, *getattr(g.noises, f"noise_{i}").shape[-2:], generator=gen, dtype=dtype)
             for i in range(g.num_layers)]
    probe = torch.randn(batch, 3, g.size, g.size, generator=gen, dtype=dtype)
    return w_plus, noise, probe


def image_and_grads(g, w_plus, noise, probe):
    """Image and the gradients of <image, probe> w.r.t. W+, every noise map and every parameter that gets one."""
    dtype = next(g.parameters()).dtype
    w_plus = w_plus.to(dtype, copy=True).requires_grad_()
    noise = [n.to(dtype, copy=True).requires_grad_() for n in noise]
    g.zero_grad(set_to_none=True)
    image, _ = g([w_plus], input_is_latent=True, noise=noise)
    (image * probe.to(dtype)).sum().backward()
    grads = {"w_plus": w_plus.grad, **{f"noise[{i}]": n.grad for i, n in enumerate(noise)},
             **{name: p.grad for name, p in g.named_parameters() if p.grad is not None}}
    return image.detach(), grads


def assert_close(out, ref, tol):
    image, grads = out
    ref_image, ref_grads = ref
    assert rel_err(image, ref_image) < tol
    assert sorted(grads) == sorted(ref_grads)
    errors = {k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}
    assert max(errors.values()) < tol, {k: e for k, e in errors.items() if e >= tol}


def patchable(model):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ in patch_module.PATCHABLE]


# ---- same images and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_generator_matches_rosinality(backend, dtype):
    """Image, W+ / noise / weight gradients of the patched model against the unpatched model in float64."""
    needs_backend(backend, dtype)
    interpreted = backend == "triton" and not torch.cuda.is_available()  # Triton's CPU interpreter: smallest model
    g64 = rosinality_generator(size=8 if interpreted else 16)
    w_plus, noise, probe = inputs(g64, batch=2 if interpreted else 3)
    ref = image_and_grads(g64, w_plus, noise, probe)
    g = copy.deepcopy(g64).to(dtype)
    handle = L.patch_stylegan2(g, backend=backend)
    assert handle.backend == backend and set(handle.modules) == {p for p, _ in patchable(g)}
    assert_close(image_and_grads(g, w_plus, noise, probe), ref, 1e-12 if dtype == torch.float64 else TOL[dtype])


def test_random_and_stored_noise_follow_rosinality():
    """noise=None draws the same stream as NoiseInjection; stored [1,1,r,r] buffers broadcast over the batch."""
    g = rosinality_generator()
    w_plus, _, _ = inputs(g)
    refs = []
    for randomize in (True, False):
        torch.manual_seed(5)
        refs.append(g([w_plus], input_is_latent=True, randomize_noise=randomize)[0])
    with L.patch_stylegan2(g, backend="reference"):
        for randomize, ref in zip((True, False), refs):
            torch.manual_seed(5)
            assert rel_err(g([w_plus], input_is_latent=True, randomize_noise=randomize)[0], ref) < 1e-12
    assert rel_err(refs[0], refs[1]) > 1e-3  # the noise matters


LAYERS = {
    "styled_conv": lambda: ros.StyledConv(5, 7, 3, STYLE_DIM),
    "styled_conv_up": lambda: ros.StyledConv(5, 7, 3, STYLE_DIM, upsample=True),
    "styled_conv_no_demod": lambda: ros.StyledConv(5, 7, 3, STYLE_DIM, demodulate=False),
    "styled_conv_up_input_scaling": lambda: ros.StyledConv(5, 7, 3, STYLE_DIM, upsample=True, fused=False),
    "to_rgb": lambda: ros.ToRGB(5, STYLE_DIM, upsample=False),
    "to_rgb_skip": lambda: ros.ToRGB(5, STYLE_DIM),
    "modconv": lambda: ros.ModulatedConv2d(5, 7, 3, STYLE_DIM),
    "modconv_up_no_demod": lambda: ros.ModulatedConv2d(5, 7, 3, STYLE_DIM, upsample=True, demodulate=False),
}


def layer_call(name, layer, batch=2, h=5, seed=3):
    """Random inputs for one layer and a closure giving its output and input/parameter gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, h, h, generator=gen, dtype=torch.float64)
    style = torch.randn(batch, STYLE_DIM, generator=gen, dtype=torch.float64)
    up = 2 if "_up" in name else 1
    extra = {}
    if name.startswith("styled_conv"):
        extra["noise"] = torch.randn(batch, 1, h * up, h * up, generator=gen, dtype=torch.float64)
    if name == "to_rgb_skip":
        extra["skip"] = torch.randn(batch, 3, h // 2 + 1, h // 2 + 1, generator=gen, dtype=torch.float64)
        x = torch.randn(batch, 5, 2 * (h // 2 + 1), 2 * (h // 2 + 1), generator=gen, dtype=torch.float64)

    dtype = next(layer.parameters()).dtype

    def run():
        leaves = {"input": x, "style": style, **extra}  # forward's positional order
        leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in leaves.items()}
        layer.zero_grad(set_to_none=True)
        out = layer(*leaves.values())
        out.square().sum().backward()
        return out.detach(), {**{k: v.grad for k, v in leaves.items()},
                              **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}

    return run


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_patched_layers_match(name):
    """Each layer kind patched on its own (the root module), float64."""
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    run = layer_call(name, layer)
    ref = run()
    with L.patch_stylegan2(layer):
        assert "forward" in layer.__dict__
        assert_close(run(), ref, 1e-12)


def test_one_fused_call_per_layer(monkeypatch):
    g = rosinality_generator(size=16)
    calls = []

    def counting(*args, **kw):
        calls.append(kw["backend"])
        return ros_op(*args, **kw)

    ros_op = patch_module.modulated_conv2d
    monkeypatch.setattr(patch_module, "modulated_conv2d", counting)
    L.patch_stylegan2(g, backend="reference")
    w_plus, noise, _ = inputs(g)
    g([w_plus], input_is_latent=True, noise=noise)
    n_styled, n_rgb = 1 + len(g.convs), 1 + len(g.to_rgbs)
    assert calls == ["reference"] * (n_styled + n_rgb)


def test_use_backend_reaches_the_patched_layers(monkeypatch):
    """backend=None: the op's own choice (use_backend, LSAP_BACKEND); patch_stylegan2(backend=) beats use_backend."""
    needs_backend("cpu", torch.float64)
    ran = []
    for name in ("reference", "cpu"):
        impl = backends._registry["modulated_conv2d"][name]
        spy = (lambda fn, name: lambda *a: ran.append(name) or fn(*a))(impl.fn, name)
        monkeypatch.setitem(backends._registry["modulated_conv2d"], name, dataclasses.replace(impl, fn=spy))
    g = rosinality_generator(size=8)
    w_plus, noise, _ = inputs(g)
    n_layers = len(g.convs) + len(g.to_rgbs) + 2
    with L.patch_stylegan2(g):
        for name in ("reference", "cpu"):
            ran.clear()
            with L.use_backend(name):
                g([w_plus], input_is_latent=True, noise=noise)
            assert ran == [name] * n_layers
    with L.patch_stylegan2(g, backend="reference"), L.use_backend("cpu"):
        ran.clear()
        g([w_plus], input_is_latent=True, noise=noise)
        assert ran == ["reference"] * n_layers


# ---- unpatch -----------------------------------------------------------------------------------------------
def test_unpatch_restores_forwards_and_outputs():
    g = rosinality_generator()
    w_plus, noise, _ = inputs(g)
    ref, _ = g([w_plus], input_is_latent=True, noise=noise)
    modules = patchable(g)
    hooks = {p: len(m._load_state_dict_pre_hooks) for p, m in modules}
    assert all("forward" not in m.__dict__ for _, m in modules)

    keys = list(g.state_dict())
    handle = L.patch_stylegan2(g)
    assert all(m.forward.__func__ is not type(m).forward for _, m in modules)
    assert list(g.state_dict()) == keys
    handle.unpatch()
    for p, m in modules:
        assert "forward" not in m.__dict__ and "_lsap_patch" not in m.__dict__, p
        assert m.forward.__func__ is type(m).forward and m.forward.__self__ is m, p
        assert len(m._load_state_dict_pre_hooks) == hooks[p], p
    assert torch.equal(g([w_plus], input_is_latent=True, noise=noise)[0], ref)  # the original code runs again
    handle.unpatch()  # a second call does nothing

    L.patch_stylegan2(g)
    assert set(L.unpatch_stylegan2(g)) == {p for p, _ in modules}
    assert all("forward" not in m.__dict__ for _, m in modules)
    with pytest.raises(ValueError, match="no module of Generator is patched"):
        L.unpatch_stylegan2(g)
    with L.patch_stylegan2(g):
        assert all("forward" in m.__dict__ for _, m in modules)
    assert all("forward" not in m.__dict__ for _, m in modules)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    """e.g. an EMA copy made after patching: the copy's forwards are bound to the copy's modules."""
    g = rosinality_generator(size=16)
    w_plus, noise, _ = inputs(g)
    ref, _ = g([w_plus], input_is_latent=True, noise=noise)
    L.patch_stylegan2(g, backend="reference")
    twin = copy.deepcopy(g)
    assert twin.convs[0].forward.__self__ is twin.convs[0]
    with torch.no_grad():
        twin.to_rgbs[0].bias.add_(1.0)  # the copy's own parameters are used
    out, _ = twin([w_plus], input_is_latent=True, noise=noise)
    assert rel_err(g([w_plus], input_is_latent=True, noise=noise)[0], ref) < 1e-12
    assert rel_err(out, ref) > 1e-3
    L.unpatch_stylegan2(twin)
    assert "forward" not in twin.convs[0].__dict__ and "forward" in g.convs[0].__dict__


def test_unpatch_refuses_to_overwrite_a_later_forward():
    g = rosinality_generator(size=8)
    handle = L.patch_stylegan2(g)
    g.conv1.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="conv1: its forward was replaced after patch_stylegan2"):
        handle.unpatch()


# ---- refusals -----------------------------------------------------------------------------------------------
def test_double_patch_is_refused():
    g = rosinality_generator(size=8)
    L.patch_stylegan2(g)
    with pytest.raises(ValueError, match=r"conv1: already patched by patch_stylegan2"):
        L.patch_stylegan2(g)


def test_models_without_rosinality_layers_are_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        L.patch_stylegan2(object())
    with pytest.raises(ValueError, match="Sequential has no rosinality-style layers to patch; expected modules"):
        L.patch_stylegan2(nn.Sequential(nn.Linear(3, 3)))
    ours = L.Generator(8, STYLE_DIM, 1, channels={4: 4, 8: 4})
    with pytest.raises(ValueError, match="lsap_kernels' own and already run on modulated_conv2d"):
        L.patch_stylegan2(ours)
    with pytest.raises(L.BackendError, match="unknown backend"):
        L.patch_stylegan2(rosinality_generator(size=8), backend="fast")


def _signature_variant(g):
    # e.g. StyleSpace forks: StyledConv.forward takes extra arguments and computes something else
    def forward(self, input, style, noise=None, index=0):
        return None

    g.convs[0].__class__ = type("StyledConv", (ros.StyledConv,), {"forward": forward})


def _downsample_variant(g):
    g.convs[1].conv = ros.ModulatedConv2d(TABLE[8], TABLE[8], 3, STYLE_DIM, downsample=True).double()


VARIANTS = {
    "blur_kernel": (lambda g: None, dict(blur_kernel=(1, 2, 2, 1)),
                    r"convs\.0\.conv \(ModulatedConv2d\): blur: .*\[1,3,3,1\]"),
    "downsample": (_downsample_variant, {}, r"convs\.1\.conv \(ModulatedConv2d\): downsample=True is not supported"),
    "slope": (lambda g: setattr(g.conv1.activate, "negative_slope", 0.1), {},
              r"conv1 \(StyledConv\): activate\.negative_slope"),
    "extra_child": (lambda g: setattr(g.to_rgbs[0], "iwt", nn.Identity()), {}, r"to_rgbs\.0 \(ToRGB\): its children"),
    "eps": (lambda g: setattr(g.to_rgb1.conv, "eps", 1e-5), {}, r"to_rgb1\.conv \(ModulatedConv2d\): eps"),
    "signature": (_signature_variant, {}, r"convs\.0 \(StyledConv\): StyledConv\.forward.* differs from rosinality"),
    "fir_pad": (lambda g: setattr(g.to_rgbs[1].upsample, "pad", (1, 2)), {}, r"to_rgbs\.1 \(ToRGB\): upsample\.pad"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unknown_variants_are_refused_by_path(variant):
    mutate, kw, message = VARIANTS[variant]
    g = rosinality_generator(size=16, **kw)
    mutate(g)
    with pytest.raises(ValueError, match=message) as info:
        L.patch_stylegan2(g)
    assert "nothing was patched" in str(info.value)
    assert all("forward" not in m.__dict__ for _, m in g.named_modules())


def test_loading_another_fir_into_a_patched_model_is_refused():
    g = rosinality_generator(size=16)
    state = g.state_dict()
    state["convs.0.conv.blur.kernel"] = torch.ones(4, 4, dtype=torch.float64) / 4
    with L.patch_stylegan2(g):
        g.load_state_dict(g.state_dict())  # the same kernels load
        with pytest.raises(ValueError, match=r"'convs\.0\.conv\.blur\.kernel'.*\[1,3,3,1\]"):
            g.load_state_dict(state)
    g.load_state_dict(state)  # unpatched: rosinality's own code uses whatever kernel it holds


def test_to_rgb_without_upsample_refuses_a_skip():
    g = rosinality_generator(size=8)
    L.patch_stylegan2(g)
    x = torch.randn(1, TABLE[4], 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="to_rgb1: got a skip but this ToRGB was built with upsample=False"):
        g.to_rgb1(x, torch.randn(1, STYLE_DIM, dtype=torch.float64), torch.randn(1, 3, 2, 2, dtype=torch.float64))


# ---- lsap_kernels.nn ---------------------------------------------------------------------------------------------
NN_LAYERS = {  # name: (constructor arguments shared by rosinality's class and ours)
    "styled_conv": ((5, 7, 3, STYLE_DIM), {}),
    "styled_conv_up": ((5, 7, 3, STYLE_DIM), dict(upsample=True)),
    "styled_conv_no_demod": ((5, 7, 3, STYLE_DIM), dict(demodulate=False)),
    "to_rgb": ((5, STYLE_DIM), dict(upsample=False)),
    "to_rgb_skip": ((5, STYLE_DIM), {}),
}


def nn_pair(name):
    """rosinality's layer and ours, built with the same arguments, both in float64."""
    args, kw = NN_LAYERS[name]
    rgb = name.startswith("to_rgb")
    theirs = (ros.ToRGB if rgb else ros.StyledConv)(*args, **kw)
    ours = (L.nn.FusedToRGB if rgb else L.nn.FusedStyledConv)(*args, **kw)
    return theirs.double(), ours.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(NN_LAYERS))
def test_fused_layers_load_rosinality_weights(name, dtype):
    torch.manual_seed(0)
    theirs, fused = nn_pair(name)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert list(fused.state_dict()) == list(theirs.state_dict())
    fused.load_state_dict(theirs.state_dict(), strict=True)
    fused.to(dtype)
    ref = layer_call(name, theirs)()
    out = layer_call(name, fused)()
    assert_close(out, ref, 1e-12 if dtype == torch.float64 else TOL[dtype])
    if name.startswith("styled_conv") and dtype == torch.float64:  # noise=None: rosinality's draw, same stream
        x, s = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, STYLE_DIM, dtype=torch.float64)
        torch.manual_seed(9)
        ref = theirs(x, s)
        torch.manual_seed(9)
        assert rel_err(fused(x, s), ref) < 1e-12


def test_fused_layers_refuse_other_firs_and_skips():
    with pytest.raises(ValueError, match=r"blur_kernel must be \[1, 3, 3, 1\]"):
        L.nn.FusedStyledConv(4, 4, 3, STYLE_DIM, upsample=True, blur_kernel=[1, 2, 1])
    with pytest.raises(ValueError, match=r"blur_kernel must be \[1, 3, 3, 1\]"):
        L.nn.FusedToRGB(4, STYLE_DIM, blur_kernel=[1, 1])
    state = ros.StyledConv(4, 4, 3, STYLE_DIM, upsample=True, blur_kernel=(1, 2, 2, 1)).state_dict()
    with pytest.raises(ValueError, match=r"'conv\.blur\.kernel' for FusedStyledConv.*\[1,3,3,1\]"):
        L.nn.FusedStyledConv(4, 4, 3, STYLE_DIM, upsample=True).load_state_dict(state)
    rgb = L.nn.FusedToRGB(4, STYLE_DIM, upsample=False)
    with pytest.raises(ValueError, match="built with upsample=False got a skip"):
        rgb(torch.randn(1, 4, 4, 4), torch.randn(1, STYLE_DIM), torch.randn(1, 3, 2, 2))


# ---- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_patched_generator_on_cuda_config_f():
    """Config-f 256², batch 4, automatic backend on CUDA (triton): image and W+ / noise gradients against the
    unpatched model in float64 (TF32 tolerance: the kernel may use it)."""
    torch.manual_seed(0)
    g64 = ros.Generator(256, 512, 8).double().cuda()
    with torch.no_grad():
        for p in g64.parameters():
            p.add_(0.2 * torch.randn_like(p))
    w_plus, noise, probe = inputs(g64, batch=4)
    w_plus, noise, probe = w_plus.cuda(), [n.cuda() for n in noise], probe.cuda()
    ref_image, ref_grads = image_and_grads(g64, w_plus, noise, probe)
    g = copy.deepcopy(g64).float()
    L.patch_stylegan2(g)
    image, grads = image_and_grads(g, w_plus, noise, probe)
    assert rel_err(image, ref_image) < 5e-3
    for k in ["w_plus"] + [f"noise[{i}]" for i in range(g.num_layers)]:
        assert rel_err(grads[k], ref_grads[k]) < 5e-3, k
