"""Tests for unetflow.model: geometry, the U-Net, its receptive field, checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from unetflow.config import ModelSpec
from unetflow.errors import CheckpointError, ConfigError, InputNotFoundError, ShapeError
from unetflow.model.checkpoint import load_checkpoint, read_spec, save_checkpoint
from unetflow.model.geometry import UNetGeometry
from unetflow.model.unet import UNet, probe_receptive_radius


def small_spec(dims: int = 2, padding: str = "valid", depth: int = 1, **kw) -> ModelSpec:
    return ModelSpec(dims=dims, padding=padding, depth=depth, width=kw.pop("width", 2), **kw)


class Unpicklable:
    """Any custom class: a safe load must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# -- geometry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, n_in, n_out",
    [
        (4, 572, 388),  # the paper's figure 1
        (4, 188, 4),  # the smallest input of the paper's net
        (1, 18, 2),  # 18 -conv-> 14 -pool-> 7 -conv-> 3 -up-> 6 -conv-> 2
        (0, 5, 1),  # two 3x3 convs only
        (2, 48, 8),
    ],
)
def test_valid_output_size_matches_hand_arithmetic(depth: int, n_in: int, n_out: int) -> None:
    assert UNetGeometry(2, "valid", depth).output_size(n_in) == n_out


@pytest.mark.parametrize("depth, margin", [(0, 2), (1, 8), (2, 20), (3, 44), (4, 92)])
def test_margin_is_constant_for_every_valid_size(depth: int, margin: int) -> None:
    g = UNetGeometry(2, "valid", depth)
    assert g.margin == margin
    for k in range(6):
        n = g.min_input + k * g.input_multiple
        assert (n - g.output_size(n)) // 2 == margin
        assert g.input_size_for_output(g.output_size(n)) == n


def test_invalid_size_names_nearest_sizes() -> None:
    g = UNetGeometry(2, "valid", 4)
    with pytest.raises(ShapeError, match=r"input size 573 .*use 572 or 588") as info:
        g.output_size(573)
    assert "\n" not in str(info.value)
    assert g.nearest_valid_inputs(573) == (572, 588)
    assert g.nearest_valid_inputs(572) == (572, 572)
    assert g.nearest_valid_inputs(10) == (None, 188)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_is_valid_input_agrees_with_the_layer_walk(padding: str, depth: int) -> None:
    g = UNetGeometry(3, padding, depth)
    for n in range(0, 140):
        try:
            g.output_size(n)
            walked = True
        except ShapeError:
            walked = False
        assert walked == g.is_valid_input(n), n


def test_same_keeps_multiples_and_refuses_others() -> None:
    g = UNetGeometry(3, "same", 3)
    assert g.output_shape((8, 64, 24)) == (8, 64, 24)
    assert g.margin == 0
    with pytest.raises(ShapeError, match=r"input size y=60 .*use 56 or 64"):
        g.output_shape((8, 60, 24))
    assert g.valid_input_at_least(60) == 64


def test_valid_input_at_least_gives_enough_output() -> None:
    g = UNetGeometry(2, "valid", 2)
    for want in range(1, 60):
        n = g.valid_input_at_least(want)
        assert g.output_size(n) >= want
        assert g.output_size(n) - want < g.input_multiple


def test_input_size_for_output_refuses_impossible_outputs() -> None:
    with pytest.raises(ShapeError, match=r"output size 389 .*use output size 388 or 404"):
        UNetGeometry(2, "valid", 4).input_size_for_output(389)


def test_geometry_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError):
        UNetGeometry(4, "valid", 2)
    with pytest.raises(ConfigError, match="did you mean 'valid'"):
        UNetGeometry(2, "vlaid", 2)


@pytest.mark.parametrize("depth", range(7))
def test_receptive_radius_closed_form(depth: int) -> None:
    valid, same = UNetGeometry(2, "valid", depth), UNetGeometry(2, "same", depth)
    # convolutions give the margin, each pooling phase adds up to 2**depth - 1 at one side
    assert valid.receptive_radius == valid.margin + 2**depth - 1
    assert same.receptive_radius == valid.receptive_radius
    assert same.receptive_field == valid.receptive_field
    assert valid.receptive_radius >= valid.margin  # equal only at depth 0
    assert valid.receptive_field <= 2 * valid.receptive_radius + 1


def test_describe_has_every_number() -> None:
    info = UNetGeometry.from_spec(small_spec(depth=4, width=64)).describe()
    assert info["margin"] == 92
    assert info["input_multiple"] == 16
    assert info["receptive_radius"] == 107
    assert set(info) >= {"min_input", "min_output", "receptive_field", "padding", "depth", "dims"}


# -- the net ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, padding, depth, shape",
    [
        (2, "valid", 1, (20, 22)),
        (2, "valid", 2, (48, 52)),
        (2, "same", 2, (16, 12)),
        (3, "valid", 1, (18, 20, 22)),
        (3, "same", 2, (8, 4, 12)),
        (3, "same", 0, (5, 3, 7)),  # depth 0 takes any size
    ],
)
def test_forward_output_shape(dims: int, padding: str, depth: int, shape: tuple[int, ...]) -> None:
    net = UNet(small_spec(dims, padding, depth, in_channels=2, classes=3))
    out = net(torch.zeros((2, 2) + shape))
    assert tuple(out.shape) == (2, 3) + net.geometry.output_shape(shape)


def test_channel_widths_double_per_level() -> None:
    net = UNet(small_spec(depth=3, width=4))
    assert [d.conv.block[0].out_channels for d in net.downs] == [8, 16, 32]
    assert [u.up.out_channels for u in net.ups] == [16, 8, 4]


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 20, 22), r"has 3 axes .*\(B, C, Y, X\)"),
        ((1, 3, 20, 22), r"has 3 channels .*built for 1"),
        ((1, 1, 20, 21), r"input size x=21 .*use 20 or 22"),
        ((1, 1, 16, 20), r"input size y=16 .*use at least 18"),
    ],
)
def test_forward_refuses_bad_inputs(shape: tuple[int, ...], match: str) -> None:
    net = UNet(small_spec(depth=1))
    with pytest.raises(ShapeError, match=match):
        net(torch.zeros(shape))


def test_same_mode_never_pads() -> None:
    net = UNet(small_spec(padding="same", depth=2))
    with pytest.raises(ShapeError, match=r"input size y=10 .*use 8 or 12"):
        net(torch.zeros(1, 1, 10, 8))
    # the parts raise as well, rather than padding a mismatched skip
    with pytest.raises(ShapeError, match="does not match the up-sampled"):
        net.ups[-1](torch.zeros(1, 4, 3, 4), torch.zeros(1, 2, 5, 8))


def test_init_is_deterministic_and_paper_scaled() -> None:
    torch.manual_seed(7)
    a = UNet(small_spec(depth=2, width=8))
    torch.manual_seed(7)
    b = UNet(small_spec(depth=2, width=8))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    conv = a.downs[1].conv.block[0]  # 16 -> 32 channels, 3x3: N = 16 * 9
    assert abs(conv.weight.std().item() - (2 / (16 * 9)) ** 0.5) < 0.01
    assert torch.count_nonzero(conv.bias) == 0


def test_valid_tiles_stitch_exactly() -> None:
    # overlap-tile: output tiles on the 2**depth grid, input tiles carry the margin
    torch.manual_seed(0)
    net = UNet(small_spec(depth=2)).double().eval()
    g = net.geometry
    x = torch.rand(1, 1, g.valid_input_at_least(24), g.valid_input_at_least(16), dtype=torch.float64)
    with torch.no_grad():
        whole = net(x)
        tile = g.input_size_for_output(8)
        parts = [net(x[..., s : s + tile, :]) for s in range(0, whole.shape[2], 8)]
        shifted = net(x[..., 2 : 2 + tile, :])  # a tile off the 2**depth grid
    # equal up to float summation order (conv kernels block differently per size)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-12)
    # the margin suffices only on the grid: off it, the pooling phase changes the result
    assert not torch.allclose(shifted[:, :, :6], whole[:, :, 2:8])


# -- receptive field probe ---------------------------------------------------------


@pytest.mark.parametrize(
    "dims, padding, depth",
    [(2, "valid", 0), (2, "valid", 1), (2, "valid", 2), (2, "same", 2), (3, "valid", 1), (3, "same", 1)],
)
def test_probe_matches_analytic_radius(dims: int, padding: str, depth: int) -> None:
    torch.manual_seed(1)
    net = UNet(small_spec(dims, padding, depth))
    analytic = net.geometry.receptive_radius
    assert probe_receptive_radius(net) == analytic
    # the net's own random weights can only reach less (dead ReLUs), never more
    own = probe_receptive_radius(net, structural=False)
    assert analytic - net.geometry.input_multiple < own <= analytic


def test_probe_sees_the_pooling_phase_beyond_the_margin() -> None:
    net = UNet(small_spec(depth=2))
    assert probe_receptive_radius(net) == net.geometry.margin + 3 > net.geometry.margin


def test_probe_leaves_the_net_alone() -> None:
    net = UNet(small_spec(depth=1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe_receptive_radius(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert next(net.parameters()).dtype == torch.float32


# -- checkpoints ----------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    spec = small_spec(3, "same", 1, classes=3, class_names=("bg", "cell", "edge"))
    net = UNet(spec).eval()
    extra = {"epoch": 5, "optimizer": {"lr": 1e-3, "state": {0: torch.ones(2)}}, "command": ["train", "x"]}
    path = save_checkpoint(tmp_path / "m.pt", net, extra=extra)
    loaded = load_checkpoint(path)
    x = torch.rand(1, 1, 4, 6, 8)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))
    assert loaded.spec == spec
    assert not loaded.net.training
    assert loaded.extra["epoch"] == 5 and torch.equal(loaded.extra["optimizer"]["state"][0], torch.ones(2))
    assert read_spec(path) == spec
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_load_does_not_move_the_callers_rng(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", UNet(small_spec()))
    torch.manual_seed(0)
    load_checkpoint(path)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_save_refuses_unsafe_extra(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"extra\['obj'\] holds a Unpicklable"):
        save_checkpoint(tmp_path / "m.pt", UNet(small_spec()), extra={"obj": Unpicklable()})
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path) -> None:
    with pytest.raises(InputNotFoundError, match=r"checkpoint .*nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        read_spec(tmp_path / "nope.pt")


def test_pickled_object_is_refused_not_run(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "unetflow-checkpoint", "obj": Unpicklable()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt cannot be loaded safely .*Unpicklable.*unetflow model init") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a checkpoint", pickle.dumps({"spec": {}}, protocol=2)],
)
def test_garbage_files_are_refused(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", UNet(small_spec()))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"m.pt cannot be loaded safely"):
        load_checkpoint(path)


def test_foreign_torch_file_is_refused(tmp_path) -> None:
    torch.save({"weights": torch.ones(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"not a unetflow checkpoint"):
        load_checkpoint(tmp_path / "w.pt")
    torch.save({"format": "unetflow-checkpoint", "format_version": 1, "state_dict": {}}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"no model spec"):
        read_spec(tmp_path / "s.pt")


def _edit_checkpoint(path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"])
    torch.save(payload, path)


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", UNet(small_spec()))

    def edit(state: dict) -> None:
        state["extra.weight"] = state.pop("outc.conv.weight")

    _edit_checkpoint(path, edit)
    with pytest.raises(CheckpointError, match=r"missing keys outc.conv.weight .*unexpected keys extra.weight"):
        load_checkpoint(path)


def test_shape_mismatch_is_named(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", UNet(small_spec()))
    _edit_checkpoint(path, lambda state: state.update({"outc.conv.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"shape mismatches outc.conv.bias \(5,\) != \(2,\)"):
        load_checkpoint(path)
