"""One block: read, normalise, predict patches, blend, convert, write, on the device.

This is the code a worker runs. A :class:`BlockJob` carries everything it needs and
is small and picklable; the model is loaded once per worker process and kept
(:func:`unetflow.model.predictor.get_predictor`), as are the opened Zarr arrays.

A block streams along axis 0, one row of patches (same axis-0 start) at a time, and
lives on the predictor's device (DESIGN.md, performance model):

    reader thread:  read raw row (its own dtype) -> upload (pinned, copy stream) -> normalise
    block loop:     cut patches -> forward (lanes / the GPU's stream) -> add into the float32
                    sums of the held planes -> finished planes: divide, convert to the
                    written dtype -> download (copy stream)
    writer pool:    compress + write

The CPU runs the same code with device=cpu (no streams, nothing copied).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from unetflow import finite, formats, store
from unetflow.memory import peak_rss
from unetflow.blend import PlaneWindow, TensorPool
from unetflow.config import NormSpec, SkipSpec, TilingSpec
from unetflow.geometry import Box
from unetflow.label import INTERIOR_THRESHOLD, instance_classes, local_components
from unetflow.model.predictor import (
    NetSource,
    Predictor,
    auto_batch_size,
    get_predictor,
    out_of_memory,
)
from unetflow.plan import Block, Plan, Tiling
from unetflow.telemetry import Clock

log = logging.getLogger(__name__)

WRITE_THREADS = 2  # default writer pool per worker process
MAX_PENDING_WRITES = 2  # at least this many slabs queued for the writers (write threads + 1)


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


@lru_cache(maxsize=8)
def _open_input(path: str, level: int | None = None) -> Any:
    return formats.open_input(path, level=level)


@lru_cache(maxsize=8)
def _open_output(path: str) -> Any:
    return store.open_output(path)


# --- values: normalising and converting, on any device ----------------------------------

# dtypes a raw row crosses to the device in (others are made float32 on the host first)
_UPLOAD_DTYPES = {np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "uint16", "int32", "float16", "float32")}


def normalise_tensor(raw: torch.Tensor, norm: NormSpec, stats: tuple[tuple[float, float], ...], *, slab: int = 0,
                     uint16_bits: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """A raw row (C, Z, ...) on its device, in its own dtype -> float32 as the model was trained to see it.

    ``stats`` holds per channel (low, high) percentiles or (mean, std). *slab*: planes
    per step along axis 1 (0: all at once; a few keep a CPU's work in its cache).
    *uint16_bits*: *raw* is int16 holding uint16 bits (how uint16 crosses to a GPU:
    torch's CUDA kernels do not convert uint16). *out*: a float32 tensor to write into.
    """
    if uint16_bits:
        raw = raw.to(torch.int32).bitwise_and_(0xFFFF)
    if out is None:
        out = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
    step = slab if slab > 0 else raw.shape[1]
    for c in range(raw.shape[0]):
        for z in range(0, raw.shape[1], step):
            part = out[c, z : z + step]
            part.copy_(raw[c, z : z + step])
            if norm.kind != "none":
                a, b = stats[c]
                part.sub_(a).div_(max(b - a, 1e-6) if norm.kind == "percentile" else max(b, 1e-6))
    return out


def normalise(data: np.ndarray, norm: NormSpec, stats: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Raw input (C, ...) ndarray -> float32 ndarray: :func:`normalise_tensor` on the host."""
    return normalise_tensor(torch.from_numpy(_uploadable(data)), norm, stats).numpy()


def _uploadable(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return data if data.dtype in _UPLOAD_DTYPES else data.astype(np.float32)


def norm_stats(samples: np.ndarray, norm: NormSpec) -> tuple[tuple[float, float], ...]:
    """Per-channel statistics from *samples* (ndarray of shape (C, N))."""
    if norm.kind == "none":
        return tuple((0.0, 1.0) for _ in samples)
    if norm.kind == "percentile":
        lo, hi = np.percentile(samples.astype(np.float64), [norm.low, norm.high], axis=1)
        return tuple((float(a), float(b)) for a, b in zip(lo, hi))
    s = samples.astype(np.float64)
    return tuple((float(m), float(d)) for m, d in zip(s.mean(axis=1), s.std(axis=1)))


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def written_dtype(output: OutputSpec) -> torch.dtype:
    """The torch dtype converted values have on the device (instances: the uint8 class map)."""
    if output.kind == "instances":
        return torch.uint8
    if output.kind == "labels" and output.dtype != "uint8":
        return torch.int32  # argmax ids; widened to the written unsigned type on the host
    return _TORCH_DTYPES[output.dtype]


def convert_values(values: torch.Tensor, output: OutputSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blended values (K, ...) float32 -> what is written, on their device (into *out* if given).

    ``probabilities`` in a dtype (uint8: x255, rounded half to even, clipped); ``labels``:
    the argmax; ``instances``: the class map of :func:`unetflow.label.instance_classes`.
    """
    if output.kind == "instances":
        result = instance_classes(values, output.interior_threshold)
    elif output.kind == "labels":
        result = values.argmax(dim=0)
    elif output.dtype == "uint8":
        result = values.mul(255.0).round_().clamp_(0, 255)
    else:
        result = values
    if out is None:
        return result.to(written_dtype(output))
    return out.copy_(result)


def convert_output(values: np.ndarray, output: OutputSpec) -> tuple[np.ndarray, int]:
    """Blended values (K, ...) ndarray -> what is written, and the block's object count (instances).

    ``instances``: the block's confident-interior components numbered locally (steps 0
    and 1 of :mod:`unetflow.label`).
    """
    data = _host_values(convert_values(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), output), output)
    if output.kind == "instances":
        return local_components(data)
    return data, 0


def _host_values(t: torch.Tensor, output: OutputSpec) -> np.ndarray:
    data = t.numpy()
    if output.kind == "labels" and data.dtype != np.dtype(output.dtype):
        data = data.astype(output.dtype)
    return data


# --- whole images and blocks in memory ------------------------------------------------------


def predict_patches(plan: Plan, block: Block, image: np.ndarray, predictor: Predictor, *, batch_size: int) -> np.ndarray:
    """Blended predictions over *block*'s write box: (K, *write_box.shape) float32 ndarray.

    *image* is the block's normalised read box (C, *read_box.shape) float32. The same
    code as a streamed block (:func:`stream_block`), holding the whole write box.
    """
    w = block.write_box
    out = np.empty((predictor.info.classes, *w.shape), dtype=np.float32)
    image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))

    def read_row(box: Box) -> torch.Tensor:
        rel = box.relative_to(block.read_box).to_slices()
        return image_t[(slice(None), *rel)].to(predictor.device)

    def emit(box: Box, held: PlaneWindow, n: int) -> None:
        z = box.offset[0] - w.offset[0]
        for slab in held.pop(n):
            out[:, z : z + slab.shape[1]] = slab.cpu().numpy()
            z += slab.shape[1]
            held.recycle(slab)

    stream_block(plan, block, predictor, Clock(predictor.device), read_row=read_row, emit=emit, batch_size=batch_size,
                 flush_planes=w.shape[0])
    return out


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


# --- one block of a run ----------------------------------------------------------------------


def run_block(job: BlockJob, block_id: int) -> BlockResult:
    """Compute and write one block. Idempotent: running it twice writes the same bytes.

    Raises
    ------
    ConfigError
        The GPU ran out of memory (names --batch-size and --patch-shape).
    """
    t0 = time.perf_counter()
    block = job.plan.block(block_id)
    skipped = skip_reason(job, block)
    if skipped:
        log.debug("block %d skipped (%s)", block_id, skipped)
        return BlockResult(block_id, 0, block.write_box.size, "-", os.getpid(), seconds_wall=time.perf_counter() - t0,
                           peak_rss=peak_rss(), skipped=skipped)
    predictor = get_predictor(job.source, device=job.device, amp=job.amp, threads=job.threads, compile=job.compile, tta=job.tiling.tta)
    amp_check = predictor.check_amp(job.plan.tiling.patch)
    clock = Clock(predictor.device)
    try:
        with torch.inference_mode():
            objects = _run_block(job, block, predictor, clock)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(predictor.device, auto_batch_size(predictor, job.plan.tiling.patch, job.tiling.batch_size), job.plan.tiling.patch) from None
    wall = time.perf_counter() - t0
    stages = clock.totals()
    log.debug("block %d write %s read %s patches %d on %s: %.3fs, %s", block_id, block.write_box, block.read_box, block.n_patches,
              predictor.device, wall, ", ".join(f"{k} {v:.3f}s" for k, v in stages.items() if v))
    gpu_peak = torch.cuda.max_memory_allocated(predictor.device) if predictor.device.type == "cuda" else 0
    return BlockResult(block_id, block.n_patches, block.write_box.size, str(predictor.device), os.getpid(), stages=stages,
                       seconds_wall=wall, objects=objects, peak_rss=peak_rss(), lanes=predictor.lanes,
                       write_threads=_write_threads(job), amp_check=amp_check, peak_device_memory=gpu_peak)


def _write_threads(job: BlockJob) -> int:
    return job.write_threads if job.write_threads > 0 else WRITE_THREADS


def _run_block(job: BlockJob, block: Block, predictor: Predictor, clock: Clock) -> int:  # long: its closures share the block's transfers, writer queue and count
    """Stream *block* through the predictor and write it; the object count (instances)."""
    moves = Transfers(predictor.device)
    writer = _pool("write", _write_threads(job))
    writes: collections.deque[Future[None]] = collections.deque()
    whole = job.output.kind == "instances"  # components need the whole block at once
    channel_axis = job.output.kind == "probabilities"
    dtype = written_dtype(job.output)
    slab = 0 if predictor.device.type == "cuda" else _cpu_slab(predictor.info.classes, block.write_box)
    pending = max(MAX_PENDING_WRITES, _write_threads(job) + 1)  # converted slabs (or float32 sums) queued or being written
    as_is = predictor.device.type == "cpu" and job.output.kind == "probabilities" and job.output.dtype == "float32"
    objects = [0]

    rows = RowReader(job, block)

    def read_row(box: Box) -> tuple[torch.Tensor, Any]:
        with clock.host("read"):
            raw = rows(box)
        with clock.device("upload", moves.up):
            return moves.upload(raw, job.norm, job.norm_stats, slab=slab)

    def convert(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Finished sums -> the written dtype, *slab* planes at a time; the sums go back to the pool."""
        with clock.device("convert"):
            out = moves.output_buffer(shape, dtype)
            step = slab or values.shape[1]
            for i in range(0, values.shape[1], step):
                v = values[:, i : i + step]
                convert_values(v, job.output, out[:, i : i + v.shape[1]] if channel_axis else out[i : i + v.shape[1]])
        PlaneWindow.recycle(values)
        return out

    def write(box: Box, host: torch.Tensor, ready: Any) -> None:
        """Writer thread: wait for the download, compress and write; the buffer goes back."""
        with clock.host("write"):
            moves.wait(ready)
            data = _host_values(host, job.output)
            if whole:
                data, objects[0] = local_components(data)
            store.write_box(_open_output(job.output_path), box, data, channel_axis=channel_axis)
        (PlaneWindow.recycle if as_is else moves.release)(host)

    def emit(box: Box, held: PlaneWindow, n: int) -> None:
        z = box.offset[0]
        for values in held.pop(n):
            part = Box((z, *box.offset[1:]), (values.shape[1], *box.shape[1:]))
            z += values.shape[1]
            ready = None
            if not as_is:  # converted here (its slab comes back at once), then only the written bytes cross
                out = convert(values, (predictor.info.classes, *part.shape) if channel_axis else tuple(part.shape))
                values, ready = moves.download(out, clock)
            with clock.host("wait_write"):
                while len(writes) >= pending:  # bounded queue: memory stays flat if writes are slow
                    writes.popleft().result()
            writes.append(writer.submit(write, part, values, ready))

    try:
        stream_block(job.plan, block, predictor, clock, read_row=read_row, emit=emit, batch_size=job.tiling.batch_size,
                     flush_planes=0 if whole else job.flush_planes, arrive=moves.arrive, row_done=moves.release)
    finally:
        with clock.host("drain"):
            while writes:
                writes.popleft().result()
    return objects[0]


def _cpu_slab(classes: int, box: Box, elements: int = 2**19) -> int:
    """Planes per step when finishing planes on a CPU: about *elements* values (2 MiB of
    float32), cache-sized and below the worker's mmap threshold (its temporaries come
    from the heap, not fresh pages)."""
    return max(1, elements // max(1, classes * math.prod(box.shape[1:])))


class Transfers:
    """Host <-> device copies on their own CUDA streams, ordered by events; on a CPU,
    nothing is copied.

    ``upload`` (reader thread): raw row -> pinned memory -> device (in its own dtype;
    uint16 as int16 bits) -> normalised float32, on the upload stream. ``arrive`` (block
    loop) makes the compute stream wait for it. ``download``: converted planes -> pinned
    host memory on the download stream; ``wait`` (writer thread) until they are there.
    Pinned buffers come from torch's caching host allocator, reused once their copy is done.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.up = torch.cuda.Stream(device) if self.cuda else None
        self.down = torch.cuda.Stream(device) if self.cuda else None

    def upload(self, parts: list[np.ndarray], norm: NormSpec, stats: tuple[tuple[float, float], ...], *,
               slab: int = 0) -> tuple[torch.Tensor, Any]:
        """Raw *parts* (consecutive along axis 1 of one row) -> the normalised row on the device."""
        parts = [_uploadable(p) for p in parts]
        shape = (parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:])
        if not self.cuda:
            row = _HOST_BUFFERS.take(shape, torch.float32)
            z = 0
            for p in parts:
                normalise_tensor(torch.from_numpy(p), norm, stats, slab=slab, out=row[:, z : z + p.shape[1]])
                z += p.shape[1]
            return row, None
        uint16 = parts[0].dtype == np.uint16
        with torch.cuda.stream(self.up):
            x = torch.empty(shape, dtype=torch.int16 if uint16 else torch.from_numpy(parts[0][:0]).dtype, device=self.device)
            z = 0
            for p in parts:
                x[:, z : z + p.shape[1]].copy_(torch.from_numpy(p.view(np.int16) if uint16 else p).pin_memory(), non_blocking=True)
                z += p.shape[1]
            image = normalise_tensor(x, norm, stats, uint16_bits=uint16)
            return image, self.up.record_event()

    def arrive(self, image: torch.Tensor, ready: Any) -> torch.Tensor:
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            image.record_stream(stream)
        return image

    def output_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where converted planes go: device memory (torch's cache), or on a CPU a host
        buffer reused across flushes and blocks (a fresh one would page-fault in again)."""
        if self.cuda:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return _HOST_BUFFERS.take(shape, dtype)

    def release(self, host: torch.Tensor) -> None:
        """*host* (from :meth:`download`, or a row from :meth:`upload` whose patches all
        ran) is no longer used: on a CPU it goes back to the pool."""
        if not self.cuda:
            _HOST_BUFFERS.give(host)

    def download(self, values: torch.Tensor, clock: Clock | None = None) -> tuple[torch.Tensor, Any]:
        if not self.cuda:
            return values, None
        computed = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.down):
            self.down.wait_event(computed)  # timed after the wait: the copy alone
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            with clock.device("download", self.down) if clock is not None else contextlib.nullcontext():
                host.copy_(values, non_blocking=True)
            values.record_stream(self.down)
            return host, self.down.record_event()

    @staticmethod
    def wait(ready: Any) -> None:
        if ready is not None:
            ready.synchronize()


class RowReader:
    """A block's rows of input (each a patch deep along axis 0), read in whole input
    chunks along axis 0 and kept while later rows need them: consecutive rows overlap,
    and each chunk is decoded once (reading each row on its own decoded the chunks
    under an overlap twice). Inputs chunked deeper than four patches are read row by row.
    """

    def __init__(self, job: BlockJob, block: Block) -> None:
        self.job = job
        self.array = _open_input(job.input_path, job.input_level)
        chunks = getattr(self.array, "chunks", None)
        depth = int(chunks[1 if job.layout.has_channel else 0]) if chunks else 0
        self.depth = depth if 0 < depth <= 4 * job.plan.tiling.patch[0] else 0
        self.lo, self.hi = block.read_box.offset[0], block.read_box.stop[0]
        self._slabs: dict[int, np.ndarray] = {}

    def _read(self, box: Box) -> np.ndarray:
        j = self.job
        raw = store.read_box(self.array, box, layout=j.layout, mode=j.tiling.mirror, name=j.input_path)
        return finite.finite_block(raw, nan_value=j.nan_value, name=j.input_path, box=box)  # issue 15: before normalising

    def __call__(self, box: Box) -> list[np.ndarray]:
        """The raw input of *box*, as consecutive parts along axis 0 (views of the kept
        chunks: not joined, so no row-sized copy is made on the host)."""
        if not self.depth:
            return [self._read(box)]
        d, z0, z1 = self.depth, box.offset[0], box.stop[0]
        first, last = z0 // d, (z1 - 1) // d
        for k in [k for k in self._slabs if k < first]:
            del self._slabs[k]
        parts = []
        for k in range(first, last + 1):
            if k not in self._slabs:
                a, b = max(k * d, self.lo), min((k + 1) * d, self.hi)
                self._slabs[k] = self._read(Box((a, *box.offset[1:]), (b - a, *box.shape[1:])))
            a = max(k * d, self.lo)
            parts.append(self._slabs[k][:, max(z0, a) - a : min(z1, (k + 1) * d) - a])
        return parts


_HOST_BUFFERS = TensorPool(keep=MAX_PENDING_WRITES + 1)  # rows and converted planes (CPU)


# --- the streamed block loop -----------------------------------------------------------------

_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_CANCELLED = threading.Event()


class BlockCancelled(RuntimeError):
    """A block running in the driver's process was told to stop (its run failed or was interrupted)."""


def cancel_blocks(cancel: bool = True) -> None:
    """Make the blocks running in this process stop at their next forward pass (they
    raise :class:`BlockCancelled`), or (``False``) let blocks run again.

    A failed or interrupted run calls it before it closes its cluster: a worker in the
    driver's process cannot be killed like a worker process, and closing its cluster
    waits for the block it is running (a Ctrl-C waited 25 s for the rest of a block).
    """
    if cancel:
        _CANCELLED.set()
    else:
        _CANCELLED.clear()


def _check_cancelled(block: Block) -> None:
    if _CANCELLED.is_set():
        raise BlockCancelled(f"block {block.block_id} stopped: its run failed or was interrupted")


def _pool(name: str, threads: int = 1) -> ThreadPoolExecutor:
    """The worker process's reader (one thread) and writer pool, kept across blocks."""
    key = f"{name}-{threads}"
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"unetflow-{name}")
        return _POOLS[key]


def _rows(plan: Plan, block: Block) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The block's patch tile starts grouped by axis-0 start, in the global order."""
    starts = list(plan.patch_tile_starts(block))
    return [(s0, list(group)) for s0, group in itertools.groupby(starts, key=lambda s: s[0])]


def _row_read_box(plan: Plan, block: Block, s0: int) -> Box:
    t = plan.tiling
    rb = block.read_box
    return Box((s0 - t.context[0], *rb.offset[1:]), (t.patch[0], *rb.shape[1:]))


def _flush_to(write_box: Box, unit: int, next_start: int | None) -> int:
    """Planes (axis 0) below the returned index are final and may be written now."""
    stop = write_box.stop[0]
    if next_start is None:
        return stop
    done = min(next_start, stop)
    return write_box.offset[0] + ((done - write_box.offset[0]) // unit) * unit


def stream_block(plan: Plan, block: Block, predictor: Predictor, clock: Clock, *,  # long: one loop over rows, the pipeline's order in one place
                 read_row: Callable[[Box], Any], emit: Callable[[Box, PlaneWindow, int], None], batch_size: int,
                 flush_planes: int = 0, arrive: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                 row_done: Callable[[torch.Tensor], None] | None = None) -> None:
    """Predict *block* one row of patches (same axis-0 start) at a time, in the global order.

    *read_row* (box) returns the normalised input of a row's read box on the device
    (or a pair (tensor, ready event) that *arrive* turns into it); it runs on the reader
    thread, one row ahead. Whenever planes are final (whole multiples of *flush_planes*,
    0: the whole write box), ``emit(box, held, n)`` must finish them with ``held.pop(n, ...)``.

    Only the planes that open patches still touch are held (memory does not grow with
    the block's first axis), and reading, computing and writing overlap:

        reader:  read r1   read r2          read r3
        lanes:   .......   patches of r1, r2, r3, ... back to back (2 per lane in flight)
        this:              cut, blend in order; at each row's end emit its final planes

    The lanes never wait for a row to end or for blending: ``2 * lanes`` forward passes
    are in flight (on a GPU they are queued on its stream, nothing waits for them).
    """
    tiling = plan.tiling
    kind = tiling.window if tiling.mode == "blend" else None
    keep = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(tiling.out_offset, tiling.tile))
    per_call = max(1, auto_batch_size(predictor, tiling.patch, batch_size) // predictor.lanes)
    w = block.write_box
    rows = _rows(plan, block)
    unit = flush_planes or w.shape[0]
    held = PlaneWindow(w, predictor.info.classes, tile=tiling.tile, starts=plan.starts, kind=kind, unit=unit,
                       device=predictor.device)

    def flush(next_start: int | None) -> None:
        n = _flush_to(w, unit, next_start) - held.start
        if n > 0:
            emit(Box((held.start, *w.offset[1:]), (n, *w.shape[1:])), held, n)

    in_flight: collections.deque[tuple[int, list[tuple[int, ...]], Future[torch.Tensor]]] = collections.deque()
    row = -1
    images: dict[int, torch.Tensor] = {}
    left = [-(-len(starts) // per_call) for _, starts in rows]  # forward passes per row not yet blended
    batches = _row_batches(plan, block, rows, per_call, clock, read_row, arrive, images)
    for item in itertools.chain(batches, itertools.repeat(None)):
        _check_cancelled(block)
        if item is not None:
            i, chunk, batch = item
            in_flight.append((i, chunk, predictor.submit(batch, clock)))
            if len(in_flight) < 2 * predictor.lanes:
                continue
        if not in_flight:
            break
        i, chunk, future = in_flight.popleft()
        if i != row:  # the first patch of a new row: the rows before it are complete
            if row >= 0:
                flush(rows[i][0])
            held.extend(rows[i][0] + tiling.tile[0])
            row = i
        with clock.host("wait_model") if predictor.lanes > 1 else contextlib.nullcontext():
            out = future.result()
        with clock.device("blend"):
            for start, pred in zip(chunk, out):
                held.add(pred[keep], Box(start, tiling.tile))
        del out, future
        left[i] -= 1
        if not left[i] and row_done is not None:
            row_done(images.pop(i))
    flush(None)


def _row_batches(plan: Plan, block: Block, rows: list[tuple[int, list[tuple[int, ...]]]], per_call: int, clock: Clock,
                 read_row: Callable[[Box], Any], arrive: Callable[[torch.Tensor, Any], torch.Tensor] | None,
                 images: dict[int, torch.Tensor]) -> Iterator[tuple[int, list[tuple[int, ...]], torch.Tensor]]:
    """(row index, tile starts, input batch on the device) for every forward pass of *block*,
    in the global order; the reader thread reads the next row meanwhile."""
    tiling = plan.tiling
    reader = _pool("read")
    pending = reader.submit(read_row, _row_read_box(plan, block, rows[0][0]))
    for i, (s0, starts) in enumerate(rows):
        with clock.host("wait_read"):
            image = pending.result()
        if arrive is not None:
            image = arrive(*image)
        images[i] = image
        if i + 1 < len(rows):
            pending = reader.submit(read_row, _row_read_box(plan, block, rows[i + 1][0]))
        row_box = _row_read_box(plan, block, s0)
        for k in range(0, len(starts), per_call):
            chunk = starts[k : k + per_call]
            with clock.device("cut"):
                batch = patch_batch(tiling, image, row_box, chunk)
            yield i, chunk, batch
        del image


def patch_batch(tiling: Tiling, image: torch.Tensor, image_box: Box, starts: list[tuple[int, ...]]) -> torch.Tensor:
    """The input patches of the tiles at *starts*, cut from *image* (C, *image_box.shape)
    on its device and stacked: (len(starts), C, *patch)."""
    boxes = [tiling.input_box(s).relative_to(image_box) for s in starts]
    if len(boxes) == 1:  # a view: one patch needs no copy (the net reads it strided)
        return image[(slice(None),) + boxes[0].to_slices()].unsqueeze(0)
    return torch.stack([image[(slice(None),) + b.to_slices()] for b in boxes])


# --- skipping blocks without signal ---------------------------------------------------


def skip_reason(job: BlockJob, block: Block) -> str:
    """``"mask"`` if the block lies outside the foreground mask, ``"empty"`` if its
    input is constant (or below ``skip_threshold``) and ``skip_empty`` is on, else ``""``."""
    if job.skip.mask and not mask_has_foreground(job.skip.mask, block.write_box, job.layout.spatial_shape):
        return "mask"
    if job.skip.empty and input_is_empty(job, block):
        return "empty"
    return ""


def scale_box(box: Box, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> Box:
    """*box* in image voxels -> the mask voxels that cover it (any mask resolution).

    >>> scale_box(Box((4, 0), (4, 3)), (8, 6), (2, 3))
    Box(offset=(1, 0), shape=(1, 2))
    """
    lo = [o * m // n for o, m, n in zip(box.offset, mask_shape, image_shape)]
    hi = [max(a + 1, -(-(o + s) * m // n)) for a, o, s, m, n in zip(lo, box.offset, box.shape, mask_shape, image_shape)]
    return Box.from_bounds(lo, [min(h, m) for h, m in zip(hi, mask_shape)])


def mask_has_foreground(mask_path: str, box: Box, image_shape: tuple[int, ...]) -> bool:
    mask = _open_input(mask_path)
    mask_shape = tuple(int(n) for n in mask.shape[-len(image_shape):])
    layout = store.Layout(len(mask.shape) > len(image_shape), 1, mask_shape)
    region = store.read_box(mask, scale_box(box, image_shape, mask_shape), layout=layout, name=mask_path)
    return bool(np.any(region))


def input_is_empty(job: BlockJob, block: Block, planes: int = 64) -> bool:
    """Whether the block's raw read box is constant or (with a threshold) all below it.

    Read in slabs of *planes* along axis 0, stopping at the first sign of signal."""
    rb = block.read_box
    lo, hi = math.inf, -math.inf
    for z in range(rb.offset[0], rb.stop[0], planes):
        box = Box((z, *rb.offset[1:]), (min(planes, rb.stop[0] - z), *rb.shape[1:]))
        raw = store.read_box(_open_input(job.input_path, job.input_level), box, layout=job.layout, mode=job.tiling.mirror, name=job.input_path)
        lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
        below = job.skip.threshold is not None and hi < job.skip.threshold
        if hi > lo and not below:
            return False
    return True
