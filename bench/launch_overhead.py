"""Host time of our Triton launchers on the real launch path, without a GPU: Triton's JITFunction.run (argument
binding and specialisation, cache key, grid, launch metadata) and our CachedAutotuner, with a stand-in driver whose
kernel launch is a no-op (kernels compiled for sm_90, as on an H100/H200). What a GPU host adds on top: the C
launcher's argument parsing and cuLaunchKernel (a few µs a launch), and CUDA's own allocator calls.

    python bench/launch_overhead.py [--repeats 300]

Prints, for a 512-channel 8² StyledConv at batch 16 in bf16 (a host-bound layer on a GPU), the µs per call of two
kernel launches alone and of the forward and backward ops (inversion gradients), whose CPU allocations (glibc
mmap for tensors of a MB) are not what CUDA's caching allocator costs. Compare rows of one run: on a 2-core VM whole
runs vary by tens of percent.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["LSAP_TRITON_AUTOTUNE"] = "0"  # one config per shape: no benchmarking with the stand-in driver

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class StandInDriver:
    """Enough of Triton's CUDA driver for compile-and-launch on CPU tensors; the launch itself does nothing."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = lambda src, metadata: (lambda *args: None)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        return lambda *args, **kwargs: 1.0


def per_call_us(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(9):  # the best of 9 rounds: the least disturbed by other load
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args(argv)
    driver.set_active(StandInDriver())
    from lsap_kernels.ops.modconv import triton as T, triton_fwd as F

    batch, ch, size, dt = 16, 512, 8, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ch, size, size, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(ch, ch, 3, 3, generator=gen)
    styles = torch.randn(batch, ch, generator=gen)
    noise = torch.randn(batch, 1, size, size, generator=gen)
    strength, bias = torch.tensor(0.1), torch.randn(ch, generator=gen)
    w_t, d, q = F.weight_and_demodulation(weight, styles, 0.02, 1e-8, dt)
    scalars = (0.02, True, 1, True, 2 ** 0.5, None, 1e-8, False, True)  # weight_gain ... z_from_out
    fwd = T.modconv_op._init_fn
    bwd = T.modconv_bwd_op._init_fn
    out, conv_out, *_ = fwd(x, weight, styles, noise, strength, bias, None, *scalars)
    grad = torch.randn(out.shape, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
    mask = [True, False, True, True, False, False, False]  # x, styles, noise: an inversion
    bb = F.next_power_of_2(batch)
    grid = lambda meta: (F.pixel_programs(size, size, meta), F.cdiv(ch, meta["BN"]), batch)  # noqa: E731
    flags = dict(DEMOD=True, HAS_NOISE=True, HAS_BIAS=True, HAS_SKIP=False, LRELU=True, HAS_CLAMP=False)
    rows = {  # the kernel launches alone (preallocated tensors), then whole ops (their allocations included)
        "_weight_demod_kernel launch": lambda: F._weight_demod_kernel[(F.cdiv(ch, 16),)](
            weight, w_t, q, styles, d, batch, ch, ch, *styles.stride(), 0.02, 1e-8, KK=9, BO=16, BI=64, BB=bb),
        "_modconv_fwd_kernel launch (autotuned)": lambda: F._modconv_fwd_kernel[grid](
            x, w_t, styles, d, noise, strength, bias, out, out, out, batch, ch, ch, size, size, size, size,
            size * size, *x.stride(), *styles.stride(), *F.noise_strides(noise), 0, 0, 0, 0, *out.stride(), 0.02,
            2 ** 0.5, 0.0, K=3, UP=1, STORE_Z=False, PRECISION="ieee", PRESCALED=True, NARROW=0, **flags),
        "forward op (3 launches)": lambda: fwd(x, weight, styles, noise, strength, bias, None, *scalars),
        "backward op (3 launches)": lambda: bwd(grad, x, weight, styles, noise, strength, bias, out, d, w_t, q,
                                                *scalars, mask),
    }
    print(f"# launch_overhead: 512→512 3x3 8², batch 16, bf16; stand-in driver, {os.cpu_count()} CPUs")
    for name, fn in rows.items():
        print(f"{name}: {per_call_us(fn, args.repeats):.0f} µs")
    print(f"torch.empty of the output: {per_call_us(lambda: F.cl_empty(out.shape, dt, out.device), 2000):.1f} µs")


if __name__ == "__main__":
    torch.set_num_threads(1)  # host work only: no intra-op threads to wake
    main()
