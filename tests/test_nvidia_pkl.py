"""NVIDIA stylegan2-ada-pytorch network pickles read as data (issue 8): exact conversion, safety, CLI."""
import collections
import io
import pickletools
import sys

import pytest
import torch

import lsap_kernels as L
import nvidia_pickle_fixture as fx
import stylegan2_rosinality as ros
from helpers import rel_err
from lsap_kernels.convert import main as convert_main
from lsap_kernels.models import NetworkPickleError, load_generator, load_network_pickle, save_generator

TABLE = {4: 32, 8: 24, 16: 16, 32: 8}


def make_generator(seed=0, conv_clamp=None, lr_mlp=0.01, dtype=torch.float32):
    """Our Generator with random weights that all matter (biases, noise strengths, w_avg away from init)."""
    torch.manual_seed(seed)
    g = L.Generator(32, 24, 2, channels=TABLE, lr_mlp=lr_mlp, conv_clamp=conv_clamp)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.2 * torch.randn_like(p))
        g.latent_avg.normal_()
    return g.to(dtype).eval()


def globals_in(path) -> set:
    """The globals a protocol-2 pickle names (GLOBAL opcodes)."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}


FORMATS = [  # protocol, numpy scalar module, container of _parameters/_buffers/_modules
    (2, "numpy.core.multiarray", collections.OrderedDict),
    (3, "numpy._core.multiarray", dict),
    (4, "numpy.core.multiarray", dict),
    (4, "numpy._core.multiarray", collections.OrderedDict),
]


@pytest.mark.parametrize("protocol,numpy_module,container", FORMATS,
                         ids=[f"p{p}-{m.split('.')[1]}-{c.__name__}" for p, m, c in FORMATS])
def test_pickle_equals_generator_built_directly(tmp_path, protocol, numpy_module, container):
    g0 = make_generator(conv_clamp=256, lr_mlp=0.05)
    path = tmp_path / "net.pkl"
    tree = fx.nvidia_tree(g0, conv_clamp=256, container=container, channels_last_res=(16, 32))
    assert not tree.state["_modules"]["synthesis"].state["_modules"]["b32"].state["_modules"]["conv1"] \
        .state["_parameters"]["weight"].is_contiguous()  # a non-contiguous (channels-last) weight in the file
    fx.dump(fx.snapshot(tree), path, protocol, numpy_module)
    data = path.read_bytes()
    assert f"{numpy_module}".encode() in data and b"_reconstruct_persistent_obj" in data
    if protocol == 2:
        assert {"_codecs.encode", "__builtin__.set", "dnnlib.util.EasyDict"} <= globals_in(path)

    g = load_generator(path)
    assert (g.size, g.style_dim, g.n_mlp, g.channels, g.lr_mlp, g.conv_clamp) == (32, 24, 2, TABLE, 0.05, 256.0)
    assert g.state_dict().keys() == g0.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g0.state_dict().values()))
    assert torch.equal(g.latent_avg, g0.latent_avg)
    torch.manual_seed(1)
    z = torch.randn(3, 24)
    assert torch.equal(g.mapping(z), g0.mapping(z))
    assert torch.equal(g.mapping(z, truncation_psi=0.7), g0.mapping(z, truncation_psi=0.7))
    w_plus = torch.randn(3, g.n_latent, 24)
    assert torch.equal(g.style_space(w_plus, "all")[0], g0.style_space(w_plus, "all")[0])
    for noise in (None, [None] * g.num_layers):  # stored noise ('const') and no noise ('none')
        assert torch.equal(g.synthesis(w_plus, noise=noise, randomize_noise=False),
                           g0.synthesis(w_plus, noise=noise, randomize_noise=False))
    # gradients w.r.t. W+ and the weights (PTI-style tuning)
    grads = []
    for net in (g, g0):
        wq = w_plus.clone().requires_grad_(True)
        net.synthesis(wq, randomize_noise=False).square().mean().backward()
        grads.append([wq.grad] + [p.grad for n, p in net.named_parameters() if not n.startswith("style.")])
    assert all(a is not None and torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("conv_clamp", [None, 0.3])
def test_matches_nvidia_semantics_float64(tmp_path, conv_clamp):
    """Against NVIDIA's forward written from the format (fixture, float64), clamp engaged at 0.3."""
    g0 = make_generator(seed=2, conv_clamp=conv_clamp, lr_mlp=0.05)
    tree = fx.nvidia_tree(g0, conv_clamp=conv_clamp)
    fx.dump(fx.snapshot(tree), tmp_path / "net.pkl")
    g64, g32 = load_generator(tmp_path / "net.pkl").double(), load_generator(tmp_path / "net.pkl")
    t = fx.tree_tensors(tree)
    torch.manual_seed(3)
    z, w_plus = torch.randn(4, 24), torch.randn(4, g64.n_latent, 24, dtype=torch.float64)
    assert rel_err(g64.mapping(z.double()), fx.nvidia_mapping(t, z, 0.05)) < 1e-12
    for mode, noise in (("const", None), ("none", [None] * g64.num_layers)):
        ref = fx.nvidia_synthesis(t, w_plus, conv_clamp, mode)
        # demodulation eps: ours adds 1e-8 to g²·Σ(Ws)², NVIDIA to Σ(Ws)² (relative effect ~1e-8 here)
        assert rel_err(g64.synthesis(w_plus, noise=noise, randomize_noise=False), ref) < 1e-7
        assert rel_err(g32.synthesis(w_plus.float(), noise=noise, randomize_noise=False), ref) < 1e-5
    if conv_clamp is not None:
        ref = fx.nvidia_synthesis(t, w_plus, conv_clamp, "const")
        unclamped = fx.nvidia_synthesis(t, w_plus, None, "const")
        assert rel_err(unclamped, ref) > 0.1  # the clamp is engaged: it changes the image a lot
        g64.conv_clamp = None
        assert rel_err(g64.synthesis(w_plus, randomize_noise=False), ref) > 0.1


def test_g_versus_g_ema(tmp_path):
    g_ema, g_train = make_generator(seed=0), make_generator(seed=1)
    path = tmp_path / "net.pkl"
    fx.dump(fx.snapshot(fx.nvidia_tree(g_ema), G=fx.nvidia_tree(g_train)), path)
    w = torch.randn(2, 24)
    for key, ref in (("g_ema", g_ema), ("G_ema", g_ema), ("G", g_train)):
        assert torch.equal(load_generator(path, key=key).synthesis(w, randomize_noise=False),
                           ref.synthesis(w, randomize_noise=False)), key
    assert torch.equal(load_generator(path).synthesis(w, randomize_noise=False),
                       g_ema.synthesis(w, randomize_noise=False))
    with pytest.raises(NetworkPickleError, match=r"has no network 'D'.*networks in it: \['G', 'G_ema'\]"):
        load_generator(path, key="D")


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('ran')\nimport os; os.system('touch {marker}')\n"
    fx.dump(fx.snapshot(fx.nvidia_tree(make_generator(), module_src=src)), tmp_path / "net.pkl")
    before = set(sys.modules)
    g = load_generator(tmp_path / "net.pkl")  # a valid network: loads, and its source is just a string
    assert g.size == 32 and not marker.exists()
    assert not any(m.startswith("_imported_module_") for m in set(sys.modules) - before)
    data = load_network_pickle(tmp_path / "net.pkl")
    assert data["G_ema"].class_name == "Generator" and "synthesis" in data["G_ema"].modules


@pytest.mark.parametrize("module,name,args", [
    ("os", "system", "touch {m}"),
    ("builtins", "eval", "open({m!r}, 'w')"),
    ("__builtin__", "eval", "open({m!r}, 'w')"),
    ("subprocess", "Popen", ["touch", "{m}"]),
    ("training.networks", "Generator", None),
    ("numpy", "load", "{m}"),
])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_globals_are_refused(tmp_path, module, name, args, protocol):
    marker = str(tmp_path / "pwned")
    args = () if args is None else ([a.format(m=marker) for a in args] if isinstance(args, list)
                                    else (args.format(m=marker),))
    snap = fx.snapshot(fx.nvidia_tree(make_generator()))
    snap["augment_pipe"] = fx.Call(module, name, *args)  # anywhere in the file, not only in G_ema
    path = tmp_path / "evil.pkl"
    fx.dump(snap, path, protocol)
    shown = "builtins" if module == "__builtin__" else module
    with pytest.raises(NetworkPickleError, match=rf"evil\.pkl: refusing global {shown}\.{name}: .*nothing from the "
                                                  "file was run"):
        load_generator(path)
    assert not (tmp_path / "pwned").exists()


def test_malicious_global_inside_a_tensor_storage_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    blob = io.BytesIO()
    torch.save(Evil(), blob, _use_new_zipfile_serialization=False)
    snap = fx.snapshot(fx.nvidia_tree(make_generator()))
    snap["extra"] = fx.Call("torch.storage", "_load_from_bytes", blob.getvalue())
    fx.dump(snap, tmp_path / "evil.pkl")
    with pytest.raises(NetworkPickleError, match=r"refusing global \S*print inside a tensor storage"):
        load_generator(tmp_path / "evil.pkl")


def test_unsupported_networks_and_bad_files(tmp_path):
    g = make_generator()
    cases = {
        "cond": (fx.nvidia_tree(g, c_dim=3), r"conditional generator \(c_dim=3\)"),
        "resnet": (fx.nvidia_tree(g, architecture="resnet"), r"b4\.architecture is 'resnet': only 'skip'"),
        "orig": (fx.nvidia_tree(g, architecture="orig"), r"architecture is 'orig'"),
        "sg3": (fx.nvidia_tree(g, stylegan3=True), r"StyleGAN3 \('T'/'R' config\)"),
    }
    for name, (tree, msg) in cases.items():
        fx.dump(fx.snapshot(tree), tmp_path / f"{name}.pkl")
        with pytest.raises(NetworkPickleError, match=rf"{name}\.pkl \[G_ema\]: .*{msg}"):
            load_generator(tmp_path / f"{name}.pkl")
    good = tmp_path / "good.pkl"
    fx.dump(fx.snapshot(fx.nvidia_tree(g)), good)
    (tmp_path / "truncated.pkl").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04not a pickle at all")
    for name in ("truncated", "junk"):
        with pytest.raises(NetworkPickleError, match=rf"could not read .*{name}\.pkl as an NVIDIA network pickle"):
            load_generator(tmp_path / f"{name}.pkl")
    with pytest.raises(FileNotFoundError, match="network pickle not found"):
        load_generator(tmp_path / "missing.pkl")
    fx.dump({"G": fx.nvidia_tree(g)}, tmp_path / "no_ema.pkl")
    with pytest.raises(NetworkPickleError, match="has no network 'G_ema'"):
        load_generator(tmp_path / "no_ema.pkl")
    with pytest.raises(ValueError, match="size=32, but size=64 was asked for"):
        load_generator(good, size=64)
    tree = fx.nvidia_tree(g)
    del tree.state["_modules"]["synthesis"].state["_modules"]["b16"].state["_modules"]["conv0"].state["_buffers"][
        "noise_const"]
    fx.dump(fx.snapshot(tree), tmp_path / "missing_tensor.pkl")
    with pytest.raises(NetworkPickleError, match=r"missing synthesis\.b16\.conv0\.noise_const"):
        load_generator(tmp_path / "missing_tensor.pkl")


def test_convert_cli_round_trip(tmp_path, capsys):
    g0 = make_generator(conv_clamp=0.3, lr_mlp=0.05)
    fx.dump(fx.snapshot(fx.nvidia_tree(g0, conv_clamp=0.3)), tmp_path / "net.pkl")
    assert convert_main([str(tmp_path / "net.pkl"), str(tmp_path / "net.pt")]) == 0
    out = capsys.readouterr().out
    assert "conv_clamp=0.3" in out and "not rosinality's config-f" in out
    ckpt = torch.load(tmp_path / "net.pt", weights_only=True)
    assert set(ckpt) == {"g_ema", "latent_avg", "lsap_config"}
    a, b = load_generator(tmp_path / "net.pkl"), load_generator(tmp_path / "net.pt")
    assert (b.conv_clamp, b.lr_mlp, b.channels) == (0.3, 0.05, TABLE)
    w = torch.randn(2, a.n_latent, 24)
    assert torch.equal(a.synthesis(w, randomize_noise=False), b.synthesis(w, randomize_noise=False))
    assert torch.equal(a.mapping(w[:, 0], 0.5), b.mapping(w[:, 0], 0.5))
    assert convert_main([str(tmp_path / "missing.pkl"), str(tmp_path / "x.pt")]) == 1
    assert "lsap-convert: error: network pickle not found" in capsys.readouterr().err


def test_converted_config_f_loads_in_rosinality(tmp_path, capsys):
    torch.manual_seed(5)
    g0 = L.Generator(8, 16, 2).eval()  # config-f table: {4: 512, 8: 512}
    with torch.no_grad():
        for p in g0.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fx.dump(fx.snapshot(fx.nvidia_tree(g0)), tmp_path / "f.pkl")
    assert convert_main([str(tmp_path / "f.pkl"), str(tmp_path / "f.pt")]) == 0
    assert "channel_multiplier=2" in capsys.readouterr().out
    theirs = ros.Generator(8, 16, 2, channel_multiplier=2)
    theirs.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True)["g_ema"], strict=True)
    w = torch.randn(2, 16)
    ref, _ = theirs([w], input_is_latent=True, randomize_noise=False)
    assert rel_err(load_generator(tmp_path / "f.pt").synthesis(w, randomize_noise=False), ref) < 1e-5


def test_save_load_keeps_clamp_and_lr(tmp_path):
    g = make_generator(conv_clamp=64, lr_mlp=0.1)
    save_generator(g, tmp_path / "g.pt")
    h = load_generator(tmp_path / "g.pt")
    assert (h.conv_clamp, h.lr_mlp) == (64.0, 0.1)
    with pytest.raises(ValueError, match="lr_mlp=0.1, but lr_mlp=0.01 was asked for"):
        load_generator(tmp_path / "g.pt", lr_mlp=0.01)


def test_layer_without_noise_input(tmp_path):
    """use_noise=False (no noise_const / noise_strength): loads with strength 0, i.e. no noise."""
    g0 = make_generator()
    tree = fx.nvidia_tree(g0)
    layer = tree.state["_modules"]["synthesis"].state["_modules"]["b8"].state["_modules"]["conv1"].state
    layer["use_noise"] = False
    del layer["_parameters"]["noise_strength"], layer["_buffers"]["noise_const"]
    fx.dump(fx.snapshot(tree), tmp_path / "net.pkl")
    g = load_generator(tmp_path / "net.pkl")
    assert g.convs[1].noise.weight.item() == 0 and not g.noises.noise_2.any()
    w, noise = torch.randn(2, 24), g0.make_noise(2)
    without = noise[:2] + [None] + noise[3:]
    assert torch.equal(g.synthesis(w, noise=noise), g0.synthesis(w, noise=without))
