"""StyleLayout: how per-layer style vectors are packed into one [B, C_total] tensor."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from .._checks import check_tensor, describe


@dataclass(frozen=True)
class StyleLayout:
    """Layer ``l`` occupies columns ``offsets[l]:offsets[l+1]`` of the packed styles and reads W+ entry
    ``w_index[l]``."""

    names: tuple[str, ...]
    channels: tuple[int, ...]
    offsets: tuple[int, ...]
    w_index: tuple[int, ...]
    _device_offsets: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self):
        n = len(self.channels)
        if n == 0:
            raise ValueError("StyleLayout needs at least one layer")
        if len(self.names) != n or len(self.w_index) != n or len(self.offsets) != n + 1:
            raise ValueError(
                f"StyleLayout: names ({len(self.names)}), channels ({n}), w_index ({len(self.w_index)}) and "
                f"offsets ({len(self.offsets)}, expected {n + 1}) disagree")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"StyleLayout: every layer needs >= 1 channel, got channels={self.channels}")
        if tuple(accumulate(self.channels, initial=0)) != tuple(self.offsets):
            raise ValueError(f"StyleLayout: offsets {self.offsets} are not the cumulative sums of {self.channels}")

    @classmethod
    def from_channels(cls, channels, names=None, w_index=None) -> "StyleLayout":
        channels = tuple(int(c) for c in channels)
        return cls(
            names=tuple(names) if names is not None else tuple(f"layer{i}" for i in range(len(channels))),
            channels=channels,
            offsets=tuple(accumulate(channels, initial=0)),
            w_index=tuple(w_index) if w_index is not None else tuple(range(len(channels))),
        )

    @property
    def n_layers(self) -> int:
        return len(self.channels)

    @property
    def total_channels(self) -> int:
        return self.offsets[-1]

    def offsets_tensor(self, device: torch.device) -> torch.Tensor:
        """int64 [L+1] offsets on ``device`` for kernels; built once per device."""
        key = str(device)
        t = self._device_offsets.get(key)
        if t is None:
            t = torch.tensor(self.offsets, dtype=torch.int64, device=device)
            self._device_offsets[key] = t
        return t

    def check_styles(self, name: str, styles) -> torch.Tensor:
        """``styles`` is a floating [B, C_total] tensor packed by this layout."""
        check_tensor(name, styles, ndim=2)
        if styles.shape[1] != self.total_channels:
            raise ValueError(
                f"{name} must have shape [B, {self.total_channels}] (packed by a layout of {self.n_layers} layers, "
                f"C_total={self.total_channels}), got {describe(styles)}")
        return styles
