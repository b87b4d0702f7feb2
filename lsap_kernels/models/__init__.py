"""StyleGAN2 models on top of the ops."""
from ..ops.style.layout import StyleLayout
from .checkpoints import infer_config, load_generator, save_generator
from .nvidia_pkl import NetworkPickleError, load_network_pickle, read_nvidia_pickle
from .stylegan2 import Generator, config_f_channels

__all__ = ["Generator", "NetworkPickleError", "StyleLayout", "config_f_channels", "infer_config", "load_generator",
           "load_network_pickle", "read_nvidia_pickle", "save_generator"]
