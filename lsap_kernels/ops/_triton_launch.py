"""Triton kernel launches with less host time per call (on a GPU a small layer's time is host time).

Triton's ``JITFunction.run`` derives at every launch what the previous launch with the same arguments derived:
argument binding, specialisation, the compiled kernel's cache key (~30 µs of a 50 µs launch of our 54-parameter GEMM
on a 2-core EPYC; bench/launch_overhead.py). A ``fast_jit`` kernel keeps the compiled kernel under a key finer than
what Triton specialises on, and calls its launcher with the arguments Triton would pass. The key: every positional
argument's type, and its value, except a tensor's: its dtype and whether its address is a multiple of 16 (all of a
tensor Triton 3.6 specialises on); the keyword arguments (constexprs, and options such as warps and stages) as given;
the debug and instrumentation settings; the device. Equal keys so name the kernel Triton would pick
(tests/test_triton_launch.py checks it against Triton's own path). The first launch of each key goes through
``JITFunction.run`` (compiling as needed), and so does every launch while a launch hook is set (profilers read the
launch metadata), with a runtime argument passed by keyword (a tensor's value must not be in a key: it would stay
alive there) or an unhashable argument, or with ``FAST_LAUNCH`` off (the default with a Triton other than 3.6).
Not re-checked on a hit: that the module globals a kernel reads are unchanged since it was compiled (ours are
constants). On a hit a callable grid gets a read-only mapping of the parameters by name, not a dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from operator import itemgetter

from torch import Tensor

try:
    import triton
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except Exception:  # triton missing or broken: the Triton backends do not register
    triton = None

# On by default with the Triton minor version whose launch path this mirrors (the launcher's calling convention and
# the specialisation rules are Triton's internals); LSAP_TRITON_FAST_LAUNCH=0/1 forces it off/on. Read at each launch.
TESTED_TRITON = "3.6"
FAST_LAUNCH: bool = (os.environ.get("LSAP_TRITON_FAST_LAUNCH", "") == "1" or (
    os.environ.get("LSAP_TRITON_FAST_LAUNCH", "") != "0" and triton is not None
    and triton.__version__.startswith(TESTED_TRITON + ".")))

# Keys kept per kernel: more (a float argument that changes at every call) starts the cache afresh
MAX_KEYS = 1024


# Host-side integer helpers for launchers and grids: triton.cdiv and triton.next_power_of_2 are jit functions, ~5 µs
# a call from Python (a 2-core EPYC), and a layer's launchers call them a dozen times
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _hooked(hook) -> bool:
    # Triton 3.6 keeps each launch hook as a HookChain, empty unless a profiler added to it
    return hook is not None and getattr(hook, "calls", True) != []


def _picker(positions: tuple):
    """args -> the tuple of its items at ``positions`` (itemgetter, at C speed, where there are several)."""
    if len(positions) > 1:
        return itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


class _Params(Mapping):
    """A kernel's parameters by name, for a callable grid: read as the grid asks (Triton builds a dict of every
    parameter per launch, ~3 µs for our 55-parameter GEMM; a grid reads two or three)."""
    __slots__ = ("_index", "_values")

    def __init__(self, index: dict, values: tuple):
        self._index, self._values = index, values

    def __getitem__(self, name):
        return self._values[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)


if triton is not None:

    class FastJITFunction(JITFunction):
        """A JITFunction whose launches skip Triton's per-launch derivations where an earlier launch had the same
        key (see the module's docstring). Everything else (compilation, autotuners, the compiled kernels) is
        Triton's own."""

        def __init__(self, fn, **kwargs):
            super().__init__(fn, **kwargs)
            self._launches = {}  # key -> (compiled kernel, the parameters after the positional arguments)
            # the positional arguments' types -> (scalars' picker, tensors' picker): the key takes a scalar's value
            # and a tensor's dtype and alignment, found without testing each argument at each launch
            self._layouts = {}
            self._runtime_params = frozenset(p.name for p in self.params if not p.is_constexpr)
            self._index = {name: i for i, name in enumerate(self.arg_names)}

        def run(self, *args, grid, warmup, **kwargs):
            runtime = knobs.runtime
            if (warmup or not FAST_LAUNCH or self.pre_run_hooks or _hooked(runtime.launch_enter_hook)
                    or _hooked(runtime.launch_exit_hook) or not self._runtime_params.isdisjoint(kwargs)):
                return super().run(*args, grid=grid, warmup=warmup, **kwargs)
            device = driver.active.get_current_device()
            # the types too: 1 == 1.0 == True, which Triton binds as a constant, an fp32 and an i1
            types = tuple(map(type, args))
            layout = self._layouts.get(types)
            if layout is None:
                layout = self._layouts[types] = tuple(_picker(tuple(i for i, t in enumerate(types)
                                                                    if issubclass(t, Tensor) is tensor))
                                                      for tensor in (False, True))
            scalars, tensors = layout
            key = (device, runtime.debug, knobs.compilation.instrumentation_mode, tuple(kwargs.items()), types,
                   scalars(args), tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors(args)]))
            try:
                hit = self._launches.get(key)
            except TypeError:  # an unhashable argument
                return super().run(*args, grid=grid, warmup=False, **kwargs)
            if hit is None:
                kernel = super().run(*args, grid=grid, warmup=False, **kwargs)
                if len(self._launches) >= MAX_KEYS:
                    self._launches.clear()
                    self._layouts.clear()
                self._launches[key] = self._entry(kernel, len(args), kwargs)
                return kernel
            if hit is False:
                return super().run(*args, grid=grid, warmup=False, **kwargs)
            kernel, tail = hit
            bound = args + tail  # every parameter in order, as JITFunction.run passes them
            if callable(grid):
                grid = grid(_Params(self._index, bound))
            n = len(grid)
            # no launch metadata and no hooks: Triton's only call them when hooked
            kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                       driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None,
                       None, *bound)
            return kernel

        def _entry(self, kernel, n_args: int, kwargs: dict):
            """What a hit of this key launches (False: no compiled kernel came back, launch through Triton)."""
            if getattr(kernel, "packed_metadata", None) is None:
                return False
            return kernel, tuple(kwargs[p.name] if p.name in kwargs else p.default for p in self.params[n_args:])

    def fast_jit(fn):
        """``triton.jit`` for a kernel launched from the host; under the interpreter exactly ``triton.jit``."""
        return triton.jit(fn) if knobs.runtime.interpret else FastJITFunction(fn)
