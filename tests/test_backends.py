"""Backend choice, forcing, errors; the package with and without its compiled extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lsap_kernels as L
from lsap_kernels import StyleLayout, backends


def _inputs():
    layout = StyleLayout.from_channels([3, 5])
    return torch.randn(2, 8), torch.randn(8), layout


def test_extension_is_built():
    """CI builds the extension (LSAP_REQUIRE_EXT=1): a broken C++ build must fail the suite, not skip it."""
    if os.environ.get("LSAP_ALLOW_NO_EXT") == "1":
        pytest.skip("LSAP_ALLOW_NO_EXT=1")
    assert L.available_backends()["cpu"], backends._ext.load_error()


def test_automatic_choice_on_cpu():
    expected = "cpu" if L.available_backends()["cpu"] else "reference"
    assert L.chosen_backend("sncd", "cpu", torch.float32) == expected
    has_cpu_modconv = "cpu" in backends._registry["modulated_conv2d"]
    assert L.chosen_backend("modulated_conv2d", "cpu", torch.float32) == (expected if has_cpu_modconv else "reference")


def test_use_backend_forces_and_restores():
    s, mu, layout = _inputs()
    with L.use_backend("reference"):
        assert L.chosen_backend("sncd") == "reference"
        with L.use_backend(sncd="reference", style_normalize="reference"):
            assert L.chosen_backend("style_normalize") == "reference"
        assert torch.equal(L.sncd(s, mu, layout), L.sncd(s, mu, layout, backend="reference"))
    assert L.chosen_backend("sncd") == ("cpu" if L.available_backends()["cpu"] else "reference")


def test_unknown_or_unavailable_backend_is_an_error():
    with pytest.raises(L.BackendError, match="unknown backend 'fast'"):
        with L.use_backend("fast"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(L.BackendError, match="'cuda' is not available here .*no CUDA device"):
            with L.use_backend("cuda"):
                pass
    s, mu, layout = _inputs()
    with pytest.raises(L.BackendError, match="unknown backend"):
        L.sncd(s, mu, layout, backend="nope")


def test_forced_backend_never_falls_back():
    if not L.available_backends()["cpu"]:
        pytest.skip("needs the C++ extension")
    x, w, s = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(1, 2)
    if L.available_backends()["triton"]:  # tests run Triton's interpreter on CPU; it takes no float64
        with L.use_backend("triton"):
            with pytest.raises(L.BackendError, match="backend 'triton' of 'modulated_conv2d' takes dtypes"):
                L.modulated_conv2d(x.double(), w.double(), s.double())
    with pytest.raises(L.BackendError, match="runs on \\('cpu',\\) tensors, got meta"):
        L.style_normalize(torch.randn(2, 8, device="meta"), StyleLayout.from_channels([3, 5]), backend="cpu")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("LSAP_BACKEND", "sncd=reference")
    assert L.chosen_backend("sncd") == "reference"
    monkeypatch.setenv("LSAP_BACKEND", "warp-drive")
    s, mu, layout = _inputs()
    with pytest.raises(L.BackendError, match="LSAP_BACKEND='warp-drive': unknown backend"):
        L.sncd(s, mu, layout)
    with L.use_backend("reference"):  # the context manager beats the environment
        L.sncd(s, mu, layout)


def test_package_works_without_the_extension():
    """A failed build leaves a working package on the reference backend, with exactly one clear warning."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["lsap_kernels._C"] = None  # as if the build had failed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, lsap_kernels as L
        msgs = [str(w.message) for w in caught if "extension" in str(w.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        assert L.available_backends()["cpu"] is False
        layout = L.StyleLayout.from_channels([3, 5])
        assert L.chosen_backend("sncd") == "reference"
        g = L.Generator(8, 16, 1, channels={4: 8, 8: 4})
        s, lay = g.style_space(g.mapping(torch.randn(2, 16)))
        print(float(L.sncd(s, torch.ones(lay.total_channels), lay)), tuple(g.synthesis(g.mapping(torch.randn(1, 16))).shape))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 3, 8, 8)" in out.stdout


@pytest.mark.skipif(not L.available_backends()["cpu"], reason="the C++ extension is not built")
def test_compiled_call_follows_use_backend():
    """torch.compile(fullgraph=True) traces the backend choice (no graph break on use_backend's ContextVar) and
    recompiles when use_backend changes it, instead of replaying a graph traced for another backend."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    x, w, s = (torch.randn(2, 3, 6, 6, generator=gen), torch.randn(4, 3, 3, 3, generator=gen),
               torch.randn(2, 3, generator=gen))
    fn = torch.compile(lambda x, w, s: L.modulated_conv2d(x, w, s), backend=record, fullgraph=True)
    auto = fn(x, w, s)
    with L.use_backend("reference"):
        ref = fn(x, w, s)
    again = fn(x, w, s)
    assert len(graphs) == 2  # one graph per backend; leaving use_backend reuses the first
    assert "lsap" in graphs[0] and "lsap" not in graphs[1]  # the cpu custom op, then plain torch ops
    assert torch.allclose(auto, ref, rtol=1e-5, atol=1e-6) and torch.equal(auto, again)
