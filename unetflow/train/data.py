"""Training data: image/label pairs in Zarr, a train/validation split, augmented patches.

Patches are read lazily from the stores (mirrored at the image border, like the
inference engine), so the images never need to fit in memory. Each pair's last
``val_fraction`` along its first spatial axis is held out for validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from unetflow import formats, store
from unetflow.config import NormSpec
from unetflow.errors import ShapeError
from unetflow.geometry import Box
from unetflow.values import normalise, norm_stats
from unetflow.train.augment import elastic, intensity_jitter, random_flip_rot
from unetflow.train.losses import class_balance_weights, weight_map
from unetflow.train.targets import INTERIOR, instance_to_classes, is_instance_labels

log = logging.getLogger(__name__)

INSTANCE_CLASSES = ("background", "interior", "border")


@dataclass
class Pair:
    """One image and its labels, opened lazily, with its split and intensity statistics."""

    image_path: str
    labels_path: str
    image: object
    labels: object
    layout: store.Layout
    stats: tuple[tuple[float, float], ...]
    train_box: Box
    val_box: Box | None
    classes: np.ndarray | None = None
    weights: np.ndarray | None = None


def open_pairs(pairs: tuple[tuple[str, str], ...], *, dims: int, in_channels: int, norm: NormSpec, val_fraction: float) -> list[Pair]:
    """Open every pair, check shapes and channels, split, and measure intensity statistics."""
    out = []
    for image_path, labels_path in pairs:
        image = formats.open_input(image_path)
        layout = store.layout_for(image, dims, name=image_path)
        if layout.channels != in_channels:
            raise ShapeError(f"training image {image_path} has {layout.channels} channel(s) but the model takes {in_channels}; pass --channels {layout.channels}")
        labels = formats.open_input(labels_path)
        if tuple(labels.shape) != layout.spatial_shape:
            raise ShapeError(f"labels {labels_path} have shape {tuple(labels.shape)} but image {image_path} has spatial shape {layout.spatial_shape}; give labels of the image's spatial shape")
        train_box, val_box = split(layout.spatial_shape, val_fraction)
        stats = norm_stats(store.sample_voxels(image, layout=layout), norm)
        out.append(Pair(image_path, labels_path, image, labels, layout, stats, train_box, val_box))
    return out


def split(shape: tuple[int, ...], val_fraction: float) -> tuple[Box, Box | None]:
    """Hold out the last *val_fraction* of the first axis.

    >>> split((10, 8), 0.2)
    (Box(offset=(0, 0), shape=(8, 8)), Box(offset=(8, 0), shape=(2, 8)))
    """
    n = shape[0]
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n - n_val < 1:
        return Box((0,) * len(shape), shape), None
    train = Box((0,) * len(shape), (n - n_val, *shape[1:]))
    val = Box((n - n_val,) + (0,) * (len(shape) - 1), (n_val, *shape[1:]))
    return train, val


def prepare_targets(pairs: list[Pair], ps: "PatchSpec") -> None:
    """Class targets and weight maps of every pair, computed once on the whole labels.

    The weight map (the paper's eq. 2) needs distances to the two nearest objects,
    which is costly per patch; it is computed once here and then deformed with the
    image like an extra channel. Holds two arrays of the labels' size per pair in
    memory (training sets are small: a few annotated images).
    """
    for pair in pairs:
        labels = np.asarray(pair.labels[...])
        pair.classes, pair.weights = make_targets(labels, ps)
        log.info("targets of %s: classes %s, weights %.3g..%.3g", pair.labels_path, np.bincount(pair.classes.ravel()).tolist(), pair.weights.min(), pair.weights.max())


def detect_targets(pairs: list[Pair], kind: str) -> tuple[str, int]:
    """``instances`` (3 classes) or ``classes`` (max label + 1), from a sample of the labels."""
    sample = np.concatenate([store.sample_voxels(p.labels, layout=store.Layout(False, 1, tuple(p.labels.shape)), max_chunks=16).ravel() for p in pairs])
    if kind == "auto":
        kind = "instances" if is_instance_labels(sample) else "classes"
    classes = len(INSTANCE_CLASSES) if kind == "instances" else max(2, int(sample.max()) + 1)
    return kind, classes


@dataclass(frozen=True)
class PatchSpec:
    """Shapes of one training sample: the input patch and the output it is scored on."""

    patch: tuple[int, ...]
    out: tuple[int, ...]
    margin: int
    targets: str
    w0: float
    sigma: float
    elastic_strength: float
    elastic_grid: int


def sample_patch(pair: Pair, rng: np.random.Generator, ps: PatchSpec, norm: NormSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented sample: image (C, *patch) float32, target (*out) int64, weight (*out) float32.

    Flips, rotations and the elastic field go identically to the image, the class
    targets (nearest) and the weight map (linear, as an extra image channel).
    """
    out_box = _random_out_box(pair.train_box, ps.out, rng)
    in_box = out_box.grow(ps.margin)
    spatial = store.Layout(False, 1, pair.layout.spatial_shape)
    image = normalise(store.read_box(pair.image, in_box, layout=pair.layout), norm, pair.stats)
    weight = store.read_box(pair.weights, in_box, layout=spatial)
    target = store.read_box(pair.classes, in_box, layout=spatial)[0]
    stacked, target = random_flip_rot(np.concatenate([image, weight]), target, rng)
    if ps.elastic_strength > 0:
        stacked, target = elastic(stacked, target, rng, strength=ps.elastic_strength, grid=ps.elastic_grid, order=1)
    image, weight = intensity_jitter(stacked[:-1], rng), stacked[-1]
    crop = tuple(slice(ps.margin, ps.margin + o) for o in ps.out)
    return np.ascontiguousarray(image, dtype=np.float32), target[crop].astype(np.int64), np.ascontiguousarray(weight[crop], dtype=np.float32)


def make_targets(labels: np.ndarray, ps: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
    """Class targets and the paper's weight map (border term for instance labels).

    The border term goes on the background and on the border class: between touching
    objects the border class is what separates them (there is no background gap).
    """
    if ps.targets == "instances":
        classes = instance_to_classes(labels)
        separators = classes != INTERIOR
        return classes, weight_map(labels, w0=ps.w0, sigma=ps.sigma, targets=classes, separators=separators).astype(np.float32)
    classes = labels.astype(np.int64)
    n = int(classes.max()) + 1
    return classes.astype(np.uint8), class_balance_weights(classes, max(n, 2))[classes].astype(np.float32)


def _random_out_box(train: Box, out: tuple[int, ...], rng: np.random.Generator) -> Box:
    start = []
    for o, s, n in zip(train.offset, out, train.shape):
        hi = max(o, o + n - s)
        start.append(int(rng.integers(o, hi + 1)))
    return Box(tuple(start), out)


def read_region(pair: Pair, box: Box, norm: NormSpec) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image (C, *box.shape) and labels (*box.shape) of a region (validation)."""
    image = normalise(store.read_box(pair.image, box, layout=pair.layout), norm, pair.stats)
    labels = store.read_box(pair.labels, box, layout=store.Layout(False, 1, pair.layout.spatial_shape))[0]
    return image, labels
