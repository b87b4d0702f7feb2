"""Committed Triton block configs (ops/modconv/triton_tuning.py): what an autotuner picked survives export → JSON →
seed into a fresh autotuner, which then launches that config without benchmarking; and the pruning modes. Runs
Triton's own Autotuner.run with its benchmark and launch replaced, so no GPU is needed."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lsap_kernels as L

pytestmark = pytest.mark.skipif(not L.available_backends()["triton"], reason="triton is not usable here")

if L.available_backends()["triton"]:
    import triton
    import triton.language as tl

    from lsap_kernels.ops.modconv import triton_fwd, triton_tuning

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def autotuner(monkeypatch, timings):
    """A fresh autotuner (the kernels' own kind) over two configs whose 'benchmark' returns ``timings[BLOCK]``
    (None: must not be called) and whose launches are recorded instead of run."""
    tuner = triton_fwd.CachedAutotuner(_copy_kernel, [triton.Config({"BLOCK": 16}, num_warps=2, num_stages=2),
                                                      triton.Config({"BLOCK": 32}, num_warps=4, num_stages=3)], ["n"])

    def bench(*args, config, **kwargs):
        assert timings is not None, "benchmarked a shape the table holds"
        return [timings[config.kwargs["BLOCK"]]] * 3

    launched = []
    monkeypatch.setattr(tuner, "_bench", bench)
    monkeypatch.setattr(tuner.fn, "run", lambda *args, **kwargs: launched.append(kwargs))
    return tuner, launched


def test_tuned_configs_survive_export_and_seed(monkeypatch):
    x, y = torch.randn(40), torch.empty(40)
    tuned, _ = autotuner(monkeypatch, {16: 2.0, 32: 1.0})
    tuned.run(x, y, 40, grid=(2,))
    tuned.run(x.double(), y.double(), 7, grid=(1,))
    table = json.loads(json.dumps(triton_tuning.export({"copy": tuned})))  # what the committed file holds
    assert [key for key, _ in table["copy"]] == [[40, "torch.float32"], [7, "torch.float64"]]  # n, x's dtype

    fresh, launched = autotuner(monkeypatch, None)
    assert triton_tuning.seed(table, {"copy": fresh, "renamed": fresh}) == 2
    assert triton_tuning.seed(table, {"copy": fresh}) == 0  # entries already there are kept
    fresh.run(x, y, 40, grid=(2,))
    assert (launched[-1]["BLOCK"], launched[-1]["num_warps"], launched[-1]["num_stages"]) == (32, 4, 3)
    # the first tensor's dtype is in the table's key, the others' are not (a kernel's float32 or 16-bit parameters)
    fresh.run(x, y.double(), 40, grid=(2,))
    assert launched[-1]["BLOCK"] == 32 and not fresh.cache

    # a shape the table lacks still autotunes
    fresh._bench = lambda *args, config, **kwargs: [1.0 if config.kwargs["BLOCK"] == 16 else 3.0] * 3
    fresh.run(x, y, 41, grid=(2,))
    assert launched[-1]["BLOCK"] == 16
    # what a GPU run reports: 40 launched from the table (with two dtype combinations: one entry), 41 benchmarked
    assert triton_tuning.usage({"copy": fresh}) == {"copy": {"from_table": 1, "autotuned": 1}}


def test_a_retuning_run_keeps_the_other_layers_entries(monkeypatch):
    """What bench/tune_modconv.py writes after retuning some shapes: the committed entries of every other shape and
    kernel stay, a retuned shape takes its new config."""
    tuner, _ = autotuner(monkeypatch, {16: 2.0, 32: 1.0})
    x, y = torch.randn(40), torch.empty(40)
    for n in (40, 7):
        tuner.run(x[:n], y[:n], n, grid=(1,))
    committed = json.loads(json.dumps({**triton_tuning.export({"copy": tuner}), "other": [[[3], {"kwargs": {}}]]}))
    retuned, _ = autotuner(monkeypatch, {16: 1.0, 32: 2.0})
    for n in (40, 9):
        retuned.run(x[:n], y[:n], n, grid=(1,))
    merged = triton_tuning.merge(committed, json.loads(json.dumps(triton_tuning.export({"copy": retuned}))))
    assert merged["other"] == committed["other"]
    assert {key[0]: config["kwargs"]["BLOCK"] for key, config in merged["copy"]} == {40: 16, 7: 32, 9: 16}
    assert merged == triton_tuning.merge(merged, {})


def test_tuning_tool_logs_every_benchmark_of_a_call(monkeypatch):
    """bench/tune_modconv.py logs every shape a kernel benchmarks within one layer call (the FIR pass tunes its
    forward and its adjoint key in one call), each with its own timings, and nothing for a shape the table seeded."""
    monkeypatch.setenv("LSAP_TRITON_AUTOTUNE", "wide")  # the tool sets it at import; restored after the test
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    tune_modconv = importlib.import_module("tune_modconv")
    tuner, _ = autotuner(monkeypatch, {16: 2.0, 32: 1.0})
    log = tune_modconv.record_benchmarks({"copy": tuner})
    x, y = torch.randn(41), torch.empty(41)
    tuner.run(x, y, 40, grid=(2,))
    tuner._bench = lambda *args, config, **kwargs: [1.0 if config.kwargs["BLOCK"] == 16 else 3.0] * 3
    tuner.run(x, y, 41, grid=(2,))
    tuner.run(x, y, 40, grid=(2,))  # known now: no benchmark
    rows = [tune_modconv.benchmark_row(*entry) for entry in log]
    assert [(r["kernel"], r["key"][0], r["best"], r["best_ms"], r["configs"]) for r in rows] == [
        ("copy", 40, "BLOCK32 w4 s3", 1.0, 2), ("copy", 41, "BLOCK16 w2 s2", 1.0, 2)]
    assert rows[1]["timings"] == {"BLOCK16 w2 s2": 1.0, "BLOCK32 w4 s3": 3.0}

    fresh, _ = autotuner(monkeypatch, None)
    triton_tuning.seed(json.loads(json.dumps(triton_tuning.export({"copy": tuner}))), {"copy": fresh})
    log = tune_modconv.record_benchmarks({"copy": fresh})
    fresh.run(x, y, 41, grid=(2,))
    assert log == []


def test_cached_autotuner_launches_the_autotuners_choice(monkeypatch):
    """CachedAutotuner (the kernels' autotuner on a GPU): each shape key and dtype goes through Triton's
    Autotuner.run once (benchmark), later launches of that key take the same config without it; a key the
    committed table holds never does."""
    configs = [triton.Config({"BLOCK": 16}, num_warps=2, num_stages=2),
               triton.Config({"BLOCK": 32}, num_warps=4, num_stages=3)]
    tuner = triton_fwd.CachedAutotuner(_copy_kernel, configs, ["n"])
    timings = {(40, torch.float32): {16: 2.0, 32: 1.0}, (40, torch.float64): {16: 1.0, 32: 3.0},
               (7, torch.float32): {16: 1.0, 32: 2.0}}
    benched, launched, slow = [], [], []

    def bench(x, y, n, *args, config, **kwargs):
        benched.append((n, x.dtype))
        return [timings[(n, x.dtype)][config.kwargs["BLOCK"]]] * 3

    base_run = triton.runtime.Autotuner.run
    monkeypatch.setattr(triton.runtime.Autotuner, "run",
                        lambda self, *a, **k: slow.append(a[2]) or base_run(self, *a, **k))  # a[2]: n
    monkeypatch.setattr(tuner, "_bench", bench)
    monkeypatch.setattr(tuner.fn, "run", lambda *args, **kwargs: launched.append(kwargs))
    x, y = torch.randn(40), torch.empty(40)
    for _ in range(3):
        tuner.run(x, y, 40, grid=(2,))
    assert [k["BLOCK"] for k in launched] == [32] * 3 and benched == [(40, torch.float32)] * 2 and slow == [40]
    assert launched[-1]["grid"] == (2,) and (launched[-1]["num_warps"], launched[-1]["num_stages"]) == (4, 3)
    for _ in range(2):  # another dtype, another size: each its own key
        tuner.run(x.double(), y.double(), 40, grid=(2,))
        tuner.run(x, y, 7, grid=(1,))
    assert [k["BLOCK"] for k in launched[3:]] == [16, 16, 16, 16] and slow == [40, 40, 7]
    # a seeded shape: the fast path from the first launch on (no Autotuner.run, no benchmark)
    table = json.loads(json.dumps(triton_tuning.export({"copy": tuner})))
    fresh = triton_fwd.CachedAutotuner(_copy_kernel, configs, ["n"])
    assert triton_tuning.seed(table, {"copy": fresh}) == 3
    monkeypatch.setattr(fresh, "_bench", None)  # must not benchmark
    slow.clear()
    for _ in range(2):
        fresh.run(x.double(), y.double(), 40, grid=(2,))
    assert launched[-1]["BLOCK"] == 16 and slow == []


@pytest.mark.parametrize("mode", ["0", "", "wide"])
def test_pruning_modes(monkeypatch, mode):
    """One config (tests), the first 4 fitting (default), or those and every fitting wide one (tuning run)."""
    monkeypatch.setenv("LSAP_TRITON_AUTOTUNE", mode)
    monkeypatch.setattr(triton_fwd, "WIDE", True)  # as if imported in wide mode: the wide configs are built too
    configs = triton_fwd.gemm_configs(triton_fwd.GEMM_SHAPES, triton_fwd.GEMM_WIDE)
    n_base = len(triton_fwd.GEMM_SHAPES)
    prune = triton_fwd.prune_mn("PIXELS", "Cout")
    kept = prune(configs, {"PIXELS": 64 * 64, "Cout": 512})  # 512→512 at 64²: every tile fits
    expected = {"0": configs[:1], "": configs[:4], "wide": configs[:4] + configs[n_base:]}[mode]
    assert len(kept) == len(expected) and all(a is b for a, b in zip(kept, expected))
    kept = prune(configs, {"PIXELS": 1024 * 1024, "Cout": 32})  # 32 channels: only tiles with BN <= 32
    fitting = [c for c in configs if c.kwargs["BN"] <= 32]
    base = [c for c in fitting if any(c is b for b in configs[:n_base])]
    wide = [c for c in fitting if any(c is w for w in configs[n_base:])]
    assert len(base) >= 4 and wide
    expected = {"0": base[:1], "": base[:4], "wide": base[:4] + wide}[mode]
    assert len(kept) == len(expected) and all(a is b for a, b in zip(kept, expected))
    # 4² toRGB: no tile fits 16 pixels × 3 channels, so the smallest one
    small = triton_fwd.prune_mn("PIXELS", "Cout")(configs, {"PIXELS": 16, "Cout": 3})
    area = [c.kwargs["BM"] * c.kwargs["BN"] for c in configs]
    assert small == [configs[area.index(min(area))]]


def test_pruning_of_pixel_blocks_and_narrow_tiles(monkeypatch):
    """2-D pixel tiles (TX columns) are kept where the image is at least TX wide, flat ones everywhere; the
    elementwise kernels' short list holds both kinds for wide layers. Channel tiles narrower than 16 only where one
    spans every channel: the toRGB skip's 3 get 4-wide ones first, wider layers none. The FIR pass's column strips
    fit the map's width too."""
    monkeypatch.setenv("LSAP_TRITON_AUTOTUNE", "")
    configs = triton_fwd.ew_configs()
    prune = triton_fwd.prune_mn("PIXELS", "Cout", "WO")
    for cout in (32, 64, 128, 256, 512):
        kept = prune(configs, {"PIXELS": 1024 * 1024, "Cout": cout, "WO": 1024})
        assert {c.kwargs["TX"] > 0 for c in kept} == {True, False}, cout
        assert all(c.kwargs["BN"] >= 16 for c in kept), cout
        narrow = prune(configs, {"PIXELS": 8 * 64, "Cout": cout, "WO": 8})
        assert narrow and all(c.kwargs["TX"] <= 8 for c in narrow), cout
    for cout, widths in ((3, [4, 4, 4, 16]), (5, [16, 16])):
        kept = prune(configs, {"PIXELS": 512 * 512, "Cout": cout, "WO": 512})
        assert [c.kwargs["BN"] for c in kept] == widths, cout
    for wo in (8, 16, 1024):
        kept = prune(triton_fwd.fir_configs(), {"PIXELS": wo * wo, "Cout": 512, "WO": wo})
        assert kept and all(c.kwargs["TX"] <= wo for c in kept), wo


def test_committed_table_names_real_kernels_and_blocks():
    """Every entry of the committed table names an autotuned kernel and only its block-size parameters, so a
    renamed kernel or block parameter cannot seed a config the kernel would reject at launch."""
    table = triton_tuning.load_table()
    if not table:
        pytest.skip("no tuned table committed yet (bench/tune_modconv.py on a GPU writes one)")
    kernels = triton_tuning.autotuned_kernels()
    for device, entries in table.items():
        for name, rows in entries.items():
            assert name in kernels, (device, name)
            params = set(kernels[name].arg_names)
            for key, config in rows:
                assert set(config["kwargs"]) <= params and set(config["kwargs"]) <= {"BM", "BN", "BK", "TX", "RY"}, \
                    (name, config)
                assert config["num_warps"] in (1, 2, 4, 8, 16) and isinstance(key, list), (name, key)


_TABLE_HITS_SCRIPT = """
import os
import sys
sys.path.insert(0, "bench")
import launch_overhead  # unsets TRITON_INTERPRET
from triton.runtime.driver import driver
driver.set_active(launch_overhead.StandInDriver())
os.environ["LSAP_TRITON_AUTOTUNE"] = ""  # autotuning as on a GPU (the stand-in's benchmark times nothing)
from lsap_kernels.ops.modconv import triton_tuning
kernels = triton_tuning.autotuned_kernels()
for kernel in kernels.values():
    kernel.cache_results = False  # no stand-in timings in Triton's disk cache
device = sys.argv[1]
triton_tuning.seed(triton_tuning.load_table()[device])
launch_overhead.triton_step(1024)()
for name, used in triton_tuning.usage().items():
    print(name, len(kernels[name].table), used["from_table"])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches stubbed on CPU tensors: CPU only (no GPU time)")
@pytest.mark.parametrize("device", sorted(triton_tuning.load_table()) if L.available_backends()["triton"] else [])
def test_a_generator_step_launches_every_committed_config(device):
    """The table is keyed by what the kernels' launches pass: one LSAP_O step of the 1024² generator in bf16, as
    the inverter and the suite's end-to-end rows run it (bench/profile_layers.py's step_call, float32 parameters),
    on Triton's real launch path with a stand-in driver (bench/launch_overhead.py) and the device's entries seeded.
    Every committed entry must be looked up by some launch: one that no launch finds is dead, and a key format
    that drifted from the launchers' (a parameter's dtype in it, say) leaves every layer autotuning on the GPU."""
    env = {**os.environ, "LSAP_DISABLE_EXT": "1"}
    env.pop("TRITON_INTERPRET", None)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _TABLE_HITS_SCRIPT, device], env=env, capture_output=True, text=True,
                         timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    counts = {name: (int(n), int(hit)) for name, n, hit in map(str.split, res.stdout.splitlines())}
    committed = triton_tuning.load_table()[device]
    for name, (n, hit) in counts.items():
        assert n == len(committed.get(name, [])) and hit == n, (name, res.stdout)
