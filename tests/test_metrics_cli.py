"""SNCD metric / loss, the anchor cache, and the command line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lsap_kernels as L
from lsap_kernels import cli, metrics
from lsap_kernels.metrics import cached_anchors, weights_hash


def small_generator(seed=0):
    torch.manual_seed(seed)
    return L.Generator(16, style_dim=32, n_mlp=2, channels={4: 16, 8: 12, 16: 8}).requires_grad_(False)


def test_weights_hash_tracks_every_weight():
    g, h = small_generator(0), small_generator(0)
    assert weights_hash(g) == weights_hash(h)
    with torch.no_grad():
        h.convs[1].activate.bias[3] += 1e-6
    assert weights_hash(g) != weights_hash(h)


def test_anchor_cache_computes_once(tmp_path, monkeypatch):
    g = small_generator()
    calls = []
    real = metrics.style_anchors
    monkeypatch.setattr(metrics, "style_anchors", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = cached_anchors(g, "all", n_samples=500, cache_dir=tmp_path)
    b = cached_anchors(g, "all", n_samples=500, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(a, b)
    assert torch.equal(a, L.style_anchors(g, n_samples=500, layers="all"))
    cached_anchors(g, "all", n_samples=600, cache_dir=tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("anchors-*.pt"))) == 2


def test_sncd_loss_gradient_matches_reference(tmp_path):
    g = small_generator(1)
    loss_fn = L.SNCDLoss(g, n_samples=300, cache_dir=tmp_path, layer_reduction="sum")
    codes = torch.randn(3, g.n_latent, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(codes), codes)
    ref_codes = codes.detach().double().requires_grad_(True)
    g64 = small_generator(1).double()
    styles, layout = g64.style_space(ref_codes, "lsap")
    ref = L.sncd(styles, loss_fn.anchors.double(), layout, "sum", "mean", backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, ref_codes)
    assert abs(loss_fn(codes).item() - ref.item()) < 1e-5
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    per_code = L.SNCD(g, anchors=loss_fn.anchors)(codes)
    assert per_code.shape == (3,) and not per_code.requires_grad
    with pytest.raises(ValueError, match=r"anchors must have shape \[\d+\] for layers='lsap'"):
        L.SNCDLoss(g, anchors=torch.zeros(5))


def test_cli_sncd_scores_saved_codes(tmp_path, capsys):
    g = small_generator(2)
    L.save_generator(g, tmp_path / "g.pt")
    codes = torch.randn(4, g.n_latent, 32)
    torch.save({"latents": codes}, tmp_path / "codes.pt")
    np.save(tmp_path / "codes.npy", codes.numpy())
    expected = L.SNCD(g, n_samples=400, cache_dir=tmp_path / "cache")(codes)
    for name in ("codes.pt", "codes.npy"):
        rc = cli.main(["sncd", "--checkpoint", str(tmp_path / "g.pt"), "--latents", str(tmp_path / name),
                       "--n-samples", "400", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
        lines = capsys.readouterr().out.strip().splitlines()
        assert rc == 0 and len(lines) == 5
        assert np.allclose([float(x.split("\t")[1]) for x in lines[:4]], expected.numpy(), atol=1e-6)
    rc = cli.main(["sncd", "--checkpoint", str(tmp_path / "nothing.pt"), "--latents", str(tmp_path / "codes.pt")])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


def test_cli_demo_writes_grid_and_metrics(tmp_path, capsys):
    rc = cli.main(["demo", "--out", str(tmp_path), "--batch", "2", "--anchor-samples", "2000"])
    assert rc == 0
    picture = np.asarray(Image.open(tmp_path / "demo_grid.png"))
    assert picture.shape == (3 * 66 + 2, 2 * 66 + 2, 3) and picture.std() > 10
    result = json.loads((tmp_path / "demo.json").read_text())
    sncd = {k: v["mean"] for k, v in result["sncd"].items()}
    # codes from the generator's own mapping sit closer to its anchors than random W+ codes
    assert sncd["synthetic W (mapping of z)"] < sncd["random Gaussian W+"]
    assert "SNCD" in capsys.readouterr().out
