"""Generator: rosinality state_dict compatibility, images, style space, checkpoints (SPEC §2)."""
import argparse
import math

import pytest
import torch

import lsap_kernels as L
import stylegan2_rosinality as ros
from helpers import rel_err
from lsap_kernels.models import config_f_channels, load_generator, save_generator

SMALL = dict(size=32, style_dim=24, n_mlp=2)
TABLE = {4: 32, 8: 24, 16: 16, 32: 8}  # small channel table: fast tests, same structure


def expected_layers(size, channels):
    """(name, channels, W+ index) of every modulated layer, from the channel table alone."""
    layers = [("conv1", channels[4], 0), ("to_rgb1", channels[4], 1)]
    for j, res in enumerate(2**i for i in range(3, int(math.log2(size)) + 1)):
        layers += [(f"convs.{2 * j}", channels[res // 2], 2 * j + 1), (f"convs.{2 * j + 1}", channels[res], 2 * j + 2),
                   (f"to_rgbs.{j}", channels[res], 2 * j + 3)]
    return layers


def pair(dtype=torch.float64, seed=0, **cfg):
    """A rosinality-style generator with randomised weights and ours loaded strictly from its state_dict."""
    cfg = {**SMALL, **cfg}
    torch.manual_seed(seed)
    theirs = ros.Generator(cfg["size"], cfg["style_dim"], cfg["n_mlp"], channels=TABLE).to(dtype)
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # biases and noise strengths start at 0/1: make them matter
            p.add_(0.2 * torch.randn_like(p))
    ours = L.Generator(cfg["size"], cfg["style_dim"], cfg["n_mlp"], channels=TABLE).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("size,cm", [(256, 2), (1024, 2), (64, 1)])
def test_state_dict_keys_and_shapes_match_rosinality(size, cm):
    with torch.device("meta"):
        theirs = ros.Generator(size, 512, 8, channel_multiplier=cm)
        ours = L.Generator(size, 512, 8, channel_multiplier=cm)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_strict_load_both_ways():
    theirs, ours = pair()
    back = ros.Generator(32, 24, 2, channels=TABLE).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=str)
def test_synthesis_matches_rosinality(dtype, tol):
    theirs, ours = pair(dtype)
    torch.manual_seed(1)
    w_plus = torch.randn(3, ours.n_latent, 24, dtype=dtype)
    noise = [n.to(dtype) for n in ours.make_noise(3)]
    ref, _ = theirs([w_plus], input_is_latent=True, noise=noise)
    assert rel_err(ours.synthesis(w_plus, noise=noise), ref) < tol
    # rosinality's own call signature on our model, with z input, truncation and style mixing
    z = [torch.randn(3, 24, dtype=dtype) for _ in range(2)]
    mean = theirs.mean_latent(64)
    ref, lat_ref = theirs(z, inject_index=3, truncation=0.7, truncation_latent=mean, randomize_noise=False,
                          return_latents=True)
    out, lat = ours(z, inject_index=3, truncation=0.7, truncation_latent=mean, randomize_noise=False,
                    return_latents=True)
    assert rel_err(lat, lat_ref) < tol and rel_err(out, ref) < tol


def test_synthesis_and_style_space_gradients_match_rosinality():
    """W+ and noise gradients through synthesis and style_space against rosinality's (float64 autograd), with the
    W+ gradient assembled by one stack per call (unbind), not a zero-filled W+-sized copy and an add per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    theirs, ours = (g.requires_grad_(False) for g in pair())  # as in an inversion: no weight gradients
    torch.manual_seed(4)
    w_plus = torch.randn(2, ours.n_latent, 24, dtype=torch.float64)
    noise = [n.double() for n in ours.make_noise(2)]

    def theirs_loss(w, ns):  # the image and conv1's styles
        return theirs([w], input_is_latent=True, noise=ns)[0].square().mean() + \
            theirs.conv1.conv.modulation(w[:, 0]).square().mean()

    def ours_loss(w, ns):
        styles, layout = ours.style_space(w, "all")
        return ours.synthesis(w, ns).square().mean() + styles[:, :layout.offsets[1]].square().mean()

    results = []
    for loss_fn in (theirs_loss, ours_loss):
        w = w_plus.clone().requires_grad_(True)
        ns = [n.clone().requires_grad_(True) for n in noise]
        loss = loss_fn(w, ns)
        ops = Ops()
        with ops:
            loss.backward()
        results.append((w.grad, [n.grad for n in ns], ops.seen))
    (ref_w, ref_n, _), (got_w, got_n, seen) = results
    assert rel_err(got_w, ref_w) < 1e-12 and all(rel_err(a, b) < 1e-12 for a, b in zip(got_n, ref_n))
    assert torch.ops.aten.select_backward.default not in seen
    assert seen.count(torch.ops.aten.stack.default) == 2  # synthesis and style_space


def test_mapping_matches_rosinality():
    theirs, ours = pair()
    z = torch.randn(4, 24, dtype=torch.float64)
    assert rel_err(ours.mapping(z), theirs.style(z)) < 1e-12
    # EqualLinear takes any leading dimensions, as rosinality's (F.linear) does
    layer, x = ours.style[1], torch.randn(2, 3, 24, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, layer.weight * layer.scale, layer.bias * layer.lr_mul)
    assert rel_err(layer(x), torch.nn.functional.leaky_relu(expected, 0.2) * math.sqrt(2)) < 1e-12


def test_noise_maps_follow_rosinality_order():
    _, ours = pair()
    shapes = [tuple(n.shape) for n in ours.make_noise(2)]
    assert shapes == [(2, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)) for i in range(ours.num_layers)]
    assert ours.num_layers == 7 and ours.n_latent == 8


def test_stored_noise_is_used_without_randomisation():
    theirs, ours = pair()
    w = torch.randn(2, 24, dtype=torch.float64)
    ref, _ = theirs([w], input_is_latent=True, randomize_noise=False)
    assert rel_err(ours.synthesis(w, randomize_noise=False), ref) < 1e-12
    a, b = ours.synthesis(w), ours.synthesis(w)  # fresh noise each call
    assert not torch.equal(a, b)


@pytest.mark.parametrize("layers", ["lsap", "all"])
def test_style_space_layout_and_values(layers):
    theirs, ours = pair()
    expected = expected_layers(32, TABLE)
    if layers == "lsap":
        expected = [e for e in expected if not e[0].startswith("to_rgb") or e[0] == "to_rgbs.2"]
    torch.manual_seed(3)
    w_plus = torch.randn(2, ours.n_latent, 24, dtype=torch.float64)
    styles, layout = ours.style_space(w_plus, layers)
    assert [(n, c, i) for n, c, i in zip(layout.names, layout.channels, layout.w_index)] == expected
    assert layout.offsets[-1] == styles.shape[1] == sum(c for _, c, _ in expected)
    for (name, _, idx), lo, hi in zip(expected, layout.offsets[:-1], layout.offsets[1:]):
        ref = theirs.get_submodule(name).conv.modulation(w_plus[:, idx])
        assert rel_err(styles[:, lo:hi], ref) < 1e-12
    # W (2-D) is W+ with every entry equal
    w = w_plus[:, 0]
    assert torch.equal(ours.style_space(w, layers)[0], ours.style_space(w[:, None].repeat(1, 8, 1), layers)[0])


@pytest.mark.parametrize("size,lsap,all_", [(1024, (18, 6080), (26, 9088)), (256, (14, None), (20, None))])
def test_style_dims(size, lsap, all_):
    with torch.device("meta"):
        g = L.Generator(size)
    expected = expected_layers(size, config_f_channels(2))
    a, b = g.style_layout("lsap"), g.style_layout("all")
    assert (a.n_layers, b.n_layers) == (lsap[0], all_[0])
    assert b.total_channels == sum(c for _, c, _ in expected)
    if lsap[1] is not None:
        assert (a.total_channels, b.total_channels) == (lsap[1], all_[1])
    assert a.w_index == tuple(range(g.n_latent))


def test_generator_shapes_256():
    torch.manual_seed(0)
    g = L.Generator(256, 64, 2, channels={**config_f_channels(2), **{r: 8 for r in (4, 8, 16, 32, 64, 128, 256)}})
    img = g.synthesis(g.mapping(torch.randn(2, 64)))
    assert img.shape == (2, 3, 256, 256) and torch.isfinite(img).all()
    assert g.mean_latent(100).shape == (1, 64)


def test_bad_latents_are_named():
    _, ours = pair()
    with pytest.raises(ValueError, match=r"w_plus must have shape \[B, 8, 24\]"):
        ours.synthesis(torch.randn(2, 5, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \[B, style_dim\] = \[B, 24\]"):
        ours.mapping(torch.randn(2, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must be a list of 7 maps"):
        ours.synthesis(torch.randn(2, 24, dtype=torch.float64), noise=[None] * 3)
    with pytest.raises(ValueError, match="layers must be one of"):
        ours.style_layout("some")
    with pytest.raises(ValueError, match="size must be a power of two"):
        L.Generator(48)


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_load_rosinality_checkpoint_infers_architecture(tmp_path):
    theirs, _ = pair(torch.float32)
    latent_avg = torch.randn(24)
    path = tmp_path / "g.pt"
    torch.save({"g_ema": theirs.state_dict(), "latent_avg": latent_avg,
                "args": argparse.Namespace(size=32, lr=0.002)}, path)  # training checkpoints carry their args
    g = load_generator(path)
    assert (g.size, g.style_dim, g.n_mlp, g.channels) == (32, 24, 2, TABLE)
    assert torch.equal(g.latent_avg, latent_avg)
    w = torch.randn(2, g.n_latent, 24)
    noise = g.make_noise(2)
    assert rel_err(g.synthesis(w, noise=noise), theirs([w], input_is_latent=True, noise=noise)[0]) < 1e-5
    assert torch.allclose(g.mapping(torch.zeros(1, 24) + 1, truncation_psi=0.0), latent_avg[None])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    g = L.Generator(16, 32, 2, channels={4: 16, 8: 12, 16: 8})
    g.latent_avg.normal_()
    save_generator(g, tmp_path / "ours.pt")
    h = load_generator(tmp_path / "ours.pt")
    assert h.channels == g.channels
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), h.state_dict().values()))
    w = torch.randn(2, g.n_latent, 32)
    noise = g.make_noise(2)
    assert torch.equal(g.synthesis(w, noise=noise), h.synthesis(w, noise=noise))
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_generator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read checkpoint .*junk.pt"):
        load_generator(tmp_path / "junk.pt")
    theirs, _ = pair(torch.float32)
    good = tmp_path / "g.pt"
    torch.save({"g_ema": theirs.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_generator(truncated)
    with pytest.raises(ValueError, match="size=32, but size=64 was asked for"):
        load_generator(good, size=64)
    state = dict(theirs.state_dict())
    state["convs.0.conv.weight"] = state["convs.0.conv.weight"][:, :, :, :1, :1]
    torch.save({"g_ema": state}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not match Generator"):
        load_generator(tmp_path / "shape.pt")
    del state["input.input"]
    torch.save({"g_ema": state}, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match="does not match Generator.*missing input.input"):
        load_generator(tmp_path / "missing_key.pt")
    torch.save({"g": theirs.state_dict()}, tmp_path / "nog.pt")
    with pytest.raises(ValueError, match="holds no generator"):
        load_generator(tmp_path / "nog.pt")
    state = dict(theirs.state_dict())
    state["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    torch.save({"g_ema": state}, tmp_path / "fir.pt")
    with pytest.raises(ValueError, match="not the \\[1,3,3,1\\] up-sampling FIR"):
        load_generator(tmp_path / "fir.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    theirs, _ = pair(torch.float32)
    torch.save({"g_ema": theirs.state_dict(), "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_generator(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out
