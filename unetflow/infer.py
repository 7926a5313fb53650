"""One block: read, normalise, predict patches, blend, convert, write.

This is the code a worker runs. A :class:`BlockJob` carries everything it needs and
is small and picklable; the model is loaded once per worker process and kept
(:func:`get_predictor`), as are the opened Zarr arrays.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from unetflow import store
from unetflow.blend import Accumulator, PlaneWindow, tile_weights
from unetflow.config import NormSpec
from unetflow.errors import ConfigError
from unetflow.geometry import Box
from unetflow.label import INTERIOR_THRESHOLD, instance_classes, local_components
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


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A resident network on one device: float32 patches in, activated outputs out.

    On a GPU the net runs channels-last, batches go through a pinned host buffer with
    non-blocking copies, and ``amp`` runs it in bf16 (fp16 where bf16 is missing).
    """

    def __init__(self, net: torch.nn.Module, *, device: torch.device, amp: bool, compile: bool = False, lanes: int = 1) -> None:
        self.info = net_info(net)
        self.device = device
        self.amp = amp
        # CPU: *lanes* patches run side by side, one torch thread each (see get_predictor)
        self.lanes = max(1, lanes) if device.type == "cpu" else 1
        self._lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="unetflow-lane")
        self.net = net.to(device).eval()
        self._pinned: torch.Tensor | None = None
        self.memory_format = torch.preserve_format
        if device.type == "cuda":
            self.memory_format = torch.channels_last_3d if self.info.dims == 3 else torch.channels_last
            self.net = self.net.to(memory_format=self.memory_format)
        self.amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        self.forward = torch.compile(self.net, dynamic=False) if compile else self.net

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return x
        if self._pinned is None or self._pinned.numel() < x.numel():
            self._pinned = torch.empty(x.numel(), dtype=torch.float32, pin_memory=True)
        staged = self._pinned[: x.numel()].view(x.shape).copy_(x)
        return staged.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """*batch*: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32.

        On CPU with several lanes the batch is split across them (torch releases the GIL).
        """
        if self.lanes < 2 or len(batch) < 2:
            return self._predict(batch)
        parts = np.array_split(batch, min(self.lanes, len(batch)))
        return np.concatenate(list(self._lane_pool.map(self._predict, parts)))

    def submit(self, batch: np.ndarray) -> Future[np.ndarray]:
        """Start one forward pass of *batch* on a free lane (the device's own thread on a
        GPU); the caller keeps ``2 * lanes`` in flight so that no lane waits for it."""
        return self._lane_pool.submit(self._predict, batch)

    @torch.inference_mode()
    def _predict(self, batch: np.ndarray) -> np.ndarray:
        """One forward pass: ndarray float32 of shape (B, C, *patch) -> (B, K, *out) float32.

        Raises
        ------
        ConfigError
            The GPU ran out of memory: the message names ``--batch-size`` and ``--patch-shape``.
        """
        try:
            x = self._to_device(batch)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                y = self.forward(x)
            y = y.float()
            if self.info.activation == "softmax":
                y = torch.softmax(y, dim=1)
            elif self.info.activation == "sigmoid":
                y = torch.sigmoid(y)
            return y.cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(
                f"out of GPU memory on {self.device} for a batch of {batch.shape[0]} patches of shape {tuple(batch.shape[2:])}; "
                "pass a smaller --batch-size (or --batch-size 0 to size it from free memory) or a smaller --patch-shape"
            ) from None


_PREDICTORS: dict[tuple[Any, str, bool, bool], Predictor] = {}


def get_predictor(source: Any, *, device: str = "auto", amp: bool | None = None, threads: int = 0, compile: bool = False) -> Predictor:
    """The worker's resident predictor for *source*: loaded on first use, then reused."""
    dev = pick_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    key = (source, str(dev), use_amp, compile)
    if key not in _PREDICTORS:
        lanes = 1
        if dev.type == "cpu":
            # Patches side by side, one torch thread each, beat one patch on all threads
            # (conv3d scales poorly across threads: BENCHMARKS.md, issue 6).
            lanes = threads if threads > 0 else (os.cpu_count() or 1)
            torch.set_num_threads(1)
        log.debug("loading model %s on %s (pid %d)", source, dev, os.getpid())
        _PREDICTORS[key] = Predictor(source.load(), device=dev, amp=use_amp, compile=compile, lanes=lanes)
    return _PREDICTORS[key]


def auto_batch_size(predictor: Predictor, patch: tuple[int, ...], requested: int) -> int:
    """*requested*, or (0) one patch per CPU lane, and on GPU
    as many patches as fit in half the free memory by an activation estimate."""
    if requested > 0:
        return requested
    if predictor.device.type != "cuda":
        return predictor.lanes  # one patch per lane
    free, _ = torch.cuda.mem_get_info(predictor.device)
    spec = getattr(predictor.net, "spec", None)
    width = getattr(spec, "width", 32)
    depth = getattr(spec, "depth", 4)
    voxels = math.prod(patch)
    per_patch = sum(6 * width * 2**lvl * voxels // 2 ** (len(patch) * lvl) for lvl in range(depth + 1))
    per_patch *= 2 if predictor.amp else 4
    return int(max(1, min(64, free // 2 // max(per_patch, 1))))


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
    return values.astype(output.dtype)


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
