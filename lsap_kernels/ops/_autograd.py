"""Autograd for the kernel custom ops with little host time per call.

In eager mode a small custom-op call spends more host time in torch.library's dispatch and per-call autograd wrapper
(a generated Function, a schema default fill quadratic in the argument count) than in our launcher, and on a GPU the
small layers of a generator are bound by host time (bench/results/nvidia-h200-2026-11-26/gpu_check.md). So our call
sites run the op's Python implementation directly where nothing needs the dispatcher, and the registered op
everywhere else (bench/bench_host_overhead.py measures both).
"""
from __future__ import annotations

from typing import Callable

import torch

# Route every call through the registered op (bench/bench_host_overhead.py and the tests compare the two paths).
ALWAYS_DISPATCH: bool = False


def fast_call(op) -> Callable:
    """``op`` as a callable that skips the dispatcher for plain tensors with grad mode off outside tracing. Grad
    mode on (e.g. a backward with create_graph=True), torch.compile/export tracing, tensor subclasses such as
    FakeTensor and active dispatch modes go through ``op``, so derivatives, fake kernels, graph capture and what
    modes see stay those of the registered op."""
    impl = getattr(op, "_init_fn", None)  # the decorated function (a private attribute of torch's CustomOpDef)
    if impl is None:  # a torch without it: always dispatch
        return op

    def call(*args):
        if (ALWAYS_DISPATCH or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or type(args[0]) is not torch.Tensor or torch._C._len_torch_dispatch_stack()):
            return op(*args)
        return impl(*args)

    return call


def register_autograd(op, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward``/``setup_context`` as ``op``'s derivative (so the op is complete for direct callers,
    opcheck and torch.compile) and return ``apply(*inputs)``: the same formula as a ``torch.autograd.Function``
    around ``fast_call(op)``, for our own call sites."""
    forward_op = fast_call(op)

    def forward(ctx, *inputs):
        output = forward_op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    function = type(f"{getattr(op, '_name', 'lsap_op')}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})
    op.register_autograd(backward, setup_context=setup_context)
    return function.apply
