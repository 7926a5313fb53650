"""Commands of the training side: train, sample, evaluate, demo."""

from __future__ import annotations

import json

import click

from unetflow.cli.common import friendly_errors, setup_logging, parse_shape_arg


def _pairs(args: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...], str]:
    from unetflow.errors import ConfigError

    if len(args) == 3 and not any(":" in a for a in args):
        return ((args[0], args[1]),), args[2]
    if len(args) >= 2 and all(":" in a for a in args[:-1]):
        return tuple(tuple(a.split(":", 1)) for a in args[:-1]), args[-1]  # type: ignore[misc]
    raise ConfigError(
        f"train got {len(args)} arguments {list(args)}; give RAW LABELS MODEL, or RAW:LABELS [RAW:LABELS ...] MODEL"
    )


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, required=True)
@click.option("--dims", type=click.Choice(["2", "3"]), default="2", show_default=True, help="Spatial dims of the U-Net.")
@click.option("--padding", type=click.Choice(["valid", "same"]), default="same", show_default=True, help="valid: the paper's unpadded convolutions (exact tiling); same: blended tiling.")
@click.option("--depth", type=int, default=3, show_default=True, help="Poolings. Deeper: larger receptive field, slower, needs larger patches.")
@click.option("--width", type=int, default=16, show_default=True, help="First-level channels. Wider: more capacity, slower, larger file.")
@click.option("--channels", type=int, default=1, show_default=True, help="Image channels.")
@click.option("--norm", type=click.Choice(["percentile", "meanstd", "none"]), default="percentile", show_default=True)
@click.option("--targets", type=click.Choice(["auto", "instances", "classes"]), default="auto", show_default=True, help="instances: one id per object, trained as background/interior/border so touching objects separate; classes: a class map.")
@click.option("--patch-shape", default=None, help="Training patch (input) shape; default 128^2 / 48^3, fitted to the net.")
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--steps", "steps_per_epoch", type=int, default=50, show_default=True, help="Batches per epoch.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="constant", show_default=True, help="cosine: the learning rate falls from --lr to 0 over all epochs (a stable last epoch); constant: --lr throughout.")
@click.option("--loss", type=click.Choice(["ce", "dice", "ce+dice"]), default="ce", show_default=True, help="ce: the paper's weighted cross-entropy with the border term.")
@click.option("--w0", type=float, default=10.0, show_default=True, help="Border weight of the paper's eq. 2. Higher: stronger push to separate touching objects.")
@click.option("--sigma", type=float, default=5.0, show_default=True, help="Border width (px) of eq. 2.")
@click.option("--elastic", "elastic_strength", type=float, default=10.0, show_default=True, help="Elastic deformation strength (px std of a 3x3 control grid, as in the paper); 0 turns it off.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Held-out part of each pair (last part of the first axis).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data, same weights.")
@click.option("--resume", is_flag=True, help="Continue from MODEL's .last.pt checkpoint exactly where it stopped.")
@click.option("--init", default=None, help="Start from this checkpoint's weights (fine-tuning).")
@click.option("--overwrite", is_flag=True, help="Replace an existing MODEL file.")
@click.option("--device", default="auto", show_default=True)
@click.option("--amp/--no-amp", default=None, help="Mixed precision (bf16); default on for GPUs.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-v", "--verbose", count=True)
@friendly_errors
def train(args: tuple[str, ...], dims: str, padding: str, depth: int, width: int, channels: int, norm: str, targets: str,
          patch_shape: str | None, epochs: int, steps_per_epoch: int, batch_size: int, learning_rate: float, lr_schedule: str, loss: str,
          w0: float, sigma: float, elastic_strength: float, val_fraction: float, seed: int, resume: bool, init: str | None,
          overwrite: bool, device: str, amp: bool | None, progress: bool, verbose: int) -> None:
    """Train a U-Net with the paper's recipe: RAW LABELS MODEL, or RAW:LABELS [...] MODEL.

    Random patches with elastic deformation, flips, 90-degree rotations and intensity
    jitter; weighted cross-entropy with class balancing and the border term that
    pulls touching objects apart. Validates every epoch on the held-out part
    (foreground IoU, object F1) and keeps MODEL (best) and MODEL.last.pt (for --resume).

    \b
    Examples:
      unetflow train raw.zarr labels.zarr model.pt --dims 2 --epochs 50
      unetflow train a.zarr:a_labels.zarr b.zarr:b_labels.zarr model.pt --resume
    """
    import os

    from unetflow import run, store
    from unetflow.config import ModelSpec, NormSpec, TrainSpec
    from unetflow.errors import OutputExistsError

    setup_logging(max(verbose, 1))
    pairs, model_path = _pairs(args)
    store.check_apart(model_path, [(kind, path) for pair in pairs for kind, path in zip(("image", "labels"), pair)] + [("--init model", init)],
                      what="model file")
    if os.path.exists(model_path) and not (resume or overwrite):
        raise OutputExistsError(f"model file {model_path} already exists; pass --resume to continue it, --overwrite to replace it, or choose another path")
    if not resume:  # --overwrite replaces only unetflow checkpoints (issue 15)
        from unetflow.model.checkpoint import check_replaceable
        from unetflow.train.loop import last_path

        check_replaceable(model_path, overwrite=overwrite)
        check_replaceable(last_path(model_path), overwrite=True, what="last checkpoint")  # refused only if not a checkpoint
    spec = TrainSpec(
        pairs=pairs, output=model_path,
        model=ModelSpec(dims=int(dims), in_channels=channels, padding=padding, depth=depth, width=width, norm=NormSpec(kind=norm)),
        targets=targets, patch_shape=parse_shape_arg(patch_shape, "patch shape"), epochs=epochs, steps_per_epoch=steps_per_epoch,
        batch_size=batch_size, learning_rate=learning_rate, lr_schedule=lr_schedule, loss=loss, w0=w0, sigma=sigma, elastic_strength=elastic_strength,
        val_fraction=val_fraction, seed=seed, resume=resume, init=init, device=device, amp=amp,
    )
    from unetflow.model.devices import check_device

    check_device(spec.device)  # before any work (issue 15)
    report = run.train(spec, progress=progress)
    best = report.history[-1] if report.history else {}
    click.echo(f"wrote {report.best} (best score {report.best_score:.4f}) and {report.last}; last epoch: {json.dumps(best)}")


@click.command()
@click.argument("path")
@click.option("--dims", type=click.Choice(["2", "3"]), default="3", show_default=True)
@click.option("--shape", default=None, help="Image shape (default 48,128,128 for 3-D, 512,512 for 2-D).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@friendly_errors
def sample(path: str, dims: str, shape: str | None, seed: int, overwrite: bool) -> None:
    """Write synthetic microscopy with ground truth: PATH/raw (uint16) and PATH/labels (instances).

    Touching nuclei-like blobs with blur, uneven background, Poisson and Gaussian noise.
    Train on it with `unetflow train PATH/raw PATH/labels model.pt`.
    """
    from unetflow.sample import write_sample

    size = parse_shape_arg(shape, "shape") or ((48, 128, 128) if dims == "3" else (512, 512))
    info = write_sample(path, size, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {path}/raw and {path}/labels: shape {list(size)}, {info['objects']} objects")


@click.command()
@click.argument("prediction")
@click.argument("truth")
@click.option("--json", "as_json", is_flag=True, help="The scores and the per-threshold table as JSON.")
@friendly_errors
def evaluate(prediction: str, truth: str, as_json: bool) -> None:
    """Score PREDICTION against TRUTH instance labels: object P/R/F1 at IoU 0.5, AP, matched IoU, Rand error.

    PREDICTION may be instance labels, a class map, or probabilities (C, ...): class
    maps from instance-trained models (background/interior/border) are turned into
    instances first. Objects match one-to-one when their IoU is above the threshold.
    Prints foreground IoU, Rand error, tp/fp/fn, precision, recall, F1, accuracy
    (tp / (tp + fp + fn)) and the mean matched IoU at IoU 0.5, ap (the mean accuracy
    over IoU 0.5:0.05:0.95, as the DSB 2018, stardist and cellpose papers report it),
    then the table per IoU threshold. Reads both arrays into memory.
    """
    from unetflow.evaluate import evaluate_arrays, format_report

    report = evaluate_arrays(prediction, truth)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@click.command()
@click.option("--out", "out_dir", default="unetflow-demo", show_default=True, help="Folder for the demo's files (re-used and refreshed on every run).")
@click.option("--shape", default="48,128,128", show_default=True, help="Sample volume shape.")
@click.option("--workers", type=int, default=2, show_default=True, help="Local Dask workers.")
@click.option("--seed", type=int, default=1, show_default=True, help="Sample seed (the bundled model was trained on seed 0).")
@friendly_errors
def demo(out_dir: str, shape: str, workers: int, seed: int) -> None:
    """The one-minute first run: sample volume -> bundled model on a local cluster -> scores and a PNG."""
    from unetflow.demo import run_demo

    setup_logging(0)
    result = run_demo(out_dir, parse_shape_arg(shape, "shape"), workers=workers, seed=seed)
    for key, value in result.items():
        click.echo(f"{key:18s} {value:.4f}" if isinstance(value, float) else f"{key:18s} {value}")
