"""Optimisation-based GAN inversion with LSAP's alignment term (LSAP_O): ``Inverter``, jobs, ``lsap-invert``."""
from .edit import apply_direction, load_direction
from .inverter import InversionResult, Inverter
from .lpips import LPIPS, load_lpips

__all__ = ["Inverter", "InversionResult", "LPIPS", "apply_direction", "load_direction", "load_lpips"]
