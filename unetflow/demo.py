"""``unetflow demo``: sample volume -> bundled model on a local cluster -> scores and a PNG.

A newcomer's first minute: every step is the real one (``run.segment`` on a Dask
``LocalCluster``, Zarr in and out), only the data is small and synthetic.
"""

from __future__ import annotations

import logging
import os
import time
from importlib import resources
from typing import Any

import numpy as np

from unetflow import formats
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec

log = logging.getLogger(__name__)

BUNDLED_MODEL = "demo_unet3d.pt"


def bundled_model() -> str:
    """Path of the small 3-D U-Net shipped in the package (see unetflow/data/MODEL.md)."""
    return str(resources.files("unetflow") / "data" / BUNDLED_MODEL)


def run_demo(out_dir: str, shape: tuple[int, ...], *, workers: int = 2, seed: int = 1) -> dict[str, Any]:
    """Run the demo in *out_dir*; return the scores and the paths written.

    The cluster starts first, so its workers import torch while this process writes
    the sample and imports torch itself."""
    from unetflow import schedule

    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    sample_path = os.path.join(out_dir, "sample.zarr")
    pred_path = os.path.join(out_dir, "pred.zarr")
    config = RunConfig(
        input=f"{sample_path}/raw", output=pred_path, model=bundled_model(),
        tiling=TilingSpec(block_shape=_demo_block(shape)),
        output_settings=OutputSettings(kind="instances", chunk_shape=_demo_block(shape), overwrite=True),
        cluster=ClusterSpec(kind="local", workers=workers),
    )
    with schedule.Dispatcher.for_run(config) as dispatch:
        from unetflow.run import segment
        from unetflow.sample import write_sample

        write_sample(sample_path, tuple(shape), seed=seed, overwrite=True)
        report = segment(config, dispatch=dispatch)
    from unetflow.evaluate import evaluate

    labels = formats.open_input(pred_path)[...]
    truth = formats.open_input(f"{sample_path}/labels")[...]
    scores = evaluate(labels, truth)
    raw = formats.open_input(f"{sample_path}/raw")[...]
    png = os.path.join(out_dir, "preview.png")
    write_preview(png, raw, labels, truth)
    return {
        "sample": sample_path, "prediction": pred_path, "preview": png,
        "blocks": report.blocks_done, "objects_true": int(len(np.unique(truth)) - 1), "objects_found": int(len(np.unique(labels)) - 1),
        "foreground_iou": float(scores["foreground_iou"]), "object_precision": float(scores["precision"]),
        "object_recall": float(scores["recall"]), "object_f1": float(scores["f1"]), "seconds": time.perf_counter() - t0,
    }


def _demo_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Two blocks (one per demo worker): split the last axis."""
    return (*shape[:-1], max(1, -(-shape[-1] // 2)))


def write_preview(path: str, raw: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> None:
    """Middle slice: input | predicted instances over the input | ground truth, as one PNG."""
    from unetflow.formats.preview import compose, write_png

    z = raw.shape[0] // 2 if raw.ndim == 3 else None
    img, lab, tru = (a[z] if z is not None else a for a in (raw, labels, truth))
    panels = [compose(img, np.zeros_like(lab), labels=True), compose(img, lab, labels=True), compose(img, tru, labels=True)]
    sep = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)
    write_png(path, np.repeat(np.repeat(row, 2, axis=0), 2, axis=1))
