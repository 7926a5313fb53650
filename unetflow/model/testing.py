"""Oracle networks for tests and benchmarks: their stitched output is known exactly.

``ScaleNet(factor, margin)`` returns ``factor * input``, cropped by ``margin`` on every
side when ``margin > 0`` (so it tiles like a ``valid`` net). Any correct tiling,
blending or stitching of it must reproduce ``factor * image`` exactly.

Two test knobs make runs slow or broken on purpose: ``delay`` sleeps that many
seconds per forward pass (to kill or cancel a run midway), and ``fail_above`` raises
in any forward pass that sees an input value above it (a block that always fails).
"""

from __future__ import annotations

import time
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

    def __init__(self, *, factor: float = 1.0, margin: int = 0, dims: int = 3, channels: int = 1, multiple: int = 1,
                 delay: float = 0.0, fail_above: float | None = None):
        super().__init__()
        self.delay = float(delay)
        self.fail_above = fail_above
        self.factor = float(factor)
        self.dims = dims
        self.in_channels = channels
        self.classes = channels
        padding = "valid" if margin else "same"
        self.geometry = FixedGeometry(padding, multiple, margin, margin)
        self.activation = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        if self.fail_above is not None and bool((x > self.fail_above).any()):
            raise RuntimeError(f"ScaleNet: input value above {self.fail_above} (a planted failure)")
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
    delay: float = 0.0
    fail_above: float | None = None

    def load(self) -> ScaleNet:
        return ScaleNet(factor=self.factor, margin=self.margin, dims=self.dims, channels=self.channels, multiple=self.multiple,
                        delay=self.delay, fail_above=self.fail_above)

    def describe(self) -> dict[str, object]:
        # delay and fail_above do not change what a successful block writes
        return {"kind": "scale-net", "factor": self.factor, "margin": self.margin, "dims": self.dims}


class NearFreeNet(nn.Module):
    """Two output channels, ``x`` and ``1 - x``: a model that costs almost nothing.

    The benchmark's "pipeline ceiling" runs it through ``unetflow segment`` to measure
    everything a run does besides the forward pass (reading, normalising, cutting
    patches, blending, converting, writing). It normalises like a trained U-Net
    (percentiles to 0..1), so its outputs are probabilities-like values in about 0..1.
    """

    def __init__(self, *, dims: int = 3):
        super().__init__()
        from unetflow.config import NormSpec

        self.dims = dims
        self.in_channels = 1
        self.classes = 2
        self.geometry = FixedGeometry("same")
        self.activation = "none"
        self.norm = NormSpec(kind="percentile")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1.0 - x], dim=1)


@dataclass(frozen=True)
class NearFreeSource:
    """A picklable recipe for :class:`NearFreeNet`."""

    dims: int = 3

    def load(self) -> NearFreeNet:
        return NearFreeNet(dims=self.dims)

    def describe(self) -> dict[str, object]:
        return {"kind": "near-free", "dims": self.dims}
