"""The GPU benchmark of bench/gpu_check.sh (issue 14): one table, one run.

    python bench/gpu.py                  # on a CUDA machine: >= 4 GB volume, width-32 depth-4 U-Net, bf16
    python bench/gpu.py --smoke          # tiny sizes, any device (checks the code paths, measures nothing)

Rows:

``forward floor``     forward passes only (bf16, channels-last, the batch unetflow picks)
                      over exactly the patches of the run's global grid, input resident
                      on the GPU, timed by CUDA events: Mvox/s of image and TFLOP/s.
``unetflow``          ``unetflow segment`` (``--gpus 1``: one pinned worker process) of a
                      uint16 volume generated here, uint8 probabilities out: Mvox/s, ratio
                      to the floor, GPU busy (forward passes by CUDA events over block
                      time), peak GPU memory, the verdict.
``pipeline ceiling``  the near-free model (x, 1 - x) through ``segment`` against the I/O
                      floor (bench/ceiling.py), uint8 output.
``bf16 guard``        the probe of :meth:`Predictor.check_amp` on the U-Net.

Targets (issue 14): unetflow >= 150 Mvox/s, >= 0.85 of the floor, GPU busy >= 90 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_volume(path: str, shape: tuple[int, ...], chunk: int, threads: int) -> None:
    """A uint16 volume with smooth structure plus noise, written slab by slab in parallel."""
    import zarr

    if os.path.exists(path):
        return
    arr = zarr.create_array(store=path, shape=shape, chunks=(chunk,) * 3, dtype="uint16", dimension_names=("z", "y", "x"),
                            zarr_format=3)

    def slab(z: int) -> None:
        rng = np.random.default_rng(z)
        n = min(chunk, shape[0] - z)
        coarse = rng.integers(0, 3000, (1, -(-shape[1] // 16), -(-shape[2] // 16))).astype(np.uint16)
        data = np.repeat(np.repeat(coarse, 16, 1), 16, 2)[:, : shape[1], : shape[2]]
        data = np.repeat(data, n, 0) + rng.integers(0, 500, (n, shape[1], shape[2]), dtype=np.uint16)
        arr[z : z + n] = data

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(slab, range(0, shape[0], chunk)))


def make_model(path: str, width: int, depth: int) -> Any:
    from unetflow.config import ModelSpec
    from unetflow.model.checkpoint import save_checkpoint
    from unetflow.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(ModelSpec(dims=3, padding="same", depth=depth, width=width, classes=2))
    save_checkpoint(path, net)
    return net


def conv_flops(net: torch.nn.Module, patch: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of one patch (2 per multiply-add, convolutions only)."""
    total = [0.0]

    def hook(mod: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
        k = math.prod(mod.kernel_size)
        if isinstance(mod, torch.nn.ConvTranspose3d):
            total[0] += 2.0 * inp[0].numel() * mod.out_channels * k / mod.groups
        else:
            total[0] += 2.0 * out.numel() * mod.in_channels * k / mod.groups

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.inference_mode():
        net.cpu()(torch.zeros((1, 1, *patch)))
    for h in hooks:
        h.remove()
    return total[0]


def forward_floor(model: str, shape: tuple[int, ...], patch: int, overlap: float, device: str, batch: int) -> dict[str, Any]:
    from unetflow.model.predictor import CheckpointSource, auto_batch_size, get_predictor
    from unetflow.plan import Plan, make_tiling

    predictor = get_predictor(CheckpointSource(model), device=device, amp=device == "cuda")
    tiling = make_tiling(predictor.info.geometry, (patch,) * 3, blend="gaussian", overlap=overlap)
    plan = Plan(shape, shape, tiling)
    n_patches = math.prod(len(s) for s in plan.starts)
    b = auto_batch_size(predictor, tiling.patch, batch)
    x = torch.randn((b, 1, *tiling.patch), device=predictor.device)
    for _ in range(3):
        predictor.run(x)
    iters = max(3, min(50, n_patches // b))
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            predictor.run(x)
        end.record()
        end.synchronize()
        per_batch = start.elapsed_time(end) / 1000 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            predictor.run(x)
        per_batch = (time.perf_counter() - t0) / iters
    flops = conv_flops(CheckpointSource(model).load(), tiling.patch) * b
    seconds = per_batch * n_patches / b
    return {"batch": b, "patches": n_patches, "seconds": seconds, "voxels": math.prod(shape),
            "mvox_s": math.prod(shape) / seconds / 1e6, "tflops": flops / per_batch / 1e12, "amp": predictor.amp}


def unetflow_run(inp: str, out: str, model: str, patch: int, overlap: float, device: str, batch: int, workers: str) -> dict[str, Any]:
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
    from unetflow.run import segment

    cluster = ClusterSpec(kind="inline") if workers == "inline" else ClusterSpec(kind="local", gpus=1 if device == "cuda" else 0)
    config = RunConfig(
        input=inp, output=out, model=model,
        tiling=TilingSpec(patch_shape=(patch,) * 3, overlap=overlap, batch_size=batch),
        output_settings=OutputSettings(overwrite=True, dtype="uint8", write_threads=max(2, (os.cpu_count() or 2) // 2)),
        cluster=cluster, device=device, amp=device == "cuda",
    )
    t0 = time.perf_counter()
    report = segment(config, progress=False)
    wall = time.perf_counter() - t0
    peak = max((r.peak_device_memory for r in report.results), default=0)
    return {"seconds": report.seconds, "seconds_end_to_end": wall, "voxels": report.voxels, "blocks": report.blocks_done,
            "mvox_s": report.voxels / report.seconds / 1e6, "telemetry": report.telemetry, "peak_gpu_memory_gb": peak / 1e9}


def guard(model: str, patch: int, device: str) -> dict[str, Any] | None:
    from unetflow.model.checkpoint import load_checkpoint
    from unetflow.model.predictor import Predictor

    p = Predictor(load_checkpoint(model).net, device=torch.device(device), amp=True)
    return p.check_amp((patch,) * 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1024,1536,1536", help="Volume Z,Y,X (uint16; the default is 4.8 GB).")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=0, help="0: unetflow's choice (from free GPU memory).")
    ap.add_argument("--workers", default="gpus", choices=["gpus", "inline"], help="--gpus 1 (a worker process) or --workers 0.")
    ap.add_argument("--work", default="/tmp/unetflow-gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="Where the table and JSON go.")
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes on any device: the code paths, no figures.")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.shape, args.patch, args.width, args.depth = "64,96,96", 32, 4, 2
    elif device != "cuda":
        print("FAIL: bench/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False (use --smoke to check the code)")
        return 2
    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "shape": shape,
                            "patch": args.patch, "overlap": args.overlap, "torch": torch.__version__}
    model = str(work / f"unet-w{args.width}-d{args.depth}.pt")
    make_model(model, args.width, args.depth)
    t0 = time.perf_counter()
    inp = str(work / f"raw-{'x'.join(map(str, shape))}.zarr")
    make_volume(inp, shape, 64, os.cpu_count() or 4)
    rows["volume_seconds"] = time.perf_counter() - t0
    print(f"volume {shape} ready in {rows['volume_seconds']:.0f}s", flush=True)
    rows["guard"] = guard(model, args.patch, device) if device == "cuda" else None
    rows["floor"] = forward_floor(model, shape, args.patch, args.overlap, device, args.batch_size)
    print(f"floor: {rows['floor']['mvox_s']:.1f} Mvox/s, {rows['floor']['tflops']:.1f} TFLOP/s", flush=True)
    rows["unetflow"] = unetflow_run(inp, str(work / "pred.zarr"), model, args.patch, args.overlap, device, args.batch_size, args.workers)
    print(f"unetflow: {rows['unetflow']['mvox_s']:.1f} Mvox/s; {rows['unetflow']['telemetry']['verdict']}", flush=True)
    from bench.ceiling import measure

    ceiling_shape = (64, 96, 96) if args.smoke else (256, 512, 512)
    rows["ceiling_shape"] = ceiling_shape
    rows["ceiling"] = measure(work, ceiling_shape, ["uint8"], device=device, repeat=1, floor_threads=[2, 8])
    table = format_table(rows)
    print(table)
    (out_dir / "gpu-table.md").write_text(table + "\n")
    (out_dir / "gpu-results.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


def format_table(rows: dict[str, Any]) -> str:
    f, u = rows["floor"], rows["unetflow"]
    t = u["telemetry"]
    c = rows["ceiling"]["uint8"]
    cf = min(c["floor"], key=lambda r: r["seconds"])
    cc = min(c["ceiling"], key=lambda r: r["seconds"])
    g = rows["guard"]
    gv = "n/a (no GPU)" if g is None else (f"bf16 kept (mean |diff| {g['mean_abs_diff']:.2g}, argmax flips {g['argmax_flips']:.2%})" if g["kept"]
                                         else f"fell back to float32 (mean |diff| {g['mean_abs_diff']:.2g}, flips {g['argmax_flips']:.2%})")
    lines = [
        f"device: {rows['device']}; torch {rows['torch']}; volume {rows['shape']} uint16; patch {rows['patch']}^3, overlap {rows['overlap']}",
        "",
        "| row | Mvox/s | ratio | notes |",
        "|---|---|---|---|",
        f"| forward floor | {f['mvox_s']:.1f} | 1.00 | {f['tflops']:.1f} TFLOP/s achieved, batch {f['batch']}, {f['patches']} patches, amp {f['amp']} |",
        f"| unetflow (block phase) | {u['mvox_s']:.1f} | {u['mvox_s'] / f['mvox_s']:.2f} | GPU busy {t['busy']:.0%}; peak GPU memory "
        f"{u['peak_gpu_memory_gb']:.1f} GB; {u['blocks']} blocks; end to end incl. start {u['voxels'] / u['seconds_end_to_end'] / 1e6:.1f} Mvox/s; "
        f"{t['verdict']} |",
        f"| I/O floor ({'x'.join(map(str, rows['ceiling_shape']))}, uint8 out) | {cf['voxels'] / cf['seconds'] / 1e6:.1f} | 1.00 | read + write the same output, {cf['threads']} threads |",
        f"| pipeline ceiling (near-free model) | {cc['voxels'] / cc['seconds'] / 1e6:.1f} | {cf['seconds'] / cc['seconds']:.2f} | "
        f"{cc['telemetry']['verdict']} |",
        f"| bf16 guard | | | {gv} |",
        "",
        f"targets: unetflow >= 150 Mvox/s: {'met' if u['mvox_s'] >= 150 else 'NOT met'}; >= 0.85 of the floor: "
        f"{'met' if u['mvox_s'] >= 0.85 * f['mvox_s'] else 'NOT met'}; GPU busy >= 90 %: {'met' if t['busy'] >= 0.9 else 'NOT met'}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
