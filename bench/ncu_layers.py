"""Hardware counters of our Triton kernels in the largest config-f 1024² layers (Nsight Compute): why a kernel runs
below its memory floor — DRAM and SM throughput, L1/L2 hit rates, occupancy, issue activity and the warps' main
stall reasons, per kernel of one forward+backward (inversion gradients) of each layer.

    python bench/ncu_layers.py [--out DIR] [--layers convs.15 convs.14 to_rgbs.7] [--batch 16] [--precision bf16]
                               [--timeout 120]

For each layer one process runs under ``ncu --set full --clock-control none`` (the clocks as they are, METHOD.md)
and profiles only the kernels of one call after warm-up (cudaProfilerStart/Stop; kernel names starting with "_":
ours). The report is exported, then read back as ncu's raw page (every metric) into ncu_<layer>.csv; the
summary goes to ncu_layers.md, both in DIR (default bench/results/<device>-<date>/); the binary report is deleted.
GPU only, and only where ncu can read the counters (Firecracker machines; on gVisor ncu fails to load its library:
the summary then says so).
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_LAYERS = ["convs.15", "convs.14", "to_rgbs.7"]
# (column, metric): what the summary shows of each kernel, where ncu reported it
SUMMARY = [
    ("µs", "gpu__time_duration.sum"),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L1 hit %", "l1tex__t_sector_hit_rate.pct"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("theoretical %", "sm__maximum_warps_per_active_cycle_pct"),
    ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("registers", "launch__registers_per_thread"),
]
# warps stalled per issued instruction, by reason (WarpStateStats); else PC samples per reason (SourceCounters)
STALLS = [re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$"),
          re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+?)$")]
TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def parse_raw_csv(text: str) -> list[dict]:
    """ncu's ``--csv --page raw`` output -> one dict per profiled kernel: "name", "grid", "block", every metric as a
    float (time metrics in µs), and "stalls": [(reason, warps stalled per issued instruction, or PC samples where
    ncu reported only those)], largest first. Lines that are not CSV rows (ncu's messages) are skipped."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    units = body.pop(0) if body and not body[0][0].strip().isdigit() else [""] * len(header)  # the units row
    kernels = []
    for row in body:
        k = {"name": row[header.index("Kernel Name")], "grid": row[header.index("Grid Size")],
             "block": row[header.index("Block Size")]}
        for name, unit, value in zip(header, units, row):
            try:
                k[name] = float(value.replace(",", "")) * TIME_UNITS.get(unit, 1.0)
            except ValueError:
                continue
        for stall in STALLS:
            k["stalls"] = sorted(((m.group(1), k[name]) for name in header
                                  if (m := stall.match(name)) and name in k and not name.endswith("_not_issued")),
                                 key=lambda s: -s[1])
            if k["stalls"]:
                break
        kernels.append(k)
    return kernels


def summary_table(kernels: list[dict], top_stalls: int = 4) -> list[str]:
    cols = [c for c, metric in SUMMARY if any(metric in k for k in kernels)]
    lines = ["| kernel | grid | block | " + " | ".join(cols) + " | main stalls |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    for k in kernels:
        cells = [f"{k[m]:.4g}" if m in k else "" for c, m in SUMMARY if c in cols]
        stalls = ", ".join(f"{r} {v:.2f}" for r, v in k["stalls"][:top_stalls])
        lines.append(f"| `{k['name']}` | {k['grid']} | {k['block']} | " + " | ".join(cells) + f" | {stalls} |")
    return lines


def child(layer: str, batch: int, precision: str) -> None:
    """Runs under ncu: warm up (autotuning, compilation), then one profiled call."""
    import torch

    import baselines
    from profile_layers import layer_call
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = baselines.lsap_generator(baselines.rosinality_generators(1024)[0].state_dict(), 1024).to("cuda")
    call, _ = layer_call(g, layer, batch, dtype, "cuda")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--timeout", type=float, default=120, help="seconds per layer")
    p.add_argument("--ncu", default="ncu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.batch, args.precision)
    import common
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# ncu_layers — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}; batch {args.batch}, {args.precision}, "
             "one forward+backward (inversion gradients) per layer under `ncu --set full --clock-control none`, "
             "our kernels only. Percentages of peak; stalls: warps stalled per issued instruction, by reason (or PC "
             "samples per reason where ncu gave only those).", ""]
    for layer in args.layers:
        report, table = out / f"ncu_{layer}.ncu-rep", out / f"ncu_{layer}.csv"
        profile = [args.ncu, "--clock-control", "none", "--profile-from-start", "off", "--kernel-name", "regex:^_",
                   "--set", "full", "--export", str(report), "--force-overwrite",
                   sys.executable, __file__, "--child", layer, "--batch", str(args.batch),
                   "--precision", args.precision]
        read_back = [args.ncu, "--import", str(report), "--page", "raw", "--csv", "--print-units", "base"]
        t0 = time.time()
        try:
            res = subprocess.run(profile, capture_output=True, text=True, timeout=args.timeout)
            status, tail = f"exit {res.returncode}", (res.stdout + res.stderr)[-600:]
            if report.exists():
                table.write_text(subprocess.run(read_back, capture_output=True, text=True, timeout=60).stdout)
                report.unlink()  # binary, several MB: the CSV holds every metric
        except (OSError, subprocess.SubprocessError) as e:
            status, tail = type(e).__name__, str(e)[-600:]
        kernels = parse_raw_csv(table.read_text()) if table.exists() else []
        lines += [f"## {layer}", "", f"- {status}, {time.time() - t0:.0f} s, {len(kernels)} kernels profiled", ""]
        lines += summary_table(kernels) if kernels else ["```", tail.strip(), "```"]
        lines.append("")
        (out / "ncu_layers.md").write_text("\n".join(lines) + "\n")  # after every layer: a time box keeps them
    print("\n".join(lines))


if __name__ == "__main__":
    main()
