"""Real data check: unetflow train on a real annotated fluorescence image vs classical pipelines.

The image and its instance annotation are the 2018 Data Science Bowl nuclei image that
the stardist package ships (``stardist/data/images/img2d.tif`` and ``mask2d.tif``,
512 x 512, about 125 touching nuclei). They are taken from the stardist wheel on PyPI
(``pip download --no-deps stardist``), read with tifffile; stardist itself is not
installed or used.

The top rows train, the bottom ``--test-rows`` rows are held out: never seen by any
method while it is trained or tuned, and the only rows scored. Measured in one run on
those rows (object matching at IoU 0.5, AP over IoU 0.5:0.05:0.95, see
``unetflow.evaluate``):

- unetflow: ``unetflow train`` on the top rows (it holds out its own validation part
  inside them), then ``unetflow segment --output instances`` on the held-out rows, once
  per ``--seeds`` seed (every model is scored and listed: one lucky seed proves nothing);
  training is timed in wall seconds and in CPU seconds of the training process
  (``resource.getrusage(RUSAGE_CHILDREN)``), which stay meaningful on a shared machine;
- Otsu + connected components, specks under 20 px dropped;
- Otsu + distance-transform watershed (:mod:`bench.classical`), its parameters chosen
  by a grid search for the best object F1 on the training rows only.

    python bench/real_nuclei.py                # prints JSON and a Markdown table
    python bench/real_nuclei.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import classical  # noqa: E402
from bench.child import child_env  # noqa: E402
from bench.sections import machine, replace_section  # noqa: E402

SECTION = "## Real data: unetflow train vs"  # the heading's start: this section replaces any earlier one
TRAIN_ARGS = ["--dims", "2", "--depth", "3", "--width", "16", "--patch-shape", "96,96", "--batch-size", "4"]


def fetch(cache: str) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "stardist-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, "stardist==0.9.2"], check=True)
        wheels = glob.glob(os.path.join(cache, "stardist-*.whl"))
    with zipfile.ZipFile(wheels[0]) as whl:
        img = tifffile.imread(whl.open("stardist/data/images/img2d.tif"))
        mask = tifffile.imread(whl.open("stardist/data/images/mask2d.tif"))
    return img, mask


def write(path: str, data: np.ndarray) -> None:
    from unetflow import store
    from unetflow.geometry import Box

    arr = store.create_output(path, shape=data.shape, chunks=(128, 128), dtype=str(data.dtype), dimension_names=("y", "x"))
    store.write_box(arr, Box((0, 0), data.shape), data, channel_axis=False)


def unetflow_cli(args: list[str]) -> list[str]:
    """The command line of ``unetflow ARGS`` in this python, with this checkout's unetflow first."""
    return [sys.executable, "-c", "from unetflow.cli import main; main()", *args]


def train_unetflow(out: str, model: str, train_args: list[str]) -> dict[str, Any]:
    """``unetflow train`` on the training rows: wall and CPU seconds of the training process."""
    args = ["train", f"{out}/train_raw.zarr", f"{out}/train_labels.zarr", model, *train_args, "--no-progress", "--overwrite"]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(unetflow_cli(args), check=True, env=child_env())
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "unetflow " + " ".join(args), "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def segment_unetflow(out: str, model: str, pred: str, segment_args: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    from unetflow import formats

    args = ["segment", f"{out}/test_raw.zarr", pred, "--model", model, "--output", "instances",
            "--workers", "0", "--no-progress", "--overwrite", *segment_args]
    t0 = time.perf_counter()
    subprocess.run(unetflow_cli(args), check=True, env=child_env())
    info = {"command": "unetflow " + " ".join(args), "wall_seconds": round(time.perf_counter() - t0, 1)}
    return np.asarray(formats.open_input(pred)[...]).astype(np.int64), info


def unetflow_runs(out: str, seeds: list[int], train_args: list[str], segment_args: list[str], truth: np.ndarray) -> list[dict[str, Any]]:
    """Train and segment once per seed: the spread over seeds is part of the result."""
    runs = []
    for seed in seeds:
        model, pred = f"{out}/model-seed{seed}.pt", f"{out}/pred-seed{seed}.zarr"
        training = train_unetflow(out, model, [*train_args, "--seed", str(seed)])
        labels, seg = segment_unetflow(out, model, pred, segment_args)
        runs.append({"seed": seed, "training": training, "segment": seg, **scored(labels, truth)})
    return runs


def scored(labels: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    from unetflow.evaluate import evaluate_report

    report = evaluate_report(labels.astype(np.int64), truth)
    return {"scores": {k: round(float(v), 4) for k, v in report["scores"].items()},
            "per_threshold": [{k: round(float(v), 4) for k, v in r.items()} for r in report["per_threshold"]]}


def classical_rows(img: np.ndarray, mask: np.ndarray, split: int) -> dict[str, Any]:
    """Both classical pipelines, the watershed tuned on the rows above *split*, scored below it."""
    from unetflow.evaluate import match_objects

    truth = mask[split:].astype(np.int64)
    t0 = time.perf_counter()
    params, train_f1 = classical.tune_watershed(img[:split], mask[:split].astype(np.int64), lambda a, b: match_objects(a, b)["f1"])
    tune_s = time.perf_counter() - t0
    return {
        "otsu_cc_min20px": scored(classical.otsu_components(img[split:], 20), truth),
        "otsu_watershed_tuned": {**scored(classical.otsu_watershed(img[split:], **params), truth), "params": params,
                                 "train_rows_f1": round(train_f1, 4), "tune_seconds": round(tune_s, 1),
                                 "grid": {k: list(v) for k, v in classical.WATERSHED_GRID.items()}},
    }


def table(result: dict[str, Any]) -> list[str]:
    runs = result["unetflow"]
    tta = ", `--tta`" if "--tta" in runs[0]["segment"]["command"] else ""
    rows = [(f"unetflow (`segment --output instances`{tta}), seed {r['seed']}", r) for r in runs]
    rows += [("Otsu + distance watershed, tuned on the training rows", result["otsu_watershed_tuned"]),
             ("Otsu + connected components, specks < 20 px dropped", result["otsu_cc_min20px"])]
    lines = ["| method | objects found | precision | recall | object F1 (IoU 0.5) | AP (IoU 0.5:0.95) | mean matched IoU | foreground IoU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        s = r["scores"]
        lines.append(f"| {name} | {s['n_pred']:.0f} | {s['precision']:.3f} | {s['recall']:.3f} | **{s['f1']:.3f}** | {s['ap']:.3f} "
                     f"| {s['mean_matched_iou']:.3f} | {s['foreground_iou']:.3f} |")
    f1 = [r["scores"]["f1"] for r in runs]
    lines += ["", f"unetflow over {len(runs)} seed(s): object F1 mean {np.mean(f1):.3f}, lowest {min(f1):.3f}, highest {max(f1):.3f}; "
              f"AP mean {np.mean([r['scores']['ap'] for r in runs]):.3f}.",
              "", "Per IoU threshold: F1", "",
              "| IoU > | " + " | ".join(f"{r['threshold']:.2f}" for r in runs[0]["per_threshold"]) + " |",
              "|---|" + "---|" * len(runs[0]["per_threshold"])]
    per = [(f"unetflow, seed {r['seed']}", r) for r in runs] + [("watershed", result["otsu_watershed_tuned"])]
    for name, r in per:
        lines.append(f"| {name} | " + " | ".join(f"{t['f1']:.3f}" for t in r["per_threshold"]) + " |")
    return lines


def write_section(path: Path, result: dict[str, Any], command: str) -> None:
    runs, ws = result["unetflow"], result["otsu_watershed_tuned"]
    cpu = [r["training"]["cpu_seconds"] / 60 for r in runs]
    wall = [r["training"]["wall_seconds"] / 60 for r in runs]
    lines = [
        f"{SECTION} classical pipelines: {time.strftime('%Y-%m-%d')}", "",
        f"- machine: {machine(False)}, load average {result['load_before']:.1f} before the run; "
        "training time is reported as CPU seconds of the training process (meaningful on a shared machine) as well as wall",
        f"- command: `{command}`",
        f"- image: {result['image']}; rows 0-{result['split'] - 1} train, rows {result['split']}-511 are the held-out test part "
        f"({result['objects_in_test_part']} objects), seen by no method before scoring",
        f"- unetflow training, once per seed ({', '.join(str(r['seed']) for r in runs)}): `{runs[0]['training']['command']}`: "
        f"{min(cpu):.1f}-{max(cpu):.1f} CPU-minutes, {min(wall):.1f}-{max(wall):.1f} wall minutes per model",
        f"- unetflow segmentation: `{runs[0]['segment']['command']}`",
        f"- watershed: grid {ws['grid']} searched on the training rows (best F1 there {ws['train_rows_f1']}, "
        f"{ws['tune_seconds']:.0f} s); chosen {ws['params']}",
        "", *table(result),
    ]
    replace_section(path, SECTION, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2", help="One model trained per seed; every one is scored and listed.")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--train-args", default="--lr-schedule cosine", help="More `unetflow train` flags (write --train-args=...).")
    ap.add_argument("--segment-args", default="--tta", help="More `unetflow segment` flags (write --segment-args=...; '' for none).")
    ap.add_argument("--test-rows", type=int, default=160)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/unetflow-bench"))
    ap.add_argument("--out", default=None, help="Working folder (default: a new temporary one).")
    ap.add_argument("--write", default=None, help="Rewrite this script's section of this Markdown file (BENCHMARKS.md).")
    args = ap.parse_args()

    img, mask = fetch(args.cache)
    out = args.out or tempfile.mkdtemp(prefix="unetflow-real-")
    split = img.shape[0] - args.test_rows
    write(f"{out}/train_raw.zarr", img[:split])
    write(f"{out}/train_labels.zarr", mask[:split].astype(np.uint32))
    write(f"{out}/test_raw.zarr", img[split:])
    truth = mask[split:].astype(np.int64)
    load = os.getloadavg()[0]
    train_args = [*TRAIN_ARGS, "--epochs", str(args.epochs), "--steps", str(args.steps), *args.train_args.split()]
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {
        "image": "stardist img2d.tif / mask2d.tif (DSB 2018), 512x512", "split": split, "load_before": load,
        "objects_in_test_part": int(len(np.unique(truth)) - 1),
        "unetflow": unetflow_runs(out, seeds, train_args, args.segment_args.split(), truth), **classical_rows(img, mask, split),
    }
    print(json.dumps(result, indent=2))
    print("\n".join(table(result)))
    if args.write:
        write_section(Path(args.write), result, "python bench/real_nuclei.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
