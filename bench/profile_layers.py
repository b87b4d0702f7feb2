"""Where the time of our modulated-conv layers goes: one forward+backward (inversion gradients, weights frozen) of
selected config-f 1024² layers under torch.profiler, device time by kernel name, and the host time of the call.

    python bench/profile_layers.py [--out DIR] [--layers convs.15 to_rgbs.7 ...] [--batch 16] [--precision bf16]

Writes profile_layers.md (rewritten after every layer) into DIR (default bench/results/<device>-<date>/).
Defaults: the three largest layers and the mid-size ones the H200 suite run (2026-11-26) found slower than a
baseline. Meant for the GPU (bench/gpu_check.sh bench); on a CPU pass a small --size with its layer names.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import common  # noqa: E402
from suite import layer_specs  # noqa: E402  (the suite's table of layer shapes)

import lsap_kernels as L  # noqa: E402

DEFAULT_LAYERS = ["convs.14", "convs.15", "to_rgbs.7", "convs.7", "convs.11", "convs.1"]


def layer_call(g, name: str, batch: int, dtype, device: str):
    """The layer's forward+backward on random inputs of its shape (x, w and the noise map or skip get gradients)."""
    layer = g.get_submodule(name)
    spec = next(s for s in layer_specs(g) if s["layer"] == name)
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dt=dtype):  # 4-D tensors channels_last: what our layers produce and get inside the generator
        t = torch.randn(*shape, generator=gen, device=device).to(dt)
        return (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t).requires_grad_(True)

    x = rnd(batch, spec["cin"], spec["res_in"], spec["res_in"])
    w = rnd(batch, 512, dt=torch.float32)
    if spec["rgb"]:
        side = rnd(batch, 3, spec["res_out"] // 2, spec["res_out"] // 2) if spec["skip"] else None
    else:
        side = rnd(batch, 1, spec["res_out"], spec["res_out"])
    grad_out = rnd(batch, spec["cout"], spec["res_out"], spec["res_out"]).detach()

    def call():
        for t in (x, w, side):  # fresh gradients, as in an inversion step: no accumulation kernels in the profile
            if t is not None:
                t.grad = None
        layer(x, w, side).backward(grad_out)

    return call, spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--top", type=int, default=8, help="kernels listed per layer")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # as in the suite: the fp32 model, its layers compute in their input's dtype
    g = baselines.lsap_generator(baselines.rosinality_generators(args.size)[0].state_dict(), args.size).to(device)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# profile_layers — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}; backend "
             f"{L.backends.chosen_backend('modulated_conv2d', torch.device(device), dtype)}, batch {args.batch}, "
             f"{args.precision}, forward+backward (inversion gradients).", ""]
    for name in args.layers:
        call, spec = layer_call(g, name, args.batch, dtype, device)
        for _ in range(3):  # compile / autotune, warm caches
            call()
        common.sync(device)
        t = time.perf_counter()
        call()
        host_ms = (time.perf_counter() - t) * 1e3
        common.sync(device)
        wall_ms = common.time_ms(lambda i: call(), device, warmup=1, repeats=10)
        with profile(activities=[activity]) as prof:
            call()
            common.sync(device)
        key = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
        events = [e for e in prof.key_averages() if key(e) > 0]
        total = sum(key(e) for e in events) / 1e3
        up = " up" if spec["up"] == 2 else ""
        lines += [f"## {name}: {spec['cin']}→{spec['cout']} {spec['k']}x{spec['k']}{up} {spec['res_out']}²", "",
                  f"- call {wall_ms:.3f} ms (median), host time to return {host_ms:.3f} ms, "
                  f"{'device' if device == 'cuda' else 'CPU op'} time summed {total:.3f} ms", "",
                  "| kernel | calls | ms | share |", "|---|---|---|---|"]
        for e in sorted(events, key=key, reverse=True)[:args.top]:
            lines.append(f"| `{e.key[:90]}` | {e.count} | {key(e) / 1e3:.3f} | {key(e) / 1e3 / max(total, 1e-9):.0%} |")
        lines.append("")
        (out / "profile_layers.md").write_text("\n".join(lines) + "\n")  # after every layer: a time box keeps them
    print("\n".join(lines))


if __name__ == "__main__":
    main()
