"""lsap_kernels/ops/_autograd.py: our call sites skip the dispatcher in eager mode (host time per call) and must give
exactly what the registered custom ops give: same outputs and gradients, bit for bit, the op still dispatched where
it must be (grad mode on, dispatch modes), double backward still raising."""
import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import lsap_kernels as L
from lsap_kernels import StyleLayout
from lsap_kernels.ops import _autograd
from test_modconv import tensor_case

pytestmark = pytest.mark.skipif(not L.available_backends()["cpu"], reason="the C++ extension is not built")


@contextlib.contextmanager
def always_dispatch():
    _autograd.ALWAYS_DISPATCH = True
    try:
        yield
    finally:
        _autograd.ALWAYS_DISPATCH = False


def modconv_step():
    """Forward + backward of an up=2 layer with noise, bias and skip on the cpu backend: (out, input grads)."""
    t = {n: v.float().requires_grad_(True) for n, v in tensor_case(2, 3, 5, 4, 3, 2, skip=True, seed=5).items()}
    out = L.modulated_conv2d(**t, up=2, clamp=0.7, backend="cpu")
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
    return [out.detach()] + [t[n].grad for n in sorted(t)]


def sncd_step():
    layout = StyleLayout.from_channels([1, 7, 40])
    gen = torch.Generator().manual_seed(7)
    styles = torch.randn(3, layout.total_channels, generator=gen, requires_grad=True)
    anchors = torch.randn(layout.total_channels, generator=gen)
    loss = L.sncd(styles, anchors, layout, backend="cpu") + L.style_normalize(styles, layout, backend="cpu").sum()
    loss.backward()
    return [loss.detach(), styles.grad]


def lsap_ops_dispatched(step) -> list[str]:
    """Names of the lsap:: custom ops the profiler saw dispatched while ``step`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("lsap::")})


@pytest.mark.parametrize("step", [modconv_step, sncd_step])
def test_direct_calls_equal_dispatched_calls(step):
    with always_dispatch():
        dispatched = step()
    direct = step()
    assert len(direct) == len(dispatched)
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)


@pytest.mark.parametrize("step", [modconv_step, sncd_step])
def test_eager_calls_skip_the_dispatcher_unless_asked(step):
    assert lsap_ops_dispatched(step) == []
    with always_dispatch():
        seen = lsap_ops_dispatched(step)
    assert any("backward" in n for n in seen) and any("backward" not in n for n in seen), seen


def test_dispatch_modes_see_the_registered_ops():
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        modconv_step()
    assert "lsap.modulated_conv2d_cpu.default" in seen and "lsap.modulated_conv2d_backward_cpu.default" in seen


def test_double_backward_still_raises():
    t = {n: v.float().requires_grad_(True) for n, v in tensor_case(1, 3, 4, 4, 3, 1, seed=8).items()}
    out = L.modulated_conv2d(**t, backend="cpu")
    (gx,) = torch.autograd.grad(out.square().sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
