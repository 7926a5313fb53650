"""``unetflow model``: make and inspect model checkpoints."""

from __future__ import annotations

import click

from unetflow.cli.common import friendly_errors


@click.group()
def model() -> None:
    """Make and inspect model checkpoints."""


@model.command("init")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--dims", type=click.Choice(["2", "3"]), default="3", show_default=True)
@click.option("--padding", type=click.Choice(["valid", "same"]), default="same", show_default=True, help="valid: the paper's unpadded convolutions, exact overlap-tile stitching, output smaller than input by a margin. same: output = input, patches blended.")
@click.option("--depth", type=int, default=3, show_default=True, help="Poolings; inputs must be multiples of 2**depth. Deeper: larger receptive field, larger halo.")
@click.option("--width", type=int, default=16, show_default=True, help="Channels of the first level (doubled per level). Wider: better, slower.")
@click.option("--channels", type=int, default=1, show_default=True, help="Input channels.")
@click.option("--classes", type=int, default=2, show_default=True, help="Output classes.")
@click.option("--norm", type=click.Choice(["percentile", "meanstd", "none"]), default="percentile", show_default=True, help="Intensity normalisation, applied alike in training and inference.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@friendly_errors
def model_init(path: str, dims: str, padding: str, depth: int, width: int, channels: int, classes: int, norm: str, seed: int, overwrite: bool) -> None:
    """Write a fresh, untrained U-Net checkpoint to PATH."""
    from unetflow.config import ModelSpec, NormSpec
    from unetflow.model.make import init_checkpoint

    spec = ModelSpec(dims=int(dims), in_channels=channels, classes=classes, padding=padding, depth=depth, width=width, norm=NormSpec(kind=norm))
    init_checkpoint(path, spec, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {path}: {spec.dims}-D {spec.padding} U-Net, depth {spec.depth}, width {spec.width}, {spec.classes} classes")


@model.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--probe", is_flag=True, help="Also measure the receptive field with an impulse response (slower).")
@friendly_errors
def model_info(path: str, probe: bool) -> None:
    """Print a checkpoint's spec and geometry: input multiple, margin, receptive field."""
    from unetflow.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    click.echo(f"path             {path}")
    click.echo(f"unetflow version {ckpt.unetflow_version}")
    for key, value in ckpt.spec.to_dict().items():
        click.echo(f"{key:16s} {value}")
    for key, value in ckpt.net.geometry.describe().items():
        click.echo(f"{key:16s} {value}")
    n_params = sum(p.numel() for p in ckpt.net.parameters())
    click.echo(f"{'parameters':16s} {n_params}")
    if probe:
        from unetflow.model.unet import probe_receptive_radius

        click.echo(f"{'probed radius':16s} {probe_receptive_radius(ckpt.net)}")
