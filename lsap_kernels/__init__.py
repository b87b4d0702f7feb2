"""lsap-kernels: fused StyleGAN2 / LSAP kernels for GAN inversion."""
from .backends import BackendError, available_backends, chosen_backend, use_backend
from .models import Generator, StyleLayout, load_generator, save_generator
from .ops.modconv import modulated_conv2d
from .ops.style import sncd, style_anchors, style_normalize
from .metrics import SNCD, SNCDLoss, cached_anchors
from .invert import InversionResult, Inverter, apply_direction
from .patch import StyleGAN2Patch, patch_stylegan2, unpatch_stylegan2
from . import nn

__version__ = "0.1.0"

__all__ = [
    "SNCD", "SNCDLoss", "BackendError", "Generator", "cached_anchors", "StyleLayout", "available_backends", "chosen_backend", "load_generator",
    "Inverter", "InversionResult", "apply_direction", "modulated_conv2d", "save_generator", "sncd", "style_anchors", "style_normalize", "use_backend",
    "StyleGAN2Patch", "nn", "patch_stylegan2", "unpatch_stylegan2",
]
