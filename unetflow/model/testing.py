"""Oracle networks for tests and benchmarks: their stitched output is known exactly.

``ScaleNet(factor, margin)`` returns ``factor * input``, cropped by ``margin`` on every
side when ``margin > 0`` (so it tiles like a ``valid`` net). Any correct tiling,
blending or stitching of it must reproduce ``factor * image`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unetflow.errors import ShapeError


@dataclass(frozen=True)
class FixedGeometry:
    """Geometry of an oracle net: a fixed margin, any size that is a multiple of ``input_multiple``."""

    padding: str
    input_multiple: int = 1
    margin: int = 0
    receptive_radius: int = 0

    def output_size(self, n: int) -> int:
        if n % self.input_multiple or n - 2 * self.margin < 1:
            raise ShapeError(
                f"patch size {n} is not a multiple of {self.input_multiple} larger than {2 * self.margin}; "
                f"use a multiple of {self.input_multiple}"
            )
        return n - 2 * self.margin


class ScaleNet(nn.Module):
    """``factor * x``, centre-cropped by ``margin``: an exact oracle for stitching."""

    def __init__(self, *, factor: float = 1.0, margin: int = 0, dims: int = 3, channels: int = 1, multiple: int = 1):
        super().__init__()
        self.factor = float(factor)
        self.dims = dims
        self.in_channels = channels
        self.classes = channels
        padding = "valid" if margin else "same"
        self.geometry = FixedGeometry(padding, multiple, margin, margin)
        self.activation = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.geometry.margin
        if m:
            x = x[(slice(None), slice(None)) + (slice(m, -m),) * self.dims]
        return x * self.factor


@dataclass(frozen=True)
class ScaleNetSource:
    """A picklable recipe for :class:`ScaleNet`, usable wherever a checkpoint source is."""

    factor: float = 1.0
    margin: int = 0
    dims: int = 3
    channels: int = 1
    multiple: int = 1

    def load(self) -> ScaleNet:
        return ScaleNet(factor=self.factor, margin=self.margin, dims=self.dims, channels=self.channels, multiple=self.multiple)

    def describe(self) -> dict[str, object]:
        return {"kind": "scale-net", "factor": self.factor, "margin": self.margin, "dims": self.dims}
