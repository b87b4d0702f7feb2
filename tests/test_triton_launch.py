"""The fast launch path (lsap_kernels/ops/_triton_launch.py) launches what Triton's own JITFunction.run launches: the
same compiled kernel (so the same specialisation), grid and arguments, for every kind of argument Triton specialises
on. Runs Triton's real launch path in a subprocess, kernels compiled for sm_90, with a stand-in driver that records
each launch instead of running it (bench/launch_overhead.py); on a GPU every test goes through the fast path."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lsap_kernels as L

pytestmark = pytest.mark.skipif(not L.available_backends()["triton"], reason="triton is not usable here")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "bench")
    import launch_overhead  # unsets TRITON_INTERPRET
    from triton.runtime.driver import driver
    record = []
    driver.set_active(launch_overhead.StandInDriver(record))
    import torch
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    from lsap_kernels.ops import _triton_launch as TL

    @TL.fast_jit
    def kernel(p, n, f, b, q, C: tl.constexpr, D: tl.constexpr = 3):
        i = tl.arange(0, C)
        v = tl.load(p + i) * f + n + D
        if b:
            v = v + 1
        if q is not None:
            tl.store(q + i, v.to(q.dtype.element_ty))
        tl.store(p + i, v.to(p.dtype.element_ty))

    def fresh(a):  # the same kind of argument, another object (a tensor: same dtype, address alignment kept)
        if not isinstance(a, torch.Tensor):
            return a
        base = torch.zeros(a.numel() + 8, dtype=a.dtype)
        shift = (a.data_ptr() % 16) // a.element_size()
        return base[shift:shift + a.numel()]

    def same(u, v):
        return u is v if isinstance(u, torch.Tensor) else (type(u) is type(v) and u == v)

    def launch(args, kwargs, fast):
        TL.FAST_LAUNCH = fast
        before = len(record)
        kernel[lambda meta: (meta["C"] // 4, meta["D"], 2)](*args, **kwargs)
        assert len(record) == before + 1
        launcher, launched = record[-1]
        return launcher, launched[:3], launched[9:]  # grid, then every kernel parameter in order

    t = torch.zeros(64)
    CASES = [  # (p, n, f, b, q), kwargs: each kind and value class Triton specialises on
        ((t, 16, 2.0, True, None), dict(C=16)),
        ((t, 1, 2.0, True, None), dict(C=16)),  # n == 1: a constant
        ((t, 17, 2.0, True, None), dict(C=16)),  # n % 16 != 0
        ((t, -16, 2.0, True, None), dict(C=16)),
        ((t, 2 ** 31, 2.0, True, None), dict(C=16)),  # i64
        ((t, 2 ** 63 + 16, 2.0, True, None), dict(C=16)),  # u64
        ((t[1:], 16, 2.0, True, None), dict(C=16)),  # an address not a multiple of 16
        ((t[4:], 16, 2.0, True, None), dict(C=16)),  # 16 bytes in: aligned
        ((t.to(torch.bfloat16), 16, 2.0, True, None), dict(C=16)),
        ((t, 16, 1, True, None), dict(C=16)),  # an int where a float was
        ((t, 16, 2.0, False, None), dict(C=16)),
        ((t, 16, 2.0, 1, None), dict(C=16)),  # 1 == True, a constant
        ((t, 16, 2.0, True, t[32:]), dict(C=16)),  # a tensor where None was
        ((t, 16, 2.0, True, None), dict(C=32)),
        ((t, 16, 2.0, True, None), dict(C=16, D=5)),
        ((t, 16, 2.0, True, None), dict(C=16, num_warps=2)),
        ((t, 16, 2.0, True, None, 16), dict()),  # C passed by position
    ]
    kernels = []
    for args, kwargs in CASES:
        want = launch(args, kwargs, fast=False)
        for attempt in range(2):  # the first fast launch fills the key, the second launches from it
            call = tuple(map(fresh, args))
            got = launch(call, kwargs, fast=True)
            assert got[0] is want[0], (args, kwargs, attempt, "another compiled kernel than Triton's")
            assert got[1] == want[1], (args, kwargs, got[1], want[1])
            wanted = call + want[2][len(call):]
            assert len(got[2]) == len(wanted) and all(map(same, got[2], wanted)), (args, kwargs, got[2], wanted)
        kernels.append(want[0])
    print("kernels", *[kernels.index(k) for k in kernels])  # per case, the first case with its compiled kernel

    # a hit goes through no JITFunction.run; a set launch hook sends every launch through it
    calls = []
    run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: calls.append(1) or run(self, *a, **k)
    launch(tuple(map(fresh, CASES[0][0])), CASES[0][1], fast=True)
    print("hit calls", len(calls))
    from triton import knobs
    hook = lambda metadata: calls.append(2)
    knobs.runtime.launch_enter_hook.add(hook)
    launch(tuple(map(fresh, CASES[0][0])), CASES[0][1], fast=True)
    knobs.runtime.launch_enter_hook.remove(hook)
    print("hooked calls", calls)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs the stand-in driver; test_same_bits_on_gpu runs there")
def test_fast_launch_launches_what_triton_launches(tmp_path):
    env = {**os.environ, "LSAP_DISABLE_EXT": "1", "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "fast_launch.py"  # a file: Triton reads a kernel's source
    script.write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.splitlines()
    # Triton 3.6's specialisation, which the key must refine: -16, an address 16 bytes in, a runtime bool's other
    # value and C by position share case 0's kernel; every other case compiles its own
    assert lines[0] == "kernels 0 1 2 0 4 5 6 0 8 9 0 11 12 13 14 15 0", res.stdout
    assert lines[1] == "hit calls 0", res.stdout
    assert lines[2] == "hooked calls [1]", res.stdout  # through Triton; the stand-in launcher calls no hook


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["3x3-up2", "torgb"])
def test_same_bits_on_gpu(kind, monkeypatch):
    """On a GPU: a layer's forward and every gradient, launched through the fast path (its keys filled, then from
    them) and through Triton's own, give the same bits (the kernels are deterministic)."""
    from lsap_kernels.ops import _triton_launch
    gen = torch.Generator(device="cuda").manual_seed(0)
    cin, cout, k, up, skip_on = (64, 32, 3, 2, False) if kind == "3x3-up2" else (32, 3, 1, 1, True)
    size, batch, dt = 32, 4, torch.bfloat16
    cl = torch.channels_last
    x = torch.randn(batch, cin, size, size, device="cuda", generator=gen).to(dt).contiguous(memory_format=cl)
    leaves = dict(x=x, weight=torch.randn(cout, cin, k, k, device="cuda", generator=gen),
                  styles=torch.randn(batch, cin, device="cuda", generator=gen), bias=torch.randn(cout, device="cuda"))
    ho = size * up
    if skip_on:
        leaves["skip"] = torch.randn(batch, cout, ho // 2, ho // 2, device="cuda", generator=gen).to(dt)
        opts = dict(demodulate=False, activation="linear")
    else:
        leaves["noise"] = torch.randn(batch, 1, ho, ho, device="cuda", generator=gen)
        opts = dict(up=up, noise_strength=torch.tensor(0.1, device="cuda"))
    leaves = {n: t.requires_grad_(True) for n, t in leaves.items()}
    grad = torch.randn(batch, cout, ho, ho, device="cuda", generator=gen).to(dt)

    def run(fast):
        monkeypatch.setattr(_triton_launch, "FAST_LAUNCH", fast)
        for t in leaves.values():
            t.grad = None
        out = L.modulated_conv2d(leaves["x"], leaves["weight"], leaves["styles"], **opts, backend="triton",
                                 **{n: t for n, t in leaves.items() if n not in ("x", "weight", "styles")})
        out.backward(grad)
        return [out.detach().clone()] + [t.grad.clone() for t in leaves.values()]

    want = run(False)
    for _ in range(2):
        got = run(True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
