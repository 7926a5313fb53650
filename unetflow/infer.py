"""One block: read, normalise, predict patches, blend, convert, write.

This is the code a worker runs. A :class:`BlockJob` carries everything it needs and
is small and picklable; the model is loaded once per worker process and kept
(:func:`get_predictor`), as are the opened Zarr arrays.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch

from unetflow import store
from unetflow.blend import Accumulator, tile_weights
from unetflow.config import NormSpec
from unetflow.geometry import Box
from unetflow.label import local_components
from unetflow.plan import Block, Plan, Tiling

log = logging.getLogger(__name__)


class NetSource(Protocol):
    """A picklable recipe that builds the network on a worker."""

    def load(self) -> torch.nn.Module: ...


@dataclass(frozen=True)
class CheckpointSource:
    """A network from a unetflow checkpoint file (loaded with ``weights_only=True``)."""

    path: str

    def load(self) -> torch.nn.Module:
        from unetflow.model.checkpoint import load_checkpoint

        return load_checkpoint(self.path).net

    def describe(self) -> dict[str, object]:
        return {"kind": "checkpoint", "path": os.path.abspath(self.path)}


@dataclass(frozen=True)
class NetInfo:
    """What the driver and the block code need to know about a loaded network."""

    dims: int
    in_channels: int
    classes: int
    activation: str  # softmax, sigmoid or none
    geometry: Any


def net_info(net: torch.nn.Module) -> NetInfo:
    """Describe a UNet (it has ``.spec``) or an oracle net (it has plain attributes)."""
    spec = getattr(net, "spec", None)
    if spec is not None:
        activation = "softmax" if spec.classes > 1 else "sigmoid"
        return NetInfo(spec.dims, spec.in_channels, spec.classes, activation, net.geometry)
    return NetInfo(net.dims, net.in_channels, net.classes, net.activation, net.geometry)


@dataclass(frozen=True)
class OutputSpec:
    """What the written output holds: ``probabilities`` (K channels) or ``labels``."""

    kind: str = "probabilities"
    dtype: str = "float32"


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to compute any block of one run."""

    input_path: str
    output_path: str
    plan: Plan
    layout: store.Layout
    source: Any
    norm: NormSpec
    norm_stats: tuple[tuple[float, float], ...]
    output: OutputSpec = field(default_factory=OutputSpec)
    mirror: str = "reflect"
    batch_size: int = 4
    device: str = "auto"
    amp: bool | None = None
    threads: int = 0
    input_level: int | None = None


@dataclass(frozen=True)
class BlockResult:
    """What a block reports back: timings, sizes and where it ran."""

    block_id: int
    n_patches: int
    voxels: int
    seconds_read: float
    seconds_compute: float
    seconds_write: float
    device: str
    pid: int
    objects: int = 0

    @property
    def seconds(self) -> float:
        return self.seconds_read + self.seconds_compute + self.seconds_write


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A resident network on one device: float32 patches in, activated outputs out."""

    def __init__(self, net: torch.nn.Module, *, device: torch.device, amp: bool) -> None:
        self.info = net_info(net)
        self.device = device
        self.amp = amp
        self.net = net.to(device).eval()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """*batch*: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32."""
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            y = self.net(x)
        y = y.float()
        if self.info.activation == "softmax":
            y = torch.softmax(y, dim=1)
        elif self.info.activation == "sigmoid":
            y = torch.sigmoid(y)
        return y.cpu().numpy()


_PREDICTORS: dict[tuple[Any, str, bool], Predictor] = {}


def get_predictor(source: Any, *, device: str = "auto", amp: bool | None = None, threads: int = 0) -> Predictor:
    """The worker's resident predictor for *source*: loaded on first use, then reused."""
    dev = pick_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp and dev.type == "cuda")
    key = (source, str(dev), use_amp)
    if key not in _PREDICTORS:
        if threads > 0 and dev.type == "cpu":
            torch.set_num_threads(threads)
        log.debug("loading model %s on %s (pid %d)", source, dev, os.getpid())
        _PREDICTORS[key] = Predictor(source.load(), device=dev, amp=use_amp)
    return _PREDICTORS[key]


@lru_cache(maxsize=8)
def _open_input(path: str, level: int | None = None) -> Any:
    return store.open_input(path, level=level)


@lru_cache(maxsize=8)
def _open_output(path: str) -> Any:
    return store.open_output(path)


def normalise(data: np.ndarray, norm: NormSpec, stats: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Raw input (C, ...) -> float32 as the model was trained to see it.

    ``stats`` holds per channel (low, high) percentiles or (mean, std).
    """
    out = data.astype(np.float32, copy=True)
    if norm.kind == "none":
        return out
    for c, (a, b) in enumerate(stats):
        if norm.kind == "percentile":
            out[c] -= a
            out[c] /= max(b - a, 1e-6)
        else:
            out[c] -= a
            out[c] /= max(b, 1e-6)
    return out


def norm_stats(samples: np.ndarray, norm: NormSpec) -> tuple[tuple[float, float], ...]:
    """Per-channel statistics from *samples* (ndarray of shape (C, N))."""
    if norm.kind == "none":
        return tuple((0.0, 1.0) for _ in samples)
    if norm.kind == "percentile":
        lo, hi = np.percentile(samples.astype(np.float64), [norm.low, norm.high], axis=1)
        return tuple((float(a), float(b)) for a, b in zip(lo, hi))
    s = samples.astype(np.float64)
    return tuple((float(m), float(d)) for m, d in zip(s.mean(axis=1), s.std(axis=1)))


def predict_block(job: BlockJob, block: Block, image: np.ndarray, predictor: Predictor) -> np.ndarray:
    """Blended predictions over the block's write box: (K, *write_box.shape) float32.

    *image* is the normalised read box, ndarray float32 of shape (C, *read_box.shape).
    """
    return predict_patches(job.plan, block, image, predictor, batch_size=job.batch_size)


def predict_patches(plan: Plan, block: Block, image: np.ndarray, predictor: Predictor, *, batch_size: int) -> np.ndarray:
    """Run the block's patches in global order, in batches, and blend them over its write box."""
    tiling = plan.tiling
    acc = Accumulator(block.write_box, predictor.info.classes, weighted=tiling.mode == "blend")
    weights = tile_weights(tiling.tile, tiling.window) if tiling.mode == "blend" else None
    starts = list(plan.patch_tile_starts(block))
    keep = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(tiling.out_offset, tiling.tile))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        boxes = [tiling.input_box(s).relative_to(block.read_box) for s in chunk]
        out = predictor(np.stack([image[(slice(None),) + b.to_slices()] for b in boxes]))
        for start, pred in zip(chunk, out):
            acc.add(pred[keep], Box(start, tiling.tile), weights)
    return acc.result()


def predict_array(predictor: Predictor, image: np.ndarray, tiling: Tiling, *, batch_size: int = 4, mirror: str = "reflect") -> np.ndarray:
    """Predict a whole in-memory image (C, *S), normalised, as one block: (K, *S) float32.

    The same global patch grid and blending as a blockwise run, so it is the
    reference a tiled run must equal. Used for validation during training.
    """
    shape = tuple(image.shape[1:])
    plan = Plan(shape, shape, tiling)
    block = plan.block(0)
    layout = store.Layout(True, image.shape[0], shape)
    padded = store.read_box(image, block.read_box, layout=layout, mode=mirror)
    return predict_patches(plan, block, padded, predictor, batch_size=batch_size)


def convert_output(values: np.ndarray, output: OutputSpec) -> tuple[np.ndarray, int]:
    """Blended values (K, ...) -> what is written, and the block's object count (instances).

    ``probabilities`` in a dtype; ``labels``: the argmax; ``instances``: the block's
    interior components numbered locally (phase 1 of :mod:`unetflow.label`).
    """
    if output.kind == "instances":
        return local_components(values.argmax(axis=0))
    return _convert_values(values, output), 0


def _convert_values(values: np.ndarray, output: OutputSpec) -> np.ndarray:
    if output.kind == "labels":
        return values.argmax(axis=0).astype(output.dtype)
    if output.dtype == "uint8":
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return values.astype(output.dtype)


def run_block(job: BlockJob, block_id: int) -> BlockResult:
    """Compute and write one block. Idempotent: running it twice writes the same bytes."""
    t0 = time.perf_counter()
    block = job.plan.block(block_id)
    raw = store.read_box(_open_input(job.input_path, job.input_level), block.read_box, layout=job.layout, mode=job.mirror, name=job.input_path)
    image = normalise(raw, job.norm, job.norm_stats)
    t1 = time.perf_counter()
    predictor = get_predictor(job.source, device=job.device, amp=job.amp, threads=job.threads)
    values = predict_block(job, block, image, predictor)
    data, objects = convert_output(values, job.output)
    t2 = time.perf_counter()
    store.write_box(_open_output(job.output_path), block.write_box, data, channel_axis=job.output.kind == "probabilities")
    t3 = time.perf_counter()
    log.debug(
        "block %d write %s read %s patches %d read %.3fs compute %.3fs write %.3fs on %s",
        block_id, block.write_box, block.read_box, block.n_patches, t1 - t0, t2 - t1, t3 - t2, predictor.device,
    )
    return BlockResult(block_id, block.n_patches, block.write_box.size, t1 - t0, t2 - t1, t3 - t2, str(predictor.device), os.getpid(), objects)
