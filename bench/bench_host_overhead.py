"""Host time per forward+backward call of our ops on tiny shapes, where the device work is negligible: what an
inversion step pays per layer before any kernel runs. Each kernel backend is timed twice in the same run: as our
call sites make the call (the op's implementation called directly, ops/_autograd.py) and through the registered
torch.library op (``ALWAYS_DISPATCH``); the triton backend a third time, its kernels launched through Triton's
JITFunction.run instead of our fast launch path (ops/_triton_launch.py); plus the reference backend and one plain
conv2d as yardsticks.

    python bench/bench_host_overhead.py [--out DIR] [--calls 400] [--repeats 7]

Per row: the median over ``repeats`` rounds of (wall time of ``calls`` back-to-back calls, synchronised once at the
end) / calls. Writes host_overhead.json/.md into DIR (default bench/results/<device>-<date>/).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lsap_kernels as L  # noqa: E402
from lsap_kernels.ops import _autograd, _triton_launch  # noqa: E402


def modconv_call(device: str, backend: str):
    """One 3×3 layer with noise and bias, B=2, 8→8 channels, 8×8: the call shape of every StyledConv."""
    g = torch.Generator().manual_seed(0)
    x, w, s = (torch.randn(2, 8, 8, 8, generator=g), torch.randn(8, 8, 3, 3, generator=g),
               torch.randn(2, 8, generator=g))
    noise, bias, strength = torch.randn(2, 1, 8, 8, generator=g), torch.randn(8, generator=g), torch.tensor(0.1)
    x, w, s, noise, bias, strength = (t.to(device) for t in (x, w, s, noise, bias, strength))
    x.requires_grad_(True)
    s.requires_grad_(True)
    noise.requires_grad_(True)

    def call():
        out = L.modulated_conv2d(x, w, s, noise=noise, noise_strength=strength, bias=bias, backend=backend)
        out.sum().backward()

    return call


def sncd_call(device: str, backend: str):
    """SNCD of B=2 over the 1024² "all" layout (26 layers): one call per inversion step."""
    with torch.device("meta"):
        layout = L.Generator(1024).style_layout("all")
    styles, anchors = common.random_style_inputs(layout, 2, torch.float32, device, seed=0)
    styles.requires_grad_(True)

    def call():
        L.sncd(styles, anchors, layout, backend=backend).backward()

    return call


def plain_conv_call(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=g).to(device).requires_grad_(True)
    w, s = torch.randn(8, 8, 3, 3, generator=g).to(device), torch.randn(2, 8, 1, 1, generator=g).to(device)

    def call():
        torch.nn.functional.conv2d(x * s, w, padding=1).sum().backward()

    return call


def host_us(call, device: str, calls: int, repeats: int) -> float:
    for _ in range(20):
        call()
    common.sync(device)
    rounds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        common.sync(device)
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(rounds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    rows = [{"op": "conv2d", "provider": "plain torch (x·s, conv2d)", "us_per_call": host_us(
        plain_conv_call(device), device, args.calls, args.repeats)}]
    for op, make in (("modulated_conv2d", modconv_call), ("sncd", sncd_call)):
        ref_us = host_us(make(device, "reference"), device, args.calls, args.repeats)
        rows.append({"op": op, "provider": "reference", "us_per_call": ref_us})
        for backend in common.kernel_backends(op, device, torch.float32):
            timed = {}
            for dispatch in (True, False):
                _autograd.ALWAYS_DISPATCH = dispatch
                try:
                    timed[dispatch] = host_us(make(device, backend), device, args.calls, args.repeats)
                finally:
                    _autograd.ALWAYS_DISPATCH = False
            rows.append({"op": op, "provider": f"{backend}, through the registered op", "us_per_call": timed[True]})
            ours = timed[False]
            rows.append({"op": op, "provider": f"{backend}, our call path", "us_per_call": ours,
                         "dispatch_over_ours": timed[True] / ours, "reference_over_ours": ref_us / ours})
            if backend == "triton" and _triton_launch.FAST_LAUNCH:
                _triton_launch.FAST_LAUNCH = False
                try:
                    jit_run = host_us(make(device, backend), device, args.calls, args.repeats)
                finally:
                    _triton_launch.FAST_LAUNCH = True
                rows.append({"op": op, "provider": "triton, our call path, Triton's launch path", "us_per_call": jit_run,
                             "jit_run_over_ours": jit_run / ours})
    for r in rows:
        print(f"{r['op']:17s} {r['provider']:44s} {r['us_per_call']:8.1f} us")
    meta = {"what": "host microseconds per forward+backward call on tiny shapes (device work negligible)",
            "calls_per_round": args.calls, "rounds (median)": args.repeats, "threads": torch.get_num_threads()}
    common.write_results(out, "host_overhead", env, meta, rows,
                         ["op", "provider", "us_per_call", "dispatch_over_ours", "reference_over_ours",
                          "jit_run_over_ours"])


if __name__ == "__main__":
    main()
