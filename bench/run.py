"""unetflow benchmark (issue 6): the floor, MONAI, dask map_overlap and unetflow on one
model, one Zarr input and one patch setting; then unetflow at 1x, 4x and 16x the image.

    python bench/run.py            # CPU, about 15 minutes on 2 cores (2 rounds); writes BENCHMARKS.md
    python bench/run.py --gpu      # the device variant: >= 1 GB image, bf16, GPU utilisation

Every method runs in its own child process (``python bench/run.py _one ...``), so peak
RSS is per method; unetflow's workers report their own peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import child  # noqa: E402
from bench.methods import METHODS, Case  # noqa: E402
from bench.sections import machine, replace_section  # noqa: E402


FLOORS = ("floor", "floor_lanes", "floor_lanes_malloc")


def make_input(path: str, shape: tuple[int, ...], chunk: int, seed: int = 0) -> None:
    """A uint16 volume with smooth structure plus noise (compresses like microscopy, roughly)."""
    import numpy as np
    import zarr

    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3000, tuple(-(-n // 16) for n in shape)).astype(np.uint16)
    data = coarse.repeat(16, 0).repeat(16, 1).repeat(16, 2)[: shape[0], : shape[1], : shape[2]]
    data = data + rng.integers(0, 500, shape, dtype=np.uint16)
    zarr.create_array(store=path, data=data, chunks=(chunk,) * 3, dimension_names=("z", "y", "x"), zarr_format=3)


def make_model(path: str, width: int, seed: int = 0) -> None:
    import torch

    from unetflow.config import ModelSpec
    from unetflow.model.checkpoint import save_checkpoint
    from unetflow.model.unet import UNet

    torch.manual_seed(seed)
    save_checkpoint(path, UNet(ModelSpec(dims=3, padding="same", depth=3, width=width, classes=2)))


class GpuSampler:
    """Samples GPU utilisation (nvidia-smi) every half second while a method runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> "GpuSampler":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_one(method: str, case: Case, *, gpu: bool, malloc: bool = False) -> dict[str, Any]:
    """Run *method* in a child process; return its JSON result.

    *malloc*: start the child with the glibc settings unetflow gives its workers
    (``tuning.WORKER_MALLOC_TUNABLES``), so the anchors can be measured with them too.
    """
    from unetflow.tuning import WORKER_MALLOC_TUNABLES

    spec = json.dumps(dataclasses.asdict(case))
    env = child.child_env()
    env.pop("GLIBC_TUNABLES", None)
    if malloc:
        env["GLIBC_TUNABLES"] = WORKER_MALLOC_TUNABLES
    load = os.getloadavg()[0]
    with GpuSampler(gpu) as sampler:
        result = child.run_child(__file__, method, spec, env)
    result["gpu_util"] = sampler.mean
    result["load_before"] = load
    result["malloc"] = malloc
    print(f"  {method:22s} {'(malloc) ' if malloc else ''}{result['seconds']:8.2f}s  peak {result['peak_rss'] / 2**20:7.0f} MB", flush=True)
    return result


def cpu_threads() -> int:
    """The torch threads of one unetflow CPU worker (the floor uses the same)."""
    from unetflow.config import ClusterSpec
    from unetflow.schedule import cpu_threads_per_worker

    return cpu_threads_per_worker(ClusterSpec(workers=1))


def versions() -> dict[str, str]:
    import dask
    import distributed
    import monai
    import numpy
    import torch
    import zarr

    import unetflow

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "python": platform.python_version(), "unetflow": f"{unetflow.__version__} ({commit})", "torch": torch.__version__,
        "monai": monai.__version__, "dask": dask.__version__, "distributed": distributed.__version__,
        "zarr": zarr.__version__, "numpy": numpy.__version__,
    }


def mb(n: float) -> str:
    return f"{n / 2**20:.0f}"


def worker_rss(result: dict[str, Any]) -> str:
    per = result.get("worker_peak_rss")
    if not per:
        return mb(result["peak_rss"])
    return " / ".join(mb(v) for v in per.values()) + f" (driver {mb(result['peak_rss'])})"


def compare_table(results: dict[str, dict[str, Any]], floor_s: float, workers: int) -> list[str]:
    rows = ["| method | seconds | voxels/s | ratio to floor | peak RSS MB (per worker) | notes |", "|---|---|---|---|---|---|"]
    notes = {
        "floor": lambda r: f"{r['patches']} patches of the global grid, batch {r['batch_size']}, {r.get('threads') or 'default'} torch thread(s), data in memory",
        "floor_lanes": lambda r: f"the same, {r['lanes']} patches side by side, 1 torch thread each",
        "floor_lanes_malloc": lambda r: "floor, lanes, started with unetflow's worker malloc settings",
        "map_overlap_malloc": lambda r: "map_overlap, started with unetflow's worker malloc settings" + _util(r),
        "monai": lambda r: "sliding_window_inference, gaussian, Zarr in and out" + _util(r),
        "map_overlap": lambda r: "equal settings: 48^3 chunks + 8 halo = one 64^3 patch per call, no blending, dask threads" + _util(r),
        "map_overlap_z64": lambda r: "the Zarr's 64^3 chunks + 16 halo = 96^3 per call, no blending, dask threads" + _util(r),
        "unetflow_1": lambda r: _uf_note(r),
        "unetflow_1p": lambda r: _uf_note(r),
        "unetflow_inline": lambda r: _uf_note(r),
        f"unetflow_{workers}": lambda r: _uf_note(r),
        "unetflow_1_tuned": lambda r: _uf_note(r),
        f"unetflow_{workers}_tuned": lambda r: _uf_note(r),
    }
    labels = {"floor_lanes": "floor, lanes", "floor_lanes_malloc": "floor, lanes, malloc", "map_overlap_malloc": "map_overlap, malloc", "unetflow_inline": "unetflow, --workers 0 (in process)", "unetflow_1": "unetflow, 1 worker (default: threads of the driver's process)",
              "unetflow_1p": "unetflow, 1 worker process (--processes)", f"unetflow_{workers}": f"unetflow, {workers} worker processes",
              "unetflow_1_tuned": "unetflow, 1 worker, --tuning", f"unetflow_{workers}_tuned": f"unetflow, {workers} worker processes, --tuning"}
    for key, r in results.items():
        rows.append(
            f"| {labels.get(key, key)} | {r['seconds']:.2f} | {r['voxels'] / r['seconds']:.3g} | {r['seconds'] / floor_s:.2f} "
            f"| {worker_rss(r)} | {notes[key](r)}; load avg before {r['load_before']:.1f}{_runs(r)} |"
        )
    return rows


def _runs(r: dict[str, Any]) -> str:
    runs = r.get("all_seconds") or []
    return f"; best of {len(runs)} runs: " + ", ".join(f"{x:.2f}" for x in runs) + " s" if len(runs) > 1 else ""


def _util(r: dict[str, Any]) -> str:
    return f"; GPU util {r['gpu_util']:.0f}%" if r.get("gpu_util") is not None else ""


def _uf_note(r: dict[str, Any]) -> str:
    t = r["telemetry"]
    s = t["seconds"]
    waited = s.get("wait_read", 0) + s.get("wait_model", 0) + s.get("wait_write", 0) + s.get("drain", 0)
    return (
        f"{r['blocks']} block(s), patches computed / global grid {r['block_redundancy']}; blocks {r['seconds_blocks']:.2f}s; "
        f"read {s['read']:.2f}s forward {s['forward']:.2f}s blend {s['blend']:.2f}s write {s['write']:.2f}s waited {waited:.2f}s; "
        f"model busy {t['busy']:.0%}" + _util(r)
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Device variant: CUDA, bf16, a >= 1 GB image.")
    ap.add_argument("--workers", type=int, default=2, help="N for the N-worker unetflow run (CPU).")
    ap.add_argument("--width", type=int, default=8, help="U-Net width (depth 3, same padding, 2 classes).")
    ap.add_argument("--plane", type=int, default=None, help="Y and X size (default 128 CPU, 512 GPU).")
    ap.add_argument("--base-z", type=int, default=None, help="Z size at 1x (default 64 CPU, 256 GPU).")
    ap.add_argument("--compare-scale", type=int, default=16, help="Image scale (x base) of the comparison table; large enough that the cluster's start (seconds) is amortised.")
    ap.add_argument("--scales", default="1,4,16", help="Scales of the growth table (the image grows along Z).")
    ap.add_argument("--repeat", type=int, default=2, help="Rounds over all compared methods; each row keeps its fastest run (all are listed).")
    ap.add_argument("--batch-size", type=int, default=0, help="0: unetflow's choice (1 on CPU).")
    ap.add_argument("--work", default="/tmp/unetflow-bench", help="Scratch folder for inputs and outputs.")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Where to write the tables (Markdown).")
    args = ap.parse_args(argv)
    gpu = args.gpu
    plane = args.plane or (512 if gpu else 128)
    base_z = args.base_z or (256 if gpu else 64)
    device = "cuda" if gpu else "cpu"
    work = Path(args.work) / device
    work.mkdir(parents=True, exist_ok=True)
    model = str(work / f"unet-w{args.width}.pt")
    make_model(model, args.width)
    scales = [int(s) for s in args.scales.split(",")]

    def case(scale: int, name: str, workers: int = 1) -> Case:
        shape = (base_z * scale, plane, plane)
        inp = str(work / f"raw-{scale}x.zarr")
        make_input(inp, shape, 64)
        return Case(inp, str(work / f"out-{name}-{scale}x.zarr"), model, batch_size=args.batch_size, workers=workers,
                    device=device, amp=gpu)

    s = args.compare_scale
    print(f"comparison at {s}x: {(base_z * s, plane, plane)}", flush=True)
    threads = 0 if gpu else cpu_threads()
    jobs: list[tuple[str, str, Case, bool]] = [("floor", "floor", dataclasses.replace(case(s, "floor"), threads=threads), False)]
    if not gpu and threads > 1:  # unetflow's CPU lanes: patches side by side, one torch thread each
        lanes = dataclasses.replace(case(s, "floor"), lanes=threads, batch_size=1)
        jobs += [("floor_lanes", "floor", lanes, False), ("floor_lanes_malloc", "floor", lanes, True)]
    jobs += [(m, m, case(s, m), False) for m in ("monai", "map_overlap", "map_overlap_z64")]
    # the anchors again with the allocator settings unetflow gives its workers
    jobs.append(("map_overlap_malloc", "map_overlap", case(s, "map_overlap"), True))
    if not gpu:
        jobs.append(("unetflow_inline", "unetflow", dataclasses.replace(case(s, "ufi"), inline=True, threads=threads), False))
    jobs.append(("unetflow_1", "unetflow", case(s, "uf1"), False))
    if not gpu:
        jobs.append(("unetflow_1p", "unetflow", dataclasses.replace(case(s, "uf1p"), processes=True), False))
        jobs.append((f"unetflow_{args.workers}", "unetflow", case(s, f"uf{args.workers}", args.workers), False))
    # what --tuning buys (docs/performance.md): the same runs with unetflow.tuning on
    jobs.append(("unetflow_1_tuned", "unetflow", dataclasses.replace(case(s, "uf1t"), tuning=True), False))
    if not gpu:
        jobs.append((f"unetflow_{args.workers}_tuned", "unetflow", dataclasses.replace(case(s, f"uf{args.workers}t", args.workers), tuning=True), False))
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.repeat):  # rounds, so that drifting load hits every method alike
        print(f"round {round_ + 1} of {args.repeat}", flush=True)
        for key, method, c, malloc in jobs:
            runs.setdefault(key, []).append(run_one(method, c, gpu=gpu, malloc=malloc))
    compare = {  # each method's fastest run, with every run's seconds
        key: {**min(rs, key=lambda r: r["seconds"]), "all_seconds": [round(r["seconds"], 2) for r in rs]} for key, rs in runs.items()
    }

    growth = []
    for scale in scales:
        print(f"growth {scale}x: {(base_z * scale, plane, plane)}", flush=True)
        if scale == s:
            f = min((compare[k] for k in FLOORS if k in compare), key=lambda r: r["seconds"])
        else:
            f = run_one("floor", dataclasses.replace(case(scale, "floor"), lanes=threads if threads > 1 else 0, batch_size=1), gpu=gpu, malloc=True)
        u = compare["unetflow_1"] if scale == s else run_one("unetflow", case(scale, "uf1"), gpu=gpu)
        growth.append((scale, (base_z * scale, plane, plane), f, u))

    command = "python bench/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    write_report(Path(args.out), compare, growth, gpu=gpu, command=command, workers=args.workers,
                 shape=(base_z * s, plane, plane), width=args.width)
    print(f"wrote {args.out}")


def tuning_lines(compare: dict[str, Any], workers: int) -> list[str]:
    """What ``--tuning`` bought in this run: the tuned rows against the same runs untuned."""
    pairs = [(k, f"{k}_tuned", label) for k, label in (("unetflow_1", "1 worker (threads)"), (f"unetflow_{workers}", f"{workers} worker processes"))]
    parts = [f"{label} {compare[a]['seconds']:.1f} s -> {compare[b]['seconds']:.1f} s ({compare[a]['seconds'] / compare[b]['seconds']:.2f}x)"
             for a, b, label in pairs if a in compare and b in compare]
    return [f"- what `--tuning` bought here (docs/performance.md): {'; '.join(parts)}"] if parts else []


def write_report(path: Path, compare: dict[str, Any], growth: list[Any], *, gpu: bool, command: str, workers: int,
                 shape: tuple[int, ...], width: int) -> None:
    floor_s = min(compare[k]["seconds"] for k in FLOORS if k in compare)  # the fastest one is the floor
    section = "GPU" if gpu else "CPU"
    lines = [
        f"## {section}: {time.strftime('%Y-%m-%d')}",
        "",
        f"- machine: {machine(gpu)}",
        f"- command: `{command}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- model: `UNet(ModelSpec(dims=3, padding='same', depth=3, width={width}, classes=2))`, untrained, "
        f"{'bf16' if gpu else 'float32'}",
        f"- input: Zarr v3 uint16 {shape}, chunks 64^3; patch 64^3, overlap 0.25, gaussian; outputs float32 "
        "probabilities, Zarr v3, zstd 3",
        "",
        f"### Methods on {shape} ({shape[0] * shape[1] * shape[2] / 1e6:.1f} M voxels)",
        "",
        *compare_table(compare, floor_s, workers),
        "",
        *tuning_lines(compare, workers),
        "- not measured: other machine classes (GPU nodes, many-core workstations, cluster nodes), "
        "other chunk and patch shapes, trained models (the forward pass costs the same)",
        "",
        "### Growth (unetflow, 1 worker, defaults; the image grows along Z)",
        "",
        "| scale | shape | floor s | unetflow s | ratio to floor | unetflow s per M voxels | worker peak RSS MB | vs 1x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_rss = max(growth[0][3]["worker_peak_rss"].values())
    for scale, shp, f, u in growth:
        rss = max(u["worker_peak_rss"].values())
        lines.append(
            f"| {scale}x | {shp} | {f['seconds']:.2f} | {u['seconds']:.2f} | {u['seconds'] / f['seconds']:.2f} "
            f"| {u['seconds'] / (u['voxels'] / 1e6):.3f} | {mb(rss)} | {rss / base_rss:.2f} |"
        )
    replace_section(path, f"## {section}:", lines)  # this device's section; the other device's stays
    (ROOT / "bench" / f"results-{section.lower()}.json").write_text(
        json.dumps({"compare": compare, "growth": [[g[0], g[1], g[2], g[3]] for g in growth]}, indent=1, default=str)
    )


def _one(method: str, spec: str) -> dict[str, Any]:
    return METHODS[method](Case(**json.loads(spec)))


if __name__ == "__main__":
    child.main_or_child(main, _one)
