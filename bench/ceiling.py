"""The pipeline ceiling against the I/O floor (issue 14): how close a run with a model
that costs nothing comes to the speed of its own reads and writes.

    python bench/ceiling.py                      # CPU: 256x512x512 uint16, uint8 and float32 outputs
    python bench/ceiling.py --device cuda        # the same on a GPU (bench/gpu_check.sh runs it)

Rows, per output dtype, measured in one run:

``I/O floor``         read the input (row slabs of 64 planes) and write the same output
                      (the near-free model's values, computed beforehand, untimed) with
                      the same chunks and codecs, from 1 or 2 threads: best of ``--repeat``.
``pipeline ceiling``  ``unetflow.run.segment`` with :class:`~unetflow.model.testing.NearFreeNet`
                      (two channels ``x`` and ``1 - x``), 64^3 patches, overlap 0.25,
                      gaussian blending, one block, in this process (``--workers 0``):
                      best of ``--repeat``, timed over the block phase and end to end.

Every measurement runs in a child process (``python bench/ceiling.py _one ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import child  # noqa: E402
from bench.run import make_input, versions  # noqa: E402
from bench.sections import machine, replace_section  # noqa: E402

PATCH = 64
OVERLAP = 0.25
CHUNK = 64


def expected_output(input_path: str, dtype: str) -> Any:
    """What the near-free model's run writes, computed in memory with unetflow's own
    statistics and conversion (not timed): (2, *shape) in *dtype*."""
    import numpy as np

    from unetflow import formats, store
    from unetflow.job import OutputSpec
    from unetflow.values import convert_output, norm_stats
    from unetflow.model.testing import NearFreeNet

    array = formats.open_input(input_path)
    layout = store.layout_for(array, 3, name=input_path)
    norm = NearFreeNet().norm
    (lo, hi), = norm_stats(store.sample_voxels(array, layout=layout), norm)
    x = (array[:].astype(np.float32) - lo) / max(hi - lo, 1e-6)
    values = np.stack([x, 1.0 - x])
    data, _ = convert_output(values, OutputSpec("probabilities", dtype))
    return data


def io_floor(input_path: str, output_path: str, dtype: str, threads: int) -> dict[str, Any]:
    """Read every input slab and write the same output bytes, *threads* slabs at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    from unetflow import store

    data = expected_output(input_path, dtype)
    array = zarr.open_array(input_path, mode="r")
    shape = array.shape
    store.remove(output_path)
    out = store.create_output(output_path, shape=data.shape, chunks=(2, CHUNK, CHUNK, CHUNK), dtype=dtype,
                              dimension_names=("c", "z", "y", "x"), overwrite=True)

    def one(z: int) -> None:
        array[z : z + CHUNK]
        out[:, z : z + CHUNK] = data[:, z : z + CHUNK]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, shape[0], CHUNK)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "voxels": int(data[0].size), "threads": threads}


def ceiling(input_path: str, output_path: str, dtype: str, device: str, amp: bool, tuning: bool = False) -> dict[str, Any]:
    """``unetflow segment`` with the near-free model, one block, in this process
    (*tuning*: with ``--tuning``, i.e. unetflow's allocator settings for this process)."""
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.model.testing import NearFreeSource
    from unetflow.run import segment

    config = RunConfig(
        input=input_path, output=output_path, model="near-free",
        tiling=TilingSpec(patch_shape=(PATCH,) * 3, overlap=OVERLAP),
        output_settings=OutputSettings(overwrite=True, dtype=dtype),
        cluster=ClusterSpec(kind="inline"), device=device, amp=amp, tuning=tuning,
    )
    t0 = time.perf_counter()
    report = segment(config, source=NearFreeSource(), progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": report.seconds, "seconds_end_to_end": seconds, "voxels": report.voxels, "blocks": report.blocks_done,
            "telemetry": report.telemetry}


def run_child(kind: str, **kwargs: Any) -> dict[str, Any]:
    return child.run_child(__file__, kind, json.dumps(kwargs))


def measure(work: Path, shape: tuple[int, ...], dtypes: list[str], *, device: str, repeat: int,
            floor_threads: list[int]) -> dict[str, Any]:
    """Floor and ceiling for every dtype, interleaved round by round (drifting load hits both)."""
    inp = str(work / f"raw-{'x'.join(map(str, shape))}.zarr")
    make_input(inp, shape, CHUNK)
    out: dict[str, Any] = {d: {"floor": [], "ceiling": [], "ceiling_tuned": []} for d in dtypes}
    for round_ in range(repeat):
        for d in dtypes:
            for t in floor_threads:
                r = run_child("floor", input_path=inp, output_path=str(work / f"floor-{d}.zarr"), dtype=d, threads=t)
                out[d]["floor"].append(r)
                print(f"  round {round_ + 1} {d:8s} I/O floor, {t} thread(s): {r['voxels'] / r['seconds'] / 1e6:7.1f} Mvox/s", flush=True)
            for tuned in (False, True):
                r = run_child("ceiling", input_path=inp, output_path=str(work / f"ceiling-{d}.zarr"), dtype=d, device=device,
                              amp=device == "cuda", tuning=tuned)
                out[d]["ceiling_tuned" if tuned else "ceiling"].append(r)
                print(f"  round {round_ + 1} {d:8s} pipeline ceiling{', tuned' if tuned else ''}: {r['voxels'] / r['seconds'] / 1e6:7.1f} Mvox/s  "
                      f"({r['telemetry']['verdict']})", flush=True)
    return out


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: r["seconds"])


def table(results: dict[str, Any]) -> list[str]:
    lines = ["| output | row | Mvox/s (best) | all runs, Mvox/s | ratio to I/O floor | notes |", "|---|---|---|---|---|---|"]
    for dtype, r in results.items():
        f = best(r["floor"])
        floor_v = f["voxels"] / f["seconds"]
        all_f = ", ".join(f"{x['voxels'] / x['seconds'] / 1e6:.1f} ({x['threads']}t)" for x in r["floor"])
        lines.append(f"| {dtype} | I/O floor | {floor_v / 1e6:.1f} | {all_f} | 1.00 | read input + write the same output, {f['threads']} thread(s) |")
        for key, name in (("ceiling", "pipeline ceiling"), ("ceiling_tuned", "pipeline ceiling, `--tuning`")):
            if not r.get(key):
                continue
            c = best(r[key])
            ceil_v = c["voxels"] / c["seconds"]
            all_c = ", ".join(f"{x['voxels'] / x['seconds'] / 1e6:.1f}" for x in r[key])
            t = c["telemetry"]
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in t["seconds"].items() if k != "wall")
            lines.append(
                f"| {dtype} | {name} | {ceil_v / 1e6:.1f} | {all_c} | {ceil_v / floor_v:.2f} | "
                f"block phase; end to end {c['voxels'] / c['seconds_end_to_end'] / 1e6:.1f} Mvox/s; {stages}; verdict: {t['verdict']} |"
            )
    return lines


def tuning_lines(results: dict[str, Any]) -> list[str]:
    """What ``--tuning`` bought in this run, per output dtype (best runs, Mvox/s)."""
    parts = []
    for dtype, r in results.items():
        if r.get("ceiling") and r.get("ceiling_tuned"):
            a, b = (best(r[k]) for k in ("ceiling", "ceiling_tuned"))
            va, vb = a["voxels"] / a["seconds"] / 1e6, b["voxels"] / b["seconds"] / 1e6
            parts.append(f"{dtype} {va:.1f} -> {vb:.1f} Mvox/s ({vb / va:.2f}x)")
    return [f"- what `--tuning` bought here (docs/performance.md): {'; '.join(parts)}"] if parts else []


def write_report(path: Path, results: dict[str, Any], *, device: str, command: str, shape: tuple[int, ...]) -> None:
    section = f"## Pipeline ceiling ({'GPU' if device == 'cuda' else 'CPU'}):"
    lines = [
        f"{section} {time.strftime('%Y-%m-%d')}",
        "",
        f"- machine: {machine(device == 'cuda')}",
        f"- command: `{command}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- input: Zarr v3 uint16 {shape}, chunks 64^3; near-free model (x, 1 - x), patch 64^3, overlap 0.25, gaussian; "
        "output 2 channels, chunks 2x64^3, zstd 3; one block, `--workers 0`",
        "- method: `bench/ceiling.py` (its docstring); each row is the best of its runs, all runs listed",
        "",
        *table(results),
        "",
        *tuning_lines(results),
        "- not measured: other machine classes, other chunk and patch shapes, `--workers` > 0 (the ceiling is one block in the driver)",
    ]
    replace_section(path, section, lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", default="256,512,512", help="Input shape Z,Y,X (uint16).")
    ap.add_argument("--dtypes", default="uint8,float32", help="Output dtypes to measure.")
    ap.add_argument("--repeat", type=int, default=3, help="Rounds; each row keeps its best run.")
    ap.add_argument("--floor-threads", default="1,2", help="Thread counts tried for the I/O floor (its best counts).")
    ap.add_argument("--work", default="/tmp/unetflow-bench/ceiling", help="Scratch folder.")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="The Markdown file whose section this run rewrites (\"\" for none).")
    ap.add_argument("--json", default=None, help="Write all runs as JSON here.")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = measure(work, shape, args.dtypes.split(","), device=args.device, repeat=args.repeat,
                      floor_threads=[int(t) for t in args.floor_threads.split(",")])
    print("\n".join(table(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        command = "python bench/ceiling.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        write_report(Path(args.out), results, device=args.device, command=command, shape=shape)
        print(f"wrote {args.out}")


def _one(kind: str, spec: str) -> dict[str, Any]:
    kwargs = json.loads(spec)
    return io_floor(**kwargs) if kind == "floor" else ceiling(**kwargs)


if __name__ == "__main__":
    child.main_or_child(main, _one)
