"""From a predicted class map (background / interior / border) to instance labels.

No watershed: the interiors are the seeds, and each border voxel joins the seed
nearest to it (a Euclidean distance transform with ``return_indices``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unetflow.errors import ShapeError


def label_instances_from_classes(class_map: np.ndarray, *, interior: int = 1, border: int = 2, connectivity: int = 1) -> np.ndarray:
    """Instance labels from a class map: interior components grown over the border.

    1. Seeds: connected components of ``class_map == interior``.
    2. Foreground (interior or border) voxels take the id of the nearest seed voxel
       (straight-line distance), but only if that seed lies in the same connected
       component of the foreground; objects are never joined across background.
    3. Foreground components without any seed (all border) become objects of their own.

    Parameters
    ----------
    class_map : ndarray of shape (Y, X) or (Z, Y, X), integer
    interior, border : int
        Class values of object interior and object border; others are background.
    connectivity : int
        1 (faces) up to ndim (faces, edges and corners), as in
        ``scipy.ndimage.generate_binary_structure``.

    Returns
    -------
    ndarray of the shape of ``class_map``, uint32
        0 background, 1..N objects; seeded objects first, in scan order of their seeds.

    Raises
    ------
    ShapeError
        If ``class_map`` is not 2-D or 3-D.

    Examples
    --------
    >>> cm = np.array([[1, 1, 2, 2, 1, 1]])
    >>> label_instances_from_classes(cm)
    array([[1, 1, 1, 2, 2, 2]], dtype=uint32)
    """
    if class_map.ndim not in (2, 3):
        raise ShapeError(f"class map of shape {class_map.shape} must be 2-D or 3-D; pass (Y, X) or (Z, Y, X)")
    structure = ndimage.generate_binary_structure(class_map.ndim, connectivity)
    seeds, n_seeds = ndimage.label(class_map == interior, structure=structure)
    foreground = (class_map == interior) | (class_map == border)
    components, _ = ndimage.label(foreground, structure=structure)
    labels = np.zeros(class_map.shape, dtype=np.uint32)
    if n_seeds:
        nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
        same = foreground & (components[tuple(nearest)] == components)
        labels[same] = seeds[tuple(nearest)][same]
    orphans, _ = ndimage.label(foreground & (labels == 0), structure=structure)
    labels[orphans > 0] = orphans[orphans > 0].astype(np.uint32) + n_seeds
    return labels
