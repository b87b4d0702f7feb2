"""Style normalisation + SNCD, forward+backward, on the "all" layout of a 1024² config-f generator (9,088
channels, 26 layers): our backends against the per-layer PyTorch loop users write and torch.compile of it.

    python bench/bench_style.py [--out DIR] [--batches 1 16 64 256] [--no-compile]

Writes style.json and style.md into DIR (default bench/results/<device>-<date>/). Every timed variant is first
checked against the float64 reference. The byte floor counts each input read once and each output written once:
forward reads styles and anchors and writes [B, L] cosines; backward reads styles, anchors, the saved [B, L]
cosines/norms and the incoming gradient, and writes the styles' gradient.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lsap_kernels as L  # noqa: E402


def per_layer_loop(styles, anchors, channels):
    """What a user writes without this library (GANInverter's formulation, mean over layers and batch)."""
    loss = 0.0
    for s, mu in zip(torch.split(styles.float(), channels, 1), torch.split(anchors, channels)):
        s_hat = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8)
        loss = loss + (1 - (s_hat * mu).sum(1)).mean()
    return loss / len(channels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.environment()
    out = Path(args.out) if args.out else common.results_dir(env)
    with torch.device("meta"):
        layout = L.Generator(1024).style_layout("all")
    bandwidth = common.copy_bandwidth(device)
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    ours = [b for b in (("cuda", "triton") if device == "cuda" else ("cpu",)) if L.available_backends()[b]]
    compiled = None if args.no_compile else torch.compile(per_layer_loop)
    rows = []
    for dtype in dtypes:
        for batch in args.batches:
            sets = [common.random_style_inputs(layout, batch, dtype, device, seed) for seed in range(4)]
            ref = L.sncd(sets[0][0].double(), sets[0][1].double(), layout, backend="reference")
            providers = {f"ours:{b}": (lambda s, a, b=b: L.sncd(s, a, layout, backend=b)) for b in ours}
            providers["per-layer loop"] = lambda s, a: per_layer_loop(s, a, list(layout.channels))
            if compiled is not None:
                providers["torch.compile(loop)"] = lambda s, a: compiled(s, a, list(layout.channels))
            elt = torch.empty((), dtype=dtype).element_size()
            c, n_l = layout.total_channels, layout.n_layers
            nbytes = (batch * c * elt + c * 4 + batch * n_l * 8) + (batch * c * elt + c * 4 + batch * n_l * 12
                                                                    + batch * c * elt)
            for name, fn in providers.items():
                check = fn(sets[0][0], sets[0][1])
                err = abs(check.item() - ref.item()) / abs(ref.item())
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), (name, err)

                def step(i, fn=fn):
                    s = sets[i % len(sets)][0].detach().requires_grad_(True)
                    fn(s, sets[i % len(sets)][1]).backward()

                ms = common.time_ms(step, device)
                kernels = common.kernel_launches(step, device) if name.startswith("ours") else None
                # ours = the op's own kernels (CUDA: sncd_{fwd,bwd}_kernel<T>; Triton: _sncd_{fwd,bwd}_kernel);
                # the rest are PyTorch's (autograd's grad seed, output allocation fills, ...)
                ours_n = sum(n for k, n in kernels.items() if "sncd_" in k) if kernels else None
                rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, "provider": name,
                             "ms_fwd_bwd": ms, "bytes": nbytes, "GB_per_s": nbytes / ms / 1e6,
                             "floor_ms": nbytes / bandwidth * 1e3 if bandwidth else None,
                             "fraction_of_floor": (nbytes / bandwidth * 1e3) / ms if bandwidth else None,
                             "our_kernels_fwd_bwd": ours_n,
                             "all_kernels_fwd_bwd": sum(kernels.values()) if kernels else None,
                             "kernels": kernels, "rel_err_vs_float64": err})
                print(f"{rows[-1]['dtype']:8s} B={batch:<4d} {name:22s} {ms:9.4f} ms  "
                      f"{rows[-1]['GB_per_s']:8.1f} GB/s" + (f"  our kernels={ours_n} of {sum(kernels.values())}" if kernels else ""))
    common.write_results(out, "style", env, {"layout": "1024 config-f, all (26 layers, 9088 channels)",
                                            "copy_bandwidth_GB_per_s": bandwidth / 1e9 if bandwidth else None},
                         rows, ["dtype", "batch", "provider", "ms_fwd_bwd", "GB_per_s", "fraction_of_floor",
                                "our_kernels_fwd_bwd", "all_kernels_fwd_bwd"])


if __name__ == "__main__":
    main()
