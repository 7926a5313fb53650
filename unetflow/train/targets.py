"""Training targets from instance labels: background / interior / border classes.

The U-Net separates touching objects by learning a border class between them
(the three-class formulation used with the paper's border-weighted loss).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unetflow.errors import ShapeError

BACKGROUND, INTERIOR, BORDER = 0, 1, 2
N_CLASSES = 3


def instance_to_classes(labels: np.ndarray, *, touch_width: int = 2) -> np.ndarray:
    """Turn instance labels into a class map: 0 background, 1 interior, 2 border.

    A border voxel is an object voxel with a face neighbour (6-connectivity in 3-D,
    4 in 2-D) of a different value: background or another object. The border is one
    voxel thick on each object, so two touching objects are separated by two border
    voxels (one on each side). The image edge is not a border (``mode='nearest'``).
    Where two objects touch, the border is ``touch_width`` voxels deep on each side,
    so that predicted interiors of touching objects stay apart by a safe margin (the
    instance rule of :mod:`unetflow.label` grows them back over 3 voxels).

    Parameters
    ----------
    labels : ndarray of shape (Y, X) or (Z, Y, X), integer
        0 background, any other value one object.

    Returns
    -------
    ndarray of shape (Y, X) or (Z, Y, X), uint8
        The class map.

    Raises
    ------
    ShapeError
        If ``labels`` is not an integer array with 2 or 3 axes.

    Examples
    --------
    >>> lab = np.zeros((5, 5), dtype=np.uint32); lab[1:4, 1:4] = 7
    >>> instance_to_classes(lab)[2]
    array([0, 2, 1, 2, 0], dtype=uint8)
    """
    if labels.ndim not in (2, 3) or labels.dtype.kind not in "iu":
        raise ShapeError(f"labels of shape {labels.shape} and dtype {labels.dtype} must be 2-D or 3-D integers; pass an instance label array")
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    high = ndimage.maximum_filter(labels, footprint=cross, mode="nearest")
    low = ndimage.minimum_filter(labels, footprint=cross, mode="nearest")
    foreground = labels != 0
    border = foreground & ((high != labels) | (low != labels))
    touching = foreground & (((high != labels) & (high != 0)) | ((low != labels) & (low != 0)))
    if touch_width > 1 and touching.any():
        border |= ndimage.binary_dilation(touching, structure=cross, iterations=touch_width - 1, mask=foreground)
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[foreground] = INTERIOR
    classes[border] = BORDER
    return classes


def is_instance_labels(labels: np.ndarray, *, n_classes: int = N_CLASSES) -> bool:
    """Guess whether ``labels`` holds instance ids rather than a class map.

    The heuristic: an integer array that contains a value ``>= n_classes`` cannot be
    a class map, so it is taken as instance labels; anything else is taken as a class
    map. An instance map with fewer than ``n_classes`` objects (e.g. ids {0, 1, 2}
    with 3 classes) is therefore read as classes: say which it is explicitly
    (``TrainSpec.targets``) when that can happen.

    Parameters
    ----------
    labels : ndarray of any shape, integer
    n_classes : int
        Number of classes a class map would use.

    Returns
    -------
    bool
        True if ``labels`` looks like instance labels.

    Examples
    --------
    >>> is_instance_labels(np.array([0, 1, 2])), is_instance_labels(np.array([0, 1, 5]))
    (False, True)
    """
    if labels.dtype.kind not in "iu" or labels.size == 0:
        return False
    return int(labels.max()) >= n_classes
