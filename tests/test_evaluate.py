"""Scores on hand-made cases, and instances recovered from class maps."""

from __future__ import annotations

import numpy as np
import pytest

from unetflow.errors import ConfigError, ShapeError
from unetflow.evaluate import (
    average_precision, contingency, evaluate, evaluate_report, foreground_iou, format_report, match_objects, matching_curve, rand_error,
)
from unetflow.label import label_whole as label_instances_from_classes
from unetflow.sample import make_sample
from unetflow.train.targets import instance_to_classes


def squares(n, size=4, gap=1):
    """A (size+2) x n*(size+gap) image with n separate squares labelled 1..n."""
    labels = np.zeros((size + 2, n * (size + gap) + gap), dtype=np.uint32)
    for k in range(n):
        x = gap + k * (size + gap)
        labels[1 : size + 1, x : x + size] = k + 1
    return labels


# ---------------------------------------------------------------- object matching


def test_perfect_prediction_scores_perfectly_with_other_ids():
    true = squares(5)
    pred = np.where(true > 0, true + 100, 0).astype(np.uint32)
    scores = evaluate(pred, true)
    assert scores["f1"] == scores["precision"] == scores["recall"] == 1.0
    assert (scores["tp"], scores["fp"], scores["fn"]) == (5, 0, 0)
    assert scores["rand_error"] == 0.0 and scores["foreground_iou"] == 1.0


def test_one_missed_object_costs_recall_only():
    true = squares(5)
    pred = np.where(true == 3, 0, true)
    scores = match_objects(pred, true)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (4, 0, 1)
    assert scores["recall"] == pytest.approx(4 / 5)
    assert scores["precision"] == 1.0
    assert scores["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1))


@pytest.mark.parametrize(
    "cut, expected",
    [
        (2, (0, 2, 1)),  # halves: IoU exactly 0.5 is not > 0.5, nothing matches
        (3, (1, 1, 0)),  # 3/4 of the object matches, the sliver is a false positive
    ],
)
def test_split_object(cut, expected):
    true = np.zeros((4, 4), dtype=np.uint32)
    true[:, :] = 1
    pred = np.ones((4, 4), dtype=np.uint32)
    pred[:, cut:] = 2
    scores = match_objects(pred, true)
    assert (scores["tp"], scores["fp"], scores["fn"]) == expected


def test_merged_objects_count_one_fp_and_two_fn():
    true = squares(2)
    pred = (true > 0).astype(np.uint32)
    pred[1:5, 5] = 1  # fill the gap: one object over both
    scores = match_objects(pred, true)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 1, 2)


def test_empty_cases():
    empty = np.zeros((3, 3), dtype=np.uint32)
    assert match_objects(empty, empty)["f1"] == 1.0
    one = empty.copy()
    one[1, 1] = 1
    assert match_objects(empty, one)["recall"] == 0.0
    assert match_objects(one, empty)["precision"] == 0.0
    assert foreground_iou(empty, empty) == 1.0


def test_low_threshold_is_still_one_to_one():
    true = np.array([[1, 1, 1, 1, 1, 1]], dtype=np.uint32)
    pred = np.array([[1, 1, 1, 2, 2, 2]], dtype=np.uint32)
    scores = match_objects(pred, true, threshold=0.3)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 0)


def test_bad_inputs_raise():
    with pytest.raises(ShapeError):
        evaluate(np.zeros((3, 3), dtype=np.uint32), np.zeros((3, 4), dtype=np.uint32))
    with pytest.raises(ConfigError):
        match_objects(np.zeros(3, dtype=np.uint32), np.zeros(3, dtype=np.uint32), threshold=1.0)


# ---------------------------------------------------------------- pixel scores


def test_foreground_iou_hand_case():
    true = np.array([1, 1, 1, 0, 0])
    pred = np.array([0, 2, 2, 2, 0])
    assert foreground_iou(pred, true) == pytest.approx(2 / 4)


def test_contingency_is_sparse_pairs():
    p, t, n = contingency(np.array([[0, 1], [1, 7]]), np.array([[0, 3], [3, 3]]))
    assert sorted(zip(p.tolist(), t.tolist(), n.tolist())) == [(0, 0, 1), (1, 3, 2), (7, 3, 1)]


def test_rand_error_hand_cases():
    true = np.array([5, 5, 5, 5])
    assert rand_error(true, true) == 0.0
    # a 2 + 2 split: of the 6 pairs, only the 2 inside each half agree
    assert rand_error(np.array([1, 1, 2, 2]), true) == pytest.approx(4 / 6)
    # background of the truth is ignored by default, not with foreground_only=False
    true_bg = np.array([0, 0, 5, 5])
    pred_bg = np.array([1, 1, 5, 5])
    assert rand_error(pred_bg, true_bg) == 0.0
    assert rand_error(pred_bg, true_bg, foreground_only=False) == 0.0  # same partition
    assert rand_error(np.array([5, 1, 5, 5]), true_bg, foreground_only=False) > 0.0


def test_rand_error_on_a_split_sample_object():
    _, true = make_sample((48, 48), seed=0)
    pred = true.copy()
    k = int(true.max())
    ys, xs = np.nonzero(true == 1)
    pred[ys[xs > np.median(xs)], xs[xs > np.median(xs)]] = k + 1
    assert rand_error(true, true) == 0.0
    assert rand_error(pred, true) > 0.0


# ---------------------------------------------------------------- instances from classes


def test_two_touching_objects_separated_by_a_border_are_recovered():
    labels = np.zeros((6, 12), dtype=np.uint32)
    labels[1:5, 1:6] = 1
    labels[1:5, 6:11] = 2  # touching along x = 5 | 6
    recovered = label_instances_from_classes(instance_to_classes(labels))
    np.testing.assert_array_equal(recovered, labels)


def test_instances_round_trip_on_a_crowded_3d_sample():
    _, labels = make_sample((16, 48, 48), seed=7)
    recovered = label_instances_from_classes(instance_to_classes(labels))
    scores = evaluate(recovered, labels)
    assert scores["f1"] > 0.95 and scores["foreground_iou"] == 1.0


def test_seedless_border_is_dropped_and_background_separates():
    class_map = np.array([[1, 1, 2, 0, 2, 2, 0, 2, 1]], dtype=np.uint8)
    recovered = label_instances_from_classes(class_map)
    # seeds 1 (x=0..1) and 2 (x=8) grow over their borders; the border pair at x=4..5
    # has no seed: the blockwise-exact rule (unetflow.label) leaves it background
    np.testing.assert_array_equal(recovered, [[1, 1, 1, 0, 0, 0, 0, 2, 2]])
    assert recovered.dtype == np.uint64


def test_no_seeds_at_all():
    assert label_instances_from_classes(np.zeros((3, 3), dtype=np.uint8)).max() == 0
    assert label_instances_from_classes(np.full((2, 2), 2)).max() == 0


# ---------------------------------------------------------------- IoU thresholds, AP, matched IoU (issue 16)


def shifted_squares():
    """Five 10x10 true squares; predictions shifted by 0, 1, 2, 3 px along x (IoU (10-k)/(10+k)),
    the fifth true square missed, and one predicted square where nothing is."""
    true = np.zeros((12, 100), dtype=np.uint32)
    pred = np.zeros_like(true)
    for k in range(5):
        true[1:11, 5 + 18 * k : 15 + 18 * k] = k + 1
    for k in range(4):
        pred[1:11, 5 + 18 * k + k : 15 + 18 * k + k] = 10 + k
    pred[0:4, 95:99] = 99  # the false positive
    return pred, true


def test_per_threshold_counts_are_exact():
    pred, true = shifted_squares()
    ious = [1.0, 9 / 11, 8 / 12, 7 / 13]
    curve = matching_curve(pred, true)
    assert [c["threshold"] for c in curve] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    for c in curve:
        tp = sum(i > c["threshold"] for i in ious)
        assert (c["tp"], c["fp"], c["fn"]) == (tp, 5 - tp, 5 - tp)
        assert c["precision"] == pytest.approx(tp / 5) and c["recall"] == pytest.approx(tp / 5)
        assert c["f1"] == pytest.approx(2 * tp / 10)
        assert c["accuracy"] == pytest.approx(tp / (10 - tp))
        assert c["mean_matched_iou"] == pytest.approx(np.mean([i for i in ious if i > c["threshold"]]))
    tps = [4, 3, 3, 3, 2, 2, 2, 1, 1, 1]
    assert [c["tp"] for c in curve] == tps
    assert average_precision(curve) == pytest.approx(np.mean([t / (10 - t) for t in tps]))


def test_evaluate_reports_ap_and_matched_iou():
    pred, true = shifted_squares()
    report = evaluate_report(pred, true)
    s = report["scores"]
    assert (s["tp"], s["fp"], s["fn"], s["n_pred"], s["n_true"]) == (4, 1, 1, 5, 5)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["mean_matched_iou"] == pytest.approx(np.mean([1.0, 9 / 11, 8 / 12, 7 / 13]))
    assert s["ap"] == pytest.approx(average_precision(report["per_threshold"]))
    assert evaluate(pred, true) == s
    table = format_report(report)
    assert "0.95" in table and "accuracy" in table and table.count("\n") > 10


def test_perfect_and_empty_curves():
    true = squares(3)
    assert all(c["accuracy"] == 1.0 and c["mean_matched_iou"] == 1.0 for c in matching_curve(true * 7, true))
    empty = np.zeros_like(true)
    assert average_precision(matching_curve(empty, empty)) == 1.0
    miss = matching_curve(empty, true)
    assert all((c["tp"], c["fn"], c["accuracy"], c["mean_matched_iou"]) == (0, 3, 0.0, 0.0) for c in miss)


def test_cli_evaluate_table_json_and_shapes(tmp_path):
    import json

    from click.testing import CliRunner

    from conftest import write_zarr
    from unetflow.cli import main

    pred, true = shifted_squares()
    p, t = write_zarr(tmp_path / "p.zarr", pred), write_zarr(tmp_path / "t.zarr", true)
    out = CliRunner().invoke(main, ["evaluate", p, t, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["scores"]["tp"] == 4 and len(report["per_threshold"]) == 10 and report["per_threshold"][-1]["tp"] == 1
    text = CliRunner().invoke(main, ["evaluate", p, t])
    assert text.exit_code == 0 and "mean_matched_iou" in text.output and " 0.75 " in text.output
    other = write_zarr(tmp_path / "o.zarr", true[:, :90])
    bad = CliRunner().invoke(main, ["evaluate", p, other])
    assert bad.exit_code == 1 and "(12, 100)" in bad.output and "(12, 90)" in bad.output
