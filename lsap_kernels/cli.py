"""``lsap-kernels`` command line: ``demo`` (the embedded default job) and ``sncd`` (score saved W+ codes)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import backends
from .images import grid, save_png
from .metrics import SNCD, cached_anchors
from .models import Generator, load_generator

DEMO_CHANNELS = {4: 128, 8: 128, 16: 64, 32: 64, 64: 32}


def demo_generator(seed: int = 0) -> Generator:
    """The embedded default: a seeded random-weight 64² generator (no download)."""
    torch.manual_seed(seed)
    return Generator(64, style_dim=128, n_mlp=4, channels=DEMO_CHANNELS).eval().requires_grad_(False)


def run_demo(args) -> int:
    t0 = time.perf_counter()
    g = demo_generator(args.seed)
    rng = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        anchors = cached_anchors(g, "lsap", n_samples=args.anchor_samples, cache_dir=False)
        metric = SNCD(g, anchors=anchors)
        w = g.mapping(torch.randn(args.batch, g.style_dim, generator=rng))
        w_mean = g.mean_latent(10_000, generator=rng)
        codes = {
            "synthetic W (mapping of z)": w,
            "W truncated (psi=0.5)": torch.lerp(w_mean, w, 0.5),
            "W+ with per-layer drift": w[:, None] + 0.5 * w.std() * torch.randn(args.batch, g.n_latent, g.style_dim,
                                                                                 generator=rng),
            "random Gaussian W+": torch.randn(args.batch, g.n_latent, g.style_dim, generator=rng),
        }
        scores = {name: metric(c) for name, c in codes.items()}
        noise = g.make_noise(args.batch, generator=rng)
        images = torch.cat([g.synthesis(codes[n], noise=noise) for n in list(codes)[:3]])
    out = Path(args.out)
    save_png(grid(images, ncol=args.batch), out / "demo_grid.png")
    summary = {name: {"mean": s.mean().item(), "min": s.min().item(), "max": s.max().item()}
               for name, s in scores.items()}
    used = {op: backends.chosen_backend(op) for op in ("modulated_conv2d", "sncd", "style_normalize")}
    (out / "demo.json").write_text(json.dumps({"sncd": summary, "backends": used, "seed": args.seed}, indent=2))
    print(f"SNCD (mean over {g.style_layout('lsap').n_layers} LSAP layers; lower = closer to the generator's "
          f"synthetic distribution), batch {args.batch}, anchors from {args.anchor_samples} samples")
    print(f"{'codes':30s} {'mean':>8s} {'min':>8s} {'max':>8s}")
    for name, s in summary.items():
        print(f"{name:30s} {s['mean']:8.4f} {s['min']:8.4f} {s['max']:8.4f}")
    print(f"backends: {used}")
    print(f"wrote {out / 'demo_grid.png'} (rows: the first three code sets) and {out / 'demo.json'} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def load_codes(path: Path) -> torch.Tensor:
    """W+ [B, n_latent, D] or W [B, D] codes from .npy or .pt (a tensor, or a dict with 'latents')."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("latents", obj.get("w_plus"))
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of codes or a dict with 'latents', got {type(obj).__name__}")
    return obj.float()


def run_sncd(args) -> int:
    g = load_generator(args.checkpoint, device=args.device).requires_grad_(False)
    codes = load_codes(Path(args.latents)).to(args.device)
    metric = SNCD(g, layers=args.layers, n_samples=args.n_samples, cache_dir=args.cache_dir)
    scores = metric(codes)
    for i, s in enumerate(scores.tolist()):
        print(f"{i}\t{s:.6f}")
    print(f"mean\t{scores.mean().item():.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lsap-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embedded default: SNCD of codes of a seeded random-weight generator + PNG grid")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor-samples", type=int, default=20_000)
    p.set_defaults(run=run_demo)
    p = sub.add_parser("sncd", help="print the SNCD of saved W+ codes for a generator checkpoint")
    p.add_argument("--checkpoint", required=True, help="rosinality-format .pt ({'g_ema', 'latent_avg'})")
    p.add_argument("--latents", required=True, help=".pt or .npy with codes [B, n_latent, D] or [B, D]")
    p.add_argument("--layers", choices=("lsap", "all"), default="lsap")
    p.add_argument("--n-samples", type=int, default=100_000, help="samples for the anchors (cached per generator)")
    p.add_argument("--cache-dir", default=None, help="anchor cache (default $LSAP_CACHE_DIR or ~/.cache/lsap_kernels)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(run=run_sncd)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lsap-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
