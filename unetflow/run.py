"""The only orchestration: ``segment(config)`` as a sequence of named steps.

Data flows one way: config -> input and model checks -> plan -> output created ->
blocks scheduled -> report. Everything a user can get wrong is checked before the
output is touched or any block runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

import unetflow
from unetflow import finite, instances, preflight, resume, schedule, store, telemetry
from unetflow.config import RunConfig, parse_shape, to_dict
from unetflow.errors import BlockFailedError, ConfigError, InputFormatError, OutputExistsError, OutputWriteError, ShapeError, UnetflowError
from unetflow.infer import WRITE_THREADS, BlockJob, BlockResult, OutputSpec, cancel_blocks, norm_stats, run_block
from unetflow.model.predictor import CheckpointSource, NetInfo, net_info
from unetflow.plan import Plan, make_tiling
from unetflow.worker import tune_allocator

log = logging.getLogger(__name__)

# Defaults from the measurements in BENCHMARKS.md (issue 6). Blocks stream along their
# first axis, so their memory does not grow with it; a patch on a block border is
# computed by both blocks, so redundancy per split axis is about 1 + patch / block.
DEFAULT_PATCH = {2: 256, 3: 64}
DEFAULT_BLOCK = {2: (4096, 4096), 3: (512, 512, 512)}
MAX_DEPTH_FACTOR = 4  # default blocks reach up to 4x DEFAULT_BLOCK along axis 0 (see default_block)
DEFAULT_CHUNK = {2: 256, 3: 64}


@dataclass
class Prepared:
    """Everything checked and derived before any work: the run's full picture."""

    config: RunConfig
    info: NetInfo
    spec: dict[str, Any] | None
    norm: Any
    layout: store.Layout
    plan: Plan
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None
    output: OutputSpec
    source: Any

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


@dataclass
class RunReport:
    """What a finished run reports (and writes next to the output)."""

    summary: dict[str, Any]
    blocks_done: int = 0
    seconds: float = 0.0
    voxels: int = 0
    results: list[BlockResult] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)
    blocks_skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    workers: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


def prepare(config: RunConfig, *, source: Any = None) -> Prepared:
    """Check the input, the model and the settings; derive the plan. Touches nothing."""
    preflight.check(config)
    source = source or CheckpointSource(config.model)
    net = source.load()
    info = net_info(net)
    spec = net.spec.to_dict() if hasattr(net, "spec") else None
    norm = net.spec.norm if hasattr(net, "spec") else getattr(net, "norm", None) or _no_norm()
    array = store.open_input(config.input, level=config.level)
    layout = store.layout_for(array, info.dims, name=config.input)
    check_image(array, layout, name=config.input)
    if layout.channels != info.in_channels:
        raise ShapeError(
            f"input {config.input} has {layout.channels} channel(s) but the model takes {info.in_channels}; "
            "use a model trained on this channel count or select the channels into a new array"
        )
    t = config.tiling
    dims = info.dims
    patch = parse_shape(t.patch_shape, what="patch shape", ndim=dims) if t.patch_shape else default_patch(info, layout)
    block = parse_shape(t.block_shape, what="block shape", ndim=dims) if t.block_shape else default_block(config, layout.spatial_shape)
    chunks, shards = output_chunks(config, block)
    tiling = make_tiling(info.geometry, patch, blend=t.blend, overlap=t.overlap, halo=t.halo, allow_small_halo=t.allow_small_halo)
    plan = Plan(layout.spatial_shape, block, tiling)
    return Prepared(config, info, spec, norm, layout, plan, chunks, shards, output_spec(config, info), source)


def check_image(array: Any, layout: store.Layout, *, name: str) -> None:
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


def _no_norm() -> Any:
    from unetflow.config import NormSpec

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
    unit = parse_shape(given, what="chunk shape", ndim=dims)[0] if given else DEFAULT_CHUNK[dims]
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


def smallest_valid_patch(geometry: Any, at_least: int) -> int:
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
        chunks = parse_shape(o.chunk_shape, what="chunk shape", ndim=dims)
    else:
        chunks = tuple(DEFAULT_CHUNK[dims] if b % DEFAULT_CHUNK[dims] == 0 else b for b in block)
    shards = parse_shape(o.shard_shape, what="shard shape", ndim=dims) if o.shard_shape else None
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


def estimate_memory(p: Prepared) -> int:
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
        width, depth, dims = p.spec["width"], p.spec["depth"], p.spec["dims"]
        acts = sum(3 * width * 2**lvl * patch // 2 ** (dims * lvl) * 4 for lvl in range(depth + 1)) * batch_size
    return rows + sums + converted + batch + acts


# zstd shrinks label maps many times and float probabilities little; no output of
# unetflow shrinks by more than this, so an output that would not fit even so is refused
BEST_COMPRESSION = 50


def output_bytes(p: Prepared) -> int:
    """Bytes the output takes uncompressed: level 0, the OME-Zarr pyramid (at most a
    third more) and, for instances, the uint64 scratch array it needs while it runs."""
    voxels = math.prod(p.layout.spatial_shape)
    values = p.info.classes if p.output.kind == "probabilities" else 1
    total = voxels * values * np.dtype(p.output.dtype).itemsize
    if _ome(p.config):
        total += total // 3
    if p.output.kind == "instances":
        total += voxels * 8
    return int(total)


def check_room(p: Prepared) -> None:
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


def output_attributes(p: Prepared, stats: Sequence[Sequence[float]]) -> dict[str, Any]:
    return {
        "unetflow": {
            "version": unetflow.__version__,
            "config": p.config.to_dict(),
            "model": {"spec": p.spec, "source": p.source.describe() if hasattr(p.source, "describe") else repr(p.source)},
            "plan": p.plan.summary(),
            "norm_stats": [list(s) for s in stats],
            "output": to_dict(p.output),
        }
    }


def segment(config: RunConfig, *, source: Any = None, progress: bool = True, dispatch: schedule.Dispatcher | None = None) -> RunReport:
    """Run a whole segmentation: check, plan, create the output, run every block, report.

    With ``config.resume`` (or ``config.part``) an existing output made with the same
    settings and model is finished: blocks with a done marker are skipped. The run
    holds the output's lock throughout and writes ``<output>.unetflow/report.json``.

    *dispatch*: a :class:`schedule.Dispatcher` to run the blocks on, shared by several
    runs (the nightly pipeline keeps one cluster, and its batch jobs, for all its
    inputs). The run leaves it open, except after a failure, when blocks may still be
    running: then it is closed (a later dispatch starts a new cluster). By default the
    run opens its own and closes it before it releases the output's lock.

    Raises
    ------
    UnetflowError
        Bad input or settings (before anything is written), a locked output, or failed
        blocks (after the others finished and the report was written).
    """
    if not config.dry_run and schedule.computes_here(config.cluster):
        tune_allocator()  # before this process first allocates for torch (loading the model)
    p = prepare(config, source=source)
    report = RunReport(summary=p.summary())
    if config.dry_run:
        return report
    check_room(p)
    run_dir = resume.RunDir(config.output)
    own = dispatch is None
    with schedule.Dispatcher(config.cluster, log_directory=str(run_dir.log_dir)) if own else contextlib.nullcontext(dispatch) as d:
        if schedule.starts_early(config):
            d.start()  # the cluster starts while the input statistics are sampled (a no-op when started already)
        failures, block_ids = _segment(p, report, run_dir, d, progress=progress, close=own)
    if failures:
        raise BlockFailedError(failure_message(report.failures, len(block_ids), config.output))
    return report


def _segment(p: Prepared, report: RunReport, run_dir: resume.RunDir, dispatch: schedule.Dispatcher, *, progress: bool,
             close: bool) -> tuple[list[Any], list[int]]:
    """:func:`segment` from the input statistics on: claim the output, run the blocks, report.
    The cluster stops before the lock goes: always when *close*, else after a failure."""
    config = p.config
    array = store.open_input(config.input, level=config.level)
    stats = input_stats(store.sample_voxels(array, layout=p.layout), p.norm, nan_value=config.nan_value, name=config.input)
    ident = run_identity(p, stats)
    with _storage_errors(config.output), claim_output(p, stats, ident, run_dir) as lock:
        block_ids = resume.part_blocks(p.plan.n_blocks, config.part)
        done = run_dir.done_blocks()
        todo = [b for b in block_ids if b not in done]
        report.blocks_skipped = len(block_ids) - len(todo)
        if report.blocks_skipped:
            log.info("resuming: %d of %d blocks already done, %d to do", report.blocks_skipped, len(block_ids), len(todo))
        job = make_job(p, stats)
        t0 = time.perf_counter()
        with _closing(dispatch, always=close), _progress(len(todo), enabled=progress) as bar:
            def on_result(outcome: Any) -> None:
                result = outcome.result
                report.results.append(result)
                report.blocks_done += 1
                report.voxels += result.voxels
                report.workers.setdefault(outcome.worker, resume.Tally()).add(outcome, result.voxels, result.seconds, result.stages)
                bar.update(1)
                bar.set_postfix_str(f"{report.voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
                log.info(json.dumps(block_log(p, result, outcome)))

            record = instances.block_record if p.output.kind == "instances" else None
            fn = resume.MarkDone(run_block, str(run_dir.done_dir), lock.holder["token"], record)
            try:
                failures = dispatch(fn, job, todo, on_result=on_result)
            except OutputWriteError as err:  # a full or read-only output: the run stops at the first block that met it
                report.failures = [{"error": str(err)}]
                _write_report(run_dir, config.part, report_dict(p, report, ident, len(block_ids)))
                raise
            if p.output.kind == "instances" and not failures:
                label_instances(p, run_dir, dispatch, lock.holder["token"])
        report.seconds = time.perf_counter() - t0
        report.telemetry = telemetry.summary(report.results)
        log.info("telemetry: %s", report.telemetry["verdict"])
        report.failures = [failure_entry(p, f) for f in failures]
        finished = run_dir.path / "ome-finished"
        if not failures and _ome(config) and all_done(p, run_dir) and (report.blocks_done or not finished.exists()):
            from unetflow.formats import omezarr  # the pyramid, once every block (of every part) is done

            names = tuple((p.spec or {}).get("class_names") or ())
            contents = omezarr.Contents(p.info.classes, names, config.output_settings.image, array, p.layout.has_channel)
            omezarr.finish_prediction(config.output, kind=p.output.kind, input_path=config.input, level=config.level, contents=contents)
            finished.touch()
        _write_report(run_dir, config.part, report_dict(p, report, ident, len(block_ids)))
    return failures, block_ids


def _write_report(run_dir: resume.RunDir, part: tuple[int, int] | None, data: dict[str, Any]) -> None:
    """Write report.json; on a full or read-only location say so, and let the run's own result stand."""
    try:
        resume.write_json(run_dir.report_file(part), data)
    except OSError as err:
        log.warning("could not write the report %s (%s)", run_dir.report_file(part), err)


@contextlib.contextmanager
def _storage_errors(output: str) -> Iterator[None]:
    """An OSError while the output or its run folder is created or claimed (read-only,
    full, permissions) -> one line naming the output and the cause."""
    try:
        yield
    except UnetflowError:
        raise
    except OSError as err:
        raise OutputWriteError(
            f"output {output} could not be written: {err.strerror or err} (errno {err.errno}) at {err.filename or output}; "
            "free space or make the location writable, then run again (with --resume if blocks were done)"
        ) from None


def input_stats(samples: np.ndarray, norm: Any, *, nan_value: float | None, name: str) -> tuple[tuple[float, float], ...]:
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


@contextlib.contextmanager
def _closing(dispatch: schedule.Dispatcher, *, always: bool) -> Iterator[None]:
    """Close *dispatch* after the run (*always*) or only after a failure or an interrupt
    (a shared one). Blocks of this run may still be running then, and must stop before
    the output's lock goes: those in this process (the threaded worker) are told to
    stop at their next forward pass; worker processes end with their cluster."""
    try:
        yield
    except BaseException:
        cancel_blocks()
        try:
            dispatch.close()
        finally:
            cancel_blocks(False)
        raise
    if always:
        dispatch.close()


@contextlib.contextmanager
def claim_output(p: Prepared, stats: Sequence[Sequence[float]], ident: dict[str, Any], run_dir: resume.RunDir) -> Iterator[resume.Lock]:
    """Create the output (or join it: ``--resume``, ``--part``) and hold its lock.

    A fresh output is created, then locked; an existing one is locked, then checked to
    have been made with the same settings and model. A live run's lock is refused
    (naming its host, pid and start), a dead run's stale lock is taken over on resume.
    """
    c = p.config
    joining = c.resume or c.part is not None
    exists = os.path.exists(c.output)
    if exists and c.output_settings.overwrite:
        resume.check_unlocked(run_dir, None, takeover=True)  # never delete under a live run
    if exists and not c.output_settings.overwrite:
        if not joining:
            resume.check_unlocked(run_dir, c.part, takeover=False)
            raise OutputExistsError(
                f"output {c.output} already exists; pass --resume to finish it, --overwrite to replace it, or choose another path"
            )
        lock = resume.acquire(run_dir, c.part, takeover=True)
        try:
            resume.check_same_run(run_dir, ident)
        except BaseException:
            lock.release()
            raise
    else:
        try:
            create_output_array(p, stats)
        except OutputExistsError:  # another --part job created it first
            if not joining:
                raise
            _wait_for(run_dir.run_file)
        else:
            run_dir.clear()  # a new store: markers beside it are an earlier output's (issue 18)
            resume.record_run(run_dir, ident)
        lock = resume.acquire(run_dir, c.part, takeover=c.resume)
        resume.check_same_run(run_dir, ident)
    try:
        yield lock
    finally:
        lock.release()


def _wait_for(path: Any, seconds: float = 30.0) -> None:
    t_end = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < t_end:
        time.sleep(0.2)


def run_identity(p: Prepared, stats: Sequence[Sequence[float]]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue an output (see ``resume.identity``)."""
    model = p.source.describe() if hasattr(p.source, "describe") else {"repr": repr(p.source)}
    extra = {
        "input": {"path": store.absolute_input(p.config.input), "shape": list(p.layout.spatial_shape), "channels": p.layout.channels},
        "norm_stats": [[float(v) for v in s] for s in stats],
        "output": to_dict(p.output),
        "unetflow": unetflow.__version__,
    }
    return resume.identity(p.config.to_dict(), dict(model), extra)


def _box(box: Any) -> dict[str, list[int]]:
    return {"offset": list(box.offset), "shape": list(box.shape)}


def block_log(p: Prepared, result: BlockResult, outcome: Any) -> dict[str, Any]:
    """The structured log line of one finished block."""
    block = p.plan.block(result.block_id)
    return {
        "event": "block_done", "block_id": result.block_id, "write_box": _box(block.write_box), "read_box": _box(block.read_box),
        "patches": result.n_patches, "seconds": round(result.seconds, 4), "device": result.device, "worker": outcome.worker,
    }


def failure_entry(p: Prepared, failure: schedule.BlockFailure) -> dict[str, Any]:
    block = p.plan.block(failure.block_id)
    return {"block_id": failure.block_id, "write_box": _box(block.write_box), "read_box": _box(block.read_box), "error": failure.error,
            "traceback": failure.traceback}


def failure_message(failures: Sequence[dict[str, Any]], total: int, output: str) -> str:
    first = failures[0]
    wb = first["write_box"]
    return (
        f"{len(failures)} of {total} blocks failed (ids {[f['block_id'] for f in failures][:10]}); first: block {first['block_id']} "
        f"write box offset {wb['offset']} shape {wb['shape']}: {first['error']}; details in {resume.RunDir(output).report_file()}; "
        "fix the cause and rerun with --resume to redo only the failed blocks"
    )


def report_dict(p: Prepared, report: RunReport, ident: dict[str, Any], n_blocks: int) -> dict[str, Any]:
    """The JSON report written next to the output."""
    return {
        "status": "failed" if report.failures else "complete",
        "output": os.path.abspath(p.config.output),
        "part": list(p.config.part) if p.config.part else None,
        "fingerprint": resume.fingerprint(ident),
        "blocks": {"total": n_blocks, "done": report.blocks_done, "skipped": report.blocks_skipped, "failed": len(report.failures)},
        "seconds": round(report.seconds, 3),
        "voxels": report.voxels,
        "voxels_per_second": round(report.voxels_per_second, 1),
        "workers": {name: tally.to_dict() for name, tally in sorted(report.workers.items())},
        "failures": report.failures,
        "plan": p.plan.summary(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def label_instances(p: Prepared, run_dir: resume.RunDir, dispatch: Any, token: str) -> None:
    """Phases 2-4 of instances (:func:`unetflow.instances.label`), once every block of
    every part is done: a ``--part`` job leaves them to the final ``--resume``."""
    if p.config.part is not None:
        log.info("part %d/%d done; label the instances with `unetflow segment ... --resume` once every part has finished", *p.config.part)
        return
    output = os.path.abspath(output_array_path(p.config, p.output.kind))
    instances.label(p.plan, run_dir=run_dir, scratch=scratch_path(p.config.output), output=output, dispatch=dispatch, token=token)


def all_done(p: Prepared, run_dir: resume.RunDir) -> bool:
    """Every block of every part has its marker (and instances their labelling)."""
    blocks = len(run_dir.done_blocks()) >= p.plan.n_blocks
    return blocks and (p.output.kind != "instances" or instances.complete(run_dir))


scratch_path = preflight.scratch_path


def train(spec: Any, *, progress: bool = True) -> Any:
    """Train a U-Net (``unetflow train``): see :mod:`unetflow.train.loop`."""
    from unetflow.train.loop import train as train_loop

    return train_loop(spec, progress=progress)


def _ome(config: RunConfig) -> bool:
    return config.output_settings.ome or config.output.rstrip("/").lower().endswith(".ome.zarr")


def output_array_path(config: RunConfig, kind: str) -> str:
    """The array the blocks write: the output itself, or level 0 inside an OME-Zarr group."""
    if not _ome(config):
        return config.output
    from unetflow.formats import omezarr

    return omezarr.level0_path(config.output, kind=kind)


def create_output_array(p: Prepared, stats: Sequence[Sequence[float]]) -> None:
    o = p.config.output_settings
    spatial = p.layout.spatial_shape
    names = ("z", "y", "x")[-len(spatial):]
    if p.output.kind == "probabilities":
        k = p.info.classes
        shape, chunks = (k, *spatial), (k, *p.chunk_shape)
        shards = (k, *p.shard_shape) if p.shard_shape else None
        dim_names = ("c", *names)
    else:
        shape, chunks, shards, dim_names = spatial, p.chunk_shape, p.shard_shape, names
    path = p.config.output
    if _ome(p.config):
        from unetflow.formats import omeroot, omezarr

        if p.output.kind != "probabilities":  # before anything is written (issue 18)
            omeroot.check_root_image(p.config.input, level=p.config.level, mode=o.image)
        path = omezarr.prepare_output(path, kind=p.output.kind, overwrite=o.overwrite)
    store.create_output(
        path, shape=shape, chunks=chunks, shards=shards, dtype=p.output.dtype, dimension_names=dim_names,
        attributes=output_attributes(p, stats), overwrite=o.overwrite, compression_level=o.compression_level,
    )
    if p.output.kind == "instances":
        scratch = scratch_path(p.config.output)
        store.create_output(scratch, shape=shape, chunks=chunks, dtype="uint64", overwrite=True, kinds=("scratch",),
                            attributes={"unetflow": {"scratch_of": os.path.abspath(p.config.output)}})


def make_job(p: Prepared, stats: Sequence[Sequence[float]]) -> BlockJob:
    c = p.config
    output_path = scratch_path(c.output) if p.output.kind == "instances" else os.path.abspath(output_array_path(c, p.output.kind))
    return BlockJob(
        input_path=store.absolute_input(c.input), output_path=output_path, plan=p.plan, layout=p.layout,
        source=p.source, norm=p.norm, norm_stats=tuple(tuple(s) for s in stats), output=p.output,
        mirror=c.tiling.mirror, batch_size=c.tiling.batch_size, device=c.device, amp=c.amp,
        threads=schedule.cpu_threads_per_worker(c.cluster) if c.cluster.kind != "inline" else 0,
        flush_planes=(p.shard_shape or p.chunk_shape)[0], skip_empty=c.skip.empty, skip_threshold=c.skip.threshold,
        mask_path=os.path.abspath(c.skip.mask) if c.skip.mask else None, compile=c.compile,
        input_level=c.level, write_threads=c.output_settings.write_threads, nan_value=c.nan_value,
    )


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="block", disable=not enabled, dynamic_ncols=True, mininterval=0.5)
