"""Losses of the U-Net paper: the border weight map and weighted cross entropy.

:func:`weight_map` is numpy / scipy (computed once per training patch, on CPU);
:func:`weighted_cross_entropy` and :func:`soft_dice_loss` are torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unetflow.errors import ConfigError, ShapeError

NEGLIGIBLE = 1e-3  # border terms below NEGLIGIBLE * w0 are dropped


def class_balance_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights, normalised so the voxel mean of the weights is 1.

    With ``f_k`` the fraction of voxels of class k and ``K`` the number of classes
    present, ``w_k = 1 / (K * f_k)``; then ``sum_k f_k * w_k = 1`` and every class
    present contributes the same total weight. Absent classes get weight 0.

    Parameters
    ----------
    targets : ndarray of any shape, integer in [0, n_classes)
    n_classes : int

    Returns
    -------
    ndarray of shape (n_classes,), float32

    Examples
    --------
    >>> class_balance_weights(np.array([0, 0, 0, 1]), 2)
    array([0.6666667, 2.       ], dtype=float32)
    """
    counts = np.bincount(np.asarray(targets).ravel(), minlength=n_classes)[:n_classes].astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def weight_map(
    instance_labels: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    separators: np.ndarray | None = None,
) -> np.ndarray:
    """The paper's eq. 2: ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``.

    ``d1`` and ``d2`` are the Euclidean distances (in voxels, between voxel centres)
    from ``x`` to the nearest voxel of the nearest and of the second-nearest object.
    The border term is added on the *separating* voxels only, by default the
    background (as in the paper): it makes the thin gaps between close objects
    expensive to get wrong. Where objects touch with no background between them, the
    separating voxels are the border class at the contact (``d1 = 0``, ``d2`` about 1),
    so the instance targets pass ``separators = classes != interior`` (see
    :func:`unetflow.train.data.make_targets`); on an object's outer border far from
    any other object the term vanishes (``d2`` large).

    ``w_c`` balances class frequencies: ``class_weights[targets]``, where ``targets``
    defaults to ``instance_labels > 0`` (background / foreground) and
    ``class_weights`` defaults to :func:`class_balance_weights` of ``targets`` (mean
    weight 1 over the voxels, equal total weight per class).

    Cost: one distance transform per object, over the object's bounding box grown by
    ``reach = sigma * sqrt(2 ln(1 / NEGLIGIBLE))`` (about 3.7 sigma) and clipped to
    the image; voxels farther than ``reach`` from an object count as infinitely far
    from it, which drops only terms below ``NEGLIGIBLE * w0``. Fine for training
    patches; not meant for whole volumes.

    Parameters
    ----------
    instance_labels : ndarray of shape (Y, X) or (Z, Y, X), integer
        0 background, other values objects.
    w0, sigma : float
        Border weight and its width in voxels (paper: 10 and 5).
    class_weights : ndarray of shape (K,), optional
        Weight per class of ``targets``.
    targets : ndarray of the shape of ``instance_labels``, integer in [0, K), optional
        Class map ``w_c`` is looked up in.
    separators : ndarray of the shape of ``instance_labels``, bool, optional
        Voxels that get the border term; default ``instance_labels == 0``.

    Returns
    -------
    ndarray of the shape of ``instance_labels``, float32

    Raises
    ------
    ShapeError
        If ``instance_labels`` is not 2-D or 3-D integers, or ``targets`` or
        ``separators`` does not have its shape.
    ConfigError
        If ``sigma <= 0`` or ``w0 < 0``.
    """
    if instance_labels.ndim not in (2, 3) or instance_labels.dtype.kind not in "iu":
        raise ShapeError(f"labels of shape {instance_labels.shape} and dtype {instance_labels.dtype} must be 2-D or 3-D integers; pass instance labels")
    if sigma <= 0 or w0 < 0:
        raise ConfigError(f"weight map sigma {sigma} and w0 {w0} must be > 0 and >= 0; pass e.g. sigma 5, w0 10")
    targets = (instance_labels > 0).astype(np.uint8) if targets is None else np.asarray(targets)
    if targets.shape != instance_labels.shape:
        raise ShapeError(f"targets of shape {targets.shape} do not match labels of shape {instance_labels.shape}; pass the class map of these labels")
    separators = instance_labels == 0 if separators is None else np.asarray(separators, dtype=bool)
    if separators.shape != instance_labels.shape:
        raise ShapeError(f"separators of shape {separators.shape} do not match labels of shape {instance_labels.shape}; pass one flag per voxel")
    if class_weights is None:
        class_weights = class_balance_weights(targets, int(targets.max()) + 1)
    weights = np.asarray(class_weights, dtype=np.float32)[targets]
    if w0 > 0:
        d1, d2 = two_nearest_distances(instance_labels, reach=sigma * math.sqrt(2 * math.log(1 / NEGLIGIBLE)))
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
        weights += np.where(separators, border, 0.0).astype(np.float32)
    return weights


def two_nearest_distances(instance_labels: np.ndarray, *, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, each capped to inf beyond ``reach``.

    Parameters
    ----------
    instance_labels : ndarray of shape (Y, X) or (Z, Y, X), integer
    reach : float
        Distances larger than this are reported as ``inf``.

    Returns
    -------
    d1, d2 : ndarrays of the shape of ``instance_labels``, float32
        ``d1 <= d2``; 0 inside an object for its own distance.
    """
    _, dense = np.unique(instance_labels, return_inverse=True)
    dense = dense.reshape(instance_labels.shape) + (0 if instance_labels.min() == 0 else 1)
    d1 = np.full(instance_labels.shape, np.inf, dtype=np.float32)
    d2 = np.full(instance_labels.shape, np.inf, dtype=np.float32)
    grow = int(math.ceil(reach))
    for k, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is None:
            continue
        win = tuple(slice(max(s.start - grow, 0), min(s.stop + grow, n)) for s, n in zip(box, dense.shape))
        dist = ndimage.distance_transform_edt(dense[win] != k).astype(np.float32)
        dist[dist > reach] = np.inf
        d2[win] = np.minimum(d2[win], np.maximum(d1[win], dist))
        d1[win] = np.minimum(d1[win], dist)
    return d1, d2


def _check_batch(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ShapeError unless logits is (B, K, *S) and target is (B, *S)."""
    if logits.ndim < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ShapeError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not fit; pass (B, K, *S) and (B, *S)")


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted softmax cross entropy: ``mean(weight * CE)`` over all voxels.

    This is the paper's energy (eq. 1) divided by the number of voxels; with the
    default ``w_c`` (mean 1) its scale matches plain cross entropy.

    Parameters
    ----------
    logits : Tensor of shape (B, K, *S), float
    target : Tensor of shape (B, *S), long, values in [0, K)
    weight : Tensor of shape (B, *S), float
        From :func:`weight_map`.

    Returns
    -------
    Tensor of shape (), float
    """
    _check_batch(logits, target)
    if weight.shape != target.shape:
        raise ShapeError(f"weight {tuple(weight.shape)} does not match target {tuple(target.shape)}; pass one weight per voxel")
    ce = F.cross_entropy(logits, target, reduction="none")
    return (weight.to(ce.dtype) * ce).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_background: bool = True, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean_k dice_k`` of the softmax probabilities against one-hot targets.

    ``dice_k = (2 sum(p_k t_k) + smooth) / (sum(p_k) + sum(t_k) + smooth)``, summed over
    the batch and all voxels; the mean runs over classes 1..K-1 when
    ``ignore_background`` (class 0 is background), else over all K.

    Parameters
    ----------
    logits : Tensor of shape (B, K, *S), float
    target : Tensor of shape (B, *S), long, values in [0, K)
    ignore_background : bool
    smooth : float
        Added to numerator and denominator; keeps absent classes at dice 1.

    Returns
    -------
    Tensor of shape (), float
    """
    _check_batch(logits, target)
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    dice = (2 * (probs * onehot).sum(dims) + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    if ignore_background and logits.shape[1] > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()
