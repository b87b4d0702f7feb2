"""Host time of our Triton launchers on the real launch path, without a GPU: Triton's JITFunction.run (argument
binding and specialisation, cache key, grid, launch metadata) and our CachedAutotuner, with a stand-in driver whose
kernel launch is a no-op (kernels compiled for sm_90, as on an H100/H200). What a GPU host adds on top: the C
launcher's argument parsing and cuLaunchKernel (a few µs a launch), and CUDA's own allocator calls.

    python bench/launch_overhead.py [--repeats 300] [--step 256]

Prints, for a 512-channel 8² StyledConv at batch 16 in bf16 (a host-bound layer on a GPU), the µs per call of two
kernel launches alone and of the forward and backward ops (inversion gradients), each with our fast launch path
(lsap_kernels/ops/_triton_launch.py) and through Triton's JITFunction.run, measured interleaved. The ops' CPU
allocations (glibc mmap for tensors of a MB) are not what CUDA's caching allocator costs. Compare rows of one run:
on a 2-core VM whole runs vary by tens of percent.

``--step SIZE``: also one whole LSAP_O step of the SIZE² generator at batch 1 in bf16 (bench/profile_layers.py's
step_call, every op on its triton backend), its Triton launches counted; the step's aten ops do their real work on
CPU tensors, so the difference between the two paths is what to read.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class StandInDriver:
    """Enough of Triton's CUDA driver for compile-and-launch on CPU tensors; the launch itself does nothing, or,
    given a list ``record``, appends (launcher, its arguments) to it: one launcher per compiled kernel, called with
    (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook, *kernel arguments)."""

    def __init__(self, record: list | None = None):
        self.utils = _Utils()
        if record is None:
            self.launcher_cls = lambda src, metadata: (lambda *args: None)
        else:
            def launcher_cls(src, metadata):
                def launch(*args):
                    record.append((launch, args))
                return launch
            self.launcher_cls = launcher_cls

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


class LaunchCount:
    """A StandInDriver ``record`` that only counts (a list would keep every launch's tensors alive)."""
    n = 0

    def append(self, launch) -> None:
        self.n += 1


def per_call_us(fn, repeats: int, fast_launch=(None,)) -> list[float]:
    """µs per call of ``fn`` with our fast launch path on (True), off (False) or as configured (None), one result
    per entry of ``fast_launch``: the best of 9 rounds each, the rounds interleaved so that each entry is measured
    under the same load."""
    from lsap_kernels.ops import _triton_launch
    configured = _triton_launch.FAST_LAUNCH
    best = [float("inf")] * len(fast_launch)
    for _ in range(9):
        for i, mode in enumerate(fast_launch):
            _triton_launch.FAST_LAUNCH = configured if mode is None else mode
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / repeats * 1e6)
    _triton_launch.FAST_LAUNCH = configured
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--step", type=int, default=None, metavar="SIZE")
    args = p.parse_args(argv)
    launches = LaunchCount()
    driver.set_active(StandInDriver(launches))
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
    print("# µs per call: fast launch path (lsap_kernels.ops._triton_launch) | Triton's JITFunction.run")
    for name, fn in rows.items():
        fast, slow = per_call_us(fn, args.repeats, fast_launch=(True, False))
        print(f"{name}: {fast:.0f} | {slow:.0f}")
    empty, = per_call_us(lambda: F.cl_empty(out.shape, dt, out.device), 2000)
    print(f"torch.empty of the output: {empty:.1f} µs")
    if args.step:
        step = triton_step(args.step)
        step()
        launches.n = 0
        step()
        n_launches = launches.n
        fast, slow = (us / 1e3 for us in per_call_us(step, 3, fast_launch=(True, False)))
        print(f"LSAP_O step, {args.step}², batch 1, bf16 ({n_launches} Triton launches): {fast:.1f} | {slow:.1f} ms")


def triton_step(size: int):
    """profile_layers.step_call on CPU tensors, every op on the triton backend (registered here for the CPU too)."""
    import dataclasses

    import lsap_kernels as L
    from lsap_kernels import backends
    from profile_layers import step_call
    backends._triton_available = lambda: True
    for impls in backends._registry.values():
        if "triton" in impls:
            impls["triton"] = dataclasses.replace(impls["triton"], devices=None)
    call = step_call(size, 1, "bf16", "cpu")

    def step():
        with L.use_backend("triton"):
            call()
    return step


if __name__ == "__main__":
    torch.set_num_threads(1)  # host work only: no intra-op threads to wake
    main()
