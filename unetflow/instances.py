"""The phases of ``--output instances`` after the GPU blocks: resumable, partable, out of core.

The rule itself (which voxels seed objects, how they grow) is :mod:`unetflow.label`;
this room runs it blockwise and keeps every phase's result on disk, in the run folder
beside the output (:class:`unetflow.resume.RunDir`), so a killed driver or a lost job
loses at most the blocks under way::

    <output>.unetflow/
      done/<block_id>.json         phase 1 (GPU blocks): written after the block's local
                                   ids are in the scratch array; holds its object count
      instances/
        offsets.npy                phase 2: first global id of every block (n_blocks + 1
                                   entries, the last is the number of local components)
        pairs/<block_id>.npy       phase 3: (n, 2) uint64 global ids that touch across the
                                   block's upper faces (the file is its marker)
        table.npy                  phase 3, merged on the driver: the final id of every
                                   global id (one uint64 per local component, 0 -> 0)
        relabel/<block_id>.json    phase 4: written after the block's final ids are in
                                   the output
        finished.json              every phase done: the scratch, the pairs and the table
                                   are removed

Every file is written under a temporary name and renamed, so it exists only once
complete. Each phase is a function of the one before only, so a resumed run (``--resume``,
any phase, any number of times) writes the same bytes as an uninterrupted one.

The merge streams the pair files (:data:`MERGE_BATCH` pairs at a time) into a
union-find whose roots are always the smallest id of their component: the driver
holds one int64 per local component and one batch, never all pairs. Relabel workers
read the table and the offsets memory-mapped, so a task carries paths, not arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from unetflow import resume, schedule, store
from unetflow.errors import ConfigError, OutputWriteError
from unetflow.geometry import Box
from unetflow.label import BORDER, GROW_STEPS, face_pairs, relabel_and_grow, to_global
from unetflow.plan import Plan

log = logging.getLogger(__name__)

MERGE_BATCH = 1 << 20  # face pairs per union-find step on the driver: about 150 MiB of working memory


@dataclass(frozen=True)
class Folder:
    """Where the phases after the GPU blocks keep their results (see the module docstring)."""

    path: Path

    @classmethod
    def of(cls, run_dir: resume.RunDir) -> "Folder":
        return cls(run_dir.instances_dir)

    @property
    def offsets(self) -> Path:
        return self.path / "offsets.npy"

    @property
    def pairs_dir(self) -> Path:
        return self.path / "pairs"

    def pairs(self, block_id: int) -> Path:
        return self.pairs_dir / f"{block_id}.npy"

    @property
    def table(self) -> Path:
        return self.path / "table.npy"

    @property
    def relabel_dir(self) -> Path:
        return self.path / "relabel"

    @property
    def finished(self) -> Path:
        return self.path / resume.INSTANCES_FINISHED


def block_record(result: Any) -> dict[str, Any]:
    """What phase 1's done marker keeps of a block: its count of local components."""
    return {"objects": int(result.objects)}


def complete(run_dir: resume.RunDir) -> bool:
    """Whether every phase of the output's instance labelling has finished."""
    return Folder.of(run_dir).finished.exists()


# ---- files: written whole or not at all ---------------------------------------------


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write *array* to *path* (.npy) atomically: a reader finds the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def listed_ids(folder: Path, suffix: str) -> set[int]:
    """Block ids of the ``<id><suffix>`` files in *folder* (temporaries never match)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set()
    n = len(suffix)
    return {int(name[:-n]) for name in names if name.endswith(suffix) and name[:-n].isdigit()}


# ---- phase 2: numbering ---------------------------------------------------------------


def block_counts(run_dir: resume.RunDir, n_blocks: int) -> np.ndarray:
    """(n_blocks,) int64: every block's count of local components, from its done marker.

    Raises
    ------
    ConfigError
        A marker without a count (written by an unetflow that did not keep them).
    """
    counts = np.zeros(n_blocks, dtype=np.int64)
    for block_id in range(n_blocks):
        path = run_dir.done_dir / f"{block_id}.json"
        marker = resume.read_json(path)
        if "objects" not in marker:
            raise ConfigError(
                f"done marker {path} has no object count (an output of an older unetflow); "
                "pass --overwrite to segment it again"
            )
        counts[block_id] = int(marker["objects"])
    return counts


def number(run_dir: resume.RunDir, n_blocks: int) -> np.ndarray:
    """Phase 2: (n_blocks + 1,) uint64 first global id of each block, kept in offsets.npy."""
    folder = Folder.of(run_dir)
    if folder.offsets.exists():
        return np.load(folder.offsets)
    counts = block_counts(run_dir, n_blocks)
    offsets = np.zeros(n_blocks + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum(counts)
    save_npy(folder.offsets, offsets)
    return offsets


# ---- phases 3 and 4 on workers ----------------------------------------------------------


@dataclass(frozen=True)
class LabelJob:
    """What phases 3 and 4 need: the scratch of local ids, the output and the run's folder.

    Offsets and the merge table are read from *folder* (memory-mapped) by each task, so
    a task is a few hundred bytes however many blocks and objects the run has.
    """

    scratch_path: str
    output_path: str
    plan: Plan
    folder: str


def read_global(job: LabelJob, box: Box, offsets: np.ndarray) -> np.ndarray:
    """Global ids over *box* (clipped to the image; outside stays 0): one read of the
    scratch, then each block's part offset by its first global id."""
    out = np.zeros(box.shape, dtype=np.uint64)
    inside = box.intersect(job.plan.total_box)
    if inside.is_empty():
        return out
    local = np.asarray(store.open_output(job.scratch_path)[inside.to_slices()])
    first = [o // b for o, b in zip(inside.offset, job.plan.block_shape)]
    last = [(s - 1) // b for s, b in zip(inside.stop, job.plan.block_shape)]
    for pos in itertools.product(*(range(a, b + 1) for a, b in zip(first, last))):
        block_id = int(np.ravel_multi_index(pos, job.plan.grid))
        part = job.plan.block(block_id).write_box.intersect(inside)
        data = local[part.relative_to(inside).to_slices()]
        out[part.relative_to(box).to_slices()] = to_global(data, int(offsets[block_id]))
    return out


def _ids(a: np.ndarray) -> np.ndarray:
    return np.where(a == BORDER, np.uint64(0), a)


def block_face_pairs(job: LabelJob, block_id: int) -> int:
    """Phase 3 for one block: the id pairs across its upper face on every axis, saved
    to ``pairs/<block_id>.npy``; returns how many.

    One read covers the write box and the first plane past each of its upper faces::

        +-------------+.
        |  write box  |:   <- the plane past the face (the next block's first plane)
        +-------------+:
        :..............:
    """
    folder = Folder(Path(job.folder))
    write = job.plan.block(block_id).write_box
    inner = [write.stop[a] < job.plan.image_shape[a] for a in range(write.ndim)]  # axes with a block above
    grown = Box(write.offset, tuple(n + 1 if up else n for n, up in zip(write.shape, inner)))
    ids = _ids(read_global(job, grown, np.load(folder.offsets, mmap_mode="r")))
    found = [np.zeros((0, 2), dtype=np.uint64)]
    for axis in (a for a in range(write.ndim) if inner[a]):
        lower = tuple(write.shape[a] - 1 if a == axis else slice(0, write.shape[a]) for a in range(write.ndim))
        upper = tuple(write.shape[a] if a == axis else slice(0, write.shape[a]) for a in range(write.ndim))
        found.append(face_pairs(ids[lower], ids[upper]))
    pairs = np.concatenate(found).astype(np.uint64)
    save_npy(folder.pairs(block_id), pairs)
    return len(pairs)


def block_relabel(job: LabelJob, block_id: int) -> int:
    """Phase 4 for one block: merged ids grown into the border, written to the output."""
    folder = Folder(Path(job.folder))
    offsets = np.load(folder.offsets, mmap_mode="r")
    table = np.load(folder.table, mmap_mode="r")
    write = job.plan.block(block_id).write_box
    halo = write.grow(GROW_STEPS).intersect(job.plan.total_box)
    final = relabel_and_grow(read_global(job, halo, offsets), table, halo, write)
    store.write_box(store.open_output(job.output_path), write, final, channel_axis=False)
    return block_id


# ---- phase 3 on the driver: the streaming merge ---------------------------------------


def find(parent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Roots of *ids* in the union-find *parent*; the ids are pointed at them (path compression)."""
    roots = parent[ids]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    parent[ids] = roots
    return roots


def union(parent: np.ndarray, pairs: np.ndarray) -> None:
    """Join the components of every pair (n, 2) in *parent*, each to its smallest root.

    The components of the batch's roots are found at once (a sparse graph of the
    distinct roots only), so a batch costs one pass however its pairs chain.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = find(parent, pairs[:, 0]), find(parent, pairs[:, 1])
    apart = a != b
    if not apart.any():
        return
    roots, index = np.unique(np.concatenate([a[apart], b[apart]]), return_inverse=True)
    k = int(apart.sum())
    graph = coo_matrix((np.ones(k, dtype=np.int8), (index[:k], index[k:])), shape=(len(roots), len(roots)))
    _, comp = connected_components(graph, directed=False)
    low = np.full(int(comp.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(low, comp, roots)
    parent[roots] = low[comp]


def batches(arrays: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Concatenate a stream of (n, 2) arrays into batches of about *size* rows."""
    held: list[np.ndarray] = []
    rows = 0
    for a in arrays:
        if len(a):
            held.append(a)
            rows += len(a)
        if rows >= size:
            yield np.concatenate(held).astype(np.int64)
            held, rows = [], 0
    if held:
        yield np.concatenate(held).astype(np.int64)


def stream_merge(total: int, pair_arrays: Iterable[np.ndarray], *, batch: int = MERGE_BATCH) -> np.ndarray:
    """Map global ids 0..total to consecutive merged ids, reading the pairs batch by batch.

    Equals :func:`unetflow.label.merge_table` on all the pairs at once (components
    numbered by their smallest id, 0 stays 0) in memory of one int64 per id and one batch.

    >>> stream_merge(6, iter([np.array([[1, 3]]), np.array([[3, 5], [2, 6]])]), batch=1).tolist()
    [0, 1, 2, 1, 3, 1, 2]
    """
    parent = np.arange(total + 1, dtype=np.int64)
    for chunk in batches(pair_arrays, batch):
        union(parent, chunk)
    while True:  # point every id at its root (the smallest id of its component)
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    is_root = parent == np.arange(total + 1, dtype=np.int64)
    rank = np.cumsum(is_root, dtype=np.int64) - 1
    return rank[parent].astype(np.uint64)


def read_pairs(folder: Folder, n_blocks: int) -> Iterator[np.ndarray]:
    for block_id in range(n_blocks):
        yield np.load(folder.pairs(block_id))


def merge(folder: Folder, n_blocks: int, total: int) -> int:
    """Phase 3 on the driver: table.npy from the pair files; returns the number of objects."""
    table = stream_merge(total, read_pairs(folder, n_blocks))
    save_npy(folder.table, table)
    return int(table.max())


# ---- the phases in order ------------------------------------------------------------------


def run_phase(dispatch: Any, fn: Callable[[Any, int], Any], job: LabelJob, todo: Sequence[int]) -> None:
    """Run *fn* over the blocks *todo*; a failed block stops the run (``--resume`` redoes it)."""
    if todo:
        schedule.raise_failures(dispatch(fn, job, list(todo), on_result=lambda _: None), len(todo))


@dataclass
class Summary:
    """What the labelling of one output did (for the log and tests)."""

    local_components: int = 0
    objects: int = 0
    blocks_done: dict[str, int] = field(default_factory=dict)  # per phase: blocks computed by this run
    seconds: dict[str, float] = field(default_factory=dict)  # per phase


def label(plan: Plan, *, run_dir: resume.RunDir, scratch: str, output: str, dispatch: Any, token: str) -> Summary:
    """Phases 2-4 after every GPU block is done: number, pair and merge, relabel and grow.

    Each phase first reads what an earlier (killed) run left, and does only the rest.

    Raises
    ------
    OutputWriteError
        The scratch array is gone while phases still need it.
    BlockFailedError
        A block of phase 3 or 4 failed (the others finished; ``--resume`` redoes it).
    """
    folder = Folder.of(run_dir)
    summary = Summary()
    if folder.finished.exists():
        _clean_up(folder, scratch)
        return summary
    if not os.path.isdir(scratch):
        raise OutputWriteError(
            f"instances scratch {scratch} is missing, but labelling {run_dir.output} is not finished; "
            "pass --overwrite to segment it again"
        )
    n = plan.n_blocks
    job = LabelJob(scratch, output, plan, str(folder.path))
    with _timed(summary, "number"):
        offsets = number(run_dir, n)
    summary.local_components = int(offsets[-1])
    with _timed(summary, "pairs"):
        todo = sorted(set(range(n)) - listed_ids(folder.pairs_dir, ".npy"))
        run_phase(dispatch, block_face_pairs, job, todo)
        summary.blocks_done["pairs"] = len(todo)
    with _timed(summary, "merge"):
        objects = merge(folder, n, summary.local_components) if not folder.table.exists() else None
    with _timed(summary, "relabel"):
        todo = sorted(set(range(n)) - listed_ids(folder.relabel_dir, ".json"))
        run_phase(dispatch, resume.MarkDone(block_relabel, str(folder.relabel_dir), token), job, todo)
        summary.blocks_done["relabel"] = len(todo)
    summary.objects = objects if objects is not None else int(np.load(folder.table, mmap_mode="r").max())
    resume.write_json(folder.finished, {"local_components": summary.local_components, "objects": summary.objects})
    _clean_up(folder, scratch)
    log.info("instances: %d local components merged into %d objects (seconds %s)", summary.local_components, summary.objects,
             summary.seconds)
    return summary


@contextlib.contextmanager
def _timed(summary: Summary, phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    summary.seconds[phase] = round(time.perf_counter() - t0, 4)


def _clean_up(folder: Folder, scratch: str) -> None:
    """After the last phase: the scratch array, the pair files and the table go."""
    store.remove(scratch)
    shutil.rmtree(folder.pairs_dir, ignore_errors=True)
    folder.table.unlink(missing_ok=True)
