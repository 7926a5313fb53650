"""Commands on image files: info, convert, preview."""

from __future__ import annotations

import json
from typing import Any

import click

from unetflow.cli.common import friendly_errors, setup_logging, parse_shape_arg


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def info(path: str, as_json: bool) -> None:
    """Describe a Zarr array: shape, dtype, chunks, shards, codecs, dimension names, attributes."""
    from unetflow import formats

    meta = formats.describe(path)
    if as_json:
        click.echo(json.dumps(meta, indent=2, default=str))
        return
    for key, value in meta.items():
        if key == "attributes":
            value = json.dumps(value, default=str)[:400]
        click.echo(f"{key:16s} {value}")


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.argument("output_path", metavar="OUTPUT")
@click.option("--chunks", default=None, help="Output chunk shape, e.g. 64,256,256 (last axes; leading axes get 1). Default 64,256,256 (3-D) or 512,512 (2-D).")
@click.option("--shards", default=None, help="Output shard shape (whole chunks); each shard is one task. Fewer, larger files on disk; more memory per task.")
@click.option("--level", type=int, default=None, help="Resolution level of a multiscale INPUT.")
@click.option("--workers", type=int, default=4, show_default=True, help="Parallel copy threads; memory holds one chunk (or shard) per thread.")
@click.option("--ome", is_flag=True, help="Write an OME-Zarr 0.5 image with a pyramid (default for OUTPUT ending in .ome.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("-v", "--verbose", count=True)
@friendly_errors
def convert(inputs: tuple[str, ...], output_path: str, chunks: str | None, shards: str | None, level: int | None, workers: int,
            ome: bool, overwrite: bool, progress: bool, verbose: int) -> None:
    """Copy INPUT (TIFF, TIFF slices, HDF5, OME-Zarr, URL) into OUTPUT, a chunked Zarr v3 array.

    Several INPUTs (an unquoted glob the shell expanded) are one TIFF per z-slice,
    sorted by name. Reads and writes chunk by chunk: memory stays bounded.

    \b
    Examples:
      unetflow convert slices/*.tif raw.zarr --chunks 64,256,256
      unetflow convert em.h5:/volumes/raw raw.zarr --chunks 64,256,256 --shards 128,512,512
      unetflow convert stack.ome.tif raw.ome.zarr
    """
    setup_logging(verbose)
    from tqdm.auto import tqdm

    from unetflow import formats, store
    from unetflow.formats import convert as conv

    store.check_apart(output_path, [("input", path) for path in inputs])  # before --overwrite could remove an input (issue 15)
    store.check_writable(output_path)
    source = formats.open_input(inputs[0], level=level) if len(inputs) == 1 else _slices(list(inputs))
    total = conv.n_units(source.shape, parse_shape_arg(chunks, "chunks"), parse_shape_arg(shards, "shards"))
    with tqdm(total=total, unit="chunk" if not shards else "shard", disable=not progress, dynamic_ncols=True) as bar:
        out = conv.convert(source, output_path, chunks=parse_shape_arg(chunks, "chunks"), shards=parse_shape_arg(shards, "shards"), workers=workers,
                           overwrite=overwrite, ome=ome, on_progress=bar.update)
    click.echo(f"wrote {output_path}: shape {tuple(out.shape)} {out.dtype}, chunks {tuple(out.chunks)}")


def _slices(files: list[str]) -> Any:
    from unetflow.formats import tiff

    return tiff.open_slices(files)


@click.command()
@click.argument("prediction")
@click.option("-o", "--output", "png", default="preview.png", show_default=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--z", type=int, default=None, help="The z-slice (default: the middle one).")
@click.option("--max-projection", is_flag=True, help="Maximum over z instead of one slice (reads slab by slab).")
@click.option("--input", "input_path", default=None, help="The input to draw under the prediction (default: the one recorded in its attributes).")
@click.option("--level", type=int, default=None, help="Resolution level of --input.")
@click.option("--channel", type=int, default=None, help="Probabilities: the class to overlay (default: the last).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Overlay opacity.")
@friendly_errors
def preview(prediction: str, png: str, z: int | None, max_projection: bool, input_path: str | None, level: int | None,
            channel: int | None, alpha: float) -> None:
    """Write a PNG of one slice of PREDICTION over its input: a quick look without napari.

    \b
    Examples:
      unetflow preview pred.ome.zarr --z 40 -o preview.png
      unetflow preview pred.zarr --max-projection --input raw.zarr -o mip.png
    """
    from unetflow.formats.preview import render

    info = render(prediction, png, input_path=input_path, level=level, z=z, project=max_projection, channel=channel, alpha=alpha)
    click.echo(f"wrote {png}: {info['shape'][0]}x{info['shape'][1]} " + (f"over {info['input']}" if info["input"] else "(prediction only)"))
