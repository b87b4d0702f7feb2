"""modulated_conv2d reference against an independent per-sample-weight formula (SPEC §3, §5)."""
import math

import pytest
import torch
import torch.nn.functional as F

import lsap_kernels as L
from helpers import rel_err
from stylegan2_rosinality import make_kernel, upfirdn2d


def formula(x, weight, styles, *, demodulate=True, up=1, noise=None, noise_strength=1.0, bias=None,
            activation="lrelu", clamp=None, skip=None):
    """rosinality's formulation: one modulated (and demodulated) weight per sample, convolved sample by sample;
    the up-sampling and skip FIRs by zero insertion + padding + flipped-kernel convolution."""
    batch, cin, _, _ = x.shape
    k = weight.shape[-1]
    fir = make_kernel([1, 3, 3, 1]).to(x.dtype) * 4
    outs = []
    for b in range(batch):
        w = weight / math.sqrt(cin * k * k) * styles[b].view(1, cin, 1, 1)
        if demodulate:
            w = w / torch.sqrt(w.square().sum((1, 2, 3), keepdim=True) + 1e-8)
        if up == 1:
            outs.append(F.conv2d(x[b:b + 1], w, padding=k // 2))
        else:
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
            p = 4 - 2 - (k - 1)
            outs.append(upfirdn2d(y, fir, pad=((p + 1) // 2 + 1, p // 2 + 1)))
    a = torch.cat(outs)
    if noise is not None:
        a = a + noise_strength * noise
    if bias is not None:
        a = a + bias.view(1, -1, 1, 1)
    out = torch.where(a >= 0, a, 0.2 * a) * math.sqrt(2) if activation == "lrelu" else a
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    if skip is not None:
        out = out + upfirdn2d(skip, fir, up=2, pad=(2, 1))
    return out


def make_case(batch, cin, cout, size, k, up, dtype=torch.float64, noise=True, bias=True, skip=False, seed=0,
              noise_batch=None):
    g = torch.Generator().manual_seed(seed)
    ho = size * up

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    args = dict(x=rnd(batch, cin, size, size), weight=rnd(cout, cin, k, k), styles=rnd(batch, cin) * 0.5 + 1)
    kw = {}
    if noise:
        kw["noise"] = rnd(noise_batch or batch, 1, ho, ho)
        kw["noise_strength"] = 0.3
    if bias:
        kw["bias"] = rnd(cout)
    if skip:
        kw["skip"] = rnd(batch, cout, ho // 2, ho // 2)
    return args, kw


def tensor_case(batch, cin, cout, size, k, up, skip=False, seed=0, noise_batch=None, noise=True, bias=True):
    """make_case's float64 inputs as one dict, with a tensor noise strength (so it gets a gradient)."""
    args, kw = make_case(batch, cin, cout, size, k, up, skip=skip, seed=seed, noise_batch=noise_batch, noise=noise,
                         bias=bias)
    if noise:
        kw["noise_strength"] = torch.tensor(0.3, dtype=torch.float64)
    return {**args, **kw}


VARIANTS = {
    "3x3": dict(k=3, up=1),
    "3x3-up2": dict(k=3, up=2),
    "1x1-up2": dict(k=1, up=2),
    "torgb": dict(k=1, up=1, demodulate=False, activation="linear", skip=True),
}
SHAPES = [(1, 3, 1, 4), (5, 5, 7, 5), (2, 8, 16, 9), (3, 4, 6, 8)]  # batch, Cin, Cout, H=W


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_formula(variant, shape):
    v = dict(VARIANTS[variant])
    batch, cin, cout, size = shape
    skip = v.pop("skip", False) and size % 2 == 0
    args, kw = make_case(batch, cin, cout, size, v.pop("k"), v["up"], skip=skip, seed=sum(shape))
    out = L.modulated_conv2d(**args, **kw, **v, backend="reference")
    assert rel_err(out, formula(**args, **kw, **v)) < 1e-12


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("noise,bias", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("activation,clamp", [("lrelu", None), ("linear", None), ("lrelu", 0.5)])
def test_reference_options(demodulate, noise, bias, activation, clamp):
    args, kw = make_case(2, 4, 5, 6, 3, 1, noise=noise, bias=bias, seed=3, noise_batch=1)
    opts = dict(demodulate=demodulate, activation=activation, clamp=clamp)
    out = L.modulated_conv2d(**args, **kw, **opts, backend="reference")
    ref = formula(**args, **kw, **opts)
    assert rel_err(out, ref) < 1e-12
    if clamp is not None:  # the clamp must have engaged for the comparison to mean something
        assert (formula(**args, **kw, **{**opts, "clamp": None}).abs() > clamp).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_reference_low_precision(dtype, tol):
    args, kw = make_case(2, 16, 8, 8, 3, 2, seed=4)
    low = {k: v.to(dtype) for k, v in args.items()}
    low_kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = L.modulated_conv2d(**low, **low_kw, up=2, backend="reference")
    assert out.dtype == dtype
    assert rel_err(out, formula(**args, **kw, up=2)) < tol


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_gradcheck(variant):
    v = dict(VARIANTS[variant])
    args, kw = make_case(2, 3, 2, 4, v.pop("k"), v["up"], skip=v.pop("skip", False), seed=5)
    kw["noise_strength"] = torch.tensor(0.3, dtype=torch.float64)
    tensors = {**args, **{k: t for k, t in kw.items()}}
    names = list(tensors)
    for t in tensors.values():
        t.requires_grad_(True)

    def fn(*ts):
        d = dict(zip(names, ts))
        return L.modulated_conv2d(d.pop("x"), d.pop("weight"), d.pop("styles"), **d, **v, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))


def test_bad_inputs_are_named():
    args, kw = make_case(2, 4, 5, 6, 3, 1, seed=6)
    x, w, s = args["x"], args["weight"], args["styles"]
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got shape \(4, 6, 6\)"):
        L.modulated_conv2d(x[0], w, s)
    with pytest.raises(ValueError, match=r"weight must have shape \[Cout, 4, k, k\]"):
        L.modulated_conv2d(x, w[:, :3], s)
    with pytest.raises(ValueError, match=r"styles must have shape \[2, 4\]"):
        L.modulated_conv2d(x, w, s[:1])
    with pytest.raises(TypeError, match=r"styles must have dtype torch.float64 \(x has torch.float64\), got shape "
                                        r"\(2, 4\), dtype torch.float32"):
        L.modulated_conv2d(x, w, s.float())
    half = x.to(torch.bfloat16)  # 16-bit activations take float32 parameters, no other dtype
    with pytest.raises(TypeError, match=r"weight must have dtype torch.bfloat16 or torch.float32 \(x has "
                                        r"torch.bfloat16\), got shape \(5, 4, 3, 3\), dtype torch.float16"):
        L.modulated_conv2d(half, w.half(), s.float())
    with pytest.raises(TypeError, match=r"bias must have dtype torch.bfloat16 or torch.float32"):
        L.modulated_conv2d(half, w.float(), s.float(), bias=kw["bias"])
    with pytest.raises(TypeError, match=r"skip must have dtype torch.bfloat16 \(x has torch.bfloat16\)"):
        L.modulated_conv2d(half, w.float(), s.float(), skip=torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"noise must have shape \[2 or 1, 1, 12, 12\]"):
        L.modulated_conv2d(x, w, s, up=2, noise=kw["noise"])
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        L.modulated_conv2d(x, w, s, bias=kw["bias"][:4])
    with pytest.raises(ValueError, match=r"skip must have shape \[2, 5, 3, 3\]"):
        L.modulated_conv2d(x, w, s, skip=torch.randn(2, 5, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="up must be one of"):
        L.modulated_conv2d(x, w, s, up=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        L.modulated_conv2d(x, w, s, activation="relu")
    with pytest.raises(ValueError, match="weight must be on cpu like the other inputs"):
        L.modulated_conv2d(x, w.to("meta"), s)
    with pytest.raises(ValueError, match="noise_strength must be a number or a one-element tensor"):
        L.modulated_conv2d(x, w, s, noise=kw["noise"], noise_strength=torch.ones(2, dtype=torch.float64))
