"""StyleGAN2 generator in rosinality's state_dict layout, built on the functional ops (SPEC §2).

Parameter and buffer names and shapes equal rosinality's stylegan2-pytorch ``Generator`` of the same config,
so its checkpoints load strictly both ways; every modulated layer runs through ``modulated_conv2d``, so faster
backends speed the model up without touching it.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.modconv import as_parameter, modulated_conv2d
from ..ops.modconv.reference import fir_kernel
from ..ops.style.layout import StyleLayout

LAYER_SETS = ("lsap", "all")
PRECISIONS = ("fp32", "bf16")


def config_f_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """rosinality's channel table: resolution -> channels."""
    cm = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
            1024: 16 * cm}


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with run-time weight scaling (equalised learning rate); ``activation``: leaky-ReLU·√2."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):
        # bias·lr_mul + scale·(x @ Wᵀ) as one addmm (its beta and alpha), not three launches (W·scale, b·lr_mul,
        # linear): 26 of these run per synthesis and host time bounds a GPU step's small layers
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, self.weight.t(), beta=self.lr_mul, alpha=self.scale)
        out = out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])
        return F.leaky_relu(out, 0.2) * math.sqrt(2.0) if self.activation else out

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(y, f) with forward(x) = f·y, for a linear layer and x [B, in_dim]: y = x @ Wᵀ + bias·lr_mul/scale, one
        addmm whose backward is a single mm (addmm's alpha ≠ 1 adds a multiply launch to it). For consumers that
        fold f into a scale of their own: a modulated convolution is the same with styles y and weight gain g·f."""
        return torch.addmm(self.bias, x, self.weight.t(), beta=self.lr_mul / self.scale), self.scale


class FIRBuffer(nn.Module):
    """Holds the up-sampling FIR as buffer ``kernel`` where rosinality's Blur/Upsample modules keep it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(1, torch.float32, torch.device("cpu"))[0, 0].clone())


class ModulatedConv(nn.Module):
    """Weights of one modulated convolution: ``weight`` [1, Cout, Cin, k, k] and the affine ``modulation``."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        if upsample:  # registered first: rosinality's state_dict order
            self.blur = FIRBuffer()
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.demodulate = demodulate
        self.up = 2 if upsample else 1

    def operands(self, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(weight, styles, weight_gain) for ``modulated_conv2d`` next to activations of ``dtype``: the parameters
        as they are where the op takes them (float32 next to bf16: the kernels convert them as they read them, no
        cast per call), and the affine's scale folded into the weight gain (the op depends on styles·gain only)."""
        styles, factor = self.modulation.unscaled(w)
        return as_parameter(self.weight[0], dtype), as_parameter(styles, dtype), self.scale * factor


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class BiasActivation(nn.Module):
    """Holds the per-channel ``bias`` of rosinality's FusedLeakyReLU; the op applies it."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv(in_channel, out_channel, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasActivation(out_channel)

    def forward(self, x, w, noise=None, clamp=None):
        c, dt = self.conv, x.dtype
        weight, styles, gain = c.operands(w, dt)
        return modulated_conv2d(x, weight, styles, weight_gain=gain, demodulate=c.demodulate, up=c.up,
                                noise=None if noise is None else as_parameter(noise, dt),
                                noise_strength=as_parameter(self.noise.weight, dt),
                                bias=as_parameter(self.activate.bias, dt), activation="lrelu", clamp=clamp)


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = FIRBuffer()
        self.conv = ModulatedConv(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, w, skip=None, clamp=None):
        weight, styles, gain = self.conv.operands(w, x.dtype)
        return modulated_conv2d(x, weight, styles, weight_gain=gain, demodulate=False,
                                bias=as_parameter(self.bias.view(3), x.dtype), activation="linear", clamp=clamp,
                                skip=skip)


class ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))


class Generator(nn.Module):
    """rosinality-layout StyleGAN2 generator: ``mapping(z) -> w``, ``synthesis(w_plus, noise) -> image``.

    ``channels`` overrides the per-resolution channel table (default: config-f with ``channel_multiplier``);
    ``conv_clamp`` clamps every layer's output to ±conv_clamp (NVIDIA networks; None = rosinality's no clamp).
    ``precision="bf16"``: synthesis runs in bfloat16 (activations; the fp32 weights are rounded as the kernels read
    them, or cast per call on backends that do not read fp32 parameters) with fp32 accumulation in the kernels;
    latents, noise inputs and the returned image keep their own dtype (fp32), gradients flow back to them in it.
    "fp32" (default): everything in the parameters' dtype.
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 lr_mlp: float = 0.01, channels: dict[int, int] | None = None, conv_clamp: float | None = None,
                 precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        self.size, self.style_dim, self.n_mlp = size, style_dim, n_mlp
        self.channel_multiplier, self.lr_mlp = channel_multiplier, lr_mlp
        self.channels = dict(channels) if channels is not None else config_f_channels(channel_multiplier)
        self.log_size = int(math.log2(size))
        missing = [2**i for i in range(2, self.log_size + 1) if 2**i not in self.channels]
        if missing:
            raise ValueError(f"channels has no entry for resolutions {missing} (size {size})")
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True)
                                                 for _ in range(n_mlp)])
        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch
        # rosinality keeps latent_avg beside g_ema in the checkpoint, not in it: non-persistent.
        self.register_buffer("latent_avg", torch.zeros(style_dim), persistent=False)
        # NVIDIA's conv_clamp (not in rosinality): every layer output and toRGB clamped to ±conv_clamp.
        self.conv_clamp: float | None = None if conv_clamp is None else float(conv_clamp)
        self._layouts: dict[str, tuple[StyleLayout, tuple[str, ...]]] = {}

    # ---- mapping -------------------------------------------------------------------------------------
    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z [B, style_dim] -> w [B, style_dim]; truncation towards ``latent_avg`` when psi != 1."""
        self._check_latent("z", z, 2)
        w = self.style(z)
        return w if truncation_psi == 1.0 else torch.lerp(self.latent_avg.to(w.dtype), w, truncation_psi)

    @torch.no_grad()
    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of ``mapping(z)`` over ``n_latent`` samples, [1, style_dim] (rosinality's ``mean_latent``)."""
        z = torch.randn(n_latent, self.style_dim, generator=generator).to(self.latent_avg.device)
        return self.style(z.to(self.latent_avg.dtype)).mean(0, keepdim=True)

    # ---- noise ---------------------------------------------------------------------------------------
    def noise_shapes(self) -> list[tuple[int, int]]:
        return [tuple(getattr(self.noises, f"noise_{i}").shape[-2:]) for i in range(self.num_layers)]

    def make_noise(self, batch: int = 1, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Fresh noise maps [batch, 1, r, r] in rosinality's order (4, 8, 8, 16, 16, ...)."""
        ref = self.latent_avg
        where = generator.device if generator is not None else ref.device  # draw where the stream lives
        return [torch.randn(batch, 1, h, w, generator=generator, device=where).to(device=ref.device, dtype=ref.dtype)
                for h, w in self.noise_shapes()]

    # ---- synthesis -----------------------------------------------------------------------------------
    def synthesis(self, w_plus: torch.Tensor, noise: list | None = None, randomize_noise: bool = True) -> torch.Tensor:
        """W+ [B, n_latent, style_dim] (or W [B, style_dim], used for every layer) -> image [B, 3, size, size].

        ``noise``: list of ``num_layers`` maps [B or 1, 1, r, r] (entries may be None); when ``noise`` is None,
        fresh random maps (``randomize_noise``) or the stored ``noises.noise_i`` buffers.
        """
        w_plus = self._as_w_plus(w_plus)
        batch = w_plus.shape[0]
        if noise is None:
            noise = (self.make_noise(batch) if randomize_noise else
                     [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)])
            noise = [n.to(w_plus.dtype) for n in noise]
        elif len(noise) != self.num_layers:
            raise ValueError(f"noise must be a list of {self.num_layers} maps (one per conv layer), got {len(noise)}")
        clamp = self.conv_clamp
        compute = torch.bfloat16 if self.precision == "bf16" else self.input.input.dtype
        x = self.input.input.expand(batch, -1, -1, -1).to(compute)
        ws = w_plus.unbind(1)  # one backward node (a stack), where each w_plus[:, i] would add a zero-filled copy
        x = self.conv1(x, ws[0], noise[0], clamp)
        skip = self.to_rgb1(x, ws[1], clamp=clamp)
        for j, to_rgb in enumerate(self.to_rgbs):
            i = 2 * j + 1
            x = self.convs[2 * j](x, ws[i], noise[i], clamp)
            x = self.convs[2 * j + 1](x, ws[i + 1], noise[i + 1], clamp)
            skip = to_rgb(x, ws[i + 2], skip, clamp)
        return skip if self.precision == "fp32" else skip.to(w_plus.dtype)

    def forward(self, styles, return_latents: bool = False, inject_index: int | None = None, truncation: float = 1.0,
                truncation_latent: torch.Tensor | None = None, input_is_latent: bool = False, noise=None,
                randomize_noise: bool = True):
        """rosinality's call: ``G([z or w or w_plus, (second for mixing)], ...) -> (image, w_plus or None)``."""
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if truncation != 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) < 2:
            w_plus = self._as_w_plus(styles[0])
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            first = styles[0].unsqueeze(1).expand(-1, inject_index, -1)
            second = styles[1].unsqueeze(1).expand(-1, self.n_latent - inject_index, -1)
            w_plus = torch.cat([first, second], 1)
        image = self.synthesis(w_plus, noise=noise, randomize_noise=randomize_noise)
        return image, (w_plus if return_latents else None)

    # ---- style space ---------------------------------------------------------------------------------
    def modulated_layers(self) -> list[tuple[str, int]]:
        """Every modulated layer in forward order as (module name, W+ index)."""
        layers = [("conv1", 0), ("to_rgb1", 1)]
        for j in range(len(self.to_rgbs)):
            layers += [(f"convs.{2 * j}", 2 * j + 1), (f"convs.{2 * j + 1}", 2 * j + 2), (f"to_rgbs.{j}", 2 * j + 3)]
        return layers

    def style_layout(self, layers: str = "lsap") -> StyleLayout:
        """The packing of ``style_space(w, layers)``: "lsap" = conv1, every conv and the last toRGB (one layer per
        W+ entry, as the LSAP reference uses); "all" = every modulated layer (StyleSpace)."""
        if layers not in LAYER_SETS:
            raise ValueError(f"layers must be one of {LAYER_SETS}, got {layers!r}")
        if layers not in self._layouts:
            chosen = self.modulated_layers()
            if layers == "lsap":
                last_rgb = f"to_rgbs.{len(self.to_rgbs) - 1}"
                chosen = [(n, i) for n, i in chosen if not n.startswith("to_rgb") or n == last_rgb]
            names = tuple(n for n, _ in chosen)
            channels = [self.get_submodule(n).conv.modulation.weight.shape[0] for n in names]
            layout = StyleLayout.from_channels(channels, names, [i for _, i in chosen])
            self._layouts[layers] = (layout, names)
        return self._layouts[layers][0]

    def style_space(self, w: torch.Tensor, layers: str = "lsap") -> tuple[torch.Tensor, StyleLayout]:
        """Styles s_l = A_l(w_l) of the chosen layers packed as [B, C_total], and their ``StyleLayout``."""
        layout = self.style_layout(layers)
        w_plus = self._as_w_plus(w)
        ws = w_plus.unbind(1)  # as in synthesis: one stack in the backward, not a zero-filled copy per layer
        ys, factors = zip(*(self.get_submodule(n).conv.modulation.unscaled(ws[i])
                            for n, i in zip(layout.names, layout.w_index)))
        # every affine maps style_dim inputs at lr_mul 1, so one scale 1/√style_dim for all: one multiply, not one
        # per layer (and none in each addmm's backward)
        return torch.cat(ys, 1) * factors[0], layout

    # ---- checks --------------------------------------------------------------------------------------
    def _check_latent(self, name: str, t, ndim: int) -> None:
        ref = self.latent_avg
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.shape[-1] != self.style_dim:
            shape = "[B, style_dim]" if ndim == 2 else "[B, n_latent, style_dim]"
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape {shape} = [B, {self.style_dim}]"
                             f"{'' if ndim == 2 else f' with n_latent={self.n_latent}'}, got {got}")
        if t.device != ref.device or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor on the generator's device {ref.device}, "
                             f"got dtype {t.dtype} on {t.device}")

    def _as_w_plus(self, w: torch.Tensor) -> torch.Tensor:
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            self._check_latent("w", w, 2)
            return w.unsqueeze(1).expand(-1, self.n_latent, -1)
        self._check_latent("w_plus", w, 3)
        if w.shape[1] != self.n_latent:
            raise ValueError(f"w_plus must have shape [B, {self.n_latent}, {self.style_dim}], got {tuple(w.shape)}")
        return w
