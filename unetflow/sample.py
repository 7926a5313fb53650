"""Synthetic fluorescence microscopy: nuclei-like blobs with instance ground truth.

:func:`make_sample` draws a 2-D or 3-D image of crowded, often touching nuclei the
way a widefield or confocal camera would record them, together with the instance
labels that produced it. It is the demo image of ``unetflow demo`` and the fixture of
tests that need something realistic but small.

The whole image is generated in memory (numpy and scipy.ndimage only), which is fine
for demo and test sizes (a 64 x 128 x 128 volume takes well under a second). To make a
huge sample, call it per chunk with a different ``seed`` per chunk and write the
chunks yourself; objects then do not cross chunk borders.

Steps (each a small helper below):

1. place centres with a minimum distance smaller than the sum of radii, so that
   neighbouring blobs overlap;
2. rasterise slightly irregular ellipsoids; where two overlap, each voxel goes to the
   nearest centre in the objects' own scaled metric (a weighted Voronoi split), so
   every voxel belongs to one object and touching objects share a clean border;
3. paint per-object brightness with intra-object texture over an uneven, smooth
   background;
4. blur with a gaussian PSF (wider along Z in 3-D);
5. add Poisson shot noise, gaussian read noise and a camera offset; return uint16.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from unetflow.errors import ConfigError, ShapeError

logger = logging.getLogger(__name__)

CAMERA_OFFSET = 100.0
MAX_TRIES = 50


def make_sample(
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    radius: float | None = None,
    density: float = 0.4,
    touch: float = 0.8,
    photons: float = 300.0,
    read_noise: float = 3.0,
    dtype: str = "uint16",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic fluorescence image of nuclei and its instance labels.

    Parameters
    ----------
    shape : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``; every axis at least 8.
    seed : int
        Seed of the random generator; the same seed gives the same arrays.
    radius : float, optional
        Mean object radius in voxels; default ``clip(min(Y, X) / 10, 3, 12)``,
        and in 3-D at most ``max(3, Z / 3)``.
        Radii vary by +-25 % per object and per axis.
    density : float
        Target fraction of the image covered by objects, in (0, 0.9].
    touch : float
        Minimum centre distance as a fraction of the sum of both radii, in (0, 1];
        below 1 neighbouring objects overlap and are split into touching pairs.
    photons : float
        Expected photon count at the brightest object voxel (sets the shot noise).
    read_noise : float
        Standard deviation of the gaussian camera read noise, in counts.
    dtype : {"uint16", "float32"}
        Type of the returned image; both hold the same noisy camera counts.

    Returns
    -------
    image : ndarray of shape ``shape``, uint16 or float32
        Camera counts, background near ``CAMERA_OFFSET``.
    labels : ndarray of shape ``shape``, uint32
        0 background, 1..N objects (consecutive).

    Raises
    ------
    ShapeError
        If ``shape`` is not 2-D or 3-D or an axis is shorter than 8.
    ConfigError
        If ``density``, ``touch`` or ``dtype`` is out of range.
    """
    shape = _check_args(shape, density, touch, dtype)
    rng = np.random.default_rng(seed)
    mean_radius = float(radius) if radius else _default_radius(shape)
    centres, radii = _place_centres(shape, rng, mean_radius, density, touch)
    labels, scaled = _rasterise(shape, centres, radii, rng)
    clean = _paint(labels, scaled, rng, mean_radius)
    image = _camera(clean, rng, photons, read_noise)
    logger.debug("sample %s: %d objects, seed %d", shape, int(labels.max()), seed)
    return image.astype(dtype), labels


def _check_args(shape: tuple[int, ...], density: float, touch: float, dtype: str) -> tuple[int, ...]:
    """Validate the arguments of :func:`make_sample`; return the shape as ints."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ShapeError(f"sample shape {shape} must have 2 or 3 axes of at least 8 voxels; pass e.g. (64, 128, 128)")
    if not 0.0 < density <= 0.9:
        raise ConfigError(f"sample density {density} must be in (0, 0.9]; pass e.g. 0.4")
    if not 0.0 < touch <= 1.0:
        raise ConfigError(f"sample touch {touch} must be in (0, 1]; pass e.g. 0.8")
    if dtype not in ("uint16", "float32"):
        raise ConfigError(f"sample dtype '{dtype}' is not one of uint16, float32; pass one of them")
    return shape


def _default_radius(shape: tuple[int, ...]) -> float:
    """Mean radius for :func:`make_sample` when none is given (see its docstring)."""
    radius = float(np.clip(min(shape[-2:]) / 10, 3, 12))
    return min(radius, max(3.0, shape[0] / 3)) if len(shape) == 3 else radius


def _place_centres(
    shape: tuple[int, ...], rng: np.random.Generator, mean_radius: float, density: float, touch: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random centres, shape (N, ndim), and semi-axes, shape (N, ndim), by dart throwing.

    A candidate is kept if its distance to every kept centre is at least
    ``touch * (r_new + r_old)`` (mean radii), so objects overlap but never coincide.
    """
    ndim = len(shape)
    volume = np.pi * mean_radius**2 * (4 / 3 * mean_radius if ndim == 3 else 1.0)
    target = max(1, int(density * np.prod(shape) / volume))
    centres = np.empty((0, ndim))
    radii = np.empty((0, ndim))
    for _ in range(MAX_TRIES):
        if len(centres) >= target:
            break
        cand = rng.uniform(0, 1, (4 * target, ndim)) * np.array(shape)
        cand_r = mean_radius * rng.uniform(0.75, 1.25, (4 * target, 1)) * rng.uniform(0.85, 1.15, (4 * target, ndim))
        for c, r in zip(cand, cand_r):
            if len(centres) >= target:
                break
            dist = np.sqrt(((centres - c) ** 2).sum(axis=1))
            if np.all(dist >= touch * (radii.mean(axis=1) + r.mean())):
                centres = np.vstack([centres, c])
                radii = np.vstack([radii, r])
    return centres, radii


def _rasterise(
    shape: tuple[int, ...], centres: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (uint32) and each voxel's scaled distance to its own centre.

    A voxel belongs to object k if ``q_k = |(x - c_k) / r_k| + wobble(x) < 1`` and
    ``q_k`` is the smallest over all objects (the weighted Voronoi split). ``wobble``
    is a smooth random field that makes outlines slightly irregular.
    """
    wobble = 0.15 * _smooth_noise(shape, rng, cell=max(2.0, float(radii.mean())))
    best = np.ones(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint32)
    for k, (c, r) in enumerate(zip(centres, radii), start=1):
        lo = np.maximum(np.floor(c - r * 1.3).astype(int), 0)
        hi = np.minimum(np.ceil(c + r * 1.3).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.ogrid[box]
        q = np.sqrt(sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r))) + wobble[box]
        win = q < best[box]
        best[box][win] = q[win]
        labels[box][win] = k
    return _relabel(labels), best


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels present to 1..N in order, keeping 0; shape unchanged."""
    present = np.zeros(int(labels.max()) + 1, dtype=bool)
    present[labels.ravel()] = True
    present[0] = False
    mapping = np.cumsum(present).astype(np.uint32) * present
    return mapping[labels]


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cell: float) -> np.ndarray:
    """Smooth random field of shape ``shape``, std about 1, features about ``cell`` wide.

    Draws a coarse gaussian grid and upsamples it linearly, then smooths lightly:
    much cheaper than a wide gaussian filter on the full image.
    """
    coarse_shape = tuple(int(np.ceil(s / cell)) + 2 for s in shape)
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    factors = [s / c for s, c in zip(shape, coarse_shape)]
    fine = ndimage.zoom(coarse, factors, order=1, mode="nearest", grid_mode=True)
    fine = fine[tuple(slice(0, s) for s in shape)]
    return ndimage.gaussian_filter(fine, cell / 4, truncate=2.0)


def _paint(labels: np.ndarray, scaled: np.ndarray, rng: np.random.Generator, mean_radius: float) -> np.ndarray:
    """Noise-free intensity in [0, ~1] of shape ``labels.shape``, float32, after the PSF.

    Objects get a random brightness in [0.5, 1], a texture of about 2 voxels
    (chromatin-like, +-20 %), a soft dimming towards their edge and a darker rim of
    about 2 voxels along every boundary, contacts with other nuclei included (the seam
    a nuclear envelope leaves between touching nuclei); the background is a smooth
    gradient between 0.05 and 0.2.
    """
    shape = labels.shape
    brightness = rng.uniform(0.5, 1.0, int(labels.max()) + 1).astype(np.float32)
    brightness[0] = 0.0
    texture = 1.0 + 0.2 * _smooth_noise(shape, rng, cell=2.0)
    edge = 1.0 - 0.3 * np.clip(scaled, 0.0, 1.0) ** 2
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    inside = (ndimage.minimum_filter(labels, footprint=cross) == labels) & (ndimage.maximum_filter(labels, footprint=cross) == labels)
    edge *= 1.0 - 0.4 * np.exp(-ndimage.distance_transform_edt(inside & (labels != 0)) / 1.5).astype(np.float32)
    signal = brightness[labels] * texture * edge
    ramp = sum(g * rng.uniform(-1, 1) / s for g, s in zip(np.ogrid[tuple(slice(0, s) for s in shape)], shape))
    back = 0.12 + 0.04 * ramp + 0.02 * _smooth_noise(shape, rng, cell=max(shape) / 3)
    sigma = (2.0, 1.0, 1.0) if len(shape) == 3 else (1.0, 1.0)  # the PSF is longer along Z
    return ndimage.gaussian_filter((signal + np.clip(back, 0.02, None)).astype(np.float32), sigma)


def _camera(clean: np.ndarray, rng: np.random.Generator, photons: float, read_noise: float) -> np.ndarray:
    """Camera counts, float32 of shape ``clean.shape``: Poisson shot + gaussian read noise + offset, clipped to uint16."""
    shot = rng.poisson(np.clip(clean, 0.0, None) * photons).astype(np.float32)
    counts = shot + CAMERA_OFFSET + rng.normal(0.0, read_noise, clean.shape).astype(np.float32)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.float32)


def write_sample(path: str, shape: tuple[int, ...], *, seed: int = 0, overwrite: bool = False,
                 density: float = 0.25, touch: float = 0.9) -> dict[str, int]:
    """Write ``make_sample`` to a Zarr v3 group: ``path/raw`` (uint16) and ``path/labels`` (uint32).

    The defaults give nuclei that touch in pairs and small groups, as in a typical
    field of view, rather than one crowded cluster. Refuses an existing *path*
    unless *overwrite*.
    """
    from unetflow import store
    from unetflow.geometry import Box

    image, labels = make_sample(tuple(shape), seed=seed, density=density, touch=touch)
    store.clear_output(path, overwrite=overwrite, kinds=("sample",))  # only an earlier sample (or an empty folder)
    names = ("z", "y", "x")[-len(shape):]
    chunks = tuple(min(s, 64 if len(shape) == 3 else 256) for s in shape)
    box = Box((0,) * len(shape), tuple(shape))
    for name, data in (("raw", image), ("labels", labels)):
        array = store.create_output(f"{path}/{name}", shape=shape, chunks=chunks, dtype=str(data.dtype), dimension_names=names,
                                    attributes={"unetflow": {"sample": {"seed": seed, "shape": list(shape)}}})
        store.write_box(array, box, data, channel_axis=False)
    return {"objects": int(labels.max())}
