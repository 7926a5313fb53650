"""The merge of ``--output instances`` on a plan of many blocks (issue 16): driver memory and time.

    python bench/instances_merge.py                        # 2-D 1136 x 1136, 8 x 8 blocks: 20,164 blocks
    python bench/instances_merge.py --shape 568,568        # a quarter of that (5,041 blocks)
    python bench/instances_merge.py --stress 20000,200,1000   # the merge alone, 20 M synthetic pairs

The class map of a synthetic nuclei image (:func:`unetflow.sample.make_sample`, radius 6,
so most objects straddle block seams), in this process:

1. phase 1: by default each block's local components as the blocks compute them
   (:func:`unetflow.label.local_components` into the scratch array, a done marker with the
   count); with ``--run`` a real ``unetflow segment --part 1/1`` (inline, the identity
   oracle net :class:`~unetflow.model.testing.ScaleNetSource` on one-hot probabilities);
2. numbering and the per-block face pairs (:func:`unetflow.instances.number`,
   :func:`unetflow.instances.block_face_pairs` on every block), timed;
3. the merge alone, each way in a child process of its own (``python bench/instances_merge.py
   _one METHOD JSON``), so its memory is its own: ``stream`` (what the run does:
   :func:`unetflow.instances.merge`, the pair files streamed into a union-find) and
   ``in-memory`` (what unetflow did before issue 16: every pair concatenated, then
   :func:`unetflow.label.merge_table`). Each child reports its wall time, its peak
   resident memory above what it held before the merge (``ru_maxrss`` minus ``VmRSS``
   just before), and, in a second child, the peak of numpy's allocations (``tracemalloc``);
4. with ``--run``, ``--resume``: the merge again, relabel and grow, timed; its output is
   checked against the whole-image rule up to renumbering.

The two merges must give the same table, with as many objects as the whole-image rule
finds; the script stops if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.child import child_env, main_or_child, run_child  # noqa: E402


def memory(field: str) -> int:
    """This process's ``VmRSS`` (resident now) or ``VmHWM`` (its peak) in bytes, from
    /proc/self/status: ``ru_maxrss`` would not do, Linux carries it over from the parent
    across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def one(method: str, spec: str) -> dict[str, Any]:
    """One merge in this (child) process: ``stream`` or ``in-memory``, timed or traced."""
    import numpy as np
    import scipy.sparse.csgraph  # noqa: F401 - both merges use it: imported before the baseline

    from unetflow import instances, label

    s = json.loads(spec)
    folder, n_blocks, total = instances.Folder(Path(s["folder"])), s["n_blocks"], s["total"]
    before = memory("VmRSS")
    if s["trace"]:
        tracemalloc.start()
    t0 = time.perf_counter()
    if method == "stream":
        table = instances.stream_merge(total, instances.read_pairs(folder, n_blocks))
    else:
        pairs = np.concatenate(list(instances.read_pairs(folder, n_blocks))).astype(np.int64)
        table = label.merge_table(total, pairs)
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] if s["trace"] else None
    peak = memory("VmHWM")
    np.save(s["table_out"], table)
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak, "peak_above_before": peak - before, "traced_peak": traced}


def classes_of(shape: tuple[int, ...]) -> Any:
    """The class map (background / interior / border) of a synthetic nuclei image, radius 6."""
    from unetflow.sample import make_sample
    from unetflow.train.targets import instance_to_classes

    return instance_to_classes(make_sample(shape, seed=1, radius=6)[1])


def run_blocks(work: Path, classes: Any, block: tuple[int, ...]) -> tuple[Any, Path]:
    """Phase 1 as ``unetflow segment --part 1/1`` does it (``--run``): the oracle net on
    one-hot probabilities; returns the plan and the output."""
    import numpy as np
    import zarr

    from unetflow.resolve import resolve
    from unetflow.run import segment

    probs = np.stack([(classes == i).astype(np.float32) for i in range(3)])
    zarr.create_array(store=str(work / "in.zarr"), data=probs, chunks=(3, 256, 256), overwrite=True)
    config, src = _config(work, block, part=(1, 1)), _source(classes.ndim)
    segment(config, source=src, progress=False)
    return resolve(_config(work, block, resume=True), source=src).plan, work / "inst.zarr"


def synthetic_blocks(work: Path, classes: Any, block: tuple[int, ...]) -> tuple[Any, Path]:
    """Phase 1 without the net (the default: 20,000 blocks through the engine take most
    of an hour on a loaded 2-core machine): each block's class map through
    :func:`unetflow.label.local_components`, the function the blocks call, into the
    scratch array, and a done marker with its count, as the blocks leave them."""
    import numpy as np

    from unetflow import resume, store
    from unetflow.label import local_components
    from unetflow.model.testing import FixedGeometry
    from unetflow.plan import Plan, make_tiling
    from unetflow.output import scratch_path

    out = work / "inst.zarr"
    plan = Plan(classes.shape, block, make_tiling(FixedGeometry("same"), block, overlap=0.0))
    scratch = np.zeros(classes.shape, dtype=np.uint64)
    run_dir = resume.RunDir(str(out))
    for block_id in range(plan.n_blocks):
        box = plan.block(block_id).write_box.to_slices()
        scratch[box], n = local_components(classes[box])
        resume.write_json(run_dir.done_dir / f"{block_id}.json", {"block_id": block_id, "objects": n})
    array = store.create_output(scratch_path(str(out)), shape=classes.shape, chunks=block, dtype="uint64", kinds=("scratch",))
    array[...] = scratch
    return plan, out


def stress(args: Any) -> None:
    """``--stress N,K,P``: the merge alone on N synthetic pair files, K components per
    block, P random pairs from each block's ids to the next block's (so components chain
    across the whole plan), far more pairs than one batch: what bounds the driver then."""
    import numpy as np

    from unetflow import instances

    n_blocks, k, per_block = (int(v) for v in args.stress.split(","))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    folder = instances.Folder(work / "instances")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for b in range(n_blocks):
        low = rng.integers(1, k + 1, per_block) + b * k
        high = rng.integers(1, k + 1, per_block) + min(b + 1, n_blocks - 1) * k
        instances.save_npy(folder.pairs(b), np.unique(np.stack([low, high], axis=1).astype(np.uint64), axis=0))
    written = time.perf_counter() - t0
    total = n_blocks * k
    merges = _merges(folder, n_blocks, total, work)
    n_pairs = sum(len(p) for p in instances.read_pairs(folder, n_blocks))
    rows = {"stress": [n_blocks, k, per_block], "blocks": n_blocks, "local_components": total, "face_pairs": n_pairs,
            "objects": int(np.load(work / "table-stream.npy").max()), "seconds": {"pair files written": written},
            "merge": {f"{m}{' (traced)' if t else ''}": r for (m, t), r in merges.items()}}
    print(json.dumps(rows, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    _print_table(rows)


def _merges(folder: Any, n_blocks: int, total: int, work: Path) -> dict[tuple[str, bool], Any]:
    """Both merges, timed and traced, each in a child process; their tables must agree."""
    import numpy as np

    merges = {}
    for method in ("stream", "in-memory"):
        for trace in (False, True):
            spec = json.dumps({"folder": str(folder.path), "n_blocks": n_blocks, "total": total, "trace": trace,
                               "table_out": str(work / f"table-{method}.npy")})
            merges[(method, trace)] = run_child(__file__, method, spec, env=child_env())
    if not np.array_equal(np.load(work / "table-stream.npy"), np.load(work / "table-in-memory.npy")):
        raise SystemExit("the streamed and the in-memory merge tables differ")
    return merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1136,1136")
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--run", action="store_true", help="phase 1 and 4 by unetflow segment (slow for many blocks)")
    parser.add_argument("--work", default="/tmp/unetflow-bench-instances")
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--stress", default=None, help="N,K,P: the merge alone on synthetic pair files (see stress)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.stress:
        return stress(args)
    import numpy as np

    from unetflow import instances, resume, schedule
    from unetflow.config import ClusterSpec
    from unetflow.label import label_whole
    from unetflow.output import scratch_path

    shape = tuple(int(v) for v in args.shape.split(","))
    block = (args.block,) * len(shape)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    classes = classes_of(shape)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plan, out = (run_blocks if args.run else synthetic_blocks)(work, classes, block)
    timings["blocks (phase 1)" + ("" if args.run else ", synthetic")] = time.perf_counter() - t0
    n_blocks = plan.n_blocks
    run_dir = resume.RunDir(str(out))
    folder = instances.Folder.of(run_dir)
    t0 = time.perf_counter()
    offsets = instances.number(run_dir, n_blocks)
    timings["number (phase 2)"] = time.perf_counter() - t0
    job = instances.LabelJob(scratch_path(str(out)), str(out.resolve()), plan, str(folder.path))
    t0 = time.perf_counter()
    instances.run_phase(schedule.Dispatcher(ClusterSpec(kind="inline")), instances.block_face_pairs, job, list(range(n_blocks)))
    timings["face pairs (phase 3, per block)"] = time.perf_counter() - t0
    total = int(offsets[-1])
    n_pairs = sum(len(p) for p in instances.read_pairs(folder, n_blocks))
    merges = _merges(folder, n_blocks, total, work)
    table = np.load(work / "table-stream.npy")
    expected = label_whole(classes)
    if int(table.max()) != int(expected.max()):
        raise SystemExit(f"the merge found {int(table.max())} objects, the whole-image rule {int(expected.max())}")
    if args.run:
        t0 = time.perf_counter()
        from unetflow.run import segment

        segment(_config(work, block, resume=True), source=_source(len(shape)), progress=False)
        timings["--resume: merge, relabel (phase 4)"] = time.perf_counter() - t0
        _check_same(_read(out), expected)
    import pickle

    # what one relabel task ships: now the job (paths and the plan); before issue 16 the
    # job also held the offsets and the whole merge table (label.LabelJob of unetflow 0.1)
    task = {"now": len(pickle.dumps(job)), "before": len(pickle.dumps((job, offsets, table)))}
    rows = {"shape": list(shape), "block": list(block), "blocks": n_blocks, "local_components": total, "objects": int(table.max()),
            "face_pairs": n_pairs, "relabel_task_bytes": task, "seconds": timings, "merge": {f"{m}{' (traced)' if t else ''}": r for (m, t), r in merges.items()}}
    text = json.dumps(rows, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    _print_table(rows)


def _config(work: Path, block: tuple[int, ...], **kw: Any) -> Any:
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec

    return RunConfig(input=str(work / "in.zarr"), output=str(work / "inst.zarr"), model="(oracle)",
                     tiling=TilingSpec(block_shape=block, patch_shape=block),
                     output_settings=OutputSettings(kind="instances", chunk_shape=block), cluster=ClusterSpec(kind="inline"), **kw)


def _source(dims: int) -> Any:
    from unetflow.model.testing import ScaleNetSource

    return ScaleNetSource(dims=dims, channels=3)


def _read(path: Path) -> Any:
    import zarr

    return zarr.open_array(str(path))[:]


def _check_same(got: Any, expected: Any) -> None:
    """The run's labels equal the whole-image rule's up to renumbering, or the script stops."""
    import numpy as np

    if ((got == 0) != (expected == 0)).any():
        raise SystemExit("instances differ from the whole-image labelling (foreground)")
    pairs = np.unique(np.stack([got.ravel(), expected.ravel()]), axis=1)
    if not len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]:
        raise SystemExit("instances differ from the whole-image labelling (ids)")


def _print_table(rows: dict[str, Any]) -> None:
    mib = 2**20
    print(f"\n{rows['blocks']} blocks, {rows['local_components']} local components, {rows['objects']} objects, "
          f"{rows['face_pairs']} face pairs")
    print("| merge | seconds | peak RSS above start (MiB) | traced peak (MiB) |")
    print("|---|---|---|---|")
    for method in ("stream", "in-memory"):
        plain, traced = rows["merge"][method], rows["merge"][f"{method} (traced)"]
        print(f"| {method} | {plain['seconds']:.3f} | {plain['peak_above_before'] / mib:.1f} | {traced['traced_peak'] / mib:.2f} |")
    task = rows.get("relabel_task_bytes")
    if task:
        print(f"\none relabel task pickles to {task['now']} bytes (before issue 16, with offsets and table: {task['before']})")
    print("| phase | seconds |\n|---|---|")
    for name, sec in rows["seconds"].items():
        print(f"| {name} | {sec:.1f} |")


if __name__ == "__main__":
    main_or_child(main, one)
