"""Where the time of our modulated-conv layers goes: one forward+backward (inversion gradients, weights frozen) of
selected config-f 1024² layers under torch.profiler, device time by kernel name, and the host time of the call.

    python bench/profile_layers.py [--out DIR] [--layers convs.15 to_rgbs.7 ...] [--batch 16] [--precision bf16]
                                   [--step]

Writes profile_layers.md (rewritten after every layer) into DIR (default bench/results/<device>-<date>/).
Defaults: the three largest layers and the mid-size ones the H200 suite run (2026-11-26) found slower than a
baseline. Meant for the GPU (bench/gpu_check.sh bench); on a CPU pass a small --size with its layer names.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import common  # noqa: E402
from suite import layer_specs, lsap_loss  # noqa: E402  (the suite's table of layer shapes, its LSAP_O loss)

import lsap_kernels as L  # noqa: E402

DEFAULT_LAYERS = ["convs.14", "convs.15", "to_rgbs.7", "convs.7", "convs.11", "convs.1"]
# our Triton kernels, our CUDA kernels (csrc/style_cuda.cu), our CPU ops' own time (the oneDNN convolutions they call
# count as PyTorch's)
OUR_KERNEL = re.compile(r"^_\w+_kernel$|^(normalize|sncd)_(fwd|bwd)_kernel|^modconv::")


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


def step_call(size: int, batch: int, precision: str, device: str):
    """One LSAP_O step as the suite's end-to-end rows run it: synthesis from W+ and noise, Σ_b (MSE + 0.5·SNCD),
    backward to W+ and the noise maps (generator frozen)."""
    g = baselines.lsap_generator(baselines.rosinality_generators(size)[0].state_dict(), size, precision).to(device)
    layout = g.style_layout("lsap")
    gen = torch.Generator(device=device).manual_seed(0)
    anchors = 0.05 * torch.randn(layout.total_channels, generator=gen, device=device)
    with torch.no_grad():
        w = g.mapping(torch.randn(batch, g.style_dim, generator=gen, device=device)).unsqueeze(1)
        w = w.repeat(1, g.n_latent, 1).requires_grad_(True)
    noise = [torch.randn(batch, 1, h, w_, generator=gen, device=device).requires_grad_(True)
             for h, w_ in g.noise_shapes()]
    target = torch.rand(batch, 3, size, size, generator=gen, device=device) * 2 - 1

    def call():
        for t in (w, *noise):
            t.grad = None
        styles, _ = g.style_space(w, "lsap")
        lsap_loss(g.synthesis(w, noise), target, L.sncd(styles, anchors, layout, "mean", "sum")).backward()

    return call


def profile_call(call, device: str, top: int) -> tuple[list[str], float, float, float]:
    """Kernel table lines of one call under torch.profiler (device time by kernel name, self time), after warm-up;
    also (median ms of the call, host ms to return, summed kernel ms)."""
    for _ in range(3):  # compile / autotune, warm caches
        call()
    common.sync(device)
    t = time.perf_counter()
    call()
    host_ms = (time.perf_counter() - t) * 1e3
    common.sync(device)
    wall_ms = common.time_ms(lambda i: call(), device, warmup=1, repeats=10)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        call()
        common.sync(device)
    key = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if key(e) > 0]
    total = sum(key(e) for e in events) / 1e3
    lines = ["| kernel | calls | ms | share |", "|---|---|---|---|"]
    for e in sorted(events, key=key, reverse=True)[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {key(e) / 1e3:.3f} | {key(e) / 1e3 / max(total, 1e-9):.0%} |")
    ours = sum(key(e) for e in events if OUR_KERNEL.match(e.key)) / 1e3
    lines += ["", f"Our kernels (OUR_KERNEL): {ours:.3f} ms, {ours / max(total, 1e-9):.0%} of the summed time; "
                  f"PyTorch's: {total - ours:.3f} ms.", ""]
    return lines, wall_ms, host_ms, total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    p.add_argument("--step", action="store_true", help="also profile one whole LSAP_O step (after the layers)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--top", type=int, default=8, help="kernels listed per layer (twice that for the step)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # as in the suite: the fp32 model, its layers compute in their input's dtype
    g = baselines.lsap_generator(baselines.rosinality_generators(args.size)[0].state_dict(), args.size).to(device)
    out.mkdir(parents=True, exist_ok=True)
    what = "device" if device == "cuda" else "CPU op"
    lines = [f"# profile_layers — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}; backend "
             f"{L.backends.chosen_backend('modulated_conv2d', torch.device(device), dtype)}, batch {args.batch}, "
             f"{args.precision}, forward+backward (inversion gradients).", ""]
    for name in args.layers:
        call, spec = layer_call(g, name, args.batch, dtype, device)
        table, wall_ms, host_ms, total = profile_call(call, device, args.top)
        up = " up" if spec["up"] == 2 else ""
        lines += [f"## {name}: {spec['cin']}→{spec['cout']} {spec['k']}x{spec['k']}{up} {spec['res_out']}²", "",
                  f"- call {wall_ms:.3f} ms (median), host time to return {host_ms:.3f} ms, {what} time summed "
                  f"{total:.3f} ms", "", *table]
        (out / "profile_layers.md").write_text("\n".join(lines) + "\n")  # after every layer: a time box keeps them
    if args.step:
        del g
        table, wall_ms, host_ms, total = profile_call(step_call(args.size, args.batch, args.precision, device),
                                                      device, 2 * args.top)
        lines += [f"## One LSAP_O step, {args.size}², batch {args.batch}, {args.precision} (eager)", "",
                  f"- step {wall_ms:.3f} ms (median), host time to return {host_ms:.3f} ms, {what} time summed "
                  f"{total:.3f} ms", "", *table]
        (out / "profile_layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
