"""Training: loss goes down, seeds reproduce, resume is exact, the CLI and the demo run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from unetflow.cli import main
from unetflow.config import ModelSpec, TrainSpec
from unetflow.model.checkpoint import load_checkpoint
from unetflow.run import train
from unetflow.sample import write_sample


@pytest.fixture(scope="module")
def sample2d(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "s.zarr")
    write_sample(path, (64, 64), seed=0)
    return path


def spec(sample, out, **kw):
    base = dict(
        pairs=((f"{sample}/raw", f"{sample}/labels"),), output=str(out),
        model=ModelSpec(dims=2, depth=1, width=4), patch_shape=(32, 32), epochs=3, steps_per_epoch=4, batch_size=2,
        learning_rate=3e-3, elastic_strength=4.0,
    )
    base.update(kw)
    return TrainSpec(**base)


def weights(path):
    return {k: v.clone() for k, v in load_checkpoint(path).net.state_dict().items()}


def test_loss_decreases_and_checkpoints_are_written(tmp_path, sample2d):
    report = train(spec(sample2d, tmp_path / "m.pt", epochs=4), progress=False)
    losses = [h["loss"] for h in report.history]
    assert losses[-1] < losses[0]
    assert os.path.exists(report.best) and os.path.exists(report.last)
    ckpt = load_checkpoint(report.best)
    assert ckpt.spec.classes == 3 and ckpt.spec.class_names == ("background", "interior", "border")
    assert "f1" in report.history[-1] and "foreground_iou" in report.history[-1]


def test_same_seed_same_weights_and_resume_is_exact(tmp_path, sample2d):
    train(spec(sample2d, tmp_path / "a.pt", epochs=2), progress=False)
    train(spec(sample2d, tmp_path / "b.pt", epochs=2), progress=False)
    train(spec(sample2d, tmp_path / "c.pt", epochs=1), progress=False)
    train(spec(sample2d, tmp_path / "c.pt", epochs=2, resume=True), progress=False)
    a, b, c = (weights(tmp_path / f"{n}.last.pt") for n in "abc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=0)


def test_cli_sample_train_evaluate(tmp_path):
    runner = CliRunner()
    data = str(tmp_path / "d.zarr")
    assert runner.invoke(main, ["sample", data, "--dims", "2", "--shape", "48,48"]).exit_code == 0
    model = str(tmp_path / "m.pt")
    args = ["train", f"{data}/raw", f"{data}/labels", model, "--dims", "2", "--depth", "1", "--width", "4",
            "--patch-shape", "32,32", "--epochs", "1", "--steps", "2", "--batch-size", "2", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "--resume" in again.output
    pred = str(tmp_path / "p.zarr")
    seg = runner.invoke(main, ["segment", f"{data}/raw", pred, "--model", model, "--workers", "0", "--output", "instances", "--no-progress"])
    assert seg.exit_code == 0, seg.output
    scores = runner.invoke(main, ["evaluate", pred, f"{data}/labels"])
    assert scores.exit_code == 0 and "f1" in scores.output
    # --interior-threshold reaches the blocks: 0 is the argmax of the probabilities, labelled whole
    from test_instances import same_up_to_renumbering
    from unetflow.label import instance_classes, label_whole

    plain, probs = str(tmp_path / "p0.zarr"), str(tmp_path / "probs.zarr")
    common = ["--model", model, "--workers", "0", "--no-progress"]
    assert runner.invoke(main, ["segment", f"{data}/raw", plain, *common, "--output", "instances", "--interior-threshold", "0"]).exit_code == 0
    assert runner.invoke(main, ["segment", f"{data}/raw", probs, *common]).exit_code == 0
    values = zarr.open_array(probs)[:]
    assert same_up_to_renumbering(zarr.open_array(plain)[:], label_whole(values.argmax(axis=0)))
    assert same_up_to_renumbering(zarr.open_array(pred)[:], label_whole(instance_classes(values)))
    assert runner.invoke(main, ["evaluate", probs, f"{data}/labels"]).exit_code == 0


def test_train_refuses_mismatched_labels(tmp_path, sample2d):
    from conftest import write_zarr
    from unetflow.errors import ShapeError

    bad = write_zarr(tmp_path / "bad.zarr", np.zeros((10, 10), "u2"))
    with pytest.raises(ShapeError, match="labels"):
        train(spec(sample2d, tmp_path / "m.pt", pairs=((f"{sample2d}/raw", bad),)), progress=False)


def test_demo_runs_at_a_tiny_size(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--shape", "16,48,48", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "object_f1" in result.output and "foreground_iou" in result.output
    png = tmp_path / "demo" / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_finds_touching_nuclei_with_the_bundled_model(tmp_path):
    # the bar for `unetflow demo` (seed 1, 48x128x128; the model trained on seed 0)
    from unetflow.demo import run_demo

    result = run_demo(str(tmp_path / "demo"), (48, 128, 128), workers=2, seed=1)
    assert result["objects_true"] == 27
    assert result["object_f1"] >= 0.9 and result["foreground_iou"] >= 0.9


def test_cosine_schedule_is_a_function_of_the_step(tmp_path, sample2d):
    from unetflow.train.loop import learning_rate_at

    s = spec(sample2d, tmp_path / "cos.pt", epochs=2, lr_schedule="cosine")
    rates = [learning_rate_at(s, i) for i in range(8)]
    assert rates[0] == s.learning_rate and all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert learning_rate_at(s, 4) == pytest.approx(s.learning_rate / 2)  # half-way
    train(s, progress=False)
    train(spec(sample2d, tmp_path / "cos2.pt", epochs=2, lr_schedule="cosine"), progress=False)
    train(spec(sample2d, tmp_path / "const.pt", epochs=2), progress=False)
    a, b, c = (weights(tmp_path / f"{n}.last.pt") for n in ("cos", "cos2", "const"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same schedule, same weights
    assert any(not torch.equal(a[k], c[k]) for k in a)
