"""The merge of ``--output instances`` on a plan of many blocks (issue 16): driver memory and time.

    python bench/instances_merge.py                        # 2-D 1136 x 1136, 8 x 8 blocks: 20,164 blocks
    python bench/instances_merge.py --shape 568,568        # a quarter of that (5,041 blocks)

A real run, in this process, inline, with the identity oracle net
(:class:`~unetflow.model.testing.ScaleNetSource`, 3 channels) on one-hot class
probabilities of a synthetic nuclei image (:func:`unetflow.sample.make_sample`, radius 6,
so most objects straddle block seams):

1. the GPU-block phase (``--part 1/1``: the blocks only), timed;
2. numbering and the per-block face pairs (:func:`unetflow.instances.number`,
   :func:`unetflow.instances.block_face_pairs` on every block), timed;
3. the merge alone, each way in a child process of its own (``python bench/instances_merge.py
   _one METHOD JSON``), so its memory is its own: ``stream`` (what the run does:
   :func:`unetflow.instances.merge`, the pair files streamed into a union-find) and
   ``in-memory`` (what unetflow did before issue 16: every pair concatenated, then
   :func:`unetflow.label.merge_table`). Each child reports its wall time, its peak
   resident memory above what it held before the merge (``ru_maxrss`` minus ``VmRSS``
   just before), and, in a second child, the peak of numpy's allocations (``tracemalloc``);
4. ``--resume``: relabel and grow, timed; its output is checked against the whole-image rule.

The two merges must give the same table; the script stops if not.
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


def write_input(path: Path, shape: tuple[int, ...]) -> Any:
    import numpy as np
    import zarr

    from unetflow.label import label_whole
    from unetflow.sample import make_sample
    from unetflow.train.targets import instance_to_classes

    _, truth = make_sample(shape, seed=1, radius=6)
    classes = instance_to_classes(truth)
    probs = np.stack([(classes == i).astype(np.float32) for i in range(3)])
    zarr.create_array(store=str(path), data=probs, chunks=(3, 256, 256), overwrite=True)
    return label_whole(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1136,1136")
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--work", default="/tmp/unetflow-bench-instances")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    import zarr

    from unetflow import instances, resume, schedule
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.model.testing import ScaleNetSource
    from unetflow.run import scratch_path, segment

    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    expected = write_input(work / "in.zarr", shape)
    out = work / "inst.zarr"
    block = (args.block,) * len(shape)

    def cfg(**kw: Any) -> RunConfig:
        return RunConfig(input=str(work / "in.zarr"), output=str(out), model="(oracle)",
                         tiling=TilingSpec(block_shape=block, patch_shape=block),
                         output_settings=OutputSettings(kind="instances", chunk_shape=block), cluster=ClusterSpec(kind="inline"), **kw)

    src = ScaleNetSource(dims=len(shape), channels=3)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = segment(cfg(part=(1, 1)), source=src, progress=False)
    timings["blocks"] = time.perf_counter() - t0
    plan = _plan(cfg(resume=True))
    n_blocks = plan.n_blocks
    assert report.blocks_done == n_blocks
    run_dir = resume.RunDir(str(out))
    folder = instances.Folder.of(run_dir)
    t0 = time.perf_counter()
    offsets = instances.number(run_dir, n_blocks)
    timings["number"] = time.perf_counter() - t0
    job = instances.LabelJob(scratch_path(str(out)), str(out.resolve()), plan, str(folder.path))
    t0 = time.perf_counter()
    instances.run_phase(schedule.Dispatcher(ClusterSpec(kind="inline")), instances.block_face_pairs, job, list(range(n_blocks)))
    timings["pairs"] = time.perf_counter() - t0
    total = int(offsets[-1])
    n_pairs = sum(len(p) for p in instances.read_pairs(folder, n_blocks))
    merges = {}
    for method in ("stream", "in-memory"):
        for trace in (False, True):
            spec = json.dumps({"folder": str(folder.path), "n_blocks": n_blocks, "total": total, "trace": trace,
                               "table_out": str(work / f"table-{method}.npy")})
            merges[(method, trace)] = run_child(__file__, method, spec, env=child_env())
    if not np.array_equal(np.load(work / "table-stream.npy"), np.load(work / "table-in-memory.npy")):
        raise SystemExit("the streamed and the in-memory merge tables differ")
    t0 = time.perf_counter()
    segment(cfg(resume=True), source=src, progress=False)
    timings["relabel (the --resume: merge + relabel)"] = time.perf_counter() - t0
    got = zarr.open_array(str(out))[:]
    _check_same(got, expected)
    rows = {"shape": list(shape), "block": list(block), "blocks": n_blocks,
            "local_components": total, "objects": int(got.max()), "face_pairs": n_pairs, "seconds": timings,
            "merge": {f"{m}{' (traced)' if t else ''}": r for (m, t), r in merges.items()}}
    text = json.dumps(rows, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    _print_table(rows)


def _plan(config: Any) -> Any:
    from unetflow.model.testing import ScaleNetSource
    from unetflow.run import prepare

    return prepare(config, source=ScaleNetSource(dims=len(config.tiling.block_shape), channels=3)).plan


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
    print("| phase | seconds |\n|---|---|")
    for name, sec in rows["seconds"].items():
        print(f"| {name} | {sec:.1f} |")


if __name__ == "__main__":
    main_or_child(main, one)
