"""``lsap-convert IN.pkl OUT.pt``: an NVIDIA stylegan2-ada-pytorch / stylegan3 (StyleGAN2 config) network pickle,
read as data (no code from the file runs), written as a rosinality-format checkpoint
``{'g_ema', 'latent_avg', 'lsap_config'}`` that ``load_generator`` and, for config-f channel tables, rosinality's
own ``Generator`` load. Also ``python -m lsap_kernels.convert``.
"""
from __future__ import annotations

import argparse
import sys

from .models.checkpoints import infer_config, load_generator, save_generator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lsap-convert", description=(
        "Convert an NVIDIA stylegan2-ada-pytorch / stylegan3 (StyleGAN2 config) network pickle, read as data (no "
        "code from the file runs), into a rosinality-format checkpoint {'g_ema', 'latent_avg', 'lsap_config'}."))
    p.add_argument("src", help="NVIDIA network pickle (.pkl); a rosinality/lsap .pt is re-saved")
    p.add_argument("dst", help="output .pt (written atomically)")
    p.add_argument("--key", default="G_ema", help="network to convert: G_ema (default, the one to invert) or G")
    args = p.parse_args(argv)
    try:
        g = load_generator(args.src, key=args.key)
        save_generator(g, args.dst)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lsap-convert: error: {exc}", file=sys.stderr)
        return 1
    cm = infer_config(g.state_dict()).get("channel_multiplier")
    print(f"{args.src} [{args.key}] -> {args.dst}: size={g.size} style_dim={g.style_dim} n_mlp={g.n_mlp} "
          f"lr_mlp={g.lr_mlp:g} conv_clamp={g.conv_clamp} channels={g.channels}")
    if cm is None:
        print("note: channel table is not rosinality's config-f: only lsap_kernels.load_generator builds this network")
    else:
        print(f"rosinality: Generator({g.size}, {g.style_dim}, {g.n_mlp}, channel_multiplier={cm}"
              f"{'' if g.lr_mlp == 0.01 else f', lr_mlp={g.lr_mlp:g}'}).load_state_dict(ckpt['g_ema'])")
    if g.conv_clamp is not None:
        print(f"note: rosinality's code has no conv_clamp; its images differ wherever an activation exceeds "
              f"±{g.conv_clamp:g} (load_generator applies the clamp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
