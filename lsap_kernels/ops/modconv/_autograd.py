"""Autograd wiring shared by the kernel backends of ``modulated_conv2d`` (cpu, triton).

Both register a forward custom op ``(x, weight, styles, noise, noise_strength, bias, skip, weight_gain, demodulate,
up, lrelu, gain, clamp, eps, flag) -> (out, conv_out, d, *prepared)`` and a backward custom op ``(grad_out, x,
weight, styles, noise, noise_strength, bias, conv_out, d, *prepared, weight_gain, demodulate, up, lrelu, gain,
clamp, eps, flag, mask)`` that returns the seven input gradients (x, weight, styles, noise, noise_strength, bias,
skip); ``flag`` is the backend's own switch (cpu: bf16 convolutions; triton: TF32); ``prepared``: tensors the
backend's forward derives from the weight for its backward too (triton: the weight copy and Σ w²; cpu: none). A
backend may take more scalars after ``flag`` (both ops get them).
"""
from __future__ import annotations

from .._autograd import fast_call, register_autograd


def register_modconv_autograd(modconv_op, modconv_bwd_op, backend: str, backward_reads_out=None):
    """Register both ops' derivatives; return ``apply``, the forward op with autograd for our call sites.
    ``backward_reads_out(args)``: whether the backward gets the output ``out`` in conv_out's place (the backend
    recovers what it needs from it instead of storing z)."""
    backward_op = fast_call(modconv_bwd_op)

    def setup(ctx, inputs, output):
        x, weight, styles, noise, noise_strength, bias, skip, *args = inputs
        out, conv_out, d, *prepared = output
        ctx.mark_non_differentiable(conv_out, d, *prepared)
        # no zero-filled gradients for conv_out and d (the size of the conv output: a full extra pass per layer)
        ctx.set_materialize_grads(False)
        # saving out costs no memory (the next layer holds it as its input); an in-place change of it afterwards
        # makes backward raise (autograd's version check), never read a changed tensor
        saved = out if backward_reads_out is not None and backward_reads_out(args) else conv_out
        ctx.save_for_backward(x, weight, styles, noise, noise_strength, bias, saved, d, *prepared)
        ctx.args = tuple(args)
        ctx.has = (noise is not None, noise_strength is not None, bias is not None, skip is not None)

    def backward(ctx, grad_out, *_grads_of_saved_outputs):
        x, weight, styles, noise, noise_strength, bias, conv_out, d, *prepared = ctx.saved_tensors
        has_noise, has_strength, has_bias, has_skip = ctx.has
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3] and has_noise, need[4] and has_noise and has_strength,
                need[5] and has_bias, need[6] and has_skip]
        if grad_out is None or not any(mask):
            return (None,) * (7 + len(ctx.args))
        grads = backward_op(grad_out, x, weight, styles, noise, noise_strength, bias, conv_out, d, *prepared,
                            *ctx.args, mask)
        return (*[g if m else None for g, m in zip(grads, mask)],) + (None,) * len(ctx.args)

    apply = register_autograd(modconv_op, backward, setup)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"modulated_conv2d on the {backend!r} backend has a hand-written first derivative only: "
                           "double backward (e.g. a gradient penalty through it) is not supported; run that code with "
                           "lsap_kernels.use_backend('reference')")

    modconv_bwd_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
    return apply
