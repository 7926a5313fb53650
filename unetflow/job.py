"""What travels to a worker and back: the BlockJob (a run's plan and specs) and the BlockResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unetflow import store
from unetflow.config import NormSpec, SkipSpec, TilingSpec
from unetflow.label import INTERIOR_THRESHOLD
from unetflow.model.predictor import NetSource
from unetflow.plan import Plan

WRITE_THREADS = 2  # default writer pool per worker process


@dataclass(frozen=True)
class OutputSpec:
    """What the written output holds: ``probabilities`` (K channels), ``labels`` or ``instances``."""

    kind: str = "probabilities"
    dtype: str = "float32"
    interior_threshold: float = INTERIOR_THRESHOLD  # instances: see unetflow.label.instance_classes


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to compute any block of one run."""

    input_path: str
    output_path: str
    plan: Plan
    layout: store.Layout
    source: NetSource
    norm: NormSpec
    norm_stats: tuple[tuple[float, float], ...]
    output: OutputSpec = field(default_factory=OutputSpec)
    tiling: TilingSpec = field(default_factory=TilingSpec)  # mirror mode and batch size (the plan holds the shapes)
    skip: SkipSpec = field(default_factory=SkipSpec)  # mask path absolute
    device: str = "auto"
    amp: bool | None = None
    threads: int = 0
    flush_planes: int = 0  # write finished planes (axis 0) in multiples of this; 0: once per block
    compile: bool = False
    input_level: int | None = None
    write_threads: int = 0  # compress + write threads per worker; 0: WRITE_THREADS
    nan_value: float | None = None  # replaces NaN/Inf in raw reads (unetflow.finite.finite_block); None: refuse them


@dataclass(frozen=True)
class BlockResult:
    """What a block reports back: seconds per stage (:mod:`unetflow.telemetry`), sizes, where it ran."""

    block_id: int
    n_patches: int
    voxels: int
    device: str
    pid: int
    stages: dict[str, float] = field(default_factory=dict)
    seconds_wall: float = 0.0
    objects: int = 0
    peak_rss: int = 0  # bytes, the worker process's peak resident set so far
    skipped: str = ""  # "", "empty" or "mask": written as the fill value, model not run
    lanes: int = 1  # forward passes side by side (CPU lanes)
    write_threads: int = 1
    amp_check: dict[str, Any] | None = None  # the bf16 guard's measurement (model.predictor.Predictor.check_amp)
    peak_device_memory: int = 0  # bytes, the GPU memory torch allocated at most in this worker so far (0 on a CPU)

    @property
    def seconds(self) -> float:
        return self.seconds_wall

    @property
    def seconds_read(self) -> float:
        return self.stages.get("read", 0.0)

    @property
    def seconds_compute(self) -> float:
        """Seconds inside forward passes (summed over lanes; CUDA events on a GPU)."""
        return self.stages.get("forward", 0.0)

    @property
    def seconds_write(self) -> float:
        return self.stages.get("write", 0.0)

    @property
    def busy(self) -> float:
        """Fraction of the block's wall time in forward passes, per lane (GPU busy on GPUs)."""
        return self.seconds_compute / self.lanes / self.seconds_wall if self.seconds_wall > 0 else 0.0
