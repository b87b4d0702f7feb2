"""The baselines the benchmarks compare against, built in one place so every benchmark times the same code:

  (a) grouped conv     rosinality's generator (tests/stylegan2_rosinality.py, fused=True): per-sample weights,
                       one grouped convolution with groups=B, the FIR as one-channel convolutions over [B·C, 1, H, W]
  (b) input scaling    the same model with fused=False: x ⊙ s, one shared weight, then demodulation (NVIDIA's path)
  (c) torch.compile    the suite: (a) and (b) themselves, torch.compile'd. bench_cpu_step.py: lsap_kernels'
                       Generator on the plain-PyTorch reference op, called without backend dispatch so dynamo sees
                       only torch ops, then torch.compile'd (compiled_reference)

All share one set of random weights (with non-zero biases and noise strengths, as in a trained model), loaded into
lsap_kernels' Generator too, so every provider computes the same function. The SNCD term of the baselines is the
per-layer loop a user writes without this library.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import stylegan2_rosinality as ros  # noqa: E402

import lsap_kernels as L  # noqa: E402
from lsap_kernels.models import stylegan2 as sg  # noqa: E402
from lsap_kernels.ops.modconv import reference as ref_ops  # noqa: E402


def rosinality_generators(size: int, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(grouped-conv model, input-scaling model) of config-f at ``size``, same random weights, frozen, on CPU."""
    torch.manual_seed(seed)
    grouped = ros.Generator(size, 512, 8, fused=True).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and noise strengths, as in a trained model
        for name, prm in grouped.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")) or name.startswith("to_rgb"):
                prm.add_(0.1 * torch.randn_like(prm))
    scaling = ros.Generator(size, 512, 8, fused=False).requires_grad_(False)
    scaling.load_state_dict(grouped.state_dict(), strict=True)
    return grouped, scaling


def lsap_generator(state_dict: dict, size: int, precision: str = "fp32") -> L.Generator:
    """lsap_kernels' Generator with the baselines' weights (``precision``: "fp32" or "bf16"), frozen, on CPU."""
    g = L.Generator(size, precision=precision).requires_grad_(False)
    g.load_state_dict(state_dict, strict=True)
    return g


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.input.input.dtype


def rosinality_synthesis(model):
    """W+ [B, n_latent, 512] and noise maps -> image, through rosinality's call; inputs cast to the model's dtype
    (its compute dtype comes from its parameters), so a bf16 copy of the model runs in bf16."""
    dtype = model_dtype(model)

    def synthesis(w_plus, noise):
        return model([w_plus.to(dtype)], input_is_latent=True, noise=[n.to(dtype) for n in noise])[0]

    return synthesis


def layer_styles(model, w_plus, layout) -> list[torch.Tensor]:
    """Style vectors s_l = A_l(w_l) of ``layout``'s layers, from any model with rosinality's module names."""
    w_plus = w_plus.to(model.conv1.conv.modulation.weight.dtype)
    return [model.get_submodule(n).conv.modulation(w_plus[:, i]) for n, i in zip(layout.names, layout.w_index)]


def sncd_loop(styles: list[torch.Tensor], anchors: torch.Tensor, layout) -> torch.Tensor:
    """Σ_b mean_l (1 − ŝ_bl·μ_l), one layer at a time: the SNCD term a user writes without this library."""
    total = 0.0
    for s, mu in zip(styles, torch.split(anchors, list(layout.channels))):
        s = s.float()
        s_hat = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8)
        total = total + (1 - s_hat @ mu).sum()
    return total / layout.n_layers


def reference_modconv(x, weight, styles, *, weight_gain=None, demodulate=True, up=1, noise=None, noise_strength=None,
                      bias=None, activation="lrelu", gain=None, clamp=None, eps=1e-8, skip=None):
    """The reference backend called directly (no backend dispatch), so torch.compile sees plain torch ops."""
    if weight_gain is None:
        weight_gain = 1.0 / (weight.shape[1] * weight.shape[-1] ** 2) ** 0.5
    if gain is None:
        gain = 2**0.5 if activation == "lrelu" else 1.0
    if noise_strength is None:
        noise_strength = 1.0
    elif isinstance(noise_strength, torch.Tensor):
        noise_strength = noise_strength.reshape(())
    return ref_ops.modulated_conv2d(x, weight, styles, weight_gain, demodulate, up, noise, noise_strength, bias,
                                    activation, gain, clamp, eps, skip)


@contextlib.contextmanager
def reference_without_dispatch():
    """Inside the block lsap_kernels' generator layers call ``reference_modconv`` instead of the public op."""
    saved = sg.modulated_conv2d
    sg.modulated_conv2d = reference_modconv
    try:
        yield
    finally:
        sg.modulated_conv2d = saved


def compiled_reference(fn):
    """torch.compile(fn) for an ``fn`` built on lsap_kernels' layers; every call runs with the reference op patched
    in (dynamo guards on that global, so it must be the same at every call). The first call compiles."""
    compiled = torch.compile(fn)

    def run(*args):
        with reference_without_dispatch():
            return compiled(*args)

    return run


def allow_many_recompiles(limit: int = 512) -> None:
    """Every layer module and batch size is one more compiled graph of the same code object; dynamo's default
    limit (8) would silently run the rest eagerly."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
