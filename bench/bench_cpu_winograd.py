"""oneDNN vs Winograd F(2×2, 3×3) for the stride-1 3×3 modulated convolutions of a 256² config-f generator
(channel_multiplier 2: 512 channels at 4²…64², 256 at 128², 128 at 256²), forward and input gradient, on CPU.

    python bench/bench_cpu_winograd.py [--batches 1 4] [--threads 2] [--repeats 5] [--out DIR]

Each layer runs the `cpu` backend's forward op and its backward op (gradients of x and styles, frozen weight: the
inversion step's work) with LSAP_MODCONV_CONV=onednn and =winograd, alternating call by call so that machine-load
drift hits both alike; medians of the repeats. Everything but the convolution is the same code on both paths (the
Winograd forward also skips the separate style-scaling pass: the scaling rides on its input transform), so the
difference is the convolution's. `choice` is the faster path per layer and direction; `rule` is what the op picks
by default (csrc/modconv_cpu.cpp, use_winograd). `equiv_GFLOP_per_s` counts the direct convolution's FLOPs
(2·B·H·W·Cin·Cout·9) over the whole op's time. `rel_diff_*`: ||winograd − oneDNN|| / ||oneDNN|| of the output and
the x and style gradients (the style gradient is a sum over pixels with cancellation: its two float32 results differ
more than either's output; tests/test_modconv_cpu.py checks both paths against float64).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench_cpu_step.py: huge pages for large tensors

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

import lsap_kernels as L  # noqa: E402
from lsap_kernels import _ext  # noqa: E402

LAYERS = [(4, 512), (8, 512), (16, 512), (32, 512), (64, 512), (128, 256), (256, 128)]  # (H = W, channels)
MODES = ("onednn", "winograd")


def rule(batch: int, h: int, cin: int, cout: int) -> str:
    """The op's default choice (mirror of use_winograd in csrc/modconv_cpu.cpp)."""
    return "winograd" if cin * cout >= 128 * 128 and batch * h * h >= 1024 else "onednn"


def layer_calls(batch: int, h: int, ch: int, seed: int):
    """(forward, backward) closures of one demodulated 3×3 layer with noise and bias, inputs as in a generator:
    activations after leaky-ReLU·√2, weights N(0, 1) with gain 1/√(Cin·9), styles around 1."""
    C = _ext.module()
    g = torch.Generator().manual_seed(seed)
    x = (torch.nn.functional.leaky_relu(torch.randn(batch, ch, h, h, generator=g), 0.2) * 2 ** 0.5
         ).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ch, ch, 3, 3, generator=g)
    s = 1 + 0.3 * torch.randn(batch, ch, generator=g)
    noise, strength = torch.randn(batch, 1, h, h, generator=g), torch.tensor(0.1)
    bias = 0.1 * torch.randn(ch, generator=g)
    grad = torch.randn(batch, ch, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    gain = 1 / (ch * 9) ** 0.5
    saved = {}

    def forward():
        saved["out"], saved["conv_out"], saved["d"] = C.modconv_fwd_cpu(
            x, w, s, noise, strength, bias, None, gain, True, 1, True, 2 ** 0.5, None, 1e-8, False)
        return saved["out"]

    def backward():
        return C.modconv_bwd_cpu(grad, x, w, s, noise, strength, bias, saved["conv_out"], saved["d"], gain, True, 1,
                                 True, 2 ** 0.5, None, 1e-8, False, [True, False, True, True, True, True, False])

    return forward, backward


def set_mode(mode: str) -> None:
    os.environ["LSAP_MODCONV_CONV"] = mode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path, alternating between the paths")
    p.add_argument("--no-thp", action="store_true", help="leave THP_MEM_ALLOC_ENABLE unset")
    args = p.parse_args(argv)
    assert L.available_backends()["cpu"], "build the C++ extension first"
    torch.set_num_threads(args.threads)
    env = common.environment()
    out_dir = Path(args.out) if args.out else common.results_dir(env)
    old_mode = os.environ.get("LSAP_MODCONV_CONV")
    rows = []
    load_start = os.getloadavg()[0]
    try:
        for batch in args.batches:
            for h, ch in LAYERS:
                fwd, bwd = layer_calls(batch, h, ch, seed=h + batch)
                outs = {}
                for mode in MODES:  # warm-up (oneDNN primitive creation, pool, page faults) + agreement check
                    set_mode(mode)
                    for _ in range(2):
                        out = fwd()
                        grads = bwd()
                    outs[mode] = (out.clone(), grads[0].clone(), grads[2].clone())
                err = [((a.double() - b.double()).norm() / b.double().norm()).item()
                       for a, b in zip(outs["winograd"], outs["onednn"])]
                times = {(m, d): [] for m in MODES for d in ("fwd", "bwd")}
                for r in range(args.repeats):
                    for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                        set_mode(mode)
                        t0 = time.perf_counter()
                        fwd()
                        t1 = time.perf_counter()
                        bwd()
                        t2 = time.perf_counter()
                        times[(mode, "fwd")].append(t1 - t0)
                        times[(mode, "bwd")].append(t2 - t1)
                flops = 2 * batch * h * h * ch * ch * 9
                for d in ("fwd", "bwd"):
                    med = {m: statistics.median(times[(m, d)]) for m in MODES}
                    row = {"batch": batch, "H": h, "channels": ch, "direction": d,
                           "onednn_ms": med["onednn"] * 1e3, "winograd_ms": med["winograd"] * 1e3,
                           "speedup": med["onednn"] / med["winograd"],
                           "onednn_equiv_GFLOP_per_s": flops / med["onednn"] / 1e9,
                           "winograd_equiv_GFLOP_per_s": flops / med["winograd"] / 1e9,
                           "choice": min(MODES, key=med.get), "rule": rule(batch, h, ch, ch),
                           "rel_diff_out": err[0], "rel_diff_dx": err[1], "rel_diff_dstyles": err[2],
                           "times_s": {m: times[(m, d)] for m in MODES}}
                    rows.append(row)
                    print(f"B={batch} {h:3d}² C={ch:3d} {d}: oneDNN {row['onednn_ms']:8.2f} ms, Winograd "
                          f"{row['winograd_ms']:8.2f} ms, speedup {row['speedup']:.2f} (rel diff out {err[0]:.1e}, "
                          f"dx {err[1]:.1e}, dstyles {err[2]:.1e})",
                          flush=True)
    finally:
        if old_mode is None:
            os.environ.pop("LSAP_MODCONV_CONV", None)
        else:
            os.environ["LSAP_MODCONV_CONV"] = old_mode
    meta = {"threads": args.threads, "repeats": args.repeats, "load_average_start": load_start,
            "load_average_end": os.getloadavg()[0], "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "op": "demodulated 3x3 up=1 layer with noise, bias, lrelu; bwd: grads of x, styles, noise, strength, bias"}
    common.write_results(out_dir, "cpu_winograd", env, meta, rows,
                         ["batch", "H", "channels", "direction", "onednn_ms", "winograd_ms", "speedup",
                          "onednn_equiv_GFLOP_per_s", "winograd_equiv_GFLOP_per_s", "choice", "rule",
                          "rel_diff_out", "rel_diff_dx", "rel_diff_dstyles"])


if __name__ == "__main__":
    main()
