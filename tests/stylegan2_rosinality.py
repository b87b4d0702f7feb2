"""Plain-PyTorch reference copy of the Generator side of rosinality's
stylegan2-pytorch ``model.py``.

This is an independent re-implementation written from the public description
of rosinality/stylegan2-pytorch (``model.py``, ``op/upfirdn2d.py``,
``op/fused_act.py``). No code was copied. It exists for two reasons:

* compatibility tests: class names, parameter/buffer names and shapes,
  init values, the RNG draw order at construction, and forward semantics
  follow upstream. ``Generator(...).state_dict()`` therefore has the same keys
  and shapes as upstream, and checkpoints load either way;
* benchmarks: the default ``ModulatedConv2d`` path is the "grouped conv"
  formulation (per-sample weights, ``groups=batch``), and ``upfirdn2d`` runs the
  FIR one channel at a time (``[B*C, 1, H, W]`` conv2d), as upstream's native
  fallback does. This is the slow baseline.

Everything is written with ordinary torch ops, so it runs on CPU or GPU in
float32 or float64. The compute dtype comes from the module's parameters, and
FIR kernels are cast to the input's dtype.
"""
import math
import random

import torch
import torch.nn.functional as F
from torch import nn


def fused_leaky_relu(x, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    """leaky_relu(x + bias[channel]) * scale (bias on dim 1)."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample by zero insertion, pad, FIR filter, then downsample.

    ``pad`` is ``(p0, p1)`` for both axes, or ``(x0, x1, y0, y1)``. p0 pads
    left/top and p1 pads right/bottom; a negative value crops. The filter is a
    true convolution (the kernel is flipped). Output size per axis is
    ``(n*up + p0 + p1 - k) // down + 1``.
    """
    px0, px1, py0, py1 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    y = x.reshape(b * c, 1, h, w)
    if up > 1:  # zero insertion: sample i lands at i*up, the rest stays 0
        z = y.new_zeros(b * c, 1, h * up, w * up)
        z[:, :, ::up, ::up] = y
        y = z
    y = F.pad(y, [px0, px1, py0, py1])  # negative entries crop
    k = torch.flip(kernel, [0, 1]).to(y.dtype).view(1, 1, kh, kw)
    y = F.conv2d(y, k, stride=down)
    return y.reshape(b, c, y.shape[2], y.shape[3])


def make_kernel(k):
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[:, None] * k[None, :]
    return k / k.sum()


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)  # [1,3,3,1], 2 -> (2, 1)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor ** 2
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True, bias_init=0, lr_mul=1, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x):
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activation:  # only "fused_lrelu" exists upstream
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel, bias=True, negative_slope=0.2, scale=2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True,
                 upsample=False, downsample=False, blur_kernel=(1, 3, 3, 1), fused=True):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        nb = len(blur_kernel)
        if upsample:  # k=3, 4-tap blur: pad (1, 1) after the stride-2 transposed conv
            p = (nb - 2) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        if downsample:  # k=3, 4-tap blur: pad (2, 2) before the stride-2 conv
            p = (nb - 2) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate
        self.fused = fused

    def _conv(self, x, w, groups):
        """Plain, up or down conv with weight w [O, I/groups, k, k] (for up: [I, O/groups, k, k])."""
        if self.upsample:
            return self.blur(F.conv_transpose2d(x, w, stride=2, groups=groups))
        if self.downsample:
            return F.conv2d(self.blur(x), w, stride=2, groups=groups)
        return F.conv2d(x, w, padding=self.padding, groups=groups)

    def forward(self, x, style):
        b, cin, h, w = x.shape
        cout, k = self.out_channel, self.kernel_size
        s = self.modulation(style)  # [B, Cin]
        if not self.fused:
            # NVIDIA-style: scale the activations, conv with one shared weight, then demodulate.
            wt = self.scale * self.weight[0]  # [Cout, Cin, k, k]
            x = x * s.view(b, cin, 1, 1)
            out = self._conv(x, wt.transpose(0, 1) if self.upsample else wt, 1)
            if self.demodulate:
                d = torch.rsqrt((wt[None] * s.view(b, 1, cin, 1, 1)).pow(2).sum([2, 3, 4]) + self.eps)
                out = out * d.view(b, cout, 1, 1)
            return out
        # Fused: build one weight per sample and run a grouped conv with groups=batch.
        wt = self.scale * self.weight * s.view(b, 1, cin, 1, 1)  # [B, Cout, Cin, k, k]
        if self.demodulate:
            wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4], keepdim=True) + self.eps)
        if self.upsample:
            wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)
            out = F.conv_transpose2d(x.reshape(1, b * cin, h, w), wt, stride=2, groups=b)
            return self.blur(out.view(b, cout, out.shape[2], out.shape[3]))
        if self.downsample:
            x = self.blur(x)
        h, w = x.shape[2], x.shape[3]
        out = F.conv2d(x.reshape(1, b * cin, h, w), wt.reshape(b * cout, cin, k, k),
                       stride=2 if self.downsample else 1,
                       padding=0 if self.downsample else self.padding, groups=b)
        return out.view(b, cout, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            b, _, h, w = image.shape
            noise = image.new_empty(b, 1, h, w).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, x):
        return self.input.repeat(x.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False,
                 blur_kernel=(1, 3, 3, 1), demodulate=True, fused=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel, demodulate=demodulate, fused=fused)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1), fused=True):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False, fused=fused)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """Upstream layout. Latent index per layer: conv1 -> 0, to_rgb1 -> 1, and for block j
    (resolution 2**(j+3)): convs[2j] -> 2j+1, convs[2j+1] -> 2j+2, to_rgbs[j] -> 2j+3.
    Noise index: conv1 -> 0, convs[m] -> m+1. noise_i is [1, 1, r, r] with r = 2**((i+5)//2).
    ``fused`` (not an upstream argument) sets the ModulatedConv2d path for every layer;
    ``channels`` (not upstream either) replaces the channel table, for small test models."""

    def __init__(self, size, style_dim, n_mlp, channel_multiplier=2, blur_kernel=(1, 3, 3, 1),
                 lr_mlp=0.01, fused=True, channels=None):
        super().__init__()
        self.size = size
        self.style_dim = style_dim
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu")
            for _ in range(n_mlp)])
        cm = channel_multiplier
        self.channels = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm,
                         256: 64 * cm, 512: 32 * cm, 1024: 16 * cm}
        if channels is not None:
            self.channels = dict(channels)
        c4 = self.channels[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, style_dim, blur_kernel=blur_kernel, fused=fused)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False, fused=fused)
        self.log_size = int(math.log(size, 2))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # always empty upstream; kept for attribute parity
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):  # drawn before the conv weights, as upstream does
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        cin = c4
        for res in range(3, self.log_size + 1):
            cout = self.channels[2 ** res]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel, fused=fused))
            self.convs.append(StyledConv(cout, cout, 3, style_dim, blur_kernel=blur_kernel, fused=fused))
            # upstream does not forward blur_kernel to ToRGB: its Upsample always uses [1, 3, 3, 1]
            self.to_rgbs.append(ToRGB(cout, style_dim, fused=fused))
            cin = cout
        self.n_latent = self.log_size * 2 - 2

    def make_noise(self):
        dev = self.input.input.device
        return [torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), device=dev)
                for i in range(self.num_layers)]

    def mean_latent(self, n_latent):
        z = torch.randn(n_latent, self.style_dim, device=self.input.input.device,
                        dtype=self.input.input.dtype)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, x):
        return self.style(x)

    def forward(self, styles, return_latents=False, inject_index=None, truncation=1,
                truncation_latent=None, input_is_latent=False, noise=None, randomize_noise=True):
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            noise = ([None] * self.num_layers if randomize_noise else
                     [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)])
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) < 2:  # one style: broadcast [B, D], or use a [B, n_latent, D] W+ as is
            s = styles[0]
            latent = s if s.ndim >= 3 else s.unsqueeze(1).repeat(1, self.n_latent, 1)
        else:  # style mixing: first inject_index layers use styles[0], the rest styles[1]
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = torch.cat([styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                                styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)], 1)

        out = self.conv1(self.input(latent), latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for j, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * j](out, latent[:, 2 * j + 1], noise=noise[2 * j + 1])
            out = self.convs[2 * j + 1](out, latent[:, 2 * j + 2], noise=noise[2 * j + 2])
            skip = to_rgb(out, latent[:, 2 * j + 3], skip)
        return skip, (latent if return_latents else None)
