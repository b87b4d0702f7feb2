"""``lsap-invert``: LSAP_O inversion of images into a StyleGAN2's W+ as a resumable job (torchrun-shardable).

    lsap-invert INPUTS... --out DIR --checkpoint G.pt [--batch-size N] [--steps N] [--sncd-weight X] [--resume]
                [--precision bf16] [--compile]
    lsap-invert --demo --out DIR            # embedded default: random-weight generator, no downloads
    torchrun --nproc_per_node=N -m lsap_kernels.invert INPUTS... --out DIR --checkpoint G.pt

INPUTS: image files, folders of images, globs, or .pt/.npy image tensors ([N, 3, H, W] in [-1, 1] or uint8).
Images are centre-cropped to a square and resized to the generator's resolution.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..images import grid, save_png, to_uint8
from .edit import apply_direction, load_direction, parse_layers
from .inverter import PRECISIONS, Inverter, backends_used, generator_precision
from .jobs import Job, JobError, Ranks, expand_inputs, load_items, remove_stale_temporaries, validate_items

# Settings that change the results: stored in the manifest; on --resume, unset ones come from it.
DEFAULTS = {"space": "w+", "steps": 1000, "lr": 0.1, "sncd_weight": 0.5, "sncd_layers": "lsap", "pixel_weight": 1.0,
            "perceptual": "none", "lpips_net": "vgg", "lpips_weight": 1.0, "noise_regularize": 1e5, "seed": 0,
            "anchor_samples": 100_000, "format": "pt", "direction": None, "direction_index": None,
            "strength": [-3.0, 3.0], "edit_layers": None, "precision": "fp32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsap-invert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUTS", help="image files, folders, globs, .pt/.npy tensors")
    p.add_argument("--out", required=True, help="job directory (created; holds manifest, results, metrics.jsonl, grid.png)")
    p.add_argument("--checkpoint", help="rosinality-format generator .pt ({'g_ema', 'latent_avg'}); on --resume "
                                        "defaults to the job's")
    p.add_argument("--demo", action="store_true", help="the embedded default: invert images of a seeded random-weight "
                                                      "generator with and without the SNCD term; prints a table")
    p.add_argument("--resume", action="store_true", help="continue the job in --out: finished images are skipped")
    p.add_argument("--batch-size", type=int, help="images optimised together per process (default 8; demo: 6); "
                                                  "results do not depend on it")
    p.add_argument("--steps", type=int, help=f"optimisation steps (default {DEFAULTS['steps']}; demo: {DEMO_STEPS})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--space", choices=("w+", "w"), help="latent space optimised (default w+)")
    p.add_argument("--sncd-weight", type=float, help="λ of the SNCD term, LSAP reference scale: λ·Σ_layers(1 − cos) "
                                                     f"(default {DEFAULTS['sncd_weight']}; 0 = plain projector)")
    p.add_argument("--sncd-layers", choices=("lsap", "all"), help="layers of the SNCD term (default lsap)")
    p.add_argument("--pixel-weight", type=float, help="weight of the per-image pixel MSE (default 1)")
    p.add_argument("--perceptual", choices=("none", "lpips"), help="perceptual loss (default none)")
    p.add_argument("--lpips-net", choices=("vgg", "alex"), help="LPIPS backbone (default vgg)")
    p.add_argument("--lpips-weight", type=float, help="weight of LPIPS (default 1)")
    p.add_argument("--lpips-backbone", help="local torchvision backbone weights (vgg16-397923af.pth); "
                                            "default $LSAP_LPIPS_BACKBONE")
    p.add_argument("--lpips-lin", help="local lpips head weights (lpips' weights/v0.1/vgg.pth); default $LSAP_LPIPS_LIN")
    p.add_argument("--noise-regularize", type=float, help="weight of the noise-map regulariser (default 1e5)")
    p.add_argument("--seed", type=int, help="seed of the per-image random streams (default 0; demo: generator seed)")
    p.add_argument("--anchor-samples", type=int, help="samples for the SNCD anchors (default 100000, cached)")
    p.add_argument("--cache-dir", help="anchor cache (default $LSAP_CACHE_DIR or ~/.cache/lsap_kernels)")
    p.add_argument("--format", choices=("pt", "safetensors"), help="latents/noises file format (default pt)")
    p.add_argument("--direction", help="W direction (.pt/.npy/.npz: InterfaceGAN boundary, GANSpace components) "
                                       "to render edited results with")
    p.add_argument("--direction-index", type=int, help="which direction of a stack [K, D] (GANSpace component)")
    p.add_argument("--strength", type=float, nargs="+", help="edit strengths (default -3 3)")
    p.add_argument("--edit-layers", help="W+ entries the edit moves, e.g. '0-5', '0:6', '3,4' (default all)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="synthesis precision (default fp32): bf16 runs the generator in bfloat16 (activations and "
                        "weights, fp32 accumulation) with fp32 latents, noise maps, optimiser state and losses")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each step's synthesis and losses (on CUDA as CUDA graphs, which removes the "
                        "per-launch host time of small layers); the first batch compiles, tens of seconds")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; --demo on CPU: 1, which "
                                               "is fastest for its tiny layers and robust to a busy machine)")
    p.add_argument("--grid-max", type=int, default=32, help="images shown in grid.png (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="img-step", desc=desc, dynamic_ncols=True, smoothing=0.1)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return _Quiet()


STATS_EVERY = 25  # steps between the progress bar's loss/psnr/sncd: reading them waits for the GPU


def _show_stats(bar, step: int, steps: int, stats) -> None:
    if step % STATS_EVERY == 0 or step == steps - 1:
        bar.set_postfix(loss=f"{stats['loss']:.4g}", psnr=f"{stats['psnr']:.2f}", sncd=f"{stats['sncd']:.4f}",
                        refresh=False)


def _device(args, ranks: Ranks) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device(f"cuda:{ranks.local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
        else torch.device("cpu")


def _settings(args, stored: dict | None) -> dict:
    """Result-affecting settings: the flags given, else the job's (on resume), else the defaults."""
    out = {}
    for k, default in DEFAULTS.items():
        v = getattr(args, k, None)
        if v is not None and k == "direction":
            v = str(Path(v).resolve())
        if v is None:
            v = stored[k] if stored is not None and k in stored else default
        out[k] = v
    return out


def _make_inverter(g, s: dict, args) -> Inverter:
    return Inverter(g, space=s["space"], steps=s["steps"], lr=s["lr"], sncd_weight=s["sncd_weight"],
                    sncd_layers=s["sncd_layers"], pixel_weight=s["pixel_weight"],
                    perceptual=None if s["perceptual"] == "none" else "lpips", perceptual_weight=s["lpips_weight"],
                    lpips_net=s["lpips_net"], lpips_backbone=args.lpips_backbone, lpips_lin=args.lpips_lin,
                    noise_regularize=s["noise_regularize"], seed=s["seed"], anchor_samples=s["anchor_samples"],
                    cache_dir=args.cache_dir, precision=s["precision"], compile=args.compile)


def _png_writer(image: torch.Tensor):
    return lambda path: save_png(to_uint8(image[None])[0], path)


def _load_png(path: Path, size: int) -> torch.Tensor:
    from .jobs import load_image_file

    return load_image_file(path, size)


def write_grid(job: Job, size: int, limit: int) -> Path | None:
    """grid.png: one row per finished image (the first ``limit``): input | reconstruction | edits."""
    done = [(it, r) for it, r in ((it, job.read_record(it)) for it in job.items) if r is not None][:limit]
    if not done:
        return None
    thumb = min(size, 256)
    rows, ncol = [], 2 + max(len(r.get("edits", [])) for _, r in done)
    for it, rec in done:
        row = [load_items([it], thumb)[0], _load_png(job.root / rec["reconstruction"], thumb)]
        row += [_load_png(job.root / e, thumb) for e in rec.get("edits", [])]
        row += [torch.ones(3, thumb, thumb)] * (ncol - len(row))
        rows += row
    path = job.root / "grid.png"
    save_png(grid(torch.stack(rows), ncol=ncol), path)
    return path


def run_job(args) -> int:
    ranks = Ranks.from_env()
    ranks.init()
    try:
        return _run_job(args, ranks)
    finally:
        ranks.close()


def _run_job(args, ranks: Ranks) -> int:
    from ..metrics import weights_hash
    from ..models import load_generator

    batch_size = 8 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {batch_size}")
    job = Job(args.out)
    stored = None
    if ranks.broadcast(job.exists() if ranks.rank == 0 else None):  # rank 0's view, before it writes anything
        if not args.resume:
            raise JobError(f"{args.out} already holds a job (manifest.json); pass --resume to continue it, or choose "
                           "another --out. Nothing was changed.")
        stored = job.load()
        stored["config"].setdefault("precision", "fp32")  # jobs from before the option ran in fp32
    elif args.resume and not args.inputs:
        raise JobError(f"--resume: {args.out} holds no job (no manifest.json) and no INPUTS were given")
    checkpoint = args.checkpoint or (stored["generator"]["source"] if stored else None)
    if not checkpoint:
        raise JobError("--checkpoint is required (a rosinality-format .pt), or --demo for the embedded default")
    settings = _settings(args, stored["config"] if stored else None)
    device = _device(args, ranks)
    g = load_generator(checkpoint, device=device).requires_grad_(False)
    gen_info = {"source": str(Path(checkpoint).resolve()), "sha256": weights_hash(g)[:32], "size": g.size}
    direction = None
    if settings["direction"]:
        direction = load_direction(settings["direction"], settings["direction_index"])
        apply_direction(torch.zeros(1, g.n_latent, g.style_dim), direction, 1.0,
                        parse_layers(settings["edit_layers"], g.n_latent))  # shape check before any work

    # rank 0 sets the job up; the others wait for its verdict.
    error = None
    if ranks.rank == 0:
        try:
            items = expand_inputs(args.inputs) if args.inputs else None
            if stored is not None:
                job.check_matches(items, gen_info, settings)
                remove_stale_temporaries(job.root)
                validate_items(job.pending(), g.size)
            else:
                validate_items(items, g.size)
                job.create(items, gen_info, settings)
            inverter = _make_inverter(g, settings, args)
            inverter.sncd_loss()  # anchors computed once, cached for the other ranks
        except (JobError, FileNotFoundError, ValueError) as exc:
            error = str(exc)
    error = ranks.broadcast(error)
    if error is not None:
        raise JobError(error)
    if ranks.rank != 0:
        job.load()
        inverter = _make_inverter(g, settings, args)
    pending = ranks.broadcast([it.id for it in job.pending()] if ranks.rank == 0 else None)
    by_id = {it.id: it for it in job.items}
    mine = ranks.shard([by_id[i] for i in pending])
    n_total = len(job.items)

    bar = _progress(len(mine) * settings["steps"], not args.no_progress and ranks.rank == 0,
                    f"rank {ranks.rank}/{ranks.world}" if ranks.distributed else "lsap-invert")
    t0 = time.perf_counter()
    fmt = settings["format"]
    merged = time.monotonic()
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        x = load_items(batch, g.size)

        def step(i, stats, n=len(batch)):
            bar.update(n)
            _show_stats(bar, i, settings["steps"], stats)

        res = inverter.invert(x, callback=step)
        edits = {}
        if direction is not None:
            layers = parse_layers(settings["edit_layers"], g.n_latent)
            stem = Path(settings["direction"]).stem
            with torch.no_grad(), generator_precision(g, settings["precision"]):  # as the reconstructions
                for s in settings["strength"]:
                    edited = apply_direction(res.latents, direction.to(res.latents), s, layers)
                    edits[f"{stem}_{s:+g}"] = g.synthesis(edited, noise=res.noises)
        for k, it in enumerate(batch):
            record = {"loss": res.loss[k].item(), "mse": res.mse[k].item(), "psnr": res.psnr[k].item(),
                      "sncd": res.sncd[k].item(), **({"lpips": res.lpips[k].item()} if res.lpips is not None else {}),
                      "steps": res.steps, "seed": res.seeds[k], "rank": ranks.rank}
            job.write_result(it, record, _png_writer(res.images[k]), res.latents[k], [n[k] for n in res.noises],
                             {name: _png_writer(img[k]) for name, img in edits.items()}, fmt)
        if ranks.rank == 0 and time.monotonic() - merged > 30:  # keep metrics.jsonl current on long jobs
            job.merge_metrics()
            merged = time.monotonic()
    bar.close()
    seconds = time.perf_counter() - t0
    ranks.barrier()
    if ranks.rank == 0:
        records = job.merge_metrics()
        grid_path = write_grid(job, g.size, args.grid_max)
        mean = lambda key: sum(r[key] for r in records) / max(len(records), 1)  # noqa: E731
        print(f"lsap-invert: {len(records)}/{n_total} images done ({len(pending)} this run, {n_total - len(pending)} "
              f"already finished); mean PSNR {mean('psnr'):.2f} dB, mean SNCD {mean('sncd'):.4f}; rank 0: "
              f"{len(mine) * settings['steps'] / max(seconds, 1e-9):.1f} image-steps/s on {device} "
              f"({', '.join(f'{k}={v}' for k, v in backends_used(device, precision=settings['precision']).items())}, "
              f"{settings['precision']})")
        print(f"wrote {job.root / 'metrics.jsonl'}" + (f" and {grid_path}" if grid_path else ""))
    return 0 if len(job.pending()) == 0 or ranks.rank != 0 else 1


# ---- the embedded default ------------------------------------------------------------------------------
DEMO_SIZE, DEMO_STYLE_DIM, DEMO_CHANNELS = 32, 64, {4: 64, 8: 64, 16: 32, 32: 32}
DEMO_STEPS, DEMO_BATCH, DEMO_ANCHOR_SAMPLES = 120, 6, 20_000


def demo_generator(seed: int = 0, device: str | torch.device = "cpu"):
    """The inversion demo's seeded random-weight generator (32², W of 64 dims, no download), noise strength 0.1."""
    from ..models import Generator

    torch.manual_seed(seed)
    g = Generator(DEMO_SIZE, style_dim=DEMO_STYLE_DIM, n_mlp=4, channels=DEMO_CHANNELS)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.1)
    return g.to(device).eval().requires_grad_(False)


@torch.no_grad()
def demo_targets(g, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's target images [batch, 3, R, R] (clamped to [-1, 1]) and their true W codes: mapped z and fresh
    noise maps from the stream seeded ``seed + 1``, rendered by ``g`` in its own precision."""
    rng = torch.Generator().manual_seed(seed + 1)
    device = g.latent_avg.device
    w_true = g.mapping(torch.randn(batch, g.style_dim, generator=rng).to(device))
    noise = [n.to(device) for n in g.make_noise(batch, generator=rng)]
    return g.synthesis(w_true, noise=noise).clamp(-1, 1), w_true


def run_demo(args) -> int:
    from ..metrics import SNCD, cached_anchors

    if args.inputs or args.checkpoint or args.resume:
        raise JobError("--demo takes no INPUTS, --checkpoint or --resume: it makes its own generator and targets")
    t_start = time.perf_counter()
    seed = args.seed if args.seed is not None else 0
    device = _device(args, Ranks())
    g = demo_generator(seed, device)
    steps = args.steps or DEMO_STEPS
    batch = DEMO_BATCH if args.batch_size is None else args.batch_size
    if batch < 1:
        raise JobError(f"--batch-size must be >= 1, got {batch}")
    anchors = cached_anchors(g, args.sncd_layers or "lsap", n_samples=args.anchor_samples or DEMO_ANCHOR_SAMPLES,
                             cache_dir=False)
    targets, w_true = demo_targets(g, batch, seed)
    with torch.no_grad():
        true_sncd = SNCD(g, layers=args.sncd_layers or "lsap", anchors=anchors)(w_true)
    lam = args.sncd_weight if args.sncd_weight is not None else DEFAULTS["sncd_weight"]
    precision = args.precision or DEFAULTS["precision"]
    common = dict(space=args.space or "w+", steps=steps, lr=args.lr or DEFAULTS["lr"], anchors=anchors,
                  sncd_layers=args.sncd_layers or "lsap", seed=seed, precision=precision, compile=args.compile)
    runs = {}
    for label, weight in ((f"projector (λ=0)", 0.0), (f"LSAP_O (λ={lam:g})", lam)):
        bar = _progress(steps * batch, not args.no_progress, label)

        def step(i, stats):
            bar.update(batch)
            _show_stats(bar, i, steps, stats)

        runs[label] = Inverter(g, sncd_weight=weight, **common).invert(targets, callback=step)
        bar.close()
    out = Path(args.out)
    save_png(grid(torch.cat([targets] + [r.images for r in runs.values()]), ncol=batch), out / "demo_grid.png")
    used = backends_used(device, precision=precision)
    backend = ", ".join(f"{k}={v}" for k, v in used.items())
    rows = [{"codes": "true codes (targets)", "psnr": math.inf, "sncd": true_sncd.mean().item()}]
    rows += [{"codes": label, "psnr": r.psnr.mean().item(), "sncd": r.sncd.mean().item(),
              "image_steps_per_s": r.image_steps_per_s} for label, r in runs.items()]
    total = time.perf_counter() - t_start
    summary = {"generator": {"size": g.size, "style_dim": g.style_dim, "channels": DEMO_CHANNELS, "seed": seed},
               "batch": batch, "steps": steps, "device": str(device), "precision": precision, "backends": used,
               "rows": rows, "seconds": total}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"LSAP_O inversion of {batch} images of a seeded random-weight {g.size}² generator, {steps} Adam steps "
          f"in {common['space'].upper()}, on {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + (", synthesis in bf16" if precision == "bf16" else ""))
    print(f"{'codes':24s} {'PSNR dB':>8s} {'SNCD':>8s} {'img-steps/s':>12s}  backend")
    for r in rows:
        speed = f"{r['image_steps_per_s']:12.1f}" if "image_steps_per_s" in r else f"{'':12s}"
        print(f"{r['codes']:24s} {r['psnr']:8.2f} {r['sncd']:8.4f} {speed}  {backend if 'image_steps_per_s' in r else ''}")
    print(f"wrote {out / 'demo_grid.png'} (rows: targets, projector, LSAP_O) and {out / 'demo.json'} in {total:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.demo and (args.device or "cpu").startswith("cpu") and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        return run_demo(args) if args.demo else run_job(args)
    except (JobError, FileNotFoundError, ValueError) as exc:
        print(f"lsap-invert: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
