"""Accuracy of the bf16 synthesis mode: a 200-step inversion in bf16 against the same inversion in fp32, on the
targets of the README's main command (``lsap-invert --demo``: the seeded random-weight 32² generator and its 6
target images, anchors from 20,000 samples).

    python bench/bf16_accuracy.py [--steps 200] [--threads 1] [--json FILE]

For the demo's two settings (the λ=0 projector and LSAP_O, λ=0.5) it runs ``Inverter(precision="fp32")`` and
``Inverter(precision="bf16")`` from the same start and random streams and prints: the mean over the images of the
PSNR to the targets for each precision, the mean PSNR between the bf16 and the fp32 reconstructions, the mean SNCD,
and the wall time of each inversion (the optimisation loop, as ``InversionResult.seconds``, after an untimed
warm-up). Threads default to 1, as the demo runs on CPU. Also printed: the machine, versions, commit, the backend,
and whether oneDNN has bf16 kernels here (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``; without them the C++ backend runs the convolution
in fp32 on bf16-rounded operands, so bf16 changes the numbers but saves no time).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lsap_kernels.invert import Inverter  # noqa: E402
from lsap_kernels.invert.cli import DEMO_ANCHOR_SAMPLES, DEMO_BATCH, demo_generator, demo_targets  # noqa: E402
from lsap_kernels.invert.inverter import backends_used, psnr  # noqa: E402
from lsap_kernels.metrics import cached_anchors  # noqa: E402


def onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, the demo's choice on CPU)")
    p.add_argument("--seed", type=int, default=0, help="the demo's --seed (generator, targets, random streams)")
    p.add_argument("--batch", type=int, default=DEMO_BATCH)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = demo_generator(args.seed)
    anchors = cached_anchors(g, "lsap", n_samples=DEMO_ANCHOR_SAMPLES, cache_dir=False)
    targets, _ = demo_targets(g, args.batch, args.seed)
    env = common.environment()
    env.update(threads=torch.get_num_threads(), onednn_bf16=onednn_bf16(),
               backends={prec: backends_used("cpu", precision=prec) for prec in ("fp32", "bf16")})
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}{' (dirty)' if env['commit_dirty'] else ''}; "
          f"oneDNN bf16 kernels: {env['onednn_bf16']}; modulated_conv2d backend: "
          f"{env['backends']['bf16']['modulated_conv2d']}")
    print(f"demo targets: {args.batch} images of the seeded {g.size}² generator, {args.steps} Adam steps in W+")
    print(f"{'setting':18s} {'PSNR fp32':>10s} {'PSNR bf16':>10s} {'bf16 vs fp32':>13s} {'SNCD fp32':>10s} "
          f"{'SNCD bf16':>10s} {'s fp32':>8s} {'s bf16':>8s}")
    for prec in ("fp32", "bf16"):  # warm-up, untimed: mean latent, oneDNN primitives, first-touch of buffers
        Inverter(g, steps=3, anchors=anchors, seed=args.seed, precision=prec).invert(targets)
    rows = []
    for label, lam in (("projector (λ=0)", 0.0), ("LSAP_O (λ=0.5)", 0.5)):
        res = {prec: Inverter(g, steps=args.steps, sncd_weight=lam, anchors=anchors, seed=args.seed,
                              precision=prec).invert(targets) for prec in ("fp32", "bf16")}
        between = psnr(res["bf16"].images, res["fp32"].images)
        row = {"setting": label, "sncd_weight": lam,
               "psnr_per_image": {k: r.psnr.tolist() for k, r in res.items()},
               "psnr_mean": {k: r.psnr.mean().item() for k, r in res.items()},
               "psnr_bf16_vs_fp32_per_image": between.tolist(), "psnr_bf16_vs_fp32_mean": between.mean().item(),
               "sncd_mean": {k: r.sncd.mean().item() for k, r in res.items()},
               "seconds": {k: r.seconds for k, r in res.items()},
               "latents_max_abs_diff": (res["bf16"].latents - res["fp32"].latents).abs().max().item()}
        rows.append(row)
        print(f"{label:18s} {row['psnr_mean']['fp32']:10.2f} {row['psnr_mean']['bf16']:10.2f} "
              f"{row['psnr_bf16_vs_fp32_mean']:13.2f} {row['sncd_mean']['fp32']:10.4f} {row['sncd_mean']['bf16']:10.4f} "
              f"{row['seconds']['fp32']:8.1f} {row['seconds']['bf16']:8.1f}")
    print("PSNR in dB, images in [-1, 1]; per image means; 'bf16 vs fp32': PSNR of the bf16 reconstruction against "
          "the fp32 one")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "steps": args.steps, "batch": args.batch,
                                         "seed": args.seed, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
