"""Classical nuclei baselines for bench/real_nuclei.py: Otsu + components, Otsu + distance watershed.

The watershed is the usual tuned pipeline: gaussian smoothing, a threshold at a
multiple of Otsu's, the distance transform of the foreground (smoothed), its local
maxima at least ``min_distance`` apart as markers, the watershed of the negated
distance inside the foreground, and objects under ``min_size`` pixels dropped. Its
parameters are chosen by a grid search on the training rows only
(:func:`tune_watershed`), then applied unchanged to the held-out rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from scipy import ndimage

WATERSHED_GRID = {
    "sigma": (0.0, 1.0, 2.0),
    "threshold_factor": (0.6, 0.8, 1.0, 1.2),
    "min_distance": (3, 5, 7, 9),
    "min_size": (0, 20, 40),
}


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold (maximum between-class variance) over a 256-bin histogram."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than *min_size* pixels set to background."""
    if min_size <= 0:
        return labels
    sizes = np.bincount(labels.ravel())
    return np.where(sizes[labels] >= min_size, labels, 0)


def otsu_components(image: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Otsu threshold, connected components, specks under *min_size* dropped."""
    image = image.astype(np.float64)
    labels, _ = ndimage.label(image > otsu(image))
    return drop_small(labels, min_size)


def otsu_watershed(image: np.ndarray, *, sigma: float, threshold_factor: float, min_distance: int, min_size: int) -> np.ndarray:
    """Otsu foreground split by a marker watershed of its distance transform (int64 labels)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    smooth = ndimage.gaussian_filter(image.astype(np.float64), sigma) if sigma > 0 else image.astype(np.float64)
    foreground = smooth > threshold_factor * otsu(smooth)
    foreground = ndimage.binary_fill_holes(foreground)
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(foreground), 1.0)
    parts, _ = ndimage.label(foreground)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=parts, exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=foreground)
    return drop_small(labels.astype(np.int64), min_size)


def tune_watershed(image: np.ndarray, truth: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
                   grid: dict[str, tuple] | None = None) -> tuple[dict[str, float], float]:
    """The grid point of :func:`otsu_watershed` (default grid :data:`WATERSHED_GRID`) with the best *score* on (*image*, *truth*)."""
    grid = WATERSHED_GRID if grid is None else grid
    best: tuple[dict[str, float], float] = ({}, -1.0)
    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values))
        value = score(otsu_watershed(image, **params), truth)
        if value > best[1]:
            best = (params, value)
    return best
