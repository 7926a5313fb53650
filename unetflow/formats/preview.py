"""A PNG of one slice (or a max projection) with the prediction over the input: a quick look without napari.

The input is drawn in grey (1..99.8 percentile stretch), the prediction on top:
labels as distinct colours (label 0 transparent), probabilities of one class as a
red overlay whose opacity is the probability. Only the slice (or, for a max
projection, one z-slab at a time) is read. PNGs are written with zlib alone.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from unetflow.errors import ShapeError

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.float32,
)


def plane(array: Any, *, z: int | None = None, channel: int | None = None, project: bool = False, slab: int = 16) -> np.ndarray:
    """One (Y, X) plane of an array with ``dimension_names`` (or (C,)(Z,)Y,X by rank).

    *z*: the slice (default: the middle); *project*: max over z instead, read *slab*
    slices at a time; *channel*: for arrays with a ``c`` axis (default: the last).
    """
    names = _names(array)
    index: list[Any] = []
    for n, size in zip(names, array.shape):
        if n == "c":
            index.append(size - 1 if channel is None else channel)
        elif n == "z":
            index.append(slice(None) if project else (size // 2 if z is None else z))
            if not project and not 0 <= index[-1] < size:
                raise ShapeError(f"--z {z} is outside the image's {size} slices; pass 0..{size - 1}")
        elif n in ("t",):
            index.append(0)
        else:
            index.append(slice(None))
    if not project or "z" not in names:
        return np.asarray(array[tuple(index)])
    zi = names.index("z")
    out = None
    for start in range(0, array.shape[zi], slab):
        index[zi] = slice(start, min(start + slab, array.shape[zi]))
        part = np.asarray(array[tuple(index)])
        part = part.max(axis=_z_axis(index, zi))
        out = part if out is None else np.maximum(out, part)
    return out


def _z_axis(index: list[Any], zi: int) -> int:
    return sum(1 for i in index[:zi] if isinstance(i, slice))


def _names(array: Any) -> list[str]:
    names = getattr(array, "dimension_names", None) or getattr(getattr(array, "metadata", None), "dimension_names", None)
    if names and all(names):
        return [str(n).lower() for n in names]
    return list(("c", "z", "y", "x")[-array.ndim :]) if array.ndim == 4 else list(("z", "y", "x")[-array.ndim :])


def compose(image: np.ndarray | None, pred: np.ndarray, *, labels: bool, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 (Y, X, 3): grey *image* (or black) with *pred* over it."""
    if image is not None and image.shape != pred.shape:
        raise ShapeError(f"input slice {image.shape} and prediction slice {pred.shape} differ; pass the input the prediction was made from")
    base = np.zeros(pred.shape + (3,), np.float32)
    if image is not None:
        img = image.astype(np.float32)
        lo, hi = np.percentile(img, [1.0, 99.8])
        base[:] = (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255)[..., None]
    if labels:
        colour = PALETTE[(pred.astype(np.int64) - 1) % len(PALETTE)]
        a = np.where(pred > 0, alpha, 0.0)[..., None].astype(np.float32)
    else:
        p = pred.astype(np.float32)
        p = p / 255.0 if pred.dtype == np.uint8 else p
        colour = np.broadcast_to(np.array([255, 40, 40], np.float32), base.shape)
        a = (np.clip(p, 0, 1) * alpha)[..., None]
    return np.clip(base * (1 - a) + colour * a, 0, 255).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array (H, W, 3) as an 8-bit PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def render(prediction: str, png: str, *, input_path: str | None = None, level: int | None = None, z: int | None = None,
           project: bool = False, channel: int | None = None, alpha: float = 0.5) -> dict[str, Any]:
    """Write *png*: one slice of *prediction* over its input (from the run's attributes, or *input_path*)."""
    from unetflow.formats import omezarr, open_input

    pred_array = open_input(omezarr.prediction_path(prediction))
    meta = dict(getattr(pred_array, "attrs", {}) or {}).get("unetflow", {})
    config = meta.get("config", {})
    labels = meta.get("output", {}).get("kind") == "labels" or np.dtype(pred_array.dtype).kind in "ui" and "c" not in _names(pred_array)
    pred = plane(pred_array, z=z, channel=channel, project=project)
    source = input_path or config.get("input")
    image = None
    if source:
        src = open_input(source, level=level if input_path else config.get("level"))
        image = plane(src, z=z, channel=0, project=project)
        if image.shape != pred.shape:  # a prediction level or a valid net's smaller output: show it alone
            image = None
    write_png(png, compose(image, pred, labels=labels, alpha=alpha))
    return {"png": png, "shape": list(pred.shape), "input": source if image is not None else None, "labels": labels}
