"""One block: read, normalise, predict patches, blend, convert, write, on the device.

This is the code a worker runs: the block loop, its writer pool and its cancel flag.
Its parts live in rooms below it: :mod:`~unetflow.read` (rows of input, skip rules),
:mod:`~unetflow.transfer` (host <-> device copies), :mod:`~unetflow.values`
(normalise, convert), :mod:`~unetflow.blend` (windows and sums) and
:mod:`~unetflow.job` (what travels to the worker and back). A :class:`BlockJob` carries everything it needs and
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
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from unetflow import store
from unetflow.memory import peak_rss
from unetflow.blend import PlaneWindow
from unetflow.geometry import Box
from unetflow.label import local_components
from unetflow.model.predictor import (
    Predictor,
    auto_batch_size,
    get_predictor,
    out_of_memory,
)
from unetflow.plan import Block, Plan, Tiling
from unetflow.job import WRITE_THREADS, BlockJob, BlockResult
from unetflow.read import RowReader, skip_reason
from unetflow.telemetry import Clock
from unetflow.transfer import MAX_PENDING_WRITES, Transfers
from unetflow.values import _host_values, convert_values, written_dtype

log = logging.getLogger(__name__)

@lru_cache(maxsize=8)
def _open_output(path: str) -> Any:
    return store.open_output(path)



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
