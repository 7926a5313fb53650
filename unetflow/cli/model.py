"""``unetflow model``: make and inspect model checkpoints."""

from __future__ import annotations

import click

from unetflow.cli.common import friendly_errors


@click.group()
def model() -> None:
    """Make, inspect and export model checkpoints (and inspect bioimage.io packages)."""


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
@click.argument("path", type=click.Path())
@click.option("--probe", is_flag=True, help="Also measure the receptive field with an impulse response (slower; loads the weights).")
@click.option("--trust-model-code", is_flag=True, help="With --probe: let a bioimage.io package run Python code it carries.")
@friendly_errors
def model_info(path: str, probe: bool, trust_model_code: bool) -> None:
    """Describe a checkpoint or a bioimage.io package alike: dims, channels, classes,
    valid sizes, margin, halo, receptive field, pre- and postprocessing."""
    from unetflow.model.summary import summarise

    for key, value in summarise(path, probe=probe, trust_code=trust_model_code).items():
        click.echo(f"{key:16s} {value}")


@model.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True))
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="The model's name in the package (default: the checkpoint's file name).")
@click.option("--author", "authors", multiple=True, help="An author's name (repeat for several).")
@click.option("--license", "license_", default="CC-BY-4.0", show_default=True, help="SPDX license id of the weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic test input.")
@click.option("--overwrite", is_flag=True, help="Replace an existing package.")
@friendly_errors
def model_export(checkpoint: str, package: str, name: str | None, authors: tuple[str, ...], license_: str, seed: int, overwrite: bool) -> None:
    """Write CHECKPOINT as a bioimage.io model package PACKAGE (.zip, format 0.5).

    Torchscript and state-dict weights, valid sizes, normalisation, activation, a test
    input and output, a cover and the training record; validated by bioimageio.spec.
    Needs the extra: pip install 'unetflow[bioimageio]'. Check it with `bioimageio test PACKAGE`.
    """
    from unetflow.export import export_package

    out = export_package(checkpoint, package, name=name, authors=authors, license=license_, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out}: a bioimage.io model package (format 0.5); check it with `bioimageio test {out}`")
