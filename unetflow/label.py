"""Instance labels from background / interior / border class maps, blockwise and exact.

The rule (the same in memory and blockwise, so the two agree up to renumbering):

0. from the model's probabilities, voxel by voxel (:func:`instance_classes`): the
   argmax class, except that an ``interior`` voxel whose interior probability is
   below ``INTERIOR_THRESHOLD`` counts as ``border``: only confident interior seeds
   objects, so a faint interior bridge across the contact of two touching objects
   does not merge them;
1. objects are the face-connected components of the ``interior`` class (a model
   trained by ``unetflow train`` on instance labels predicts each object's core as
   interior: :func:`unetflow.train.targets.instance_to_classes`);
2. each object then grows ``GROW_STEPS`` steps into the other foreground voxels
   (``border``): a voxel takes the label of its first labelled face neighbour in a
   fixed order (-z, +z, -y, +y, -x, +x), so ties are broken by geometry, not by ids.

Blockwise (``unetflow segment --output instances``; the phases are run, resumably, by
:mod:`unetflow.instances`):

- phase 1 (in each block): components of the block's interior, numbered 1..n locally,
  border voxels marked with :data:`BORDER`, written to a scratch array;
- phase 2 (driver): global id = prefix sum of the block counts + local id (64-bit, no
  cap on blocks or objects per block);
- phase 3 (per block): pairs of ids that touch across the block's upper faces;
  merged on the driver with a union-find (connected components of the pair graph);
- phase 4 (per block): read the write box plus a halo of ``GROW_STEPS`` from the
  scratch, map local ids to their merged, consecutive ids, grow, write the output.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from unetflow.errors import ConfigError
from unetflow.geometry import Box

BACKGROUND, INTERIOR, BORDER_CLASS = 0, 1, 2
INSTANCE_CLASSES = ("background", "interior", "border")  # the class names of a model trained on instance labels
BORDER = np.uint64(np.iinfo(np.uint64).max)  # scratch marker: a border voxel, not yet labelled
GROW_STEPS = 9  # face steps; reaches over a border of CORE_DEPTH_MAX = 5 voxels (5 * sqrt(3) < 9)
INTERIOR_THRESHOLD = 0.6
ArrayT = TypeVar("ArrayT")  # a numpy array or a torch tensor (torch stays out of this room)


def check_instance_model(model: str, classes: int, class_names: tuple[str, ...] | None) -> None:
    """Refuse ``--output instances`` with a model whose classes are not background / interior / border.

    *class_names* is None for a network without a spec (a test oracle): then 3 classes pass.

    Raises
    ------
    ConfigError
        Naming the model's classes and how to train an instance model.
    """
    ok = classes == 3 if class_names is None else tuple(class_names) == INSTANCE_CLASSES
    if ok:
        return
    names = ", ".join(class_names) if class_names else "unnamed"
    raise ConfigError(
        f"--output instances needs a model with the classes {', '.join(INSTANCE_CLASSES)}, but model {model} has {classes} "
        f"classes ({names}); train one on instance labels with `unetflow train RAW LABELS MODEL --targets instances`, "
        "or use --output labels or probabilities"
    )


def instance_classes(probabilities: ArrayT, interior_threshold: float = INTERIOR_THRESHOLD) -> ArrayT:
    """Step 0, pointwise: (3, ...) class probabilities -> class map (uint8) for instances.

    The argmax, with ``interior`` voxels below *interior_threshold* demoted to
    ``border`` (still foreground: they are grown into, not seeded from). A threshold
    of 0 (or anything up to 1/3) is the plain argmax. One-hot input gives its classes back.
    Works on numpy arrays (uint8 out) and on torch tensors (the engine, on the device).

    >>> instance_classes(np.array([[0.1, 0.1, 0.8], [0.55, 0.8, 0.1], [0.35, 0.1, 0.1]])).tolist()
    [2, 1, 0]
    """
    values: Any = probabilities  # numpy and torch share the operations used here
    classes = values.argmax(0)
    classes[(classes == INTERIOR) & (values[INTERIOR] < interior_threshold)] = BORDER_CLASS
    # a numpy array here; the block engine passes a torch tensor on its device and casts it itself
    result: Any = classes.astype(np.uint8) if isinstance(classes, np.ndarray) else classes
    return result


def local_components(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """Phase 1: interior components numbered 1..n, border voxels = BORDER, background 0 (uint64)."""
    from scipy import ndimage  # here, not at the top: scipy costs every worker ~0.3 s of start-up

    labels, n = ndimage.label(classes == INTERIOR)
    out = labels.astype(np.uint64)
    out[classes == BORDER_CLASS] = BORDER
    return out, int(n)


def grow(labels: np.ndarray, foreground: np.ndarray, steps: int = GROW_STEPS) -> np.ndarray:
    """Grow labelled voxels *steps* face-neighbour steps into unlabelled *foreground* voxels.

    Each step, every unlabelled foreground voxel takes the label of its first labelled
    face neighbour (as of the step before) in the order -z, +z, -y, +y, -x, +x. The work
    of a step is proportional to the voxels still to label, not to the array: they are
    kept as flat indices into a copy padded with one voxel of zeros, so every neighbour
    is one index offset away.

    >>> grow(np.array([0, 5, 0, 0, 0]), np.array([1, 1, 1, 1, 0], bool), 2).tolist()
    [5, 5, 5, 5, 0]
    """
    padded = np.pad(labels, 1)
    flat = padded.reshape(-1)
    offsets = [sign * stride // padded.itemsize for stride in padded.strides for sign in (-1, 1)]  # -z, +z, -y, +y, -x, +x
    todo = np.flatnonzero(np.pad((labels == 0) & foreground, 1))
    for _ in range(steps):
        taken = np.zeros(len(todo), dtype=flat.dtype)
        for offset in offsets:
            open_ = taken == 0
            taken[open_] = flat[todo[open_] + offset]
        done = taken != 0
        if not done.any():  # nothing left to label, or nothing that can be reached
            break
        flat[todo[done]] = taken[done]  # after all neighbours are read: each step sees the one before
        todo = todo[~done]
    return padded[(slice(1, -1),) * labels.ndim].copy()


def label_whole(classes: np.ndarray) -> np.ndarray:
    """The reference: the rule applied to a whole in-memory class map (uint64 labels)."""
    from scipy import ndimage

    labels, _ = ndimage.label(classes == INTERIOR)
    return grow(labels.astype(np.uint64), classes != BACKGROUND)


def face_pairs(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Phase 3: (n, 2) global id pairs of interior voxels facing each other across a face."""
    both = (lower != 0) & (upper != 0)
    pairs = np.stack([lower[both], upper[both]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def merge_table(total: int, pairs: np.ndarray) -> np.ndarray:
    """Phase 3 on the driver: map global ids 0..total to consecutive merged ids (0 stays 0).

    Components are numbered in the order of their smallest global id.

    >>> merge_table(4, np.array([[2, 4]])).tolist()
    [0, 1, 2, 3, 2]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = total + 1
    if len(pairs):
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    else:
        graph = coo_matrix((n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    order = np.argsort(first)  # components by smallest member; id 0's component comes first
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[comp].astype(np.uint64)


def to_global(local: np.ndarray, offset: int) -> np.ndarray:
    """Local ids -> global ids (BORDER and 0 kept)."""
    out = local.copy()
    inside = (local != 0) & (local != BORDER)
    out[inside] += np.uint64(offset)
    return out


def relabel_and_grow(scratch: np.ndarray, table: np.ndarray, halo_box: Box, write_box: Box) -> np.ndarray:
    """Phase 4: *scratch* holds global ids over *halo_box*; return final labels over *write_box*."""
    foreground = scratch != 0
    ids = np.where(scratch == BORDER, np.uint64(0), scratch)
    merged = table[ids.astype(np.int64)]
    grown = grow(merged, foreground)
    return grown[write_box.relative_to(halo_box).to_slices()]
