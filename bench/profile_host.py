"""Where the host time of a small layer's forward+backward goes (what bounds the small layers of an eager step on a
GPU): cProfile over many calls of selected config-f 1024² layers, per call the functions with the most own time, and
the Triton launches (count, host µs each, through our launch path: lsap_kernels/ops/_triton_launch.py).

    python bench/profile_host.py [--out DIR] [--layers conv1 to_rgb1 convs.7] [--batch 16] [--precision bf16]
                                 [--calls 200]

Writes profile_host.md into DIR (default bench/results/<device>-<date>/). Meant for the GPU (bench/gpu_check.sh
bench). Without CUDA it runs the triton backend under TRITON_INTERPRET=1 with every kernel launch replaced by a
no-op, which leaves the Python side of our call path (what the launches cost there is not measured).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available() and "--cpu" not in sys.argv


def _no_launch(self, *args, **kwargs):
    return None


if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton_fwd is imported
    import triton.runtime.interpreter as interpreter
    interpreter.InterpretedFunction.run = _no_launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import common  # noqa: E402
from profile_layers import layer_call  # noqa: E402
from suite import layer_shape  # noqa: E402

import lsap_kernels as L  # noqa: E402

def launches(stats: pstats.Stats) -> tuple[int, float]:
    """(calls, cumulative seconds) of the per-launch entry point: our fast launch path's FastJITFunction.run, Triton's
    JITFunction.run where it was not called from there (a kernel that is not ours), or _no_launch."""
    n, secs = 0, 0.0
    for (filename, _, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        if (name == "run" and filename.endswith("_triton_launch.py")) or name == "_no_launch":
            n, secs = n + nc, secs + ct
        elif name == "run" and filename.endswith("triton/runtime/jit.py"):
            for (caller_file, _, _), (_, caller_nc, _, caller_ct) in callers.items():
                if not caller_file.endswith("_triton_launch.py"):
                    n, secs = n + caller_nc, secs + caller_ct
    return n, secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", nargs="+", default=["conv1", "to_rgb1", "convs.7"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--cpu", action="store_true", help="the CPU run (launches replaced by no-ops) even with CUDA")
    args = p.parse_args(argv)
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    out.mkdir(parents=True, exist_ok=True)
    g = baselines.lsap_generator(baselines.rosinality_generators(1024)[0].state_dict(), 1024).to(device)
    lines = [f"# profile_host — {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}; backend triton, batch {args.batch}, "
             f"{args.precision}, forward+backward (inversion gradients), {args.calls} calls per layer under cProfile "
             "(which adds its own overhead per Python call: compare rows, not absolute times)."]
    if not ON_GPU:
        lines.append("No CUDA: TRITON_INTERPRET=1 with every launch a no-op, so launches cost nothing here.")
    with L.use_backend("triton"):
        for name in args.layers:
            call, spec = layer_call(g, name, args.batch, dtype, device)
            for _ in range(3):  # compile, autotune (or the table), warm caches
                call()
            common.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            plain_us = (time.perf_counter() - t0) / args.calls * 1e6  # host time to issue, no profiler
            common.sync(device)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                call()
            profiler.disable()
            common.sync(device)
            stats = pstats.Stats(profiler)
            n_launch, launch_s = launches(stats)
            lines += ["", f"## {name}: {layer_shape(spec)}", "",
                      f"- host time per call without the profiler: {plain_us:.0f} µs; under it: "
                      f"{stats.total_tt / args.calls * 1e6:.0f} µs",
                      f"- Triton launches per call: {n_launch / args.calls:.1f}, "
                      f"{launch_s / max(n_launch, 1) * 1e6:.1f} µs each (cumulative, under the profiler)", "",
                      "| function | calls per call | own µs per call | cumulative µs per call |", "|---|---|---|---|"]
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
            for (filename, line, fname), (cc, nc, tt, ct, callers) in rows:
                where = f"{Path(filename).name}:{line}({fname})" if line else fname
                lines.append(f"| `{where}` | {nc / args.calls:.1f} | {tt / args.calls * 1e6:.1f} | "
                             f"{ct / args.calls * 1e6:.1f} |")
            (out / "profile_host.md").write_text("\n".join(lines) + "\n")
            print(f"{name}: {plain_us:.0f} µs per call, {n_launch / args.calls:.1f} launches", flush=True)
    print(f"wrote {out / 'profile_host.md'}")


if __name__ == "__main__":
    main()
