"""Segmentation quality: pure functions on label arrays of any shape.

Overlaps come from a sparse contingency table (``np.unique`` on paired labels), never
a dense N x M matrix, so millions of objects are fine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetflow.errors import ConfigError, ShapeError


def _check_pair(pred: np.ndarray, true: np.ndarray) -> None:
    """Raise ShapeError unless both arrays have the same shape."""
    if pred.shape != true.shape:
        raise ShapeError(f"prediction of shape {pred.shape} does not match ground truth of shape {true.shape}; pass arrays of one shape")


def contingency(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two label arrays of one shape.

    Returns
    -------
    pred_ids, true_ids, counts : ndarrays of shape (P,)
        Every label pair that occurs together and its voxel count; P pairs.

    Examples
    --------
    >>> contingency(np.array([1, 1, 2]), np.array([5, 5, 5]))
    (array([1, 2]), array([5, 5]), array([2, 1]))
    """
    _check_pair(pred, true)
    p_vals, p_idx = np.unique(pred, return_inverse=True)
    t_vals, t_idx = np.unique(true, return_inverse=True)
    pairs, counts = np.unique(p_idx.ravel().astype(np.int64) * len(t_vals) + t_idx.ravel(), return_counts=True)
    return p_vals[pairs // len(t_vals)], t_vals[pairs % len(t_vals)], counts


def foreground_iou(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Intersection over union of the foregrounds (label != 0); 1.0 if both are empty.

    Parameters
    ----------
    pred_labels, true_labels : ndarrays of one shape, integer

    Returns
    -------
    float
    """
    _check_pair(pred_labels, true_labels)
    pred, true = pred_labels != 0, true_labels != 0
    union = np.count_nonzero(pred | true)
    return 1.0 if union == 0 else float(np.count_nonzero(pred & true) / union)


IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95, as stardist and cellpose report


def object_ious(pred_instances: np.ndarray, true_instances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """IoU of every overlapping (predicted, true) object pair, from the sparse contingency table.

    Returns
    -------
    pred_ids, true_ids, iou : ndarrays of shape (P,)
        The P pairs of objects (0 is not an object) that share a voxel, and their IoU.
    n_pred, n_true : int
        Object counts.
    """
    p_ids, t_ids, inter = contingency(pred_instances, true_instances)
    p_vals, p_size = np.unique(pred_instances[pred_instances != 0], return_counts=True)
    t_vals, t_size = np.unique(true_instances[true_instances != 0], return_counts=True)
    both = (p_ids != 0) & (t_ids != 0)
    p_ids, t_ids, inter = p_ids[both], t_ids[both], inter[both]
    union = p_size[np.searchsorted(p_vals, p_ids)] + t_size[np.searchsorted(t_vals, t_ids)] - inter
    return p_ids, t_ids, inter / np.maximum(union, 1), len(p_vals), len(t_vals)


def match_objects(pred_instances: np.ndarray, true_instances: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Match predicted to true objects one-to-one by IoU > ``threshold``.

    For ``threshold >= 0.5`` an object can overlap at most one other by more than
    half, so the matching is unique and exact (the optimal assignment that stardist
    and cellpose compute gives the same pairs). Below 0.5 pairs are matched greedily
    by decreasing IoU, which is one-to-one but not guaranteed optimal. A pair matches
    when its IoU is strictly above the threshold (stardist and cellpose use ``>=``:
    the two differ only for an IoU exactly equal to the threshold).

    Parameters
    ----------
    pred_instances, true_instances : ndarrays of one shape, integer
        0 background, other values objects.
    threshold : float
        in [0, 1).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (ints); ``precision`` = tp / (tp + fp), ``recall`` =
        tp / (tp + fn), ``f1`` = 2 tp / (2 tp + fp + fn), ``accuracy`` = tp / (tp + fp + fn)
        (stardist's "accuracy", the "average precision" of the DSB 2018 and cellpose
        papers at one threshold), all 1.0 when there is nothing to find and nothing was
        found; ``mean_matched_iou``: the mean IoU of the matched pairs (0.0 without any).
    """
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"IoU threshold {threshold} must be in [0, 1); pass e.g. 0.5")
    p_ids, t_ids, iou, n_pred, n_true = object_ious(pred_instances, true_instances)
    return _scores(_matched(p_ids, t_ids, iou, threshold), n_pred, n_true)


def matching_curve(pred_instances: np.ndarray, true_instances: np.ndarray, *,
                   thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> list[dict[str, float]]:
    """:func:`match_objects` at every IoU threshold (default 0.5:0.05:0.95), one overlap table.

    Returns
    -------
    list of dict
        One per threshold: ``threshold`` and the keys of :func:`match_objects`.
    """
    for t in thresholds:
        if not 0.0 <= t < 1.0:
            raise ConfigError(f"IoU threshold {t} must be in [0, 1); pass e.g. 0.5")
    p_ids, t_ids, iou, n_pred, n_true = object_ious(pred_instances, true_instances)
    return [{"threshold": float(t), **_scores(_matched(p_ids, t_ids, iou, t), n_pred, n_true)} for t in thresholds]


def average_precision(curve: list[dict[str, float]]) -> float:
    """The mean of ``accuracy`` = tp / (tp + fp + fn) over a :func:`matching_curve`.

    Over 0.5:0.05:0.95 this is the DSB 2018 score, cellpose's "average precision" and
    the mean of stardist's ``accuracy`` over those thresholds; not the area under a
    precision-recall curve (there is no score to rank objects by).

    >>> average_precision([{"accuracy": 1.0}, {"accuracy": 0.5}])
    0.75
    """
    return float(np.mean([c["accuracy"] for c in curve])) if curve else 0.0


def _matched(p_ids: np.ndarray, t_ids: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of the one-to-one matches with IoU > threshold, greedy by decreasing IoU."""
    order = np.argsort(-iou, kind="stable")
    used_p: set[int] = set()
    used_t: set[int] = set()
    kept = []
    for i in order[iou[order] > threshold]:
        if p_ids[i] not in used_p and t_ids[i] not in used_t:
            used_p.add(p_ids[i])
            used_t.add(t_ids[i])
            kept.append(iou[i])
    return np.array(kept, dtype=np.float64)


def _scores(matched: np.ndarray, n_pred: int, n_true: int) -> dict[str, float]:
    """tp, fp, fn, precision, recall, f1, accuracy and the mean matched IoU."""
    tp = len(matched)
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    accuracy = tp / (tp + fp + fn) if (tp + fp + fn) else 1.0
    mean_iou = float(matched.mean()) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy,
            "mean_matched_iou": mean_iou}


def rand_error(pred: np.ndarray, true: np.ndarray, *, foreground_only: bool = True) -> float:
    """``1 - Rand index`` over unordered voxel pairs, from the contingency table.

    ``RI = (C(n, 2) + 2 sum_ij C(n_ij, 2) - sum_i C(a_i, 2) - sum_j C(b_j, 2)) / C(n, 2)``
    with ``n_ij`` the contingency counts and ``a_i``, ``b_j`` its marginals. With
    ``foreground_only`` (default, as in the ISBI 2012 challenge) only voxels where
    ``true != 0`` are counted; predicted background inside them counts as one
    more segment (label 0). 0.0 is perfect; fewer than 2 voxels give 0.0.

    Parameters
    ----------
    pred, true : ndarrays of one shape, integer

    Returns
    -------
    float in [0, 1]
    """
    _check_pair(pred, true)
    if foreground_only:
        keep = true != 0
        pred, true = pred[keep], true[keep]
    _, _, n_ij = contingency(pred.ravel(), true.ravel())
    n = int(pred.size)
    if n < 2:
        return 0.0
    a = np.unique(pred, return_counts=True)[1]
    b = np.unique(true, return_counts=True)[1]
    total = n * (n - 1) / 2
    agree = total + 2 * _pairs(n_ij) - _pairs(a) - _pairs(b)
    return float(1.0 - agree / total)


def _pairs(counts: np.ndarray) -> float:
    """Sum over ``counts`` of C(count, 2), in float64 (no overflow)."""
    c = np.asarray(counts, dtype=np.float64)
    return float((c * (c - 1) / 2).sum())


def evaluate(pred_instances: np.ndarray, true_instances: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """All scores of this module for one prediction.

    Returns
    -------
    dict
        ``foreground_iou``, ``rand_error`` (foreground-restricted), the keys of
        :func:`match_objects` at *threshold*, ``ap`` (:func:`average_precision` over
        0.5:0.05:0.95), and ``n_pred``, ``n_true`` (object counts).
    """
    return evaluate_report(pred_instances, true_instances, threshold=threshold)["scores"]


def evaluate_report(pred_instances: np.ndarray, true_instances: np.ndarray, *, threshold: float = 0.5) -> dict[str, Any]:
    """:func:`evaluate`'s scores and the per-threshold table, from one overlap table.

    Returns
    -------
    dict
        ``scores``: as :func:`evaluate`; ``per_threshold``: :func:`matching_curve`
        over 0.5:0.05:0.95.
    """
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"IoU threshold {threshold} must be in [0, 1); pass e.g. 0.5")
    p_ids, t_ids, iou, n_pred, n_true = object_ious(pred_instances, true_instances)
    curve = [{"threshold": float(t), **_scores(_matched(p_ids, t_ids, iou, t), n_pred, n_true)} for t in IOU_THRESHOLDS]
    scores: dict[str, Any] = {
        "foreground_iou": foreground_iou(pred_instances, true_instances),
        "rand_error": rand_error(pred_instances, true_instances),
        **_scores(_matched(p_ids, t_ids, iou, threshold), n_pred, n_true),
        "ap": average_precision(curve),
        "n_pred": n_pred,
        "n_true": n_true,
    }
    return {"scores": scores, "per_threshold": curve}


def format_report(report: dict[str, Any]) -> str:
    """A readable table of :func:`evaluate_report`: the scores, then one row per IoU threshold."""
    lines = [f"{k:18s} {v:.4f}" if isinstance(v, float) else f"{k:18s} {v}" for k, v in report["scores"].items()]
    lines += ["", f"{'IoU >':>6s} {'tp':>6s} {'fp':>6s} {'fn':>6s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'accuracy':>8s} {'mean IoU':>8s}"]
    for r in report["per_threshold"]:
        lines.append(f"{r['threshold']:6.2f} {r['tp']:6d} {r['fp']:6d} {r['fn']:6d} {r['precision']:9.4f} {r['recall']:7.4f} "
                     f"{r['f1']:6.4f} {r['accuracy']:8.4f} {r['mean_matched_iou']:8.4f}")
    return "\n".join(lines)


def evaluate_arrays(prediction: str, truth: str) -> dict[str, Any]:
    """Score stored arrays: *prediction* (instances, a class map or probabilities) against *truth*.

    A float prediction with one axis more than the truth is probabilities (C, ...) and
    is turned into its argmax; 3-class probabilities (background / interior / border)
    into instances by the rule of ``--output instances``
    (:func:`unetflow.label.instance_classes`, then :func:`unetflow.label.label_whole`).
    The shapes are compared before either array is read.

    Returns
    -------
    dict
        :func:`evaluate_report` of the two.
    """
    from unetflow import formats
    from unetflow.label import instance_classes, label_whole

    pred_array, true_array = formats.open_input(prediction), formats.open_input(truth)
    p_shape, t_shape = tuple(pred_array.shape), tuple(true_array.shape)
    spatial = p_shape[1:] if len(p_shape) == len(t_shape) + 1 else p_shape
    if spatial != t_shape:
        what = f"probabilities of spatial shape {spatial}" if spatial != p_shape else "labels"
        raise ShapeError(f"prediction {prediction} has shape {p_shape} ({what}) but truth {truth} has shape {t_shape}; "
                         "score a prediction of the truth's image (same shape, or a leading class axis)")
    pred = np.asarray(pred_array[...])
    true = np.asarray(true_array[...])
    if pred.ndim == true.ndim + 1:
        probs, pred = pred, pred.argmax(axis=0)
        if len(probs) == 3:  # uint8 probabilities are stored as p * 255
            pred = label_whole(instance_classes(probs / 255.0 if probs.dtype == np.uint8 else probs))
        elif pred.max(initial=0) <= 2:
            pred = label_whole(pred)
    return evaluate_report(pred.astype(np.int64), true.astype(np.int64))
