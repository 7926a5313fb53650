"""Training targets from instance labels: background / interior / border classes.

The U-Net separates touching objects by learning a border class between them
(the three-class formulation used with the paper's border-weighted loss). The
interior class is each object's core, away from its outline, so one object gives
one compact seed even where it is large, textured or pressed against others; the
instance rule of :mod:`unetflow.label` grows the seeds back over the border class.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unetflow.errors import ShapeError

BACKGROUND, INTERIOR, BORDER = 0, 1, 2
N_CLASSES = 3
CORE_FRACTION = 0.5  # the interior: voxels deeper inside their object than this fraction of its largest depth ...
CORE_DEPTH_MAX = 5.0  # ... or than this many voxels; unetflow.label.GROW_STEPS must reach back over it


def instance_to_classes(labels: np.ndarray, *, touch_width: int = 2, core: float = CORE_FRACTION) -> np.ndarray:
    """Turn instance labels into a class map: 0 background, 1 interior, 2 border.

    A border voxel is an object voxel with a face neighbour (6-connectivity in 3-D,
    4 in 2-D) of a different value: background or another object. The border is one
    voxel thick on each object, so two touching objects are separated by two border
    voxels (one on each side). The image edge is not a border (``mode='nearest'``).
    Where two objects touch, the border is ``touch_width`` voxels deep on each side,
    so that predicted interiors of touching objects stay apart by a safe margin.

    The interior is the object's core: the object voxels whose depth (Euclidean
    distance to the nearest voxel outside the object, with the object mirrored at the
    image edge as the inference engine mirrors the image) exceeds
    ``max(1, min(core * largest depth of the object, CORE_DEPTH_MAX))``; the rest of
    the object is border. A deep core makes one seed per object where the outline is
    ambiguous (large or textured nuclei, long contacts), and the instance rule of
    :mod:`unetflow.label` grows it back over the border (its ``GROW_STEPS`` reach past
    ``CORE_DEPTH_MAX``). ``core=0`` keeps only the thin border above.

    Parameters
    ----------
    labels : ndarray of shape (Y, X) or (Z, Y, X), integer
        0 background, any other value one object.
    touch_width : int
        Depth of the border at contacts between objects.
    core : float
        Fraction of each object's largest depth that is border rather than interior.

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
    >>> big = np.zeros((13, 13), dtype=np.uint32); big[1:12, 1:12] = 1
    >>> instance_to_classes(big)[6].tolist()  # depth 6 in the middle: the core is deeper than 3
    [0, 2, 2, 2, 1, 1, 1, 1, 1, 2, 2, 2, 0]
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
    classes[foreground] = BORDER
    interior = foreground & ~border
    if core > 0:
        interior &= _cores(labels, core)
    classes[interior] = INTERIOR
    return classes


def _cores(labels: np.ndarray, core: float) -> np.ndarray:
    """Voxels deeper than ``max(1, min(core * largest depth, CORE_DEPTH_MAX))`` inside their object.

    One distance transform per object, over its bounding box grown by one voxel; at the
    image edge the object is mirrored over its own extent instead (the engine's mirror
    padding), so an object cut by the edge keeps its core at the edge.
    """
    out = np.zeros(labels.shape, dtype=bool)
    ids = np.unique(labels[labels != 0])
    labels = np.where(labels != 0, np.searchsorted(ids, labels) + 1, 0)  # ids 1..n: any ids (2**40, sparse) allowed
    for value, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found, labels.shape))
        obj = labels[box] == value
        pad = [(b.stop - b.start if b.start == 0 else 0, b.stop - b.start if b.stop == n else 0) for b, n in zip(box, labels.shape)]
        depth = ndimage.distance_transform_edt(np.pad(obj, pad, mode="symmetric"))
        depth = depth[tuple(slice(lo, lo + (b.stop - b.start)) for (lo, _), b in zip(pad, box))]
        cut = max(1.0, min(core * float(depth[obj].max()), CORE_DEPTH_MAX))
        out[box] |= obj & (depth > cut)
    return out


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
