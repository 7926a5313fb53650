"""Resolve a run: settings + the input's metadata + the net's geometry -> one frozen RunPlan.

Everything a user can get wrong about shapes, channels and dtypes is found here, before
the output is touched; nothing here writes. The defaults (block, patch, chunk shapes)
live here too, with the measurements that chose them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from unetflow import finite, formats, schedule, store
from unetflow.config import ModelSpec, NormSpec, RunConfig, fit_shape
from unetflow.errors import ConfigError, InputFormatError, OutputWriteError, ShapeError
from unetflow.geometry import NetGeometry
from unetflow.job import WRITE_THREADS, BlockJob, OutputSpec
from unetflow.values import norm_stats
from unetflow.model.geometry import activation_bytes
from unetflow.model.predictor import NetInfo, NetSource, model_source, net_info
from unetflow.plan import Plan, make_tiling

log = logging.getLogger(__name__)

# Defaults from the measurements in BENCHMARKS.md (issue 6). Blocks stream along their
# first axis, so their memory does not grow with it; a patch on a block border is
# computed by both blocks, so redundancy per split axis is about 1 + patch / block.
DEFAULT_PATCH = {2: 256, 3: 64}


DEFAULT_BLOCK = {2: (4096, 4096), 3: (512, 512, 512)}


MAX_DEPTH_FACTOR = 4  # default blocks reach up to 4x DEFAULT_BLOCK along axis 0 (see default_block)


DEFAULT_CHUNK = {2: 256, 3: 64}


@dataclass(frozen=True)
class RunPlan:
    """Everything checked and derived before any work: the run's full picture, handed
    down unchanged. ``image`` is the input, opened once (lazily sliceable)."""

    config: RunConfig
    info: NetInfo
    spec: dict[str, Any] | None
    norm: NormSpec
    layout: store.Layout
    plan: Plan
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None
    output: OutputSpec
    source: NetSource
    image: store.ImageArray  # the input, at config.level

    def summary(self) -> dict[str, Any]:
        out = self.plan.summary()
        out.update(
            input=self.config.input,
            output=self.config.output,
            channels=self.layout.channels,
            classes=self.info.classes,
            output_kind=self.output.kind,
            output_dtype=self.output.dtype,
            chunk_shape=list(self.chunk_shape),
            shard_shape=list(self.shard_shape) if self.shard_shape else None,
            memory_per_worker_mb=round(estimate_memory(self) / 2**20, 1),
            output_mb_uncompressed=round(output_bytes(self) / 2**20, 1),
        )
        return out


def resolve(config: RunConfig, *, source: NetSource | None = None) -> RunPlan:
    """Check the input, the model and the settings; derive the plan. Touches nothing.
    The checks that need neither (:func:`unetflow.preflight.check`) come before it."""
    source = source or model_source(config.model, trust_code=config.trust_model_code)
    net = source.load()
    info = net_info(net)
    model_spec: ModelSpec | None = getattr(net, "spec", None)  # a UNet's; oracle and package nets have none
    spec = model_spec.to_dict() if model_spec is not None else None
    norm: NormSpec = model_spec.norm if model_spec is not None else getattr(net, "norm", None) or _no_norm()
    array = formats.open_input(config.input, level=config.level)
    layout = store.layout_for(array, info.dims, name=config.input)
    check_image(array, layout, name=config.input)
    if layout.channels != info.in_channels:
        raise ShapeError(
            f"input {config.input} has {layout.channels} channel(s) but the model takes {info.in_channels}; "
            "use a model trained on this channel count or select the channels into a new array"
        )
    t = config.tiling
    dims = info.dims
    patch = fit_shape(t.patch_shape, dims, what="patch shape") if t.patch_shape else default_patch(info, layout)
    block = fit_shape(t.block_shape, dims, what="block shape") if t.block_shape else default_block(config, layout.spatial_shape)
    chunks, shards = output_chunks(config, block)
    tiling = make_tiling(info.geometry, patch, blend=t.blend, overlap=t.overlap, halo=t.halo, allow_small_halo=t.allow_small_halo)
    plan = Plan(layout.spatial_shape, block, tiling)
    if config.skip.mask:  # workers may run elsewhere (batch jobs): paths made absolute once, here
        config = replace(config, skip=replace(config.skip, mask=os.path.abspath(config.skip.mask)))
    output = output_spec(config, info)
    if config.output_settings.kind == "instances":  # before any work (issue 16)
        from unetflow.label import check_instance_model

        check_instance_model(config.model, info.classes, tuple(spec.get("class_names") or ()) if spec is not None else None)
    return RunPlan(config, info, spec, norm, layout, plan, chunks, shards, output, source, array)


def check_image(array: store.ImageArray, layout: store.Layout, *, name: str) -> None:
    """Refuse an input with no voxels (an axis of length 0) or whose values are not real
    numbers (complex, strings, records): found here, not as a traceback in a block.

    Raises
    ------
    ShapeError, InputFormatError
    """
    shape = tuple(int(n) for n in array.shape)
    if 0 in shape:
        raise ShapeError(
            f"input {name} has shape {shape}, an axis of length 0, so no voxels to segment; "
            "write the image into the array first, or name another array"
        )
    kind = np.dtype(array.dtype).kind
    if kind not in "biuf":
        raise InputFormatError(
            f"input {name} has dtype {np.dtype(array.dtype)}, not real numbers; convert it to an integer or float type first"
        )


def _no_norm() -> NormSpec:
    return NormSpec(kind="none")


def default_block(config: RunConfig, shape: Sequence[int]) -> tuple[int, ...]:
    """The default block: DEFAULT_BLOCK across, and along axis 0 (the axis blocks stream
    along, where depth costs no memory) as deep as up to MAX_DEPTH_FACTOR times that,
    split so that every worker gets a block.

    Fewer blocks along axis 0 means fewer patch rows computed twice at block seams
    (1.048x the global grid at 512 vs 1.0 at 1024 on a 1024x128x128 image, BENCHMARKS.md);
    the price is a coarser unit of resume. Depth is whole output chunks (or shards).

    >>> from unetflow.config import ClusterSpec
    >>> default_block(RunConfig(input="a", output="b", model="m", cluster=ClusterSpec(workers=1)), (1024, 128, 128))
    (1024, 512, 512)
    >>> default_block(RunConfig(input="a", output="b", model="m", cluster=ClusterSpec(workers=2)), (1000, 128, 128))
    (512, 512, 512)
    >>> default_block(RunConfig(input="a", output="b", model="m", cluster=ClusterSpec(workers=1)), (5000, 600, 600))
    (1728, 512, 512)
    """
    dims = len(shape)
    base = DEFAULT_BLOCK[dims]
    o = config.output_settings
    given = o.shard_shape or o.chunk_shape
    unit = fit_shape(given, dims, what="chunk shape")[0] if given else DEFAULT_CHUNK[dims]
    workers = 1 if config.cluster.kind == "inline" else schedule.expected_workers(config.cluster)
    across = math.prod(-(-n // b) for n, b in zip(shape[1:], base[1:]))
    parts = max(1, -(-shape[0] // (MAX_DEPTH_FACTOR * base[0])), -(-workers // across))
    depth = -(-shape[0] // parts)
    return (max(unit, -(-depth // unit) * unit), *base[1:])


def default_patch(info: NetInfo, layout: store.Layout) -> tuple[int, ...]:
    """A patch per axis: the default size, shrunk towards small images, valid for the net."""
    out = []
    for n in layout.spatial_shape:
        target = min(DEFAULT_PATCH[info.dims], max(n, 1))
        out.append(smallest_valid_patch(info.geometry, target))
    return tuple(out)


def smallest_valid_patch(geometry: NetGeometry, at_least: int) -> int:
    """The smallest input size >= *at_least* the net takes (and whose tile is not empty)."""
    for n in range(max(1, at_least), at_least + 8 * geometry.input_multiple + 4 * geometry.margin + 64):
        try:
            out = geometry.output_size(n)
        except ShapeError:
            continue
        if out >= geometry.input_multiple:
            return n
    raise ShapeError(f"no valid patch size near {at_least} for this model; pass --patch-shape explicitly")


def output_chunks(config: RunConfig, block: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Output chunk and shard shapes; the block's write box must be whole chunks (or shards)."""
    o = config.output_settings
    dims = len(block)
    if o.chunk_shape:
        chunks = fit_shape(o.chunk_shape, dims, what="chunk shape")
    else:
        chunks = tuple(DEFAULT_CHUNK[dims] if b % DEFAULT_CHUNK[dims] == 0 else b for b in block)
    shards = fit_shape(o.shard_shape, dims, what="shard shape") if o.shard_shape else None
    unit, name = (shards, "shard") if shards else (chunks, "chunk")
    if shards and any(s % c for s, c in zip(shards, chunks)):
        raise ShapeError(f"shard shape {shards} is not a multiple of chunk shape {chunks}; pass --shard-shape as whole chunks")
    if any(b % u for b, u in zip(block, unit)):
        fix = tuple(max(u, (b // u) * u) for b, u in zip(block, unit))
        raise ShapeError(
            f"block shape {tuple(block)} is not a multiple of the output {name} shape {unit}, so two blocks would write "
            f"one {name}; pass --block-shape {','.join(map(str, fix))}"
        )
    return chunks, shards


def output_spec(config: RunConfig, info: NetInfo) -> OutputSpec:
    """What the blocks write; a --dtype that cannot hold it is refused here, before any work."""
    o = config.output_settings
    if o.kind == "instances":
        from unetflow.label import INTERIOR_THRESHOLD

        if o.dtype not in (None, "uint64"):
            raise ConfigError(f"--dtype {o.dtype} with --output instances: instance ids are uint64; leave --dtype out")
        return OutputSpec("instances", "uint64", INTERIOR_THRESHOLD if o.interior_threshold is None else float(o.interior_threshold))
    if o.kind == "labels":
        smallest = "uint8" if info.classes <= 256 else "uint16"
        dtype = o.dtype or smallest
        if dtype not in ("uint8", "uint16", "uint32", "uint64"):
            raise ConfigError(f"--dtype {dtype} with --output labels: use uint8, uint16, uint32 or uint64 (or leave it out)")
        if info.classes - 1 > np.iinfo(dtype).max:
            raise ConfigError(f"--dtype {dtype} cannot hold the labels 0..{info.classes - 1} of this model; use --dtype {smallest} or leave it out")
        return OutputSpec("labels", dtype)
    return OutputSpec("probabilities", o.dtype or "float32")


def estimate_memory(p: RunPlan) -> int:
    """Bytes a worker holds for its largest block, streamed along axis 0 (on a GPU the
    sums, rows and batches are in its memory instead; the host keeps the rest).

    Three rows of normalised input (one computing, one prefetched, one whose last
    patches still run) and the raw input chunks under them; the float32 sums of the
    held planes, in slabs of a flush unit (a tile deep and one unit more, rounded up to
    slabs); the slabs queued for or being written (write threads + 1) and their
    converted copies; one batch and its activations.
    """
    t = p.plan.tiling
    read_shape = p.plan.max_read_shape()
    read_plane = math.prod(read_shape[1:]) * p.layout.channels
    rows = 3 * t.patch[0] * read_plane * 4 + 2 * t.patch[0] * read_plane * 2
    plane = math.prod(p.plan.block_shape[1:]) * p.info.classes
    flush = min((p.shard_shape or p.chunk_shape)[0], p.plan.block_shape[0])
    held = (-(-t.tile[0] // flush) + 1) * flush
    writes = (p.config.output_settings.write_threads or WRITE_THREADS) + 1
    sums = (held + writes * flush) * plane * 4
    converted = 0 if p.output.dtype == "float32" else writes * flush * plane * np.dtype(p.output.dtype).itemsize
    patch = math.prod(t.patch)
    batch_size = p.config.tiling.batch_size or 4
    batch = batch_size * patch * (p.layout.channels + p.info.classes) * 4
    acts = 0
    if p.spec:
        acts = activation_bytes(p.spec["width"], p.spec["depth"], t.patch) * batch_size
    return rows + sums + converted + batch + acts


# zstd shrinks label maps many times and float probabilities little; no output of
# unetflow shrinks by more than this, so an output that would not fit even so is refused
BEST_COMPRESSION = 50


def output_bytes(p: RunPlan) -> int:
    """Bytes the output takes uncompressed: level 0, the OME-Zarr pyramid (at most a
    third more) and, for instances, the uint64 scratch array it needs while it runs."""
    voxels = math.prod(p.layout.spatial_shape)
    values = p.info.classes if p.output.kind == "probabilities" else 1
    total = voxels * values * np.dtype(p.output.dtype).itemsize
    if is_ome(p.config):
        total += total // 3
    if p.output.kind == "instances":
        total += voxels * 8
    return int(total)


def check_room(p: RunPlan) -> None:
    """Refuse an output that cannot fit where it goes even at the best compression;
    warn, with the figures, where it fits only if it compresses (how well is not known
    before it is written). A resumed run's blocks already written count as free.

    Raises
    ------
    OutputWriteError
    """
    free = store.free_bytes(p.config.output)
    need = output_bytes(p)
    if free is None or free >= need or p.config.resume or p.config.part is not None:
        return
    figures = f"the output needs up to {need / 2**20:.1f} MiB uncompressed and {store.location(p.config.output)} has {free / 2**20:.1f} MiB free"
    if free < need // BEST_COMPRESSION:
        raise OutputWriteError(f"{figures}, too little even at {BEST_COMPRESSION}x compression; free space or choose another location")
    log.warning("%s; it fits only if zstd compresses it %.1fx: a full disk stops the run, and --resume finishes it after space is freed",
                figures, need / max(free, 1))


def input_stats(samples: np.ndarray, norm: NormSpec, *, nan_value: float | None, name: str) -> tuple[tuple[float, float], ...]:
    """Normalisation statistics of the sampled voxels (C, N), NaN and Inf left out.

    Without *nan_value* a sample holding NaN or Inf is refused (:func:`finite.check_samples`);
    with it, a channel without one finite value gets the statistics of *nan_value*.
    """
    finite.check_samples(samples, nan_value=nan_value, name=name)
    stats: list[tuple[float, float]] = []
    for row in samples:
        kept = finite.finite_values(row)
        if kept.size == 0:
            kept = np.array([nan_value or 0.0])
        stats.extend(norm_stats(kept[None], norm))
    return tuple(stats)


def is_ome(config: RunConfig) -> bool:
    from unetflow.formats import omezarr

    return omezarr.wants_ome(config.output, ome=config.output_settings.ome)


def make_job(p: RunPlan, stats: Sequence[Sequence[float]], output_path: str) -> BlockJob:
    """What every worker needs for any block: the plan, the specs, the input's statistics;
    *output_path* is the array the blocks write (:func:`unetflow.output.block_output`)."""
    c = p.config
    return BlockJob(
        input_path=store.absolute_input(c.input), output_path=output_path, plan=p.plan, layout=p.layout,
        source=p.source, norm=p.norm, norm_stats=tuple((float(s[0]), float(s[1])) for s in stats), output=p.output,
        tiling=c.tiling, skip=c.skip, device=c.device, amp=c.amp, compile=c.compile,
        threads=schedule.cpu_threads_per_worker(c.cluster) if c.cluster.kind != "inline" else 0,
        flush_planes=(p.shard_shape or p.chunk_shape)[0], input_level=c.level,
        write_threads=c.output_settings.write_threads, nan_value=c.nan_value,
    )
