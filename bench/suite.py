"""The benchmark suite (SPEC §6): every op and the end-to-end LSAP_O step against the baselines, with floors.

    python bench/suite.py [--cpu] [--out DIR] [--budget-s S] [--sections e2e modconv sncd] [--no-compile]
                          [--layers convs.15 to_rgbs.7 ...]

Writes suite.json (rows + device, versions, commit), suite.md and suite.png into DIR (default
bench/results/<device>-<date>/), rewritten after every task, so a run cut short keeps what it measured.
With CUDA it runs the GPU plan, else (or with --cpu) the small CPU plan; see bench/README.md for every column.

  e2e      one LSAP_O step: synthesis from W+ and noise, per-image MSE to a target + 0.5·SNCD (the "lsap" layers),
           backward to W+ and noise, generator frozen (the optimiser's update is left out)
  modconv  one generator layer (StyledConv or ToRGB: affine, modulated conv, noise, bias, activation, skip), every
           layer of the config-f generator; "fwd" under no_grad, "fwd+bwd" with gradients to x, w, noise/skip
  sncd     style normalisation + SNCD forward+backward on the 1024² "all" layout (26 layers, 9,088 channels)

Providers: (a) rosinality's grouped conv, (b) input scaling (NVIDIA-style), (c) torch.compile of (a) and of (b)
(bench/baselines.py; vs_c: the faster), our reference backend, and every kernel backend the registry reports
available for the device and dtype ("ours: cpu", "ours: triton", "ours: cuda"). Each variant's first call is
checked against a float64 reference (first samples of the batch: every sample's result depends on its own inputs
only), then timed: median of CUDA-event (or wall-clock) times after warm-up, rotating input sets. Work runs in order
of importance (the headline rows first) until the time budget is spent; what was left out is listed in the results.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large CPU tensors (read at torch's first alloc)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import baselines  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402

import lsap_kernels as L  # noqa: E402

A, B, REF = "(a) grouped conv", "(b) input scaling", "ours: reference"
CA, CB = "(c) torch.compile(a)", "(c) torch.compile(b)"
GRAPHED = ", CUDA graphs"  # suffix of our kernel rows run as Inverter(compile=True) runs them on CUDA
LOOP, LOOP_C = "(a) per-layer loop", "(c) torch.compile(per-layer loop)"
VS = {"vs_a": (A, LOOP), "vs_b": (B,), "vs_c": (CA, CB, LOOP_C), "vs_ref": (REF,)}  # several: the fastest
SNCD_WEIGHT = 0.5
CHECK_SAMPLES = 2
# ||err|| / ||ref|| against float64. Outputs: SPEC §5 (the end-to-end image, ~20 layers deep, a little looser).
# Gradients through leaky ReLU are looser: an element whose pre-activation lies within rounding of 0 takes the other
# slope (1 vs 0.2), and that alone gives a relative error of about sqrt(P(flip)) — ~1e-3 in fp32, 3-7 % in bf16
# (tests/test_modconv_cpu.py measures the same for the reference backend); a wrong kernel is off by O(1).
OUT_TOL = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 2e-2}
E2E_OUT_TOL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
GRAD_TOL = {"fp32": 3e-3, "tf32": 3e-2, "bf16": 1.5e-1}
OUTPUTS = ("out", "image", "value")
ROTATE_BYTES = 256 << 20  # rotated input sets span at least this (5x an H100's L2) unless one set is over 1 GiB

PLANS = {
    "gpu": dict(sizes=[1024, 256], batches=[16, 1, 8, 32], precisions=["bf16", "tf32", "fp32"], layer_size=1024,
                op_batches=[16, 1, 64], sncd_batches=[1, 16, 64, 256], sncd_precisions=["fp32", "bf16"],
                budget_s=330, compile_guess_s=60, timing=dict(warmup=2, repeats=5, min_seconds=0.1, max_seconds=1.0)),
    "cpu": dict(sizes=[32], batches=[4, 1], precisions=["fp32", "bf16"], layer_size=32, op_batches=[4, 1],
                sncd_batches=[1, 16, 64, 256], sncd_precisions=["fp32"], budget_s=150, compile_guess_s=90,
                timing=dict(warmup=0, repeats=3, min_seconds=0.0, max_seconds=1.0)),  # the checked call warms up
}


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what there is."""


def compiled_provider(provider: str) -> bool:
    """Rows whose first call compiles: (c) and our CUDA-graph rows."""
    return is_c(provider) or provider.endswith(GRAPHED)


def is_c(provider: str) -> bool:
    return provider.startswith("(c)")


def native_channels_last(provider: str) -> bool:
    """Whether the provider's layers write channels_last activations (our kernel backends do)."""
    return provider.startswith("ours: ") and provider != REF


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def set_tf32(on: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def lsap_loss(img, target, sncd_sum):
    """Σ_b [mean-pixel MSE_b + 0.5·SNCD_b]: per-image terms summed, so a sample's gradient is batch-independent."""
    return (img.to(target.dtype) - target).square().mean((1, 2, 3)).sum() + SNCD_WEIGHT * sncd_sum


def with_backend(fn, *name, **per_op):
    def run(*args):
        with L.use_backend(*name, **per_op):
            return fn(*args)
    return run


# ---- shapes, FLOPs and bytes ------------------------------------------------------------------------------------
def layer_specs(g) -> list[dict]:
    """Every modulated layer of ``g`` in forward order with its shapes."""
    specs = []
    for name, w_index in g.modulated_layers():
        conv = g.get_submodule(name).conv
        _, cout, cin, k, _ = conv.weight.shape
        if name in ("conv1", "to_rgb1"):
            res_out = 4
        elif name.startswith("convs."):
            res_out = 2 ** (int(name.split(".")[1]) // 2 + 3)
        else:
            res_out = 2 ** (int(name.split(".")[1]) + 3)
        specs.append(dict(layer=name, w_index=w_index, cin=cin, cout=cout, k=k, up=conv.up,
                          res_in=res_out // conv.up, res_out=res_out, rgb=name.startswith("to_rgb"),
                          skip=name.startswith("to_rgbs.")))
    return specs


def layer_shape(s: dict) -> str:
    up = f" up {s['res_in']}²→{s['res_out']}²" if s["up"] == 2 else f" {s['res_out']}²"
    return f"{s['cin']}→{s['cout']} {s['k']}x{s['k']}{up}" + (" +skip" if s["skip"] else "")


def layer_work(s: dict, batch: int, elt: int, backward: bool) -> tuple[float, float]:
    """(FLOPs, bytes) floors of one layer: the convolution's multiply-adds (input gradient again when ``backward``:
    weights are frozen; the FIR and epilogue are not counted), and every input read once and every output written
    once (fwd: x, w, weights, noise, bias, skip -> out; bwd adds grad_out -> grad x, w, noise, skip)."""
    flops = 2.0 * batch * s["cin"] * s["cout"] * s["k"] ** 2 * s["res_in"] ** 2
    x = batch * s["cin"] * s["res_in"] ** 2
    out = batch * s["cout"] * s["res_out"] ** 2
    side = batch * s["res_out"] ** 2 if not s["rgb"] else (batch * 3 * (s["res_out"] // 2) ** 2 if s["skip"] else 0)
    weights = s["cout"] * s["cin"] * s["k"] ** 2 * elt + 512 * s["cin"] * 4 + s["cout"] * elt
    nbytes = (x + out + side) * elt + weights + batch * 512 * 4
    if backward:
        flops *= 2
        nbytes += (out + x + side) * elt + batch * 512 * 4
    return flops, nbytes


def sncd_work(layout, batch: int, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) of style-normalise + SNCD fwd+bwd: ~8 FLOPs per style element; forward reads styles and anchors
    and writes [B, L] cosines, backward reads styles, anchors, saved [B, L] cosines/norms and the incoming gradient
    and writes the styles' gradient (the formula of bench/bench_style.py)."""
    c, n_l = layout.total_channels, layout.n_layers
    nbytes = (batch * c * elt + c * 4 + batch * n_l * 8) + (batch * c * elt + c * 4 + batch * n_l * 12 + batch * c * elt)
    return 8.0 * batch * c, nbytes


class Suite:
    def __init__(self, mode: str, args):
        self.mode, self.args = mode, args
        self.plan = {**PLANS[mode], **{k: v for k, v in vars(args).items() if k in PLANS[mode] and v is not None}}
        self.device = "cuda" if mode == "gpu" else "cpu"
        self.env = common.environment()
        self.out = Path(args.out) if args.out else common.results_dir(self.env)
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.start = time.perf_counter()
        self._models, self._compiled, self._refs = {}, {}, {}
        self.compile_s_seen: list[float] = []
        self.floors = {}
        self.load_at_start = os.getloadavg()[0]  # other work on the machine skews CPU timings: recorded

    # ---- budget -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.plan["budget_s"] - self.elapsed()

    def compile_guess(self) -> float:
        return max(self.compile_s_seen) if self.compile_s_seen else self.plan["compile_guess_s"]

    # ---- floors -------------------------------------------------------------------------------------------
    def measure_floors(self) -> None:
        dev = self.device
        self.floors["bytes_per_s"] = common.copy_bandwidth(dev)
        rates = {}
        if dev == "cuda":
            n = 8192
            for precision in self.plan["precisions"] + self.plan["sncd_precisions"]:
                if precision in rates:
                    continue
                set_tf32(precision == "tf32")
                a = torch.randn(n, n, device=dev, dtype=dtype_of(precision))
                b = torch.randn(n, n, device=dev, dtype=dtype_of(precision))
                rates[precision] = 2 * n**3 / common.time_ms(lambda i: a @ b, dev, repeats=10) * 1e3
            how = f"{n}³ matmul"
        else:
            rates["fp32"] = common.cpu_conv_rate(torch.float32, repeats=4)
            how = "256→256 3x3 conv at 64², batch 4, channels_last (oneDNN)"
            if "bf16" in self.plan["precisions"] + self.plan["sncd_precisions"]:
                # without oneDNN bf16 kernels the bf16 paths convolve in fp32: fp32's rate is the ceiling
                onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                rates["bf16"] = common.cpu_conv_rate(torch.bfloat16) if onednn_bf16 else rates["fp32"]
                how += "; bf16 " + ("measured in bf16" if onednn_bf16 else "= fp32's (oneDNN has no bf16 kernels here)")
        self.floors["flops_per_s"] = rates
        self.floors["compute_rate_measured_by"] = how
        print(f"floors: copy {self.floors['bytes_per_s'] / 1e9:.0f} GB/s; "
              + ", ".join(f"{p} {r / 1e12:.3g} TFLOP/s" for p, r in rates.items()), flush=True)

    def add_floor(self, row: dict, flops: float, nbytes: float, precision: str) -> None:
        t_flops = flops / self.floors["flops_per_s"][precision]
        t_bytes = nbytes / self.floors["bytes_per_s"]
        row.update(GFLOP=flops / 1e9, MB=nbytes / 1e6, floor_ms=max(t_flops, t_bytes) * 1e3,
                   bound="compute" if t_flops >= t_bytes else "memory")

    # ---- models -------------------------------------------------------------------------------------------
    def models(self, size: int) -> dict:
        """Generators of one size sharing one set of weights: rosinality (a)/(b) in fp32 and bf16, ours, float64."""
        if size not in self._models:
            grouped, scaling = baselines.rosinality_generators(size)
            sd = grouped.state_dict()
            dev = self.device
            ours = baselines.lsap_generator(sd, size).to(dev)
            m = {"a": {"fp32": grouped.to(dev)}, "b": {"fp32": scaling.to(dev)},
                 "ours": {"fp32": ours, "bf16": baselines.lsap_generator(sd, size, "bf16").to(dev)},
                 "ours64": copy.deepcopy(ours).double()}
            for k in ("a", "b"):
                m[k]["bf16"] = copy.deepcopy(m[k]["fp32"]).to(torch.bfloat16)
            m["layout"] = ours.style_layout("lsap")
            gen = torch.Generator().manual_seed(size)
            m["anchors"] = (0.05 * torch.randn(m["layout"].total_channels, generator=gen)).to(dev)
            self._models[size] = m
        return self._models[size]

    def compiled(self, key, make):
        """torch.compile(make()), once per key. Static shapes: each layer module is one more compile of the same
        code, and dynamo's automatic dynamic shapes then failed inside Inductor for (a)'s grouped conv (torch 2.13)."""
        if key not in self._compiled:
            self._compiled[key] = torch.compile(make(), dynamic=False)
        return self._compiled[key]

    # ---- one provider: check, time, record ------------------------------------------------------------------
    def run(self, row: dict, step, check, out_tol: float, grad_tol: float, peak_memory: bool = False,
            graph_sets: int = 0) -> None:
        """Check ``step(0)``'s outputs (``check`` -> {name: rel. error}), then time ``step``; append ``row``. On CUDA
        with ``graph_sets`` (the number of input sets ``step`` rotates), also its device time as a CUDA graph."""
        print(f"[{self.elapsed():6.1f}s] {row['section']:7s} " + " ".join(
            str(row[k]) for k in ("size", "layer", "precision", "batch", "direction", "provider") if k in row),
            end="", flush=True)
        try:
            t0 = time.perf_counter()
            errors = check(step(0))
            row["first_call_s"] = time.perf_counter() - t0
            if compiled_provider(row["provider"]):
                row["compile_s"] = row["first_call_s"]
                self.compile_s_seen.append(row["compile_s"])
            row["rel_err"] = max(errors.values())
            row["rel_errs"] = errors
            bad = {k: e for k, e in errors.items() if not e <= (out_tol if k in OUTPUTS else grad_tol)}
            calls = self.plan["timing"]["warmup"] + 3 + (peak_memory and self.device == "cuda")
            call_s = row["first_call_s"]
            if not bad and call_s * calls > self.left():
                # a first call may carry one-time work (Triton autotuning, compilation): judge by a second one
                t0 = time.perf_counter()
                step(1)
                common.sync(self.device)
                call_s = time.perf_counter() - t0
            if not bad and call_s * calls > self.left() and not compiled_provider(row["provider"]):
                row["status"] = f"skipped (budget): {self.left():.0f} s left, a call takes {call_s:.1f} s"
            elif bad:
                row["status"] = "check failed: " + ", ".join(
                    f"{k} {e:.2e} > {out_tol if k in OUTPUTS else grad_tol:.0e}" for k, e in bad.items())
            else:
                host = [] if self.device == "cuda" else None
                row["ms"] = common.time_ms(step, self.device, host_ms=host, **self.plan["timing"])
                if host:
                    row["host_ms"] = statistics.median(host)
                row["status"] = "ok"
                row["fraction_of_floor"] = row["floor_ms"] / row["ms"]
                row["TFLOP_per_s"] = row["GFLOP"] / row["ms"]
                row["GB_per_s"] = row["MB"] / row["ms"]
                if row["section"] == "e2e":
                    row["img_steps_per_s"] = row["batch"] / row["ms"] * 1e3
                # a graphed step's memory is the CUDA-graph pool, allocated at capture: not measurable per step here
                if peak_memory and self.device == "cuda" and not row["provider"].endswith(GRAPHED):
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step(1)
                    torch.cuda.synchronize()
                    row["peak_MB_per_image"] = (torch.cuda.max_memory_allocated() - base) / row["batch"] / 1e6
                # capture + replays cost about 2·sets + 6 calls: left out where that would eat the budget
                if graph_sets and self.device == "cuda" and (2 * graph_sets + 6) * row["ms"] / 1e3 > 0.2 * self.left():
                    row["graph_error"] = "skipped (budget)"
                elif graph_sets and self.device == "cuda":
                    try:
                        row["graph_ms"] = common.graph_ms(step, graph_sets)
                    except Exception as e:  # the eager row stands; say why the graph column is empty
                        row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        except torch.OutOfMemoryError:
            row["status"] = "out of memory"
        except Exception as e:  # a broken provider must not end the run
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        graphed = f"  graph {row['graph_ms']:.3f} ms" if "graph_ms" in row else ""
        print(f"  {row.get('ms', float('nan')):9.3f} ms{graphed}  err {row.get('rel_err', float('nan')):.1e}  "
              f"{row['status']}{'  graph: ' + row['graph_error'] if 'graph_error' in row else ''}", flush=True)
        self.rows.append(row)
        if self.device == "cuda" and row["status"] != "ok":
            gc.collect()
            torch.cuda.empty_cache()

    def generic_bf16(self, provider: str, precision: str) -> bool:
        """Whether ``provider`` would convolve in bf16 through torch's generic CPU kernels (no oneDNN bf16 here):
        about 1 GFLOP/s on the 2-core CI machine, minutes per row — left out of the CPU plan."""
        return (self.device == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and (provider == REF or not provider.startswith("ours: ")))

    def skip(self, row: dict, why: str) -> None:
        row["status"] = why
        self.rows.append(row)

    def rotation(self, set_bytes: float) -> int:
        return 1 if set_bytes >= 1 << 30 else min(4, max(2, math.ceil(ROTATE_BYTES / max(set_bytes, 1))))

    def randn(self, shape, seed: int, dtype=torch.float32):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=gen, device=self.device).to(dtype)

    # ---- end to end -------------------------------------------------------------------------------------------
    def e2e_inputs(self, size: int, n: int, seed: int):
        """n samples of (W+, noise maps, target image) from ``seed``: W+ near the mapping's output, as in a run."""
        g = self.models(size)["ours"]["fp32"]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            w = g.mapping(torch.randn(n, g.style_dim, generator=gen, device=self.device))
            w = w.unsqueeze(1).repeat(1, g.n_latent, 1) + 0.1 * torch.randn(n, g.n_latent, g.style_dim,
                                                                            generator=gen, device=self.device)
        noise = [torch.randn(n, 1, h, w_, generator=gen, device=self.device) for h, w_ in g.noise_shapes()]
        target = torch.rand(n, 3, size, size, generator=gen, device=self.device) * 2 - 1
        return w, noise, target

    def e2e_sets(self, size: int, batch: int):
        """Input sets for the timed batch; set 0 starts with the CHECK_SAMPLES the float64 reference also gets."""
        n_check = min(batch, CHECK_SAMPLES)
        w, noise, target = self.e2e_inputs(size, CHECK_SAMPLES, seed=1)
        head = (w[:n_check], [n[:n_check] for n in noise], target[:n_check])
        sets = []
        for k in range(3):
            if k == 0:
                parts = [head] + ([self.e2e_inputs(size, batch - n_check, seed=100 + batch)] if batch > n_check else [])
                sets.append((torch.cat([p[0] for p in parts]), [torch.cat(ns) for ns in zip(*[p[1] for p in parts])],
                             torch.cat([p[2] for p in parts])))
            else:
                sets.append(self.e2e_inputs(size, batch, seed=1000 * k + batch))
        return sets

    def e2e_reference(self, size: int):
        """float64 image and W+ gradient of the CHECK_SAMPLES head inputs, on the reference backend."""
        if ("e2e", size) not in self._refs:
            m = self.models(size)
            w, noise, target = self.e2e_inputs(size, CHECK_SAMPLES, seed=1)
            w = w.double().requires_grad_(True)
            noise = [n.double().requires_grad_(True) for n in noise]
            with L.use_backend("reference"):
                styles, layout = m["ours64"].style_space(w, "lsap")
                img = m["ours64"].synthesis(w, noise)
                lsap_loss(img, target.double(), L.sncd(styles, m["anchors"].double(), layout, "mean", "sum")).backward()
            self._refs[("e2e", size)] = (img.detach(), w.grad)
        return self._refs[("e2e", size)]

    def e2e_providers(self, size: int, precision: str) -> dict:
        m = self.models(size)
        mk = "bf16" if precision == "bf16" else "fp32"
        ours, layout, anchors = m["ours"][mk], m["layout"], m["anchors"]

        def ours_forward(w, noise):
            styles, _ = ours.style_space(w, "lsap")
            return ours.synthesis(w, noise), L.sncd(styles, anchors, layout, "mean", "sum")

        def loop_forward(model, synthesis):
            return lambda w, noise: (synthesis(w, noise),
                                     baselines.sncd_loop(baselines.layer_styles(model, w, layout), anchors, layout))

        # ours first, the compile last: what matters most is measured before the budget runs out
        providers = {f"ours: {name}": with_backend(ours_forward, modulated_conv2d=name)
                     for name in common.kernel_backends("modulated_conv2d", self.device, dtype_of(precision))}
        providers[REF] = with_backend(ours_forward, "reference")
        for name, model in ((A, m["a"][mk]), (B, m["b"][mk])):
            providers[name] = loop_forward(model, baselines.rosinality_synthesis(model))
        if not self.args.no_compile:  # (c): (a) and (b), each torch.compile'd whole
            for name, model in ((CA, m["a"][mk]), (CB, m["b"][mk])):
                synthesis = baselines.rosinality_synthesis(model)
                providers[name] = self.compiled(("e2e", size, mk, name),
                                                lambda model=model, synthesis=synthesis: loop_forward(model, synthesis))
            if self.device == "cuda":  # torch.compile "reduce-overhead": the step replayed as CUDA graphs
                for name in common.kernel_backends("modulated_conv2d", self.device, dtype_of(precision)):
                    graphed = torch.compile(ours_forward, mode="reduce-overhead")

                    def replay(w, noise, graphed=graphed):
                        torch.compiler.cudagraph_mark_step_begin()
                        return graphed(w, noise)

                    providers[f"ours: {name}{GRAPHED}"] = with_backend(replay, modulated_conv2d=name)
        return providers

    def task_e2e(self, size: int, batch: int, precision: str, only=None) -> None:
        set_tf32(precision == "tf32")
        m = self.models(size)
        sets = self.e2e_sets(size, batch)
        ref_img, ref_grad = self.e2e_reference(size)
        n = min(batch, CHECK_SAMPLES)
        g = m["ours"]["fp32"]
        elt = 2 if precision == "bf16" else 4
        works = [layer_work(s, batch, elt, True) for s in layer_specs(g)]
        flops = sum(f for f, _ in works)
        nbytes = sum(b for _, b in works) + batch * 3 * size * size * 4  # + the target image

        def make_step(forward):
            def step(i):
                w, noise, target = sets[i % len(sets)]
                w = w.detach().requires_grad_(True)
                noise = [x.detach().requires_grad_(True) for x in noise]
                img, sncd_sum = forward(w, noise)
                lsap_loss(img, target, sncd_sum).backward()
                return img, w.grad
            return step

        def check(outputs):
            img, grad = outputs
            return {"image": rel(img[:n], ref_img[:n]), "w_plus_grad": rel(grad[:n], ref_grad[:n])}

        for provider, forward in self.e2e_providers(size, precision).items():
            if only is not None and provider not in only:
                continue
            row = dict(section="e2e", size=size, precision=precision, batch=batch, provider=provider)
            self.add_floor(row, flops, nbytes, precision)
            if self.generic_bf16(provider, precision):
                self.skip(row, "skipped: bf16 through torch's generic CPU convolution (no oneDNN bf16 kernels here)")
                continue
            if self.left() <= 0 or (compiled_provider(provider) and self.left() < self.compile_guess()):
                self.skip(row, "skipped (budget)")
                continue
            self.run(row, make_step(forward), check, E2E_OUT_TOL[precision], GRAD_TOL[precision],
                     peak_memory=True)
        del sets
        self.free()

    # ---- modulated convolution layers ---------------------------------------------------------------------------
    def layer_sets(self, s: dict, batch: int, dtype, seed: int, n_sets: int | None = None):
        """[x, w, noise-or-skip (None for to_rgb1), grad_out] sets; set 0 starts with the CHECK_SAMPLES head drawn
        from ``seed`` alone, so the float64 reference of those samples is the same for every batch."""
        side = (1, s["res_out"], s["res_out"]) if not s["rgb"] else ((3, s["res_out"] // 2, s["res_out"] // 2)
                                                                     if s["skip"] else None)
        shapes = [(s["cin"], s["res_in"], s["res_in"]), (512,), side, (s["cout"], s["res_out"], s["res_out"])]
        kinds = [dtype, torch.float32, dtype, dtype]  # w stays fp32: the layers' affine runs in fp32

        def draw(n, sd):
            return [None if shape is None else self.randn((n, *shape), sd * 10 + j, kind)
                    for j, (shape, kind) in enumerate(zip(shapes, kinds))]

        set_bytes = sum(batch * math.prod(sh) * (2 if kd == torch.bfloat16 else 4)
                        for sh, kd in zip(shapes, kinds) if sh is not None)
        n_check = min(batch, CHECK_SAMPLES)
        head = [None if t is None else t[:n_check] for t in draw(CHECK_SAMPLES, seed)]
        sets = []
        for k in range(n_sets or self.rotation(set_bytes)):
            if k > 0:
                sets.append(draw(batch, seed + 2 + k))
            elif batch > n_check:
                sets.append([None if h is None else torch.cat([h, t]) for h, t in zip(head, draw(batch - n_check, seed + 1))])
            else:
                sets.append(head)
        return sets

    def layer_reference(self, s: dict, precision: str, seed: int, backward: bool):
        """float64 outputs (and gradients) of the CHECK_SAMPLES head, from the same (rounded) inputs."""
        layer = self.models(self.plan["layer_size"])["ours64"].get_submodule(s["layer"])
        head = self.layer_sets(s, CHECK_SAMPLES, dtype_of(precision), seed, n_sets=1)[0]
        head = [None if t is None else t.double() for t in head]
        return self.layer_step(with_backend(layer, modulated_conv2d="reference"), [head], backward)(0)

    @staticmethod
    def layer_step(fn, sets, backward: bool):
        def step(i):
            x, w, side, grad_out = sets[i % len(sets)]
            if not backward:
                with torch.no_grad():
                    return (fn(x, w, side),)
            x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            side = side.detach().requires_grad_(True) if side is not None else None
            out = fn(x, w, side)
            out.backward(grad_out)
            return out, x.grad, w.grad, (side.grad if side is not None else None)
        return step

    def layer_providers(self, s: dict, precision: str, with_compile: bool) -> dict:
        m = self.models(self.plan["layer_size"])
        mk = "bf16" if precision == "bf16" else "fp32"
        ours = m["ours"]["fp32"].get_submodule(s["layer"])  # layers compute in their input's dtype

        def rosinality(model):
            layer, dt = model.get_submodule(s["layer"]), baselines.model_dtype(model)
            return lambda x, w, side: layer(x, w.to(dt), side)

        providers = {f"ours: {name}": with_backend(ours, modulated_conv2d=name)
                     for name in common.kernel_backends("modulated_conv2d", self.device, dtype_of(precision))}
        providers[REF] = with_backend(ours, modulated_conv2d="reference")
        providers[A] = rosinality(m["a"][mk])
        providers[B] = rosinality(m["b"][mk])
        if with_compile:
            for name, model in ((CA, m["a"][mk]), (CB, m["b"][mk])):
                providers[name] = self.compiled(("layer", s["layer"], mk, name), lambda model=model: rosinality(model))
        return providers

    def task_layers(self, precision: str, batch: int, direction: str, only_compile: bool = False) -> None:
        set_tf32(precision == "tf32")
        backward = direction == "fwd+bwd"
        dtype = dtype_of(precision)
        elt = 2 if precision == "bf16" else 4
        size = self.plan["layer_size"]
        for idx, s in enumerate(layer_specs(self.models(size)["ours"]["fp32"])):
            if self.args.layers and s["layer"] not in self.args.layers:
                continue
            seed = 7919 * (idx + 1)
            sets = None
            providers = self.layer_providers(s, precision, with_compile=not self.args.no_compile)
            cl_sets = None
            for provider, fn in providers.items():
                if only_compile != is_c(provider):
                    continue
                row = dict(section="modconv", layer=s["layer"], shape=layer_shape(s), in_256=s["res_out"] <= 256,
                           precision=precision, batch=batch, direction=direction, provider=provider)
                self.add_floor(row, *layer_work(s, batch, elt, backward), precision)
                if self.generic_bf16(provider, precision):
                    self.skip(row, "skipped: bf16 through torch's generic CPU convolution (no oneDNN bf16 kernels here)")
                    continue
                if self.left() <= 0 or (is_c(provider) and self.left() < 10):
                    self.skip(row, "skipped (budget)")
                    continue
                if sets is None:
                    sets = self.layer_sets(s, batch, dtype, seed)
                    ref = self.layer_reference(s, precision, seed, backward)
                n = min(batch, CHECK_SAMPLES)

                def check(outputs, ref=ref, n=n):
                    names = ("out", "x_grad", "w_grad", "noise_or_skip_grad")
                    return {k: rel(o[:n], r[:n]) for k, o, r in zip(names, outputs, ref) if r is not None}

                # each provider gets its inputs in the layout its own layers produce, as inside its generator: our
                # kernels write channels_last (NCHW inputs would cost ours a layout copy of x's gradient per call)
                if native_channels_last(provider):
                    cl_sets = cl_sets or [[channels_last(t) for t in st] for st in sets]
                elif cl_sets is not None:
                    cl_sets = None
                # (c) is compiled by torch.compile's default mode: no capture of it here
                self.run(row, self.layer_step(fn, cl_sets or sets, backward), check, OUT_TOL[precision],
                         GRAD_TOL[precision], graph_sets=0 if is_c(provider) else len(sets))
            del sets, cl_sets
        self.free()

    # ---- style normalisation + SNCD ----------------------------------------------------------------------------
    def task_sncd(self, precision: str) -> None:
        with torch.device("meta"):
            layout = L.Generator(1024).style_layout("all")
        dtype = dtype_of(precision)
        channels = list(layout.channels)

        def loop(styles, anchors):
            return baselines.sncd_loop(torch.split(styles, channels, 1), anchors, layout) / styles.shape[0]

        providers = {LOOP: loop}
        if not self.args.no_compile:
            providers[LOOP_C] = torch.compile(loop)
        providers[REF] = lambda st, a: L.sncd(st, a, layout, backend="reference")
        for name in common.kernel_backends("sncd", self.device, dtype):
            providers[f"ours: {name}"] = lambda st, a, name=name: L.sncd(st, a, layout, backend=name)
        for batch in self.plan["sncd_batches"]:
            sets = [common.random_style_inputs(layout, batch, dtype, self.device, seed) for seed in range(4)]
            s64 = sets[0][0].double().requires_grad_(True)
            ref_value = L.sncd(s64, sets[0][1].double(), layout, backend="reference")
            ref_value.backward()

            def step(i, fn=None):
                st, a = sets[i % len(sets)]
                st = st.detach().requires_grad_(True)
                value = fn(st, a)
                value.backward()
                return value, st.grad

            def check(outputs):
                return {"value": rel(outputs[0], ref_value), "styles_grad": rel(outputs[1], s64.grad)}

            for provider, fn in providers.items():
                row = dict(section="sncd", precision=precision, batch=batch, provider=provider)
                self.add_floor(row, *sncd_work(layout, batch, 2 if precision == "bf16" else 4), precision)
                if self.left() <= 0 or (provider == LOOP_C and self.left() < self.compile_guess() / 2):
                    self.skip(row, "skipped (budget)")
                    continue
                # no activation: the gradient is smooth
                self.run(row, lambda i, fn=fn: step(i, fn), check, OUT_TOL[precision], OUT_TOL[precision])

    # ---- order of work ----------------------------------------------------------------------------------------
    def tasks(self) -> list[tuple[str, object]]:
        """Most important first: the headline end-to-end row, the headline layer group, SNCD, then the rest."""
        p, sections = self.plan, self.args.sections
        size0, batch0, prec0 = p["sizes"][0], p["batches"][0], p["precisions"][0]
        ob0 = p["op_batches"][0]
        out = []
        if "e2e" in sections:
            out.append((f"e2e {size0}² B{batch0} {prec0}", lambda: self.task_e2e(size0, batch0, prec0)))
        if "modconv" in sections:
            out.append((f"modconv {prec0} B{ob0} fwd+bwd", lambda: self.task_layers(prec0, ob0, "fwd+bwd")))
        if "sncd" in sections:
            out += [(f"sncd {q}", lambda q=q: self.task_sncd(q)) for q in p["sncd_precisions"]]
        if "e2e" in sections:
            out += [(f"e2e {sz}² B{batch0} {prec0}", lambda sz=sz: self.task_e2e(sz, batch0, prec0))
                    for sz in p["sizes"][1:]]
            out += [(f"e2e {sz}² B{b} {prec0}", lambda sz=sz, b=b: self.task_e2e(sz, b, prec0))
                    for sz in p["sizes"] for b in p["batches"][1:]]
        if "modconv" in sections:
            if not self.args.no_compile:
                out.append((f"modconv {prec0} B{ob0} fwd+bwd (c)",
                            lambda: self.task_layers(prec0, ob0, "fwd+bwd", only_compile=True)))
            out.append((f"modconv {prec0} B{ob0} fwd", lambda: self.task_layers(prec0, ob0, "fwd")))
            out += [(f"modconv {prec0} B{b} {d}", lambda b=b, d=d: self.task_layers(prec0, b, d))
                    for b in p["op_batches"][1:] for d in ("fwd+bwd", "fwd")]
        if "e2e" in sections:
            out += [(f"e2e {sz}² B{b} {q}", lambda sz=sz, b=b, q=q: self.task_e2e(sz, b, q))
                    for q in p["precisions"][1:] for sz in p["sizes"] for b in p["batches"]]
        if "modconv" in sections:
            out += [(f"modconv {q} B{b} {d}", lambda q=q, b=b, d=d: self.task_layers(q, b, d))
                    for q in p["precisions"][1:] for b in p["op_batches"] for d in ("fwd+bwd", "fwd")]
        return out

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def main(self) -> None:
        baselines.allow_many_recompiles()
        print(f"{self.env['device']}: {self.mode} plan, budget {self.plan['budget_s']} s, out {self.out}", flush=True)
        try:
            self.measure_floors()
            for label, task in self.tasks():
                if self.left() <= 0:
                    self.skipped.append(label)
                    continue
                print(f"== {label} ({self.left():.0f} s left)", flush=True)
                task()
                self.write()
        except Interrupted:
            print("interrupted: writing what was measured", flush=True)
        finally:
            self.write(final=True)

    # ---- results ------------------------------------------------------------------------------------------
    def write(self, final: bool = False) -> None:
        add_ratios(self.rows)
        meta = {"mode": self.mode, "plan": {k: v for k, v in self.plan.items()}, "elapsed_s": self.elapsed(),
                "floors": self.floors, "available_backends": L.available_backends(),
                "modconv_kernel_backends": {p: common.kernel_backends("modulated_conv2d", self.device, dtype_of(p))
                                            for p in self.plan["precisions"]},
                "threads": torch.get_num_threads(), "check_samples": CHECK_SAMPLES, "tolerances": {
                    "outputs": OUT_TOL, "e2e_image": E2E_OUT_TOL, "gradients_through_lrelu": GRAD_TOL},
                "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "skipped_tasks": self.skipped,
                "load_average_1min": [self.load_at_start, os.getloadavg()[0]]}
        if self.device == "cuda" and L.available_backends()["triton"]:
            from lsap_kernels.ops.modconv import triton_tuning
            meta["triton_block_configs"] = triton_tuning.usage()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "suite.json").write_text(json.dumps({**self.env, **meta, "rows": self.rows}, indent=1))
        (self.out / "suite.md").write_text(report.markdown(self.env, meta, self.rows))
        if final:
            print(f"wrote {self.out / 'suite.json'} and {self.out / 'suite.md'}", flush=True)
            print(report.plot(self.rows, meta, self.env, self.out / "suite.png"), flush=True)


def group_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("section", "size", "layer", "precision", "batch", "direction"))


def add_ratios(rows: list[dict]) -> None:
    """vs_x = the baseline's time / this row's time (> 1: this row is faster), for rows of the same group."""
    ok = {(group_key(r), r["provider"]): r["ms"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        for col, names in VS.items():
            base = min((ok[(group_key(r), n)] for n in names if (group_key(r), n) in ok), default=None)
            r[col] = base / r["ms"] if base is not None and r.get("status") == "ok" else None
    # CUDA-graph device times: against the faster of (a) and (b), measured the same way
    graphs = {(group_key(r), r["provider"]): r["graph_ms"] for r in rows if "graph_ms" in r}
    for r in rows:
        best = [graphs[(group_key(r), n)] for n in (A, B) if (group_key(r), n) in graphs]
        r["graph_vs_best"] = min(best) / r["graph_ms"] if best and "graph_ms" in r else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU plan even where CUDA is available")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>/)")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=None,
                   help="stop starting new work after this many seconds (GPU 330, CPU 150; inf: run everything)")
    p.add_argument("--sections", nargs="+", default=["e2e", "modconv", "sncd"], choices=["e2e", "modconv", "sncd"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="end-to-end resolutions (first = headline)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="end-to-end batches (first = headline)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "tf32", "fp32"],
                   help="end-to-end and layer precisions (first = headline)")
    p.add_argument("--op-batches", dest="op_batches", type=int, nargs="+", default=None, help="layer batches")
    p.add_argument("--layer-size", dest="layer_size", type=int, default=None,
                   help="the generator whose layers the modconv section times (GPU 1024, CPU 32)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    p.add_argument("--layers", nargs="+", default=None,
                   help="time only these modulated layers (e.g. convs.15 to_rgbs.7): (c) compiles once per layer, "
                        "too many for one GPU call over all 26")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
    if mode == "cpu" and args.precisions and "tf32" in args.precisions:
        p.error("tf32 is a GPU precision")

    def on_term(*_):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    Suite(mode, args).main()


if __name__ == "__main__":
    main()
