"""Sample generator, training targets, augmentation and losses, on tiny arrays."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unetflow.errors import ConfigError, ShapeError
from unetflow.sample import make_sample
from unetflow.train.augment import apply_field, elastic, elastic_field, intensity_jitter, random_flip_rot
from unetflow.train.data import PatchSpec, make_targets
from unetflow.train.losses import class_balance_weights, soft_dice_loss, weight_map, weighted_cross_entropy
from unetflow.label import GROW_STEPS, label_whole
from unetflow.train.targets import CORE_DEPTH_MAX, instance_to_classes, is_instance_labels


def touching_pairs(labels):
    """Set of (a, b) object pairs that share a face."""
    pairs = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)[:-1].ravel()
        b = np.moveaxis(labels, axis, 0)[1:].ravel()
        hit = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[hit].tolist(), b[hit].tolist())}
    return pairs


# ---------------------------------------------------------------- sample


@pytest.mark.parametrize("shape", [(96, 80), (24, 48, 40)])
def test_sample_is_realistic_and_deterministic(shape):
    image, labels = make_sample(shape, seed=3)
    again, labels_again = make_sample(shape, seed=3)
    assert image.dtype == np.uint16 and labels.dtype == np.uint32
    assert image.shape == labels.shape == shape
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, labels_again)
    n = int(labels.max())
    assert n > 5
    assert set(np.unique(labels)) == set(range(n + 1))  # consecutive ids
    assert len(touching_pairs(labels)) >= 2
    assert image[labels > 0].mean() > image[labels == 0].mean() + 50  # objects are bright


def test_sample_seed_changes_the_image_and_float_dtype_holds_counts():
    a, _ = make_sample((64, 64), seed=0)
    b, _ = make_sample((64, 64), seed=1)
    c, _ = make_sample((64, 64), seed=0, dtype="float32")
    assert not np.array_equal(a, b)
    assert c.dtype == np.float32
    np.testing.assert_array_equal(c, a.astype(np.float32))


def test_sample_is_fast():
    start = time.perf_counter()
    make_sample((64, 128, 128), seed=0)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"shape": (4, 64)}, ShapeError),  # axis too short
        ({"shape": (8, 8, 8, 8)}, ShapeError),  # 4-D
        ({"shape": (32, 32), "density": 0.0}, ConfigError),
        ({"shape": (32, 32), "touch": 1.5}, ConfigError),
        ({"shape": (32, 32), "dtype": "int8"}, ConfigError),
    ],
)
def test_sample_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        make_sample(**kwargs)


# ---------------------------------------------------------------- targets


def test_border_is_one_voxel_thick_around_a_square():
    labels = np.zeros((7, 7), dtype=np.uint32)
    labels[1:6, 1:6] = 4
    classes = instance_to_classes(labels)
    expected = np.zeros((7, 7), dtype=np.uint8)
    expected[1:6, 1:6] = 2
    expected[2:5, 2:5] = 1
    np.testing.assert_array_equal(classes, expected)


def test_touching_objects_get_a_border_on_each_side():
    labels = np.zeros((5, 8), dtype=np.uint32)
    labels[:, :4] = 1
    labels[:, 4:] = 2
    # no background at all; the image edge is not a border, the contact is
    np.testing.assert_array_equal(instance_to_classes(labels, touch_width=1, core=0)[2], [1, 1, 1, 2, 2, 1, 1, 1])
    # by default the contact border is 2 deep on each side
    np.testing.assert_array_equal(instance_to_classes(labels, core=0)[2], [1, 1, 2, 2, 2, 2, 1, 1])


def test_interior_is_the_core_of_each_object():
    labels = np.zeros((40, 40), dtype=np.uint32)
    yy, xx = np.mgrid[:40, :40]
    labels[(yy - 12) ** 2 + (xx - 12) ** 2 <= 8**2] = 1  # a disc of radius 8
    labels[(yy - 30) ** 2 + (xx - 30) ** 2 <= 3**2] = 2  # a small one
    classes = instance_to_classes(labels)
    for value, deepest in ((1, 65**0.5), (2, 10**0.5)):  # the depth of the disc's centre: to the nearest voxel outside
        depth = ndimage.distance_transform_edt(labels == value)
        assert depth.max() == pytest.approx(deepest, abs=0.01)
        np.testing.assert_array_equal(classes[labels == value] == 1, depth[labels == value] > deepest / 2)
    assert set(np.unique(classes[labels != 0])) == {1, 2} and (classes[labels == 0] == 0).all()


def test_core_depth_is_capped_so_the_rule_grows_back_over_it():
    yy, xx = np.mgrid[:50, :50]
    labels = np.zeros((3, 50, 50), dtype=np.uint32)
    labels[:, (yy - 25) ** 2 + (xx - 25) ** 2 <= 20**2] = 1  # a rod: depth 21 in y, x; z is cut by the image
    classes = instance_to_classes(labels)                       # edge on both sides (mirrored: no border there)
    np.testing.assert_array_equal(classes[1, 25, 5:12], [2, 2, 2, 2, 2, 1, 1])  # depth > CORE_DEPTH_MAX = 5
    assert GROW_STEPS >= CORE_DEPTH_MAX * np.sqrt(3)
    np.testing.assert_array_equal(label_whole(classes), labels)  # a round object grows back whole


def test_core_targets_do_not_depend_on_the_ids():
    _, labels = make_sample((40, 48), seed=2)
    sparse = np.where(labels != 0, labels.astype(np.uint64) * 2**40 + 7, 0).astype(np.uint64)
    np.testing.assert_array_equal(instance_to_classes(sparse), instance_to_classes(labels))


def test_an_object_cut_by_the_image_edge_keeps_its_core_at_the_edge():
    labels = np.zeros((20, 20), dtype=np.uint32)
    labels[0:6, 5:15] = 1  # cut by the top edge: mirrored, it is 12 deep and 10 wide
    classes = instance_to_classes(labels)
    np.testing.assert_array_equal(classes[0, 5:15], [2, 2, 1, 1, 1, 1, 1, 1, 2, 2])  # cut: all border


def test_targets_3d_cube():
    labels = np.zeros((5, 5, 5), dtype=np.uint16)
    labels[1:4, 1:4, 1:4] = 9
    classes = instance_to_classes(labels)
    assert classes[2, 2, 2] == 1
    assert np.count_nonzero(classes == 2) == 27 - 1
    assert classes.dtype == np.uint8


def test_targets_refuse_float_labels():
    with pytest.raises(ShapeError):
        instance_to_classes(np.zeros((4, 4), dtype=np.float32))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 1, 2], False),  # fits a 3-class map
        ([0, 1, 2, 3], True),  # value 3 cannot be a class
        ([0, 17], True),
        ([0.0, 5.0], False),  # floats are not labels
    ],
)
def test_is_instance_labels(values, expected):
    assert is_instance_labels(np.array(values)) is expected


# ---------------------------------------------------------------- augmentation


def test_elastic_with_zero_strength_is_the_exact_identity():
    image, labels = make_sample((40, 48), seed=1, dtype="float32")
    out_image, out_labels = elastic(image, labels, np.random.default_rng(0), strength=0.0)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_labels, labels)


def test_elastic_field_is_smooth_and_scaled():
    field = elastic_field((64, 64), np.random.default_rng(0), strength=10.0, grid=3)
    assert field.shape == (2, 64, 64) and field.dtype == np.float32
    assert 2.0 < field.std() < 20.0
    assert np.abs(np.diff(field, axis=1)).max() < 3.0  # no jumps between neighbours


def test_elastic_keeps_image_and_labels_aligned():
    _, labels = make_sample((48, 56), seed=2)
    as_image = labels.astype(np.float32)
    out_image, out_labels = elastic(as_image, labels, np.random.default_rng(5), strength=10.0, order=0)
    assert not np.array_equal(out_labels, labels)  # it did deform
    np.testing.assert_array_equal(out_image, out_labels.astype(np.float32))


def test_elastic_smooth_image_follows_labels_with_channels_3d():
    _, labels = make_sample((16, 32, 32), seed=4)
    indicator = np.stack([(labels > 0), (labels == 0)]).astype(np.float32)  # (C, Z, Y, X)
    out_image, out_labels = elastic(indicator, labels, np.random.default_rng(1), strength=4.0, order=1)
    assert out_image.shape == indicator.shape
    inside = out_image[0] > 0.5
    overlap = np.count_nonzero(inside & (out_labels > 0)) / np.count_nonzero(inside | (out_labels > 0))
    assert overlap > 0.9


def test_apply_field_refuses_a_field_of_another_shape():
    field = np.zeros((2, 8, 8), dtype=np.float32)
    with pytest.raises(ShapeError):
        apply_field(np.zeros((8, 9)), field, order=1)


def test_elastic_refuses_bad_grid():
    with pytest.raises(ConfigError):
        elastic_field((8, 8), np.random.default_rng(0), grid=1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(6, 10, 10), (6, 10, 12)])
def test_flip_rot_is_identical_on_image_and_labels(seed, shape):
    labels = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    image = np.stack([labels * 10.0, labels * 10.0 + 1])
    out_image, out_labels = random_flip_rot(image, labels, np.random.default_rng(seed))
    assert out_labels.shape == shape  # non-square YX is never turned by 90 degrees
    np.testing.assert_array_equal(out_image[0], out_labels * 10.0)
    np.testing.assert_array_equal(out_image[1], out_labels * 10.0 + 1)
    assert out_image.flags.c_contiguous and out_labels.flags.c_contiguous
    assert sorted(out_labels.ravel()) == sorted(labels.ravel())


def test_intensity_jitter_stays_within_its_bounds():
    image = np.ones((4, 4), dtype=np.float32)
    out = intensity_jitter(image, np.random.default_rng(0), scale=0.1, shift=0.1)
    assert out.dtype == np.float32
    assert np.all(np.abs(out - 1.0) <= 0.2 + 1e-6)
    np.testing.assert_array_equal(intensity_jitter(image, np.random.default_rng(0), scale=0, shift=0), image)


# ---------------------------------------------------------------- weight map


def border_term(d1, d2, w0=10.0, sigma=5.0):
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def test_weight_map_hand_computed_row():
    # x:        0  1  2  3  4  5  6  7  8
    labels = np.array([[1, 1, 0, 0, 0, 2, 2, 0, 0]], dtype=np.uint32)
    w = weight_map(labels)
    w_bg, w_fg = 9 / (2 * 5), 9 / (2 * 4)  # inverse frequency, voxel mean 1
    expected = {
        0: w_fg,
        2: w_bg + border_term(1, 3),  # object 1 at x=1, object 2 at x=5
        3: w_bg + border_term(2, 2),
        4: w_bg + border_term(1, 3),
        6: w_fg,  # object voxels carry no border term
        7: w_bg + border_term(1, 6),
        8: w_bg + border_term(2, 7),
    }
    for x, value in expected.items():
        assert w[0, x] == pytest.approx(value, rel=1e-5), x
    assert w.dtype == np.float32


def test_weight_map_hand_computed_2d_uses_euclidean_distances():
    labels = np.zeros((5, 5), dtype=np.uint32)
    labels[0, 0] = 1
    labels[3, 4] = 2
    w = weight_map(labels, w0=10.0, sigma=5.0, class_weights=[0.0, 0.0])
    assert w[0, 4] == pytest.approx(border_term(3, 4))  # d1 to (3, 4), d2 to (0, 0)
    assert w[2, 2] == pytest.approx(border_term(math.sqrt(5), math.sqrt(8)))
    assert w[4, 0] == pytest.approx(border_term(4, math.sqrt(1 + 16)))  # (0, 0) then (3, 4)


def test_weight_map_second_nearest_is_the_second_object_not_the_first_again():
    labels = np.array([[1, 1, 1, 0, 2, 0, 0, 3]], dtype=np.uint32)
    w = weight_map(labels, class_weights=[0.0, 0.0])
    assert w[0, 3] == pytest.approx(border_term(1, 1))
    assert w[0, 5] == pytest.approx(border_term(1, 2))  # objects 2 and 3, not 1
    assert w[0, 6] == pytest.approx(border_term(1, 2))


def test_weight_map_3d_matches_2d_and_drops_far_terms():
    row = np.array([[1, 0, 0, 2] + [0] * 30], dtype=np.uint32)
    w2 = weight_map(row, sigma=2.0, class_weights=[1.0, 1.0])
    w3 = weight_map(row[None], sigma=2.0, class_weights=[1.0, 1.0])
    np.testing.assert_allclose(w3[0], w2, rtol=1e-6)
    assert w2[0, 1] == pytest.approx(1.0 + border_term(1, 2, sigma=2.0))
    assert w2[0, -1] == 1.0  # beyond reach (about 3.7 sigma) of object 1: term dropped


def test_weight_map_separators_put_the_border_term_on_contacts_of_touching_objects():
    # x:        0  1  2  3  4  5  6  7  8  9
    labels = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], dtype=np.uint32)
    classes = instance_to_classes(labels)
    assert classes[0].tolist() == [1, 1, 2, 2, 2, 2, 1, 2, 0, 0]
    w = weight_map(labels, class_weights=[0.0, 0.0, 0.0], targets=classes, separators=classes != 1)
    expected = [0, 0, border_term(0, 2), border_term(0, 1), border_term(0, 1), border_term(0, 2), 0,
                border_term(0, 4), border_term(1, 5), border_term(2, 6)]
    np.testing.assert_allclose(w[0], expected, rtol=1e-5)
    paper = weight_map(labels, class_weights=[0.0, 0.0, 0.0], targets=classes)  # background only
    np.testing.assert_allclose(paper[0, :8], 0.0)
    with pytest.raises(ShapeError):
        weight_map(labels, separators=np.ones((1, 3), bool))


def test_instance_targets_weight_the_contact_between_touching_objects():
    labels = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], dtype=np.uint32)
    ps = PatchSpec((1, 10), (1, 10), 0, "instances", 10.0, 5.0, 0.0, 3)
    classes, w = make_targets(labels, ps)
    balance = class_balance_weights(classes, 3)
    assert w[0, 3] == pytest.approx(balance[2] + border_term(0, 1), rel=1e-5)  # the contact voxel
    assert w[0, 1] == pytest.approx(balance[1], rel=1e-5)  # interior: no border term


def test_weight_map_with_class_targets_and_errors():
    labels = np.array([[1, 1, 0, 0]], dtype=np.uint32)
    targets = instance_to_classes(labels)
    w = weight_map(labels, w0=0.0, targets=targets)
    assert float(w.mean()) == pytest.approx(1.0)
    with pytest.raises(ShapeError):
        weight_map(labels, targets=targets[:, :2])
    with pytest.raises(ConfigError):
        weight_map(labels, sigma=0.0)
    with pytest.raises(ShapeError):
        weight_map(labels.astype(np.float32))


def test_class_balance_weights_absent_class_is_zero():
    np.testing.assert_allclose(class_balance_weights(np.array([0, 0, 2, 2]), 3), [1.0, 0.0, 1.0])


# ---------------------------------------------------------------- torch losses


def test_weighted_cross_entropy_reduces_to_plain_and_scales():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    ones = torch.ones(2, 5, 6)
    plain = F.cross_entropy(logits, target)
    assert torch.allclose(weighted_cross_entropy(logits, target, ones), plain)
    assert torch.allclose(weighted_cross_entropy(logits, target, 2 * ones), 2 * plain)
    with pytest.raises(ShapeError):
        weighted_cross_entropy(logits, target, ones[:, :4])
    with pytest.raises(ShapeError):
        weighted_cross_entropy(logits, target[:, :4], ones)


def test_soft_dice_is_zero_for_a_perfect_prediction_3d():
    target = torch.randint(0, 3, (1, 4, 5, 6))
    logits = 50.0 * F.one_hot(target, 3).movedim(-1, 1).float()
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    wrong = 50.0 * F.one_hot((target + 1) % 3, 3).movedim(-1, 1).float()
    assert soft_dice_loss(wrong, target, ignore_background=False).item() > 0.9


def test_losses_backpropagate():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (1, 4, 4))
    weight = torch.from_numpy(weight_map(target[0].numpy().astype(np.uint32)))[None]
    (weighted_cross_entropy(logits, target, weight) + soft_dice_loss(logits, target)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
