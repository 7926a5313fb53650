"""Segmentation quality: pure functions on label arrays of any shape.

Overlaps come from a sparse contingency table (``np.unique`` on paired labels), never
a dense N x M matrix, so millions of objects are fine.
"""

from __future__ import annotations

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


def match_objects(pred_instances: np.ndarray, true_instances: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Match predicted to true objects one-to-one by IoU > ``threshold``.

    For ``threshold >= 0.5`` an object can overlap at most one other by more than
    half, so the matching is unique and exact. Below 0.5 pairs are matched greedily
    by decreasing IoU, which is one-to-one but not guaranteed optimal.

    Parameters
    ----------
    pred_instances, true_instances : ndarrays of one shape, integer
        0 background, other values objects.
    threshold : float
        in [0, 1).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (ints) and ``precision``, ``recall``, ``f1`` (floats;
        1.0 when there is nothing to find and nothing was found).
    """
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"IoU threshold {threshold} must be in [0, 1); pass e.g. 0.5")
    p_ids, t_ids, inter = contingency(pred_instances, true_instances)
    p_size = dict(zip(*np.unique(pred_instances[pred_instances != 0], return_counts=True)))
    t_size = dict(zip(*np.unique(true_instances[true_instances != 0], return_counts=True)))
    both = (p_ids != 0) & (t_ids != 0)
    p_ids, t_ids, inter = p_ids[both], t_ids[both], inter[both]
    union = np.array([p_size[p] + t_size[t] for p, t in zip(p_ids, t_ids)], dtype=np.int64) - inter
    iou = inter / np.maximum(union, 1)
    tp = _count_matches(p_ids, t_ids, iou, threshold)
    return _scores(tp, len(p_size), len(t_size))


def _count_matches(p_ids: np.ndarray, t_ids: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Number of one-to-one matches with IoU > threshold, greedy by decreasing IoU."""
    order = np.argsort(-iou, kind="stable")
    used_p: set[int] = set()
    used_t: set[int] = set()
    for i in order[iou[order] > threshold]:
        if p_ids[i] not in used_p and t_ids[i] not in used_t:
            used_p.add(p_ids[i])
            used_t.add(t_ids[i])
    return len(used_p)


def _scores(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    """tp, fp, fn, precision, recall and f1 from the match count and object counts."""
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


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
        :func:`match_objects`, and ``n_pred``, ``n_true`` (object counts).
    """
    scores: dict[str, float] = {
        "foreground_iou": foreground_iou(pred_instances, true_instances),
        "rand_error": rand_error(pred_instances, true_instances),
    }
    scores.update(match_objects(pred_instances, true_instances, threshold=threshold))
    scores["n_pred"] = scores["tp"] + scores["fp"]
    scores["n_true"] = scores["tp"] + scores["fn"]
    return scores


def evaluate_arrays(prediction: str, truth: str) -> dict[str, float]:
    """Score stored arrays: *prediction* (instances, a class map or probabilities) against *truth*.

    A float prediction with one axis more than the truth is probabilities (C, ...) and
    is turned into its argmax; 3-class probabilities (background / interior / border)
    into instances by the rule of ``--output instances``
    (:func:`unetflow.label.instance_classes`, then :func:`unetflow.label.label_whole`).
    """
    from unetflow import formats
    from unetflow.label import instance_classes, label_whole

    pred = np.asarray(formats.open_input(prediction)[...])
    true = np.asarray(formats.open_input(truth)[...])
    if pred.ndim == true.ndim + 1:
        probs, pred = pred, pred.argmax(axis=0)
        if len(probs) == 3:  # uint8 probabilities are stored as p * 255
            pred = label_whole(instance_classes(probs / 255.0 if probs.dtype == np.uint8 else probs))
        elif pred.max(initial=0) <= 2:
            pred = label_whole(pred)
    _check_pair(pred, true)
    return evaluate(pred.astype(np.int64), true.astype(np.int64))
