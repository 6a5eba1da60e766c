"""The model's input step: int16 HU volumes -> windowed, normalised float (on the accelerator)."""

from __future__ import annotations

import torch
from torch import nn


class HUWindow(nn.Module):
    """Clip HU to ``[hu_min, hu_max]`` and map that window linearly onto [-1, 1].

    Done inside the model so that shards stay int16 HU (half the bytes of float32 on the wire)
    and the cast happens on the GPU. Input (B, Z, Y, X) any integer/float dtype in HU;
    output (B, 1, Z, Y, X) float32.
    """

    def __init__(self, hu_min: float = -1000.0, hu_max: float = 1000.0):
        super().__init__()
        if not hu_max > hu_min:
            raise ValueError(f"HU window needs hu_max > hu_min, got [{hu_min}, {hu_max}]")
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() == 4:
            image = image.unsqueeze(1)
        if image.dim() != 5:
            raise ValueError(f"image must be (B, Z, Y, X) or (B, 1, Z, Y, X), got {tuple(image.shape)}")
        x = image.float().clamp_(self.hu_min, self.hu_max)
        return x.sub_(self.hu_min).mul_(2.0 / (self.hu_max - self.hu_min)).sub_(1.0)

    def extra_repr(self) -> str:
        return f"hu_min={self.hu_min}, hu_max={self.hu_max}"
