"""One block: read, normalise, predict patches, blend, convert, write.

This is the code a worker runs. A :class:`BlockJob` carries everything it needs and
is small and picklable; the model is loaded once per worker process and kept
(:func:`unetflow.model.predictor.get_predictor`), as are the opened Zarr arrays.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from unetflow import store
from unetflow.blend import Accumulator, PlaneWindow, tile_weights
from unetflow.config import NormSpec
from unetflow.geometry import Box
from unetflow.label import INTERIOR_THRESHOLD, instance_classes, local_components
from unetflow.model.predictor import Predictor, auto_batch_size, get_predictor
from unetflow.plan import Block, Plan, Tiling

log = logging.getLogger(__name__)


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
    source: Any
    norm: NormSpec
    norm_stats: tuple[tuple[float, float], ...]
    output: OutputSpec = field(default_factory=OutputSpec)
    mirror: str = "reflect"
    batch_size: int = 4
    device: str = "auto"
    amp: bool | None = None
    threads: int = 0
    flush_planes: int = 0  # write finished planes (axis 0) in multiples of this; 0: once per block
    skip_empty: bool = False
    skip_threshold: float | None = None  # with skip_empty: also skip blocks whose input max is below it
    mask_path: str | None = None
    compile: bool = False
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
    seconds_wait: float = 0.0  # compute loop idle, waiting on a read or a full write queue
    seconds_wall: float = 0.0
    peak_rss: int = 0  # bytes, the worker process's peak resident set so far
    skipped: str = ""  # "", "empty" or "mask": written as the fill value, model not run

    @property
    def seconds(self) -> float:
        return self.seconds_read + self.seconds_compute + self.seconds_write

    @property
    def busy(self) -> float:
        """Fraction of the block's wall time the model computed (GPU busy fraction on GPUs)."""
        return self.seconds_compute / self.seconds_wall if self.seconds_wall > 0 else 0.0


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
    return predict_patches(job.plan, block, image, predictor, batch_size=auto_batch_size(predictor, job.plan.tiling.patch, job.batch_size))


def predict_patches(plan: Plan, block: Block, image: np.ndarray, predictor: Predictor, *, batch_size: int) -> np.ndarray:
    """Run the block's patches in global order, in batches, and blend them over its write box."""
    tiling = plan.tiling
    acc = Accumulator(block.write_box, predictor.info.classes, weighted=tiling.mode == "blend")
    weights = tile_weights(tiling.tile, tiling.window) if tiling.mode == "blend" else None
    starts = list(plan.patch_tile_starts(block))
    keep = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(tiling.out_offset, tiling.tile))
    for i in range(0, len(starts), batch_size):
        _check_cancelled(block)
        chunk = starts[i : i + batch_size]
        out = predictor(patch_batch(tiling, image, block.read_box, chunk))
        for start, pred in zip(chunk, out):
            acc.add(pred[keep], Box(start, tiling.tile), weights)
    return acc.result()


def patch_batch(tiling: Tiling, image: np.ndarray, image_box: Box, starts: list[tuple[int, ...]]) -> np.ndarray:
    """The input patches of the tiles at *starts*, cut from *image* (C, *image_box.shape))
    and stacked: ndarray float32 of shape (len(starts), C, *patch)."""
    boxes = [tiling.input_box(s).relative_to(image_box) for s in starts]
    return np.stack([image[(slice(None),) + b.to_slices()] for b in boxes])


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
    confident-interior components numbered locally (steps 0 and 1 of :mod:`unetflow.label`).
    """
    if output.kind == "instances":
        return local_components(instance_classes(values, output.interior_threshold))
    return _convert_values(values, output), 0


def _convert_values(values: np.ndarray, output: OutputSpec) -> np.ndarray:
    if output.kind == "labels":
        return values.argmax(axis=0).astype(output.dtype)
    if output.dtype == "uint8":
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return values.astype(output.dtype, copy=False)


def run_block(job: BlockJob, block_id: int) -> BlockResult:
    """Compute and write one block. Idempotent: running it twice writes the same bytes.

    The block streams along axis 0 (see :func:`predict_block_streamed`): a reader
    thread reads and normalises the next row of patches while the model computes this
    one, and a writer thread converts, compresses and writes finished planes meanwhile.
    """
    t0 = time.perf_counter()
    block = job.plan.block(block_id)
    skipped = skip_reason(job, block)
    if skipped:
        t1 = time.perf_counter()
        log.debug("block %d skipped (%s)", block_id, skipped)
        return BlockResult(block_id, 0, block.write_box.size, t1 - t0, 0.0, 0.0, "-", os.getpid(),
                           seconds_wall=t1 - t0, peak_rss=peak_rss(), skipped=skipped)
    predictor = get_predictor(job.source, device=job.device, amp=job.amp, threads=job.threads, compile=job.compile)
    if job.output.kind == "instances":  # components need the whole block at once
        return _run_block_whole(job, block, predictor, t0)
    tel = Telemetry()
    predict_block_streamed(job, block, predictor, tel)
    wall = time.perf_counter() - t0
    log.debug(
        "block %d write %s read %s patches %d read %.3fs compute %.3fs write %.3fs wait %.3fs wall %.3fs on %s",
        block_id, block.write_box, block.read_box, block.n_patches, tel.read, tel.compute, tel.write, tel.wait, wall, predictor.device,
    )
    return BlockResult(block_id, block.n_patches, block.write_box.size, tel.read, tel.compute, tel.write, str(predictor.device),
                       os.getpid(), seconds_wait=tel.wait, seconds_wall=wall, peak_rss=peak_rss())


def _run_block_whole(job: BlockJob, block: Block, predictor: Predictor, t0: float) -> BlockResult:
    """Read, predict, convert and write the whole block in one go (instances output)."""
    raw = store.read_box(_open_input(job.input_path, job.input_level), block.read_box, layout=job.layout, mode=job.mirror, name=job.input_path)
    image = normalise(raw, job.norm, job.norm_stats)
    t1 = time.perf_counter()
    values = predict_block(job, block, image, predictor)
    data, objects = convert_output(values, job.output)
    t2 = time.perf_counter()
    store.write_box(_open_output(job.output_path), block.write_box, data, channel_axis=job.output.kind == "probabilities")
    t3 = time.perf_counter()
    return BlockResult(block.block_id, block.n_patches, block.write_box.size, t1 - t0, t2 - t1, t3 - t2, str(predictor.device),
                       os.getpid(), objects, seconds_wall=t3 - t0, peak_rss=peak_rss())


def peak_rss() -> int:
    """This process's peak resident set in bytes.

    Linux ``VmHWM`` (reset by exec); ``ru_maxrss`` would be inherited from the
    process that spawned the worker (the driver) and overstate a worker's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --- the per-worker pipeline (issue 6) ------------------------------------------------

_POOLS: dict[str, ThreadPoolExecutor] = {}
MAX_PENDING_WRITES = 2
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


def _pool(name: str) -> ThreadPoolExecutor:
    """One reader and one writer thread per worker process, kept across blocks."""
    if name not in _POOLS:
        _POOLS[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"unetflow-{name}")
    return _POOLS[name]


@dataclass
class Telemetry:
    """Seconds per stage of one block: reader and writer threads, model, and idle waits."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    wait: float = 0.0


def _rows(job: BlockJob, block: Block) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The block's patch tile starts grouped by axis-0 start, in the global order."""
    starts = list(job.plan.patch_tile_starts(block))
    return [(s0, list(group)) for s0, group in itertools.groupby(starts, key=lambda s: s[0])]


def _row_read_box(job: BlockJob, block: Block, s0: int) -> Box:
    t = job.plan.tiling
    rb = block.read_box
    return Box((s0 - t.context[0], *rb.offset[1:]), (t.patch[0], *rb.shape[1:]))


def _read(job: BlockJob, box: Box, tel: Telemetry) -> np.ndarray:
    t0 = time.perf_counter()
    raw = store.read_box(_open_input(job.input_path, job.input_level), box, layout=job.layout, mode=job.mirror, name=job.input_path)
    image = normalise(raw, job.norm, job.norm_stats)
    tel.read += time.perf_counter() - t0
    return image


def _write(job: BlockJob, box: Box, values: np.ndarray, tel: Telemetry) -> None:
    t0 = time.perf_counter()
    data, _ = convert_output(values, job.output)
    store.write_box(_open_output(job.output_path), box, data, channel_axis=job.output.kind == "probabilities")
    tel.write += time.perf_counter() - t0


def _flush_to(job: BlockJob, write_box: Box, next_start: int | None) -> int:
    """Planes (axis 0) below the returned index are final and may be written now."""
    stop = write_box.stop[0]
    if next_start is None:
        return stop
    done = min(next_start, stop)
    unit = job.flush_planes or write_box.shape[0]
    return write_box.offset[0] + ((done - write_box.offset[0]) // unit) * unit


def predict_block_streamed(job: BlockJob, block: Block, predictor: Predictor, tel: Telemetry) -> None:
    """Predict and write *block* one row of patches (same axis-0 start) at a time.

    Same sums in the same global order as :func:`predict_block`, so the same bytes;
    but only the planes that open patches still touch are held (memory does not grow
    with the block's first axis), and reading, computing, blending and writing overlap:

        reader:  read r1   read r2          read r3
        lanes:   .......   patches of r1, r2, r3, ... back to back (2 per lane in flight)
        this:              blend in order; at each row's end hand its final planes to
        writer:                                 convert, compress, write

    The lanes never wait for a row to end, for blending or for I/O: a row whose patch
    count is not a multiple of the lanes does not leave a lane idle.
    """
    tiling = job.plan.tiling
    weighted = tiling.mode == "blend"
    weights = tile_weights(tiling.tile, tiling.window) if weighted else None
    keep = (slice(None),) + tuple(slice(o, o + t) for o, t in zip(tiling.out_offset, tiling.tile))
    batch_size = auto_batch_size(predictor, tiling.patch, job.batch_size)
    per_call = max(1, batch_size // predictor.lanes)
    w = block.write_box
    rows = _rows(job, block)
    writer = _pool("write")
    writes: collections.deque[Future[None]] = collections.deque()
    unit = job.flush_planes or w.shape[0]
    held = PlaneWindow(w, predictor.info.classes, weighted=weighted, capacity=tiling.tile[0] + unit)

    def flush(next_start: int | None) -> None:
        n = _flush_to(job, w, next_start) - held.start
        if n <= 0:
            return
        box = Box((held.start, *w.offset[1:]), (n, *w.shape[1:]))
        values = held.pop(n)
        t0 = time.perf_counter()
        while len(writes) >= MAX_PENDING_WRITES:  # bounded queue: memory stays flat if writes are slow
            writes.popleft().result()
        tel.wait += time.perf_counter() - t0
        writes.append(writer.submit(_write, job, box, values, tel))

    batches = _row_batches(job, block, rows, per_call, tel)
    in_flight: collections.deque[tuple[int, list[tuple[int, ...]], Future[np.ndarray]]] = collections.deque()
    row = -1
    t_start = time.perf_counter()
    wait_before = tel.wait
    for item in itertools.chain(batches, itertools.repeat(None)):
        _check_cancelled(block)
        if item is not None:
            i, chunk, batch = item
            in_flight.append((i, chunk, predictor.submit(batch)))
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
        acc = held.acc
        for start, pred in zip(chunk, future.result()):
            acc.add(pred[keep], Box(start, tiling.tile), weights)
    flush(None)
    t3 = time.perf_counter()
    tel.compute += (t3 - t_start) - (tel.wait - wait_before)  # waiting on the lanes and blending
    while writes:
        writes.popleft().result()
    tel.wait += time.perf_counter() - t3


def _row_batches(
    job: BlockJob, block: Block, rows: list[tuple[int, list[tuple[int, ...]]]], per_call: int, tel: Telemetry,
) -> Iterator[tuple[int, list[tuple[int, ...]], np.ndarray]]:
    """(row index, tile starts, input batch) for every forward pass of *block*, in the
    global order; the reader thread reads and normalises the next row meanwhile."""
    tiling = job.plan.tiling
    reader = _pool("read")
    pending = reader.submit(_read, job, _row_read_box(job, block, rows[0][0]), tel)
    for i, (s0, starts) in enumerate(rows):
        t0 = time.perf_counter()
        image = pending.result()
        tel.wait += time.perf_counter() - t0
        if i + 1 < len(rows):
            pending = reader.submit(_read, job, _row_read_box(job, block, rows[i + 1][0]), tel)
        row_box = _row_read_box(job, block, s0)
        for k in range(0, len(starts), per_call):
            chunk = starts[k : k + per_call]
            yield i, chunk, patch_batch(tiling, image, row_box, chunk)


# --- skipping blocks without signal ---------------------------------------------------


def skip_reason(job: BlockJob, block: Block) -> str:
    """``"mask"`` if the block lies outside the foreground mask, ``"empty"`` if its
    input is constant (or below ``skip_threshold``) and ``skip_empty`` is on, else ``""``."""
    if job.mask_path and not mask_has_foreground(job.mask_path, block.write_box, job.layout.spatial_shape):
        return "mask"
    if job.skip_empty and input_is_empty(job, block):
        return "empty"
    return ""


def scale_box(box: Box, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> Box:
    """*box* in image voxels -> the mask voxels that cover it (any mask resolution).

    >>> scale_box(Box((4, 0), (4, 3)), (8, 6), (2, 3))
    Box(offset=(1, 0), shape=(1, 2))
    """
    lo = [o * m // n for o, m, n in zip(box.offset, mask_shape, image_shape)]
    hi = [max(l + 1, -(-(o + s) * m // n)) for l, o, s, m, n in zip(lo, box.offset, box.shape, mask_shape, image_shape)]
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
        raw = store.read_box(_open_input(job.input_path, job.input_level), box, layout=job.layout, mode=job.mirror, name=job.input_path)
        lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
        below = job.skip_threshold is not None and hi < job.skip_threshold
        if hi > lo and not below:
            return False
    return True
