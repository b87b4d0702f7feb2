"""StyleGAN2 models on top of the ops."""
from ..ops.style.layout import StyleLayout
from .checkpoints import infer_config, load_generator, save_generator
from .stylegan2 import Generator, config_f_channels

__all__ = ["Generator", "StyleLayout", "config_f_channels", "infer_config", "load_generator", "save_generator"]
