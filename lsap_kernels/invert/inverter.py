"""LSAP_O: batched optimisation-based embedding into W+ (or W) with the SNCD alignment term (SPEC §1).

The optimisation is the StyleGAN2 projector's (rosinality ``projector.py``, after NVIDIA's): start from the mean
latent, Adam, learning rate with a linear ramp-up and a cosine ramp-down, Gaussian noise added to the latent
that decays to zero over the first ``noise_ramp`` of the steps, per-layer noise maps optimised beside the
latent with the multi-scale autocorrelation regulariser and renormalised to zero mean / unit variance after
every step. LSAP_O adds λ·SNCD of the W+ code.

Batch invariance: every loss term is computed per image and the per-image losses are summed; the codes and
noise maps of image k are separate entries of the optimised tensors and Adam is elementwise, so image k's
trajectory does not depend on the other images. Every random draw (initial noise maps, latent noise) comes from
a per-image ``torch.Generator`` seeded by ``(seed, image key)``, where the key is the image's content hash
unless ``ids=`` names it. So ``invert(x[k:k+1])`` equals ``invert(x)[k]`` up to floating-point tolerance.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..metrics import SNCDLoss

SPACES = ("w+", "w")
PRECISIONS = ("fp32", "bf16")


# ---- schedule --------------------------------------------------------------------------------------------
def learning_rate(t: float, initial_lr: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """Projector schedule at progress ``t`` in [0, 1): ``lr·min(1, t/rampup)·(0.5 − 0.5·cos(π·min(1, (1−t)/rampdown)))``."""
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp *= min(1.0, t / rampup) if rampup > 0 else 1.0
    return initial_lr * ramp


def latent_noise_strength(t: float, latent_std: float, factor: float = 0.05, ramp: float = 0.75) -> float:
    """Std of the noise added to the latent at progress ``t``: ``latent_std·factor·max(0, 1 − t/ramp)²``."""
    return latent_std * factor * max(0.0, 1.0 - t / ramp) ** 2 if ramp > 0 else 0.0


# ---- per-image losses ------------------------------------------------------------------------------------
def noise_regularize(noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image multi-scale noise regulariser [B]: Σ over maps and over the 2× average-pooled pyramid (down to
    8×8) of the squared mean autocorrelation at a one-pixel shift, horizontally and vertically."""
    loss = 0
    for n in noises:
        while True:
            h, w = n.shape[-2:]
            loss = loss + (n * torch.roll(n, 1, 3)).mean((1, 2, 3)).square() \
                + (n * torch.roll(n, 1, 2)).mean((1, 2, 3)).square()
            if h <= 8 or w <= 8 or h % 2 or w % 2:
                break
            n = n.reshape(n.shape[0], 1, h // 2, 2, w // 2, 2).mean((3, 5))
    return loss


@torch.no_grad()
def noise_normalize_(noises: Sequence[torch.Tensor]) -> None:
    """Renormalise every image's every noise map to zero mean and unit std, in place."""
    for n in noises:
        mean = n.mean((1, 2, 3), keepdim=True)
        std = n.std((1, 2, 3), keepdim=True)
        n.sub_(mean).div_(std)


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).square().flatten(1).mean(1)


def psnr_of_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of a mean squared error of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of images in [-1, 1]; ``x`` is clamped to [-1, 1] first."""
    return psnr_of_mse(mse_per_image(x.clamp(-1, 1).float(), y.float()))


def downsample_to(x: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Average-pool images larger than ``size`` down by an integer factor (the projector does this for LPIPS)."""
    b, c, h, w = x.shape
    if h <= size:
        return x
    f = h // size
    return x.reshape(b, c, h // f, f, w // f, f).mean((3, 5))


def image_seed(seed: int, key) -> int:
    """The per-image RNG seed: 63 bits of sha256(f"{seed}|{key}")."""
    digest = hashlib.sha256(f"{int(seed)}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def content_key(image: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of one image's float32 values: its identity when no id is given."""
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]


def backends_used(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  precision: str = "fp32") -> dict[str, str]:
    """The backend each op of an inversion step runs on for this device, latent dtype and synthesis precision
    (with "bf16" the modulated convolutions see bfloat16 activations; the SNCD term always sees the latents)."""
    conv_dtype = torch.bfloat16 if precision == "bf16" else dtype
    return {"modulated_conv2d": backends.chosen_backend("modulated_conv2d", device, conv_dtype),
            "sncd": backends.chosen_backend("sncd", device, dtype)}


@contextlib.contextmanager
def generator_precision(generator: nn.Module, precision: str):
    """Run ``generator``'s synthesis in ``precision`` ("fp32" | "bf16", see ``Generator``) inside the block."""
    old, generator.precision = generator.precision, precision
    try:
        yield
    finally:
        generator.precision = old


def check_precision(precision, device: torch.device) -> None:
    """Refuse an unknown precision, and bf16 where the device or the modulated_conv2d backend cannot run it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16': the GPU {torch.cuda.get_device_name(device)} ({device}) has no "
                         "bfloat16 support; use precision='fp32'")
    try:
        backends.select("modulated_conv2d", device, torch.bfloat16)
    except backends.BackendError as exc:
        raise ValueError(f"precision='bf16' cannot run with the modulated_conv2d backend forced here: {exc}. Use "
                         "precision='fp32', or a backend that takes bfloat16 (cpu, reference)") from exc


class StepStats(Mapping):
    """A step's batch means ("loss", "psnr", "sncd") as floats, read from the device only when first accessed:
    a callback that looks every k steps lets the host run ahead of a GPU in between (each read waits for the
    step to finish)."""

    def __init__(self, loss: torch.Tensor, mse: torch.Tensor, sncd: torch.Tensor):
        self._tensors = {"loss": loss, "mse": mse, "sncd": sncd}
        self._values: dict[str, float] = {}

    def __getitem__(self, key: str) -> float:
        if key not in self._values:
            if key == "psnr":
                self._values[key] = psnr_of_mse(self._tensors["mse"]).mean().item()
            elif key in ("loss", "sncd"):
                self._values[key] = self._tensors[key].mean().item()
            else:
                raise KeyError(key)
        return self._values[key]

    def __iter__(self):
        return iter(("loss", "psnr", "sncd"))

    def __len__(self) -> int:
        return 3


# ---- result ----------------------------------------------------------------------------------------------
@dataclass
class InversionResult:
    """What ``Inverter.invert`` returns; every per-image field has the batch as first axis.

    latents [B, n_latent, style_dim] (W+; a W inversion is returned expanded), noises: one [B, 1, r, r] map per
    conv layer (rosinality order), images [B, 3, R, R] reconstructions (final code and noise, no latent noise),
    loss [B] (the objective at the final code), mse [B], psnr [B] (dB, images in [-1, 1]), sncd [B] (mean over
    the layers, as ``SNCD`` reports it), lpips [B] or None, seeds (per-image RNG seeds), keys (per-image ids).
    """

    latents: torch.Tensor
    noises: list[torch.Tensor]
    images: torch.Tensor
    loss: torch.Tensor
    mse: torch.Tensor
    psnr: torch.Tensor
    sncd: torch.Tensor
    lpips: torch.Tensor | None = None
    seeds: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    backends: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def image_steps_per_s(self) -> float:
        return len(self) * self.steps / self.seconds if self.seconds > 0 else float("nan")

    def __getitem__(self, index) -> "InversionResult":
        """The result of image ``index`` (an int keeps a batch axis of 1) or of a slice / index list."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t[torch.as_tensor(index)])
        pick_list = (lambda xs: xs[index]) if isinstance(index, slice) else (lambda xs: [xs[i] for i in index])
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = pick(v)
            elif f.name == "noises":
                out[f.name] = [pick(n) for n in v]
            elif f.name in ("seeds", "keys"):
                out[f.name] = pick_list(v)
            else:
                out[f.name] = v
        return InversionResult(**out)

    def to(self, device) -> "InversionResult":
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(device)
        out["noises"] = [n.to(device) for n in self.noises]
        return InversionResult(**out)


# ---- the inverter ----------------------------------------------------------------------------------------
class Inverter:
    """Optimisation-based GAN inversion with LSAP's alignment term (LSAP_O), batched and batch-invariant.

    Per image b the objective is

        loss_b = pixel_weight · MSE_b + perceptual_weight · LPIPS_b + noise_regularize · NR_b
                 + sncd_weight · Σ_l (1 − ŝ_bl · μ_l)

    with MSE_b the mean squared error over pixels of images in [-1, 1], NR_b the multi-scale noise regulariser of
    image b's noise maps, and the SNCD term summed over the ``sncd_layers`` layers (L of them): Σ_l (1 − ŝ·μ) =
    L · SNCD_b. That is the LSAP reference's scale (GANInverter, configs/lsap: λ = 0.5 on −Σ_l mean_b ŝ_bl·μ_l,
    the same gradient per image up to the constant L), so ``sncd_weight=0.5`` is the reference λ. The reported
    ``sncd`` is the usual mean over layers. The batch objective is Σ_b loss_b (not the mean), so nothing
    couples the images.

    ``space``: "w+" (one code per layer, the LSAP setting) or "w" (one code broadcast to every layer).
    ``perceptual``: None (pixel loss only), "lpips" (``lpips_net`` backbone with weights from local files
    ``lpips_backbone`` / ``lpips_lin``, or ``$LSAP_LPIPS_BACKBONE`` / ``$LSAP_LPIPS_LIN``), or a module
    ``(x, y) -> [B]``. Images above 256² are average-pooled to 256² for it, as the projector does.
    ``anchors``: packed SNCD anchors; default ``cached_anchors`` with ``anchor_samples`` samples in ``cache_dir``.
    ``precision``: "fp32" or "bf16" — the generator's synthesis in bfloat16 (activations and weights; fp32
    accumulation in the kernels) while the latents, noise maps, Adam state and every loss stay in the latents'
    dtype (fp32); None (default): the generator's own ``precision``. The generator is frozen
    (``requires_grad_(False)``) and set to this precision while ``invert`` runs, and restored afterwards.
    ``compile``: run each step's synthesis and loss terms through ``torch.compile`` — on CUDA in its
    "reduce-overhead" mode, i.e. replayed as CUDA graphs, which removes the per-launch host time that bounds the
    small layers; the first ``invert`` call compiles (tens of seconds), and each new batch size once more.
    Results agree with eager to floating-point rounding (fused element-wise code), not bit for bit.
    """

    def __init__(self, generator: nn.Module, space: str = "w+", steps: int = 1000, lr: float = 0.1,
                 sncd_weight: float = 0.5, sncd_layers: str = "lsap", perceptual: str | nn.Module | None = None,
                 perceptual_weight: float = 1.0, pixel_weight: float = 1.0, noise_regularize: float = 1e5,
                 initial_noise_factor: float = 0.05, noise_ramp: float = 0.75, lr_rampup: float = 0.05,
                 lr_rampdown: float = 0.25, optimize_noise: bool = True, seed: int = 0,
                 anchors: torch.Tensor | None = None, anchor_samples: int = 100_000, cache_dir=None,
                 n_mean_latent: int = 10_000, lpips_net: str = "vgg", lpips_backbone=None, lpips_lin=None,
                 precision: str | None = None, compile: bool = False):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for name, v in (("lr", lr), ("sncd_weight", sncd_weight), ("pixel_weight", pixel_weight),
                        ("perceptual_weight", perceptual_weight), ("noise_regularize", noise_regularize)):
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.precision = getattr(generator, "precision", "fp32") if precision is None else precision
        check_precision(self.precision, generator.latent_avg.device)
        self.generator = generator
        self.space, self.steps, self.lr = space, int(steps), float(lr)
        self.sncd_weight, self.sncd_layers = float(sncd_weight), sncd_layers
        self.perceptual_weight, self.pixel_weight = float(perceptual_weight), float(pixel_weight)
        self.noise_regularize = float(noise_regularize)
        self.initial_noise_factor, self.noise_ramp = float(initial_noise_factor), float(noise_ramp)
        self.lr_rampup, self.lr_rampdown = float(lr_rampup), float(lr_rampdown)
        self.optimize_noise, self.seed, self.n_mean_latent = bool(optimize_noise), int(seed), int(n_mean_latent)
        self._anchors, self.anchor_samples, self.cache_dir = anchors, int(anchor_samples), cache_dir
        self.layout = generator.style_layout(sncd_layers)  # validates the layer set
        if perceptual is None or isinstance(perceptual, nn.Module) or callable(perceptual):
            self.perceptual = perceptual
        elif perceptual == "lpips":
            from .lpips import load_lpips

            self.perceptual = load_lpips(lpips_net, backbone=lpips_backbone, lin=lpips_lin)
        else:
            raise ValueError(f"perceptual must be None, 'lpips' or a module (x, y) -> [B], got {perceptual!r}")
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.eval().requires_grad_(False)
        self._sncd: SNCDLoss | None = None
        self._mean: tuple[torch.Tensor, float] | None = None
        self.compile = bool(compile)
        self._compiled_terms = None

    # -- settings that change results (for job manifests) --
    def config(self) -> dict:
        return {"space": self.space, "steps": self.steps, "lr": self.lr, "sncd_weight": self.sncd_weight,
                "sncd_layers": self.sncd_layers, "pixel_weight": self.pixel_weight,
                "perceptual": None if self.perceptual is None else getattr(self.perceptual, "name", "custom"),
                "perceptual_weight": self.perceptual_weight, "noise_regularize": self.noise_regularize,
                "initial_noise_factor": self.initial_noise_factor, "noise_ramp": self.noise_ramp,
                "lr_rampup": self.lr_rampup, "lr_rampdown": self.lr_rampdown, "optimize_noise": self.optimize_noise,
                "seed": self.seed, "anchor_samples": self.anchor_samples, "n_mean_latent": self.n_mean_latent,
                "precision": self.precision}

    @property
    def device(self) -> torch.device:
        return self.generator.latent_avg.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.latent_avg.dtype

    def sncd_loss(self) -> SNCDLoss:
        """The SNCD term's module (layer sum, per image); anchors computed or loaded on first use."""
        if self._sncd is None:
            self._sncd = SNCDLoss(self.generator, self.sncd_layers, anchors=self._anchors, layer_reduction="sum",
                                  batch_reduction="none", n_samples=self.anchor_samples, cache_dir=self.cache_dir)
        return self._sncd

    @torch.no_grad()
    def mean_latent(self) -> tuple[torch.Tensor, float]:
        """(w_mean [style_dim], latent_std): ``latent_avg`` when the checkpoint has one (else the mean of
        ``n_mean_latent`` mapped samples from a fixed seed), and the projector's noise scale
        sqrt(Σ ||w − w_mean||² / N) over those samples."""
        if self._mean is None:
            g = self.generator
            z = torch.randn(self.n_mean_latent, g.style_dim, generator=torch.Generator().manual_seed(12345))
            w = g.style(z.to(self.device, self.dtype))
            mean = w.mean(0)
            std = ((w - mean).square().sum() / self.n_mean_latent).sqrt().item()
            if g.latent_avg.abs().sum() > 0:
                mean = g.latent_avg.detach().clone()
            self._mean = (mean, std)
        return self._mean

    def _check_images(self, images) -> torch.Tensor:
        g = self.generator
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or images.shape[2:] != (g.size, g.size):
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 3, {g.size}, {g.size}] (the generator's resolution) with "
                             f"values in [-1, 1], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        return images.detach().to(self.device, self.dtype)

    def _per_image_terms(self, img, target, noises, w_plus, sncd_grad: bool):
        mse = mse_per_image(img, target)
        loss = self.pixel_weight * mse
        lp = None
        if self.perceptual is not None:
            lp = self.perceptual(downsample_to(img), downsample_to(target)).reshape(-1)
            loss = loss + self.perceptual_weight * lp
        if self.optimize_noise and self.noise_regularize > 0:
            loss = loss + self.noise_regularize * noise_regularize(noises)
        if sncd_grad:
            s = self.sncd_loss()(w_plus)
            loss = loss + self.sncd_weight * s
        else:
            with torch.no_grad():
                s = self.sncd_loss()(w_plus)
        return loss, mse, lp, s / self.layout.n_layers

    def _step_terms(self, w_plus, noises, target, sncd_grad: bool):
        """One step's differentiable part: the synthesis and the per-image terms (loss, mse, lpips, sncd)."""
        img = self.generator.synthesis(w_plus, noise=noises)
        return self._per_image_terms(img, target, noises, w_plus, sncd_grad)

    def _step_function(self):
        if not self.compile:
            return self._step_terms
        if self._compiled_terms is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled_terms = torch.compile(self._step_terms, mode=mode)
        return self._compiled_terms

    def invert(self, images: torch.Tensor, *, ids: Sequence | None = None, init: torch.Tensor | None = None,
               callback: Callable[[int, Mapping[str, float]], None] | None = None) -> InversionResult:
        """Invert images [B, 3, R, R] in [-1, 1] (R = generator size).

        ``ids``: one key per image for its RNG stream (default: the image's content hash, so the same image
        gets the same stream in any batch). ``init``: starting codes [B, n_latent, D] or [B, D] instead of the
        mean latent. ``callback(step, stats)`` after every step with batch means of loss, psnr, sncd
        (a ``StepStats`` mapping: each value is read from the device when first accessed).
        """
        g = self.generator
        target = self._check_images(images)
        batch, device, dtype = target.shape[0], self.device, self.dtype
        check_precision(self.precision, device)  # again: a backend may have been forced since __init__
        keys = [str(k) for k in ids] if ids is not None else [content_key(x) for x in target]
        if len(keys) != batch:
            raise ValueError(f"ids must have one entry per image ({batch}), got {len(keys)}")
        seeds = [image_seed(self.seed, k) for k in keys]
        rngs = [torch.Generator().manual_seed(s) for s in seeds]

        flags = [p.requires_grad for p in g.parameters()]
        g.requires_grad_(False)
        with generator_precision(g, self.precision):
            try:
                return self._optimise(target, keys, seeds, rngs, init, callback)
            finally:
                for p, f in zip(g.parameters(), flags):
                    p.requires_grad_(f)

    def _optimise(self, target, keys, seeds, rngs, init, callback) -> InversionResult:
        g, batch, device, dtype = self.generator, target.shape[0], self.device, self.dtype
        w_mean, w_std = self.mean_latent()
        self.sncd_loss()
        shape = (g.n_latent, g.style_dim) if self.space == "w+" else (g.style_dim,)
        if init is None:
            latent = w_mean.expand(batch, *shape).clone()
        else:
            init = init.detach().to(device, dtype)
            if init.dim() == 2 and self.space == "w+":
                init = init[:, None].expand(-1, g.n_latent, -1)
            if tuple(init.shape) != (batch, *shape):
                raise ValueError(f"init must have shape {[batch, *shape]} for space={self.space!r}, "
                                 f"got {tuple(init.shape)}")
            latent = init.clone()
        latent.requires_grad_(True)
        # Initial noise maps, drawn per image (make_noise's order), then its latent noise stream.
        noises = [torch.cat([torch.randn(1, 1, h, w, generator=r) for r in rngs]).to(device, dtype)
                  for h, w in g.noise_shapes()]
        params = [latent] + ([n.requires_grad_(True) for n in noises] if self.optimize_noise else [])
        opt = torch.optim.Adam(params, lr=self.lr)

        def to_w_plus(lat):
            return lat if self.space == "w+" else lat[:, None].expand(-1, g.n_latent, -1)

        step_terms = self._step_function()
        t0 = time.perf_counter()
        for step in range(self.steps):
            t = step / self.steps
            for group in opt.param_groups:
                group["lr"] = learning_rate(t, self.lr, self.lr_rampdown, self.lr_rampup)
            strength = latent_noise_strength(t, w_std, self.initial_noise_factor, self.noise_ramp)
            lat = latent
            if strength > 0:
                draw = torch.stack([torch.randn(shape, generator=r) for r in rngs])
                if device.type == "cuda":  # from pinned memory: a pageable copy would wait for the GPU every step
                    draw = draw.pin_memory()
                lat = latent + strength * draw.to(device, dtype, non_blocking=True)
            w_plus = to_w_plus(lat)
            if self.compile:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
            loss, mse, _, s = step_terms(w_plus, noises, target, self.sncd_weight > 0)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if self.optimize_noise:
                noise_normalize_(noises)
            if callback is not None:
                with torch.no_grad():
                    # copies: with compile=True the next replay overwrites the graph's outputs
                    callback(step, StepStats(loss.detach().clone(), mse.detach().clone(), s.detach().clone()))
        seconds = time.perf_counter() - t0

        with torch.no_grad():
            latent = latent.detach()
            noises = [n.detach() for n in noises]
            w_plus = to_w_plus(latent).contiguous()
            img = g.synthesis(w_plus, noise=noises)
            loss, mse, lp, s = self._per_image_terms(img, target, noises, w_plus, False)
            return InversionResult(
                latents=w_plus, noises=noises, images=img, loss=loss.float(), mse=mse.float(),
                psnr=psnr(img, target), sncd=s.float(), lpips=None if lp is None else lp.float(),
                seeds=seeds, keys=keys, steps=self.steps, seconds=seconds,
                backends=backends_used(device, dtype, self.precision))
