"""Real data check: unetflow train on a real annotated fluorescence image vs Otsu + connected components.

The image and its instance annotation are the 2018 Data Science Bowl nuclei image that
the stardist package ships (``stardist/data/images/img2d.tif`` and ``mask2d.tif``,
512 x 512, about 125 touching nuclei). They are taken from the stardist wheel on PyPI
(``pip download --no-deps stardist``), read with tifffile; stardist itself is not
installed or used.

The top rows train (unetflow holds out its own validation part inside them), the
bottom ``--test-rows`` rows are never seen in training and are where both methods
are scored (object F1 at IoU 0.5).

    python bench/real_nuclei.py --minutes 4
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from scipy import ndimage


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


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold (maximum between-class variance) over a 256-bin histogram."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def write(path: str, data: np.ndarray) -> None:
    from unetflow import store
    from unetflow.geometry import Box

    arr = store.create_output(path, shape=data.shape, chunks=(128, 128), dtype=str(data.dtype), dimension_names=("y", "x"))
    store.write_box(arr, Box((0, 0), data.shape), data, channel_axis=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--test-rows", type=int, default=160)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/unetflow-bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from unetflow.evaluate import evaluate

    img, mask = fetch(args.cache)
    out = args.out or tempfile.mkdtemp(prefix="unetflow-real-")
    split = img.shape[0] - args.test_rows
    write(f"{out}/train_raw.zarr", img[:split])
    write(f"{out}/train_labels.zarr", mask[:split].astype(np.uint32))
    write(f"{out}/test_raw.zarr", img[split:])
    test_truth = mask[split:].astype(np.int64)

    t0 = time.perf_counter()
    train_cmd = ["unetflow", "train", f"{out}/train_raw.zarr", f"{out}/train_labels.zarr", f"{out}/model.pt", "--dims", "2",
                 "--depth", "3", "--width", "16", "--patch-shape", "96,96", "--epochs", str(args.epochs), "--steps", str(args.steps),
                 "--batch-size", "4", "--seed", "0", "--no-progress", "--overwrite"]
    subprocess.run(train_cmd, check=True)
    train_s = time.perf_counter() - t0
    seg_cmd = ["unetflow", "segment", f"{out}/test_raw.zarr", f"{out}/pred.zarr", "--model", f"{out}/model.pt",
               "--output", "instances", "--workers", "1", "--no-progress", "--overwrite"]
    subprocess.run(seg_cmd, check=True)
    from unetflow import formats

    pred = np.asarray(formats.open_input(f"{out}/pred.zarr")[...]).astype(np.int64)
    unet = evaluate(pred, test_truth)

    test = img[split:].astype(np.float64)
    otsu_labels, _ = ndimage.label(test > otsu(test))
    base = evaluate(otsu_labels.astype(np.int64), test_truth)
    sizes = np.bincount(otsu_labels.ravel())
    cleaned = np.where(sizes[otsu_labels] >= 20, otsu_labels, 0)  # the usual clean-up: drop specks < 20 px
    base_clean = evaluate(cleaned.astype(np.int64), test_truth)
    result = {
        "image": "stardist img2d.tif / mask2d.tif (DSB 2018), 512x512",
        "test_rows": args.test_rows, "objects_in_test_part": int(base["n_true"]),
        "train_seconds": round(train_s, 1), "train_command": " ".join(train_cmd),
        "unetflow": {k: round(float(v), 4) for k, v in unet.items()},
        "otsu_cc": {k: round(float(v), 4) for k, v in base.items()},
        "otsu_cc_min20px": {k: round(float(v), 4) for k, v in base_clean.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
