"""Block configs of the Triton kernels measured per GPU model and committed (``triton_tuned.json``), so a fresh
machine skips benchmarking the layer shapes we know: a first 1024² step otherwise spends ~90 s autotuning.

The table maps a device name (``torch.cuda.get_device_name``) to {kernel: [[key, config], ...]}, where key is the
kernel's key arguments and its activations' dtype (``CachedAutotuner.table_key``) and config the block sizes, warps
and stages autotuning picked. ``bench/tune_modconv.py`` writes it; shapes not in it autotune at their first call.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .triton_fwd import INTERPRET, triton

TABLE = Path(__file__).with_name("triton_tuned.json")
_seeded: set[int] = set()


def autotuned_kernels() -> dict:
    """{name: Autotuner} of every autotuned kernel of this backend."""
    from . import triton_bwd, triton_fwd
    return {k.base_fn.__name__: k for k in (triton_fwd._modconv_fwd_kernel, triton_fwd._fir_epilogue_kernel,
                                            triton_bwd._skip_bwd_kernel,
                                            triton_bwd._dgrad_kernel, triton_bwd._wgrad_kernel)}


def config_to_json(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_json(entry: dict):
    return triton.Config(dict(entry["kwargs"]), num_warps=entry["num_warps"], num_stages=entry["num_stages"])


def export(kernels: dict | None = None) -> dict:
    """{kernel: [[key, config], ...]}: what the autotuners hold now, seeded or tuned in this process (which wins)."""
    kernels = autotuned_kernels() if kernels is None else kernels
    out = {}
    for name, k in kernels.items():
        rows = {**k.table, **{k.table_key(key): cfg for key, cfg in k.cache.items()}}
        if rows:
            out[name] = [[list(key), config_to_json(cfg)]
                         for key, cfg in sorted(rows.items(), key=lambda kv: str(kv[0]))]
    return out


def merge(entries: dict, newer: dict) -> dict:
    """One device's table entries with ``newer``'s added, a shape key in both taking ``newer``'s config (a retuning
    run of a few layers keeps every other layer's entries)."""
    out = {}
    for name in sorted(set(entries) | set(newer)):
        rows = {json.dumps(key): [key, config] for key, config in entries.get(name, []) + newer.get(name, [])}
        out[name] = sorted(rows.values(), key=lambda row: str(tuple(row[0])))
    return out


def seed(entries: dict, kernels: dict | None = None) -> int:
    """Put a device's table entries into the autotuners' tables (entries already there are kept). Returns how many
    were added."""
    kernels = autotuned_kernels() if kernels is None else kernels
    added = 0
    for name, rows in entries.items():
        kernel = kernels.get(name)
        if kernel is None:  # a kernel renamed or removed since the table was written
            continue
        for key, config in rows:
            key = kernel.table_key(key)  # (also cuts a whole Autotuner key, as older tables hold)
            if key not in kernel.table:
                kernel.table[key] = config_from_json(config)
                added += 1
    return added


def usage(kernels: dict | None = None) -> dict:
    """{kernel: {"from_table": table entries launched, "autotuned": shape keys benchmarked}} in this process, so a
    GPU run shows whether the committed configs were used (bench/suite.py reports it)."""
    kernels = autotuned_kernels() if kernels is None else kernels
    out = {}
    for name, k in kernels.items():
        launched = set()
        for key, (config, _) in getattr(k, "chosen", {}).items():  # (none under the interpreter)
            if k.table.get(key := k.launch_table_key(key)) is config:
                launched.add(key)
        out[name] = {"from_table": len(launched), "autotuned": len(k.cache)}
    return out


def load_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def seed_for(device: torch.device) -> None:
    """Seed the committed configs of this device's GPU model, once per device (a set lookup afterwards).
    LSAP_TRITON_TUNED=0 leaves them out (every shape autotunes, as the tuning run needs)."""
    if INTERPRET or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _seeded:
        return
    _seeded.add(index)
    if os.environ.get("LSAP_TRITON_TUNED") != "0":
        seed(load_table().get(torch.cuda.get_device_name(index), {}))
