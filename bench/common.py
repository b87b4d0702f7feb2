"""Shared benchmark plumbing: environment record, timing, bandwidth ceiling, kernel counting, result files."""
from __future__ import annotations

import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lsap_kernels import backends

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device name, versions and git commit: every result file carries them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=RESULTS.parent, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        device = f"{cpu} ({torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "commit": commit, "commit_dirty": dirty,
            "date": datetime.date.today().isoformat()}


def results_dir(env: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"].split("(")[0]).strip("-").lower()
    return RESULTS / f"{slug}-{env['date']}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: str, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.2,
            max_seconds: float | None = None, host_ms: list | None = None) -> float:
    """Median milliseconds of ``step(i)`` (i rotates input sets) after warm-up; CUDA events on the GPU.

    At least ``repeats`` calls (more until ``min_seconds``, at most 10·repeats); with ``max_seconds``, stop once
    that much time has gone and at least 3 calls were timed. On the GPU, ``host_ms`` (a list) receives each call's
    host time, until ``step`` returned: close to the event time, the call is bound by the host's launches."""
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    start = time.perf_counter()
    i = 0
    while i < repeats or (time.perf_counter() - start < min_seconds and i < 10 * repeats):
        if max_seconds is not None and i >= 3 and time.perf_counter() - start > max_seconds:
            break
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t = time.perf_counter()
            step(i)
            if host_ms is not None:
                host_ms.append((time.perf_counter() - t) * 1e3)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t) * 1e3)
        i += 1
    return statistics.median(times)


def graph_ms(step, n_sets: int, repeats: int = 5) -> float:
    """Device milliseconds per ``step`` call with no host time in it: step(0) … step(n_sets − 1) captured once as a
    CUDA graph (after a warm-up on a side stream, as capture requires), then the replay timed with CUDA events,
    median of ``repeats`` replays over n_sets. What a layer costs inside a graphed step (Inverter(compile=True)),
    and the kernels' own speed where an eager call is bound by its host time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_sets):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(n_sets):
                step(i)
        graph.replay()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / n_sets)
        return statistics.median(times)
    finally:
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device-memory (or RAM) copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / (ms / 1e3)


def cpu_conv_rate(dtype: torch.dtype = torch.float32, repeats: int = 8) -> float:
    """FLOP/s of a large channels_last 3×3 convolution (oneDNN, 256→256 channels at 64², batch 4) in ``dtype``,
    median after warm-up (the first calls pay oneDNN's primitive creation and first-touch page faults): the
    practical compute ceiling of a CPU run (SPEC §6)."""
    x = torch.randn(4, 256, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype)
    flops = 2 * 9 * 256 * 256 * 64 * 64 * 4
    ms = time_ms(lambda i: torch.nn.functional.conv2d(x, w, padding=1), "cpu", warmup=4, repeats=repeats,
                 min_seconds=0)
    return flops / ms * 1e3


def kernel_launches(step, device: str) -> dict[str, int] | None:
    """Device kernels launched by one ``step``, by kernel name (GPU only)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(1)
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def kernel_backends(op: str, device: str, dtype: torch.dtype) -> list[str]:
    """The non-reference backends the registry can run ``op`` with here (Triton's CPU interpreter excluded)."""
    out = []
    for name in backends.BACKENDS:
        if name == "reference" or (name == "triton" and device == "cpu"):
            continue
        try:
            backends.select(op, torch.device(device), dtype, backend=name)
        except backends.BackendError:
            continue
        out.append(name)
    return out


def random_style_inputs(layout, batch: int, dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    styles = (torch.randn(batch, layout.total_channels, generator=g) + 0.5).to(device=device, dtype=dtype)
    anchors = (0.05 * torch.randn(layout.total_channels, generator=g)).to(device)
    return styles, anchors


def write_results(out: Path, name: str, env: dict, meta: dict, rows: list[dict], columns: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**env, **meta, "rows": rows}, indent=2))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# {name} — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit {env['commit']}"
             f"{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}", "",
             *[f"- {k}: {fmt(v)}" for k, v in meta.items()], "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
