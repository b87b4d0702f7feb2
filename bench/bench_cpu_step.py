"""One GAN-inversion step on CPU at 256² config-f (channel_multiplier 2, random weights): synthesis from W+ and noise,
MSE to a target, backward to W+ and noise, generator frozen — image-steps/s, achieved GFLOP/s and the fraction of
the rate of a large channels_last 3×3 convolution measured in the same run (the practical compute floor).

    python bench/bench_cpu_step.py [--batches 1 4] [--threads 2] [--providers ...] [--out DIR]

Providers, all timed in the same process on the same weights, latents, noise and target:
  (a) rosinality grouped conv   tests/stylegan2_rosinality.py, fused=True: per-sample weights, groups=B, FIR as
                                one-channel convolutions over [B·C, 1, H, W]
  (b) rosinality input scaling  the same model with fused=False (NVIDIA-style: x ⊙ s, shared weight)
  (c) torch.compile(reference)  lsap_kernels' Generator on the plain-PyTorch reference backend, torch.compile'd
                                (inductor; the compile time is reported apart and not in the step time)
  ours cpu fp32 / ours cpu bf16 lsap_kernels' Generator on the C++ `cpu` backend, precision "fp32" / "bf16"
Every provider's image and W+ gradient are checked against ours fp32 before timing (that step is also the
warm-up; for (c) it is the compile, timed on an empty inductor cache). Providers are then timed in interleaved
rounds (one step of each per round, order rotating), median per provider, so that machine-load drift hits all alike.

FLOPs per step count the convolutions only: forward Σ_l 2·B·Cin·Cout·k²·(input pixels) (the transposed conv of an
up layer at its input resolution) and the same again for the input gradient; no weight gradients.
The script sets THP_MEM_ALLOC_ENABLE=1 before importing torch (unless --no-thp): torch then backs large tensors
with huge pages, which every provider benefits from (first-touch page faults of fresh activations are a visible
cost on small VMs); the run records the setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch once, at its first allocation
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsap-bench-inductor-")  # cold compile for (c)

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import common  # noqa: E402
import stylegan2_rosinality as ros  # noqa: E402

import lsap_kernels as L  # noqa: E402
from lsap_kernels.models import stylegan2 as sg  # noqa: E402
from lsap_kernels.ops.modconv import reference as ref_ops  # noqa: E402

ALL = ("(a) rosinality grouped conv", "(b) rosinality input scaling", "(c) torch.compile(reference)",
       "ours cpu fp32", "ours cpu bf16")


def step_flops(g: L.Generator, batch: int) -> float:
    total = 0
    res = 4
    layers = [(g.conv1, res), (g.to_rgb1, res)]
    for j in range(len(g.to_rgbs)):
        layers += [(g.convs[2 * j], res), (g.convs[2 * j + 1], res * 2), (g.to_rgbs[j], res * 2)]
        res *= 2
    for layer, r in layers:
        w = layer.conv.weight
        total += 2 * batch * w.shape[1] * w.shape[2] * w.shape[3] * w.shape[4] * r * r
    return 2.0 * total  # forward + input gradient


def conv_floor_gflops(repeats: int = 8) -> float:
    """GFLOP/s of a large channels_last 3×3 convolution (oneDNN, 256→256 channels at 64², batch 4), median after
    warm-up (the first calls pay oneDNN's primitive creation and first-touch page faults)."""
    x = torch.randn(4, 256, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3)
    flops = 2 * 9 * 256 * 256 * 64 * 64 * 4
    ms = common.time_ms(lambda i: F.conv2d(x, w, padding=1), "cpu", warmup=4, repeats=repeats, min_seconds=0)
    return flops / ms / 1e6


def reference_modconv(x, weight, styles, *, weight_gain=None, demodulate=True, up=1, noise=None, noise_strength=None,
                      bias=None, activation="lrelu", gain=None, clamp=None, eps=1e-8, skip=None):
    """The reference backend called directly (no backend dispatch), so torch.compile sees plain torch ops."""
    if weight_gain is None:
        weight_gain = 1.0 / (weight.shape[1] * weight.shape[-1] ** 2) ** 0.5
    if gain is None:
        gain = 2**0.5 if activation == "lrelu" else 1.0
    if noise_strength is None:
        noise_strength = 1.0
    elif isinstance(noise_strength, torch.Tensor):
        noise_strength = noise_strength.reshape(())
    return ref_ops.modulated_conv2d(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias,
                                    activation, gain, clamp, eps, skip)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--providers", nargs="+", default=list(ALL), help=f"subset of {ALL}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one step of every provider each)")
    p.add_argument("--no-thp", action="store_true", help="leave THP_MEM_ALLOC_ENABLE unset")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = common.environment()
    out_dir = Path(args.out) if args.out else common.results_dir(env)
    assert L.available_backends()["cpu"], "build the C++ extension first"

    torch.manual_seed(0)
    theirs = ros.Generator(256, 512, 8, fused=True).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and noise strengths, as in a trained model
        for name, prm in theirs.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")) or name.startswith("to_rgb"):
                prm.add_(0.1 * torch.randn_like(prm))
    ours = L.Generator(256).requires_grad_(False)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours_bf16 = L.Generator(256, precision="bf16").requires_grad_(False)
    ours_bf16.load_state_dict(theirs.state_dict(), strict=True)
    theirs_in = ros.Generator(256, 512, 8, fused=False).requires_grad_(False)
    theirs_in.load_state_dict(theirs.state_dict(), strict=True)
    compiled_synthesis, compile_s = None, {}

    def synth_ref(w, noise):
        return ours.synthesis(w, noise)

    floor_before = conv_floor_gflops()
    print(f"large channels_last 3x3 conv: {floor_before:.1f} GFLOP/s", flush=True)
    rows = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        w_plus = ours.mapping(torch.randn(batch, 512, generator=gen)).unsqueeze(1).repeat(1, ours.n_latent, 1)
        w_plus = (w_plus + 0.1 * torch.randn(w_plus.shape, generator=gen)).detach()
        noise = [n.detach() for n in ours.make_noise(batch, generator=gen)]
        target = torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1
        flops = step_flops(ours, batch)

        def make_step(forward):
            def step(_i=0):
                w = w_plus.clone().requires_grad_(True)
                ns = [n.clone().requires_grad_(True) for n in noise]
                img = forward(w, ns)
                F.mse_loss(img.float(), target).backward()
                return img, w.grad

            return step

        providers = {
            "(a) rosinality grouped conv": lambda w, ns: theirs([w], input_is_latent=True, noise=ns)[0],
            "(b) rosinality input scaling": lambda w, ns: theirs_in([w], input_is_latent=True, noise=ns)[0],
            "ours cpu fp32": lambda w, ns: ours.synthesis(w, ns),
            "ours cpu bf16": lambda w, ns: ours_bf16.synthesis(w, ns),
        }
        if "(c) torch.compile(reference)" in args.providers:
            if compiled_synthesis is None:
                compiled_synthesis = torch.compile(synth_ref)
            providers["(c) torch.compile(reference)"] = lambda w, ns: compiled_synthesis(w, ns)

        check_img, check_grad = make_step(providers["ours cpu fp32"])()
        names = [n for n in ALL if n in args.providers]
        steps, errors = {}, {}
        for name in names:  # correctness check + warm-up (+ compile for (c))
            if name.startswith("(c)"):
                sg.modulated_conv2d = reference_modconv  # the reference backend without dispatch, for dynamo
            t0 = time.perf_counter()
            steps[name] = make_step(providers[name])
            img, grad = steps[name]()
            if name.startswith("(c)"):
                compile_s[batch] = time.perf_counter() - t0
                sg.modulated_conv2d = L.modulated_conv2d
                print(f"  (c) compile + first step: {compile_s[batch]:.1f} s", flush=True)
            tol = 3e-2 if "bf16" in name else 1e-4
            errors[name] = (common_rel(img, check_img), common_rel(grad, check_grad))
            assert errors[name][0] < tol and errors[name][1] < tol * 10, (name, errors[name])
        times = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name.startswith("(c)"):
                    sg.modulated_conv2d = reference_modconv
                t0 = time.perf_counter()
                steps[name](r)
                times[name].append(time.perf_counter() - t0)
                sg.modulated_conv2d = L.modulated_conv2d
        for name in names:
            s_step = statistics.median(times[name])
            err_img, err_grad = errors[name]
            rows.append({"batch": batch, "provider": name, "s_per_step": s_step, "img_steps_per_s": batch / s_step,
                         "GFLOP_per_s": flops / s_step / 1e9, "GFLOP_per_step": flops / 1e9,
                         "step_times_s": times[name], "rel_err_img_vs_fp32": err_img,
                         "rel_err_wgrad_vs_fp32": err_grad,
                         "compile_s": compile_s.get(batch) if name.startswith("(c)") else None})
            print(f"B={batch} {name:30s} {s_step:7.2f} s/step {batch / s_step:6.3f} img-steps/s "
                  f"{flops / s_step / 1e9:6.1f} GFLOP/s (img err {err_img:.1e}, W+ grad err {err_grad:.1e})",
                  flush=True)
    floor_after = conv_floor_gflops()
    floor = statistics.mean([floor_before, floor_after])
    for r in rows:
        r["fraction_of_conv_rate"] = r["GFLOP_per_s"] / floor
        base = {n: next((x for x in rows if x["batch"] == r["batch"] and x["provider"] == n), None)
                for n in ALL[:3]}
        for key, n in zip(("vs_a", "vs_b", "vs_c"), ALL[:3]):
            r[key] = r["img_steps_per_s"] / base[n]["img_steps_per_s"] if base[n] else None
    meta = {"threads": args.threads, "conv_floor_GFLOP_per_s": floor, "conv_floor_before": floor_before,
            "conv_floor_after": floor_after, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "load_average_at_end": os.getloadavg()[0], "rounds": args.repeats,
            "model": "256² config-f, channel_multiplier 2, random weights"}
    common.write_results(out_dir, "cpu_step", env, meta, rows,
                         ["batch", "provider", "s_per_step", "img_steps_per_s", "GFLOP_per_s", "fraction_of_conv_rate",
                          "vs_a", "vs_b", "vs_c", "compile_s"])


def common_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


if __name__ == "__main__":
    main()
