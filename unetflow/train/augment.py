"""Data augmentation for training from few images (numpy / scipy.ndimage only).

Every function takes an explicit :class:`numpy.random.Generator`, so a training run
is reproducible from its seed. Image and labels always receive the same geometric
transform. Images may carry a channel axis first: ``(C, Y, X)`` or ``(C, Z, Y, X)``;
labels never do.

The elastic deformation is the paper's: random displacement vectors on a coarse grid
of control points (``grid`` per axis, std ``strength`` voxels), interpolated to every
voxel with a cubic spline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unetflow.errors import ConfigError, ShapeError


def elastic_field(shape: tuple[int, ...], rng: np.random.Generator, *, strength: float = 10.0, grid: int = 3) -> np.ndarray:
    """Smooth random displacement field, in voxels.

    Displacements at ``grid`` control points per axis (the first and last lie on the
    image corners) are drawn from N(0, strength^2) per axis and interpolated with a
    cubic spline (the tensor product of 1-D cubic splines, which equals
    ``scipy.ndimage.zoom(order=3)`` but costs O(voxels * grid)).

    Parameters
    ----------
    shape : tuple of int
        Spatial shape ``(Y, X)`` or ``(Z, Y, X)``.
    rng : numpy.random.Generator
    strength : float
        Standard deviation of the control-point displacements in voxels (paper: 10).
        0 gives an all-zero field.
    grid : int
        Control points per axis, at least 2 (paper: 3).

    Returns
    -------
    ndarray of shape (ndim, *shape), float32
        ``field[a]`` is the displacement along axis ``a``.

    Raises
    ------
    ConfigError
        If ``strength < 0`` or ``grid < 2``.
    """
    if strength < 0 or grid < 2:
        raise ConfigError(f"elastic strength {strength} and grid {grid} must be >= 0 and >= 2; pass e.g. strength 10, grid 3")
    ndim = len(shape)
    coarse = rng.normal(0.0, strength, (ndim,) + (grid,) * ndim)
    for axis, size in enumerate(shape):
        coarse = np.moveaxis(np.tensordot(_spline_matrix(grid, size), coarse, axes=([1], [axis + 1])), 0, axis + 1)
    return coarse.astype(np.float32)


def _spline_matrix(grid: int, size: int) -> np.ndarray:
    """Matrix of shape (size, grid) that interpolates ``grid`` control points to ``size`` voxels (cubic spline)."""
    where = np.linspace(0.0, grid - 1.0, size)
    columns = [ndimage.map_coordinates(np.eye(grid)[k], [where], order=3, mode="mirror") for k in range(grid)]
    return np.stack(columns, axis=1)


def apply_field(array: np.ndarray, field: np.ndarray, *, order: int) -> np.ndarray:
    """Resample ``array`` at ``x + field(x)`` with mirror boundary.

    Mirror means scipy's ``'mirror'`` (numpy's ``'reflect'``: the edge voxel is not
    repeated). An all-zero field returns an exact copy.

    Parameters
    ----------
    array : ndarray of shape (*S) or (C, *S)
        Image (with or without channel axis) or labels.
    field : ndarray of shape (ndim, *S)
        Displacements from :func:`elastic_field`.
    order : int
        Spline order: 0 (nearest, for labels), 1 or 3 (images).

    Returns
    -------
    ndarray of the shape of ``array``
        Same dtype for ``order=0``; float32 otherwise.

    Raises
    ------
    ShapeError
        If the spatial shape of ``array`` is not ``field.shape[1:]``.
    """
    spatial = field.shape[1:]
    if array.shape[-len(spatial):] != spatial or array.ndim - len(spatial) not in (0, 1):
        raise ShapeError(f"array of shape {array.shape} does not fit a field over {spatial}; pass (C,) + {spatial} or {spatial}")
    if not np.any(field):
        return array.copy() if order == 0 else array.astype(np.float32)
    coords = np.indices(spatial, dtype=np.float32) + field
    out_type = array.dtype if order == 0 else np.float32
    channels = array if array.ndim > len(spatial) else array[None]
    out = [ndimage.map_coordinates(c, coords, order=order, mode="mirror", output=out_type) for c in channels]
    return np.stack(out) if array.ndim > len(spatial) else out[0]


def elastic(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, strength: float = 10.0, grid: int = 3, order: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Deform ``image`` and ``labels`` with the same random elastic field.

    Parameters
    ----------
    image : ndarray of shape (*S) or (C, *S)
    labels : ndarray of shape (*S), integer
    rng : numpy.random.Generator
    strength, grid : float, int
        See :func:`elastic_field`; ``strength=0`` is the exact identity.
    order : int
        Spline order for the image (1 or 3); labels always use 0 (nearest).

    Returns
    -------
    image : ndarray of the shape of ``image``, float32
    labels : ndarray of the shape and dtype of ``labels``
    """
    field = elastic_field(labels.shape, rng, strength=strength, grid=grid)
    return apply_field(image, field, order=order), apply_field(labels, field, order=0)


def random_flip_rot(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip every spatial axis with probability 1/2, then rotate by k * 90 degrees in YX.

    The same transform goes to both arrays. If Y != X only k in {0, 2} is drawn, so
    the shape never changes (patches keep stacking into batches). Results are
    C-contiguous copies (``torch.from_numpy`` refuses negative strides).

    Parameters
    ----------
    image : ndarray of shape (*S) or (C, *S)
    labels : ndarray of shape (*S)
    rng : numpy.random.Generator

    Returns
    -------
    image, labels : ndarrays of the input shapes and dtypes
    """
    ndim = labels.ndim
    offset = image.ndim - ndim
    flips = rng.random(ndim) < 0.5
    k = int(rng.integers(4)) if labels.shape[-1] == labels.shape[-2] else 2 * int(rng.integers(2))
    for axis in np.flatnonzero(flips):
        image = np.flip(image, axis=int(axis) + offset)
        labels = np.flip(labels, axis=int(axis))
    image = np.rot90(image, k, axes=(-2, -1))
    labels = np.rot90(labels, k, axes=(-2, -1))
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def intensity_jitter(image: np.ndarray, rng: np.random.Generator, *, scale: float = 0.1, shift: float = 0.1) -> np.ndarray:
    """Random contrast and brightness: ``image * (1 + a) + b``, a ~ U(-scale, scale), b ~ U(-shift, shift).

    Meant for a normalised image (about mean 0, std 1), so ``shift`` is in units of
    the image's std. One draw for all channels.

    Parameters
    ----------
    image : ndarray of any shape
    rng : numpy.random.Generator
    scale, shift : float
        Half-widths of the uniform draws, both >= 0.

    Returns
    -------
    ndarray of the shape of ``image``, float32
    """
    if scale < 0 or shift < 0:
        raise ConfigError(f"intensity jitter scale {scale} and shift {shift} must be >= 0; pass e.g. 0.1")
    a = rng.uniform(-scale, scale)
    b = rng.uniform(-shift, shift)
    return (image.astype(np.float32) * np.float32(1.0 + a) + np.float32(b)).astype(np.float32)
