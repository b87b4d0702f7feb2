"""Drop-in layers for rosinality's StyleGAN2: ``FusedStyledConv`` and ``FusedToRGB``.

They are the ``Generator``'s own layers (lsap_kernels.models.stylegan2 ``StyledConv`` / ``ToRGB``: rosinality's
parameter and buffer names and shapes, one ``modulated_conv2d`` call each) with rosinality's constructor and call:
``noise=None`` draws fresh Gaussian noise as rosinality's NoiseInjection does, and a ToRGB built without
``upsample`` refuses a skip. ``load_state_dict`` takes a rosinality StyledConv / ToRGB state_dict as is, and refuses
one whose FIR kernel is not the [1,3,3,1] one the fused op applies.
"""
from __future__ import annotations

import torch

from .models.stylegan2 import StyledConv, ToRGB
from .ops.modconv.reference import FIR_1D
from .patch import refuse_other_fir

__all__ = ["FusedStyledConv", "FusedToRGB"]


def _check_blur_kernel(blur_kernel) -> None:
    if tuple(float(v) for v in blur_kernel) != FIR_1D:
        raise ValueError(f"blur_kernel must be [1, 3, 3, 1] (the FIR the fused op applies), got {list(blur_kernel)!r}")


class FusedStyledConv(StyledConv):
    """rosinality's ``StyledConv(in_channel, out_channel, kernel_size, style_dim, upsample, blur_kernel, demodulate)``:
    ``forward(input, style, noise=None)`` = leaky_relu(modconv(input, style) + weight·noise + bias)·√2, fused."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel=(1, 3, 3, 1), demodulate: bool = True):
        _check_blur_kernel(blur_kernel)
        super().__init__(in_channel, out_channel, kernel_size, style_dim, upsample=upsample)
        self.conv.demodulate = demodulate
        if upsample:
            self.register_load_state_dict_pre_hook(refuse_other_fir("conv.blur.kernel"))

    def forward(self, input: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:  # rosinality's NoiseInjection: fresh N(0, 1) per sample and pixel
            b, _, h, w = input.shape
            noise = input.new_empty(b, 1, h * self.conv.up, w * self.conv.up).normal_()
        return super().forward(input, style, noise)


class FusedToRGB(ToRGB):
    """rosinality's ``ToRGB(in_channel, style_dim, upsample=True, blur_kernel)``: ``forward(input, style, skip=None)``
    = modconv_1×1(input, style) (no demodulation) + bias + upsample_fir(skip), fused."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel=(1, 3, 3, 1)):
        _check_blur_kernel(blur_kernel)
        super().__init__(in_channel, style_dim, upsample=upsample)
        if upsample:
            self.register_load_state_dict_pre_hook(refuse_other_fir("upsample.kernel"))

    def forward(self, input: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None and not hasattr(self, "upsample"):
            raise ValueError(f"FusedToRGB built with upsample=False got a skip of shape {tuple(skip.shape)}; "
                             "build it with upsample=True to add an up-sampled skip")
        return super().forward(input, style, skip)
