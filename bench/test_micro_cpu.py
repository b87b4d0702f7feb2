"""pytest-benchmark micro-benchmarks of the C++ CPU ops against the reference backend, one group per op and shape.

    .venv/bin/python -m pytest bench/test_micro_cpu.py -q [--benchmark-json FILE] [-k "modconv and fp32"]

Not part of the test suite (pyproject's testpaths is tests/, so `pytest` from the repo root never collects this
file) and no pass/fail signal beyond a correctness check: every case first compares its result with a float64
reference on the same random inputs (SPEC §5 tolerances), then times the call with pytest-benchmark.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
import lsap_kernels as L  # noqa: E402

pytestmark = pytest.mark.skipif(not L.available_backends()["cpu"], reason="the C++ extension is not built")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 2e-2}  # outputs (SPEC §5)
# gradients through leaky ReLU: elements within rounding of 0 flip slope (bench/README.md, "How it measures")
GRAD_TOL = {"fp32": 3e-3, "bf16": 1.5e-1}
BATCH = 2
# (Cin, Cout, k, input resolution, up, toRGB with a skip input): layer shapes of config-f at small resolutions
MODCONV = {
    "conv 512-512 3x3 16x16": (512, 512, 3, 16, 1, False),
    "up 512-256 3x3 32x32-64x64": (512, 256, 3, 32, 2, False),
    "conv 128-128 3x3 64x64": (128, 128, 3, 64, 1, False),
    "torgb 128-3 1x1 64x64 +skip": (128, 3, 1, 64, 1, True),
}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def modconv_inputs(case: str, dtype: torch.dtype) -> tuple[dict, list[str]]:
    cin, cout, k, res, up, rgb = MODCONV[case]
    g = torch.Generator().manual_seed(len(case))
    out_res = res * up

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    args = dict(x=randn(BATCH, cin, res, res), weight=randn(cout, cin, k, k), styles=randn(BATCH, cin) + 1,
                bias=randn(cout), up=up)
    if rgb:
        args.update(demodulate=False, activation="linear", skip=randn(BATCH, cout, out_res // 2, out_res // 2))
    else:
        args.update(noise=randn(BATCH, 1, out_res, out_res), noise_strength=0.1)
    grads = ["x", "styles"] + (["skip"] if rgb else ["noise"])
    return args, grads


def modconv_call(args: dict, grads: list[str], grad_out, backend: str):
    """The op on fresh leaves; with ``grad_out``, backward to the inputs an inversion optimises (weights frozen)."""
    args = {k: (v.detach().requires_grad_(grad_out is not None) if k in grads else v) for k, v in args.items()}
    if grad_out is None:
        with torch.no_grad():
            return [L.modulated_conv2d(**args, backend=backend)]
    out = L.modulated_conv2d(**args, backend=backend)
    out.backward(grad_out)
    return [out] + [args[k].grad for k in grads]


# the reference backend only in fp32: without oneDNN bf16 kernels its bf16 convolutions take a slow generic path
@pytest.mark.parametrize("backend,precision", [("cpu", "fp32"), ("cpu", "bf16"), ("reference", "fp32")])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(MODCONV))
def test_modconv(benchmark, case, direction, backend, precision):
    benchmark.group = f"modconv {case} {direction}"
    args, grads = modconv_inputs(case, DTYPES[precision])
    grad_out = None
    if direction == "fwd+bwd":
        x = args["x"]
        shape = (BATCH, args["weight"].shape[0], x.shape[2] * args["up"], x.shape[3] * args["up"])
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    args64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    expected = modconv_call(args64, grads, None if grad_out is None else grad_out.double(), "reference")
    got = modconv_call(args, grads, grad_out, backend)
    for name, a, b in zip(["out"] + grads, got, expected):
        assert rel(a, b) < (TOL if name == "out" else GRAD_TOL)[precision], (name, rel(a, b))
    benchmark.pedantic(modconv_call, args=(args, grads, grad_out, backend), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [16, 256])
@pytest.mark.parametrize("op", ["style_normalize", "sncd"])
def test_style_ops(benchmark, op, batch, backend):
    """Forward+backward on the 1024² "all" layout (26 layers, 9,088 channels), fp32."""
    benchmark.group = f"{op} fwd+bwd B{batch}"
    with torch.device("meta"):
        layout = L.Generator(1024).style_layout("all")
    g = torch.Generator().manual_seed(batch)
    styles = torch.randn(batch, layout.total_channels, generator=g) + 0.5
    anchors = 0.05 * torch.randn(layout.total_channels, generator=g)
    weights = torch.randn(batch, layout.total_channels, generator=g)

    def call(s, a, backend):
        s = s.detach().requires_grad_(True)
        if op == "sncd":
            out = L.sncd(s, a, layout, "mean", "none", backend=backend)
            out.sum().backward()
        else:
            out = L.style_normalize(s, layout, backend=backend)
            (out * weights.to(s.dtype)).sum().backward()
        return out, s.grad

    for a, b in zip(call(styles, anchors, backend), call(styles.double(), anchors.double(), "reference")):
        assert rel(a, b) < TOL["fp32"]
    benchmark.pedantic(call, args=(styles, anchors, backend), rounds=10, warmup_rounds=2)
