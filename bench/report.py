"""The suite's Markdown tables and its one multi-panel PNG (bench/README.md explains every column)."""
from __future__ import annotations

from collections import defaultdict

E2E_COLS = ["size", "precision", "batch", "provider", "ms", "host_ms", "img_steps_per_s", "TFLOP_per_s", "GB_per_s",
            "floor_ms", "bound", "fraction_of_floor", "peak_MB_per_image", "vs_a", "vs_b", "vs_c", "vs_ref", "compile_s",
            "rel_err"]
LAYER_COLS = ["layer", "shape", "provider", "ms", "host_ms", "graph_ms", "graph_vs_best", "TFLOP_per_s", "GB_per_s",
              "floor_ms", "bound", "fraction_of_floor", "vs_a", "vs_b", "vs_c", "vs_ref", "compile_s", "rel_err"]
SUM_COLS = ["precision", "batch", "direction", "provider", "layers", "ms", "floor_ms", "fraction_of_floor", "vs_a",
            "vs_b", "vs_c", "vs_ref", "graph_ms", "graph_floor_fraction", "graph_vs_best"]
GRAPH_BASELINES = ("(a) grouped conv", "(b) input scaling")
SNCD_COLS = ["precision", "batch", "provider", "ms", "host_ms", "GB_per_s", "floor_ms", "fraction_of_floor", "vs_a",
             "vs_c", "vs_ref", "compile_s", "rel_err"]
BASELINE_OF = {"vs_a": ("(a) grouped conv", "(a) per-layer loop"), "vs_b": ("(b) input scaling",),
               "vs_c": ("(c) torch.compile(a)", "(c) torch.compile(b)", "(c) torch.compile(per-layer loop)"),
               "vs_ref": ("ours: reference",)}


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(rows, cols) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]


def headline_keys(meta):
    plan = meta["plan"]
    return (plan["sizes"][0], plan["batches"][0], plan["precisions"][0]), (plan["precisions"][0],
                                                                           plan["op_batches"][0], "fwd+bwd")


def layer_sums(rows) -> list[dict]:
    """Per (precision, batch, direction, provider): time and floor summed over the layers it ran; its ratio to each
    baseline (per layer the fastest of that column's providers) over the layers both ran."""
    groups = defaultdict(list)
    for r in rows:
        if r["section"] == "modconv":
            groups[(r["precision"], r["batch"], r["direction"], r["provider"])].append(r)
    out = []
    for (precision, batch, direction, provider), rs in groups.items():
        ok = {r["layer"]: r for r in rs if r["status"] == "ok"}
        if not ok:
            continue
        row = dict(precision=precision, batch=batch, direction=direction, provider=provider,
                   layers=f"{len(ok)}/{len(rs)}", ms=sum(r["ms"] for r in ok.values()),
                   floor_ms=sum(r["floor_ms"] for r in ok.values()))
        row["fraction_of_floor"] = row["floor_ms"] / row["ms"]
        for col, names in BASELINE_OF.items():
            if provider in names:
                continue
            base_ok = {}
            for n in names:
                for r in groups.get((precision, batch, direction, n), []):
                    if r["status"] == "ok":
                        base_ok[r["layer"]] = min(base_ok.get(r["layer"], float("inf")), r["ms"])
            common = [k for k in ok if k in base_ok]
            if common:
                row[col] = sum(base_ok[k] for k in common) / sum(ok[k]["ms"] for k in common)
        graphed = {k: r["graph_ms"] for k, r in ok.items() if "graph_ms" in r}
        if graphed and len(graphed) == len(ok):
            row["graph_ms"] = sum(graphed.values())
            row["graph_floor_fraction"] = row["floor_ms"] / row["graph_ms"]
        best = {}  # per layer, the faster graphed baseline
        for name in GRAPH_BASELINES:
            for r in groups.get((precision, batch, direction, name), []):
                if r["status"] == "ok" and "graph_ms" in r:
                    best[r["layer"]] = min(best.get(r["layer"], float("inf")), r["graph_ms"])
        both = [k for k in graphed if k in best]
        if both and provider not in GRAPH_BASELINES:
            row["graph_vs_best"] = sum(best[k] for k in both) / sum(graphed[k] for k in both)
        out.append(row)
    return out


def ratio_text(r) -> str:
    parts = [f"{r[c]:.2f}x {names[0].split(' ')[0] if c != 'vs_ref' else 'reference'}"
             for c, names in BASELINE_OF.items() if r.get(c)]
    return ", ".join(parts)


def headline(meta, rows) -> list[str]:
    (size, batch, precision), (op_prec, op_batch, op_dir) = headline_keys(meta)
    out = [f"## Headline: {size}², batch {batch}, {precision}", "",
           "Ratios are the baseline's time over ours (> 1: ours is faster; < 1: ours loses to that baseline).", ""]
    e2e = [r for r in rows if r["section"] == "e2e" and (r["size"], r["batch"], r["precision"]) == (size, batch,
                                                                                                   precision)]
    for r in e2e:
        if r["provider"].startswith("ours: ") and r["provider"] != "ours: reference" and r["status"] == "ok":
            out.append(f"- end to end, {r['provider']}: {r['img_steps_per_s']:.3g} image-steps/s, "
                       f"{100 * r['fraction_of_floor']:.0f} % of the {r['bound']} floor; {ratio_text(r)}")
    if not any(line.startswith("- end to end") for line in out):
        out.append("- end to end: no kernel backend row ran (see the table and 'Not run')")
    for r in layer_sums(rows):
        if (r["precision"], r["batch"], r["direction"]) == (op_prec, op_batch, op_dir) \
                and r["provider"].startswith("ours: ") and r["provider"] != "ours: reference":
            graphed = (f"; as CUDA graphs (device time) {r['graph_ms']:.3g} ms, "
                       f"{100 * r['graph_floor_fraction']:.0f} % of the floors" if r.get("graph_ms") else "")
            if r.get("graph_vs_best"):
                graphed += f", {r['graph_vs_best']:.2f}x the faster of (a)/(b) graphed, layer by layer"
            out.append(f"- every layer ({op_dir}, batch {op_batch}, {op_prec}, summed), {r['provider']}: "
                       f"{r['ms']:.3g} ms for {r['layers']} layers, {100 * r['fraction_of_floor']:.0f} % of the "
                       f"floors; {ratio_text(r)}{graphed}")
    return out + [""]


def markdown(env, meta, rows) -> str:
    fl = meta["floors"]
    rates = ", ".join(f"{p} {v / 1e12:.3g} TFLOP/s" for p, v in fl.get("flops_per_s", {}).items())
    lines = [f"# Benchmark suite — {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, Python {env['python']}, commit "
             f"{env['commit']}{' (dirty)' if env['commit_dirty'] else ''}, {env['date']}", "",
             f"- plan: {meta['mode']}; {meta['elapsed_s']:.0f} s of a {meta['plan']['budget_s']} s budget; "
             f"{meta['threads']} CPU threads; THP_MEM_ALLOC_ENABLE={meta['THP_MEM_ALLOC_ENABLE']}; 1-minute load "
             f"average at start and end: {', '.join(f'{v:.1f}' for v in meta.get('load_average_1min', []))}",
             f"- floors measured in this run: copy bandwidth {fl.get('bytes_per_s', 0) / 1e9:.0f} GB/s (read + write); "
             f"compute ({fl.get('compute_rate_measured_by', '')}): {rates}",
             f"- backends: {meta['available_backends']}; modulated_conv2d kernel backends by precision: "
             f"{meta['modconv_kernel_backends']}",
             f"- every timed variant's first {meta['check_samples']} samples were checked against float64 first "
             f"(||err||/||ref|| at most: outputs {meta['tolerances']['outputs']}, end-to-end image "
             f"{meta['tolerances']['e2e_image']}, gradients through leaky ReLU "
             f"{meta['tolerances']['gradients_through_lrelu']}; see bench/README.md)"]
    if meta.get("triton_block_configs"):
        lines.append("- Triton block configs, per kernel: shapes launched with the committed table's config / shapes "
                     "autotuned in this run: " + ", ".join(f"{name} {u['from_table']}/{u['autotuned']}"
                                                          for name, u in meta["triton_block_configs"].items()))
    lines += [""] + headline(meta, rows)
    ok = [r for r in rows if r["status"] == "ok"]
    e2e = [r for r in ok if r["section"] == "e2e"]
    if e2e:
        lines += ["## End to end: one LSAP_O step (synthesis + MSE + 0.5·SNCD, backward to W+ and noise)", ""]
        lines += table(sorted(e2e, key=lambda r: (-r["size"], r["precision"], r["batch"])), E2E_COLS) + [""]
    sums = layer_sums(rows)
    if sums:
        lines += [f"## Modulated convolution layers of the {meta['plan']['layer_size']}² generator, summed over "
                  "layers (each layer's time and floors added up; ratios over the layers both ran)", ""]
        lines += table(sorted(sums, key=lambda r: (r["precision"], r["batch"], r["direction"])), SUM_COLS) + [""]
        _, (op_prec, op_batch, op_dir) = headline_keys(meta)
        layer_rows = [r for r in ok if r["section"] == "modconv"
                      and (r["precision"], r["batch"], r["direction"]) == (op_prec, op_batch, op_dir)]
        lines += [f"## Every layer: {op_dir}, batch {op_batch}, {op_prec}", ""] + table(layer_rows, LAYER_COLS) + [""]
        lines += ["(The other layer groups, row by row, are in suite.json.)", ""]
    sncd = [r for r in ok if r["section"] == "sncd"]
    if sncd:
        lines += ["## Style normalisation + SNCD, forward+backward, 1024² \"all\" layout (26 layers, 9,088 channels)",
                  ""] + table(sncd, SNCD_COLS) + [""]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad or meta["skipped_tasks"]:
        lines += ["## Not run", ""]
        by_status = defaultdict(list)
        for r in bad:
            by_status[r["status"]].append(r)
        for status, rs in by_status.items():
            names = sorted({f"{r['section']} {r['provider']}" for r in rs})
            lines.append(f"- {status}: {len(rs)} rows ({'; '.join(names[:6])}{' …' if len(names) > 6 else ''})")
        if meta["skipped_tasks"]:
            lines.append(f"- tasks not started (budget): {', '.join(meta['skipped_tasks'])}")
    return "\n".join(lines) + "\n"


def plot(rows, meta, env, path) -> str:
    """One PNG with every panel; returns what it did (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok"]
    (size0, batch0, prec0), (op_prec, op_batch, op_dir) = headline_keys(meta)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    panels = []
    for size in meta["plan"]["sizes"]:
        sel = [r for r in ok if r["section"] == "e2e" and r["size"] == size and r["precision"] == prec0]
        if sel:
            panels.append((f"LSAP_O step {size}², {prec0}", "batch", "image-steps/s", sel, "batch",
                           "img_steps_per_s", True))
    sel = [r for r in ok if r["section"] == "e2e" and r["size"] == size0 and r["precision"] == prec0]
    if sel and any(r.get("peak_MB_per_image") for r in sel):
        panels.append((f"peak memory per image, {size0}², {prec0}", "batch", "MB / image", sel, "batch",
                       "peak_MB_per_image", True))
    elif sel:
        panels.append((f"LSAP_O step {size0}², {prec0}: fraction of floor", "batch", "floor / time", sel, "batch",
                       "fraction_of_floor", True))
    layers = [r for r in ok if r["section"] == "modconv"
              and (r["precision"], r["batch"], r["direction"]) == (op_prec, op_batch, op_dir)]
    if layers:
        panels.append((f"layers {op_dir}, batch {op_batch}, {op_prec}", "layer", "ms", layers, "layer", "ms", False))
        panels.append((f"layers {op_dir}, batch {op_batch}, {op_prec}: fraction of floor", "layer", "floor / time",
                       layers, "layer", "fraction_of_floor", False))
    sncd = [r for r in ok if r["section"] == "sncd" and r["precision"] == meta["plan"]["sncd_precisions"][0]]
    if sncd:
        panels.append((f"style-norm + SNCD fwd+bwd, {sncd[0]['precision']}", "batch", "ms", sncd, "batch", "ms",
                       True))
    if not panels:
        return "nothing measured: no plot written"
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    for ax, (title, xlabel, ylabel, sel, xkey, ykey, logx) in zip(axes.flat, panels):
        xs_all = list(dict.fromkeys(r[xkey] for r in sel))
        for provider in dict.fromkeys(r["provider"] for r in sel):
            pts = [(r[xkey], r[ykey]) for r in sel if r["provider"] == provider and r.get(ykey) is not None]
            if not pts:
                continue
            if logx:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider, color=colors[provider])
            else:
                ax.plot([xs_all.index(p[0]) for p in pts], [p[1] for p in pts], "o-", ms=3, label=provider,
                        color=colors[provider])
        if logx:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(xs_all), [str(x) for x in sorted(xs_all)])
        else:
            ax.set_xticks(range(len(xs_all)), xs_all, rotation=90, fontsize=6)
        if ykey in ("ms", "img_steps_per_s"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{env['device']} — torch {env['torch']}, commit {env['commit']}, {env['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
