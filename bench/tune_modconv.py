"""Tune the Triton modulated-conv kernels' block configs on this GPU and write the table that
lsap_kernels/ops/modconv/triton_tuning.py seeds (copy DIR/triton_tuned.json over lsap_kernels/ops/modconv/).

    python bench/tune_modconv.py [--out DIR] [--size 1024] [--batch 16] [--precision bf16] [--layers ...]
                                 [--budget-s 300] [--retune]

Every autotuned kernel of each layer's forward+backward (inversion gradients) benchmarks every fitting config of
the wide lists (LSAP_TRITON_AUTOTUNE=wide). Shapes already in the committed table are skipped unless --retune, so
a run cut short resumes. After each layer it rewrites DIR/triton_tuned.json (the committed table plus this GPU's
choices) and tune_modconv.json/.md: per kernel and shape, every config's time, the best one, and the best of the
first four (what autotuning without the table would have tried). Default layers: those from 64² on, largest first,
whose device time dominates a step (the smaller ones are host-bound). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["LSAP_TRITON_AUTOTUNE"] = "wide"  # read at import by triton_fwd
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import common  # noqa: E402
from profile_layers import layer_call  # noqa: E402
from suite import layer_specs  # noqa: E402


def describe(config) -> str:
    return " ".join(f"{k}{v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"


def record_benchmarks(kernels: dict) -> list[tuple]:
    """Wrap each autotuner's run so that every benchmark is logged as (kernel, shape key, configs_timings) when it
    happens: one layer call may tune one kernel at several keys (the FIR pass runs as the forward's epilogue and as
    its adjoint), and the autotuner keeps only the last timings. A new key whose timings object did not change came
    from the committed table."""
    log = []
    for kname, kernel in kernels.items():
        def recording(*args, _run=kernel.run, _kernel=kernel, _name=kname, **kwargs):
            keys, timings = set(_kernel.cache), getattr(_kernel, "configs_timings", None)
            launched = _run(*args, **kwargs)
            new, now = set(_kernel.cache) - keys, getattr(_kernel, "configs_timings", None)
            if new and now is not None and now is not timings:
                log.append((_name, next(iter(new)), now))
            return launched
        kernel.run = recording  # the launch site looks run up on the instance
    return log


def benchmark_row(kname: str, key, timings: dict) -> dict:
    ms = {c: t[0] if isinstance(t, (list, tuple)) else t for c, t in timings.items()}
    best = min(ms, key=ms.get)
    default = min(list(ms)[:4], key=ms.get)  # the wide lists extend the default ones: their first 4 fitting
    return dict(kernel=kname, key=list(key), configs=len(ms), best=describe(best), best_ms=ms[best],
                first4_best=describe(default), first4_ms=ms[default], gain=ms[default] / ms[best],
                timings={describe(c): t for c, t in ms.items()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--layers", nargs="+", default=None, help="default: every layer with output 64² or larger")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=300, help="no new layer after this")
    p.add_argument("--retune", action="store_true", help="tune shapes the committed table already holds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_modconv.py needs a CUDA GPU")
    if args.retune:
        os.environ["LSAP_TRITON_TUNED"] = "0"
    from lsap_kernels.ops.modconv import triton_tuning

    t_start = time.perf_counter()
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = baselines.lsap_generator(baselines.rosinality_generators(args.size)[0].state_dict(), args.size).cuda()
    specs = layer_specs(g)
    # largest first: a run cut short has tuned the layers that take the most device time
    names = args.layers or [s["layer"] for s in sorted(specs, key=lambda s: -s["res_out"]) if s["res_out"] >= 64]
    kernels = triton_tuning.autotuned_kernels()
    benchmarks = record_benchmarks(kernels)
    device_name = torch.cuda.get_device_name()
    rows = []
    for name in names:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget: stopped before {name}")
            break
        call, spec = layer_call(g, name, args.batch, dtype, "cuda")
        t0 = time.perf_counter()
        call()  # every kernel this layer launches tunes its shape now (or finds it in the table)
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - t0
        rows += [dict(layer=name, **benchmark_row(*b)) for b in benchmarks]
        benchmarks.clear()
        print(f"[{time.perf_counter() - t_start:6.0f}s] {name}: {tune_s:.1f} s", flush=True)
        table = triton_tuning.load_table()
        table[device_name] = triton_tuning.merge(table.get(device_name, {}), triton_tuning.export(kernels))
        tmp = out / "triton_tuned.json.tmp"
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        tmp.replace(out / "triton_tuned.json")
        write_report(out, env, args, rows)


def write_report(out: Path, env: dict, args, rows: list[dict]) -> None:
    meta = {**env, "size": args.size, "batch": args.batch, "precision": args.precision}
    tmp = out / "tune_modconv.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out / "tune_modconv.json")
    lines = [f"# tune_modconv — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}; {args.size}² layers, batch {args.batch}, "
             f"{args.precision}, forward+backward. Times: Triton's autotuning benchmark (median), one kernel launch.",
             "", "| layer | kernel | configs | best | ms | best of the first 4 | ms | gain |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | `{r['kernel']}` | {r['configs']} | {r['best']} | {r['best_ms']:.4f} | "
                     f"{r['first4_best']} | {r['first4_ms']:.4f} | {r['gain']:.2f}× |")
    (out / "tune_modconv.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
