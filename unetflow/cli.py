"""The ``unetflow`` command line: flags -> frozen config -> ``run.*``.

Heavy libraries are imported inside commands so that ``unetflow --help`` is instant.
Every :class:`~unetflow.errors.UnetflowError` becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click

from unetflow import __version__
from unetflow.errors import UnetflowError, one_line

log = logging.getLogger("unetflow")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("unetflow")
    root.handlers[:] = [handler]
    root.setLevel(level)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UnetflowError into ``error: <one line>`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnetflowError as err:
            click.echo(f"error: {one_line(str(err))}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unetflow")
def main() -> None:
    """Run (and train) a U-Net over microscopy images too big for one GPU.

    Images are Zarr arrays (v2 or v3), 2-D (Y, X) or 3-D (Z, Y, X), optionally with a
    leading channel axis. Work is cut into blocks that line up with the output's
    chunks, run on a Dask cluster, and written back as a chunked Zarr v3 array.
    """


def _shape(value: str | None, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    from unetflow.config import parse_shape

    return parse_shape(value, what=what)


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("output_path", metavar="OUTPUT")
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False), help="A unetflow checkpoint (.pt): `unetflow model init` or `unetflow train` makes one.")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU workers. Each holds one block and one model (more workers: more memory) and uses cores/N of the CPU. One worker runs as threads of this process; several get a process each (see --processes). 0 runs blocks in this process without Dask (debugging).")
@click.option("--gpus", type=int, default=0, show_default=True, help="One worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES. Overrides --workers.")
@click.option("--processes/--threads", "processes", default=None, help="CPU workers as processes of their own, or as threads of this process [default: threads for one worker, processes for several]. A process costs a second start of torch (~2 s) and its memory, and buys a nanny that restarts a worker past its memory limit, and glibc settings at start.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (tcp://host:8786) to use instead of starting a cluster.")
@click.option("--block-shape", default=None, help="Write box per block (default 3-D 512x512 across and, along Z, up to 2048 deep, split so that every worker gets a block; 2-D 4096 across, up to 16384 along Y). A block streams along its first axis, so memory grows with the other axes only (about 1.5 GB per worker at 512x512 planes, see --dry-run). A patch on a block border is computed by both blocks: smaller blocks cost about 1 + patch/block more compute per split axis, but give more blocks to share among workers and a finer unit of --resume. Must be whole output chunks (or shards).")
@click.option("--patch-shape", default=None, help="Input shape of one forward pass (default 3-D 64^3, 2-D 256^2, fitted to the model). Larger patches: less overlap overhead and blend work, more GPU memory and more re-computed border per block.")
@click.option("--chunk-shape", default=None, help="Output chunk shape (spatial; default 64^3 / 256^2 or the block shape).")
@click.option("--shard-shape", default=None, help="Output shard shape (Zarr v3 sharding; whole chunks). Blocks then align to shards.")
@click.option("--blend", type=click.Choice(["gaussian", "constant", "crop"]), default="gaussian", show_default=True, help="For `same` nets: blend overlapping patches with a gaussian or flat window, or keep each patch's centre (crop, exact but needs a halo >= the receptive radius). `valid` nets always overlap-tile exactly.")
@click.option("--overlap", type=float, default=0.25, show_default=True, help="Blend overlap as a fraction of the patch. More overlap: smoother seams, more compute (0.5 doubles it per axis).")
@click.option("--halo", default=None, help="Crop mode: voxels dropped on each side of a patch (default: the receptive radius).")
@click.option("--allow-small-halo", is_flag=True, help="Crop mode: accept a halo smaller than the receptive radius (results then depend on the tiling; warns).")
@click.option("--mirror", type=click.Choice(["reflect", "symmetric"]), default="reflect", show_default=True, help="How context outside the image is filled (numpy names).")
@click.option("--batch-size", type=int, default=0, show_default=True, help="Patches per forward pass. 0: on CPU one per core of the worker, run side by side with one torch thread each (measured 1.7x faster than one patch on all threads); on GPU as many as fit in half the free memory. Larger: better GPU use, more memory.")
@click.option("--skip-empty", is_flag=True, help="Leave blocks whose input is constant to the fill value (0) without running the model.")
@click.option("--skip-threshold", type=float, default=None, help="With --skip-empty: also skip blocks whose input maximum is below this value.")
@click.option("--mask", "mask", default=None, help="A Zarr foreground mask of any resolution (scaled to the image); blocks with no nonzero mask voxel are skipped and stay 0.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (slower start, often faster on GPUs).")
@click.option("--output", "output_kind", type=click.Choice(["probabilities", "labels", "instances"]), default="probabilities", show_default=True, help="Class probabilities (C, ...), argmax labels, or instances: one 64-bit id per object for models trained on instance labels (background/interior/border), consistent across blocks (a CPU merge phase after the blocks).")
@click.option("--interior-threshold", type=float, default=None, help="Instances: interior probability a voxel needs to seed an object (default 0.8; 0 is the plain argmax). Higher splits more touching objects, lower merges more.")
@click.option("--dtype", default=None, help="Probabilities: float32 (default), float16 or uint8 (x255, 4x smaller). Labels: the smallest unsigned type that fits.")
@click.option("--write-threads", type=int, default=0, show_default=True, help="Threads per worker that convert (on CPU), compress and write finished planes. 0: 2. More keep a fast GPU fed when compression bounds the run (the verdict says so); each holds one output chunk layer of the block in memory.")
@click.option("--nan-value", "nan_value", type=float, default=None, help="Replace NaN and Inf in the input by this value before the model (statistics ignore them). Without it an input holding NaN or Inf is refused, naming the count.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output, only if unetflow segment made it (or it is an empty folder); anything else is refused. Without it an existing output is never touched.")
@click.option("--dry-run", is_flag=True, help="Print the plan (blocks, shapes, redundancy, memory per worker) and stop.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N or mps. A device this machine does not have is refused before any work.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (bf16, fp16 where bf16 is missing). Default: on for GPUs (about 2x faster, probabilities differ ~1e-2), off on CPU.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--ome", is_flag=True, help="Write OME-Zarr 0.5 (multiscales, voxel size, a pyramid for viewers; labels under labels/segmentation). On by default for OUTPUT ending in .ome.zarr.")
@click.option("--image", "image", type=click.Choice(["copy", "link", "none"]), default="copy", show_default=True, help="OME-Zarr labels/instances: put the input image at OUTPUT's root with the labels under labels/, so viewers open OUTPUT as image + labels. copy: its chunk files (re-encoded where they are not Zarr v3), as much disk as the input levels used; link: symlinks to a local OME-Zarr 0.5 input's levels (no copy; the output breaks if the input moves); none: the labels alone (open OUTPUT/labels/segmentation).")
@click.option("--level", type=int, default=None, help="Resolution level of a multiscale INPUT (OME-Zarr, pyramidal OME-TIFF); 0 is full resolution.")
@click.option("-v", "--verbose", count=True, help="-v: a log line per block; -vv: debug.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="YAML run config (cluster, tiling, output, device); see pipelines/configs/. Flags given on the command line override it.")
@click.option("--resume", is_flag=True, help="Finish an existing output: skip blocks with a done marker, after checking it was made with the same settings and model. Takes over the stale lock of a dead run. With --output instances every labelling phase resumes too, from the files it left in OUTPUT.unetflow/instances/ (a merge cut short restarts from its pair files).")
@click.option("--part", default=None, help="i/n: compute only every n-th block starting at block i-1; n independent jobs with --part 1/n .. n/n write one output together. With --output instances a part runs only the GPU blocks: a final run with --resume (no --part) labels the instances once every part has finished (a CPU pass over every block, a merge on the driver, a second pass that writes the output).")
@friendly_errors
def segment(input_path: str, output_path: str, model: str, workers: int, gpus: int, processes: bool | None, scheduler: str | None, block_shape: str | None,
            patch_shape: str | None, chunk_shape: str | None, shard_shape: str | None, blend: str, overlap: float, halo: str | None,
            allow_small_halo: bool, mirror: str, batch_size: int, output_kind: str, interior_threshold: float | None, dtype: str | None,
            write_threads: int, nan_value: float | None, overwrite: bool,
            dry_run: bool, device: str, amp: bool | None, progress: bool, ome: bool, image: str, level: int | None, verbose: int,
            config_file: str | None = None, resume: bool = False, part: str | None = None,
            skip_empty: bool = False, skip_threshold: float | None = None, mask: str | None = None, compile_: bool = False) -> None:
    """Segment INPUT into OUTPUT (a new Zarr v3 array, or OME-Zarr for *.ome.zarr / --ome).

    INPUT is a Zarr array, an OME-Zarr image (--level), a TIFF / BigTIFF / OME-TIFF,
    a folder or quoted glob of one TIFF per z-slice, file.h5:/dataset, or an fsspec
    URL (s3://, gs://, https://) of Zarr; credentials come from the environment.

    \b
    Examples:
      unetflow segment raw.zarr pred.zarr --model unet.pt --gpus 4
      unetflow segment stack.ome.tif pred.ome.zarr --model unet.pt
      unetflow segment em.h5:/volumes/raw pred.zarr --model unet.pt
      unetflow segment s3://bucket/raw.ome.zarr pred.ome.zarr --model unet.pt --level 1
      unetflow segment data.zarr/em/raw pred.zarr --model unet.pt --workers 2 --block-shape 256,256,256
      unetflow segment raw.zarr pred.zarr --model unet.pt --dry-run
      unetflow segment raw.zarr pred.zarr --model unet.pt --config pipelines/configs/slurm.yaml
      unetflow segment raw.zarr pred.zarr --model unet.pt --resume      # after a crash or a lost job
      unetflow segment raw.zarr pred.zarr --model unet.pt --part 3/8    # one of 8 independent jobs
    """
    _setup_logging(verbose)
    from unetflow.config import ClusterSpec, OutputSettings, RunConfig, SkipSpec, TilingSpec
    from unetflow.resume import RunDir

    if scheduler:
        cluster = ClusterSpec(kind="address", address=scheduler)
    elif workers == 0 and not gpus:
        cluster = ClusterSpec(kind="inline")
    else:
        cluster = ClusterSpec(kind="local", workers=max(workers, 1), gpus=gpus, processes=None if gpus else processes)
    config = RunConfig(
        input=input_path, output=output_path, model=model,
        tiling=TilingSpec(block_shape=_shape(block_shape, "block shape"), patch_shape=_shape(patch_shape, "patch shape"), blend=blend, overlap=overlap,
                          halo=_shape(halo, "halo"), allow_small_halo=allow_small_halo, mirror=mirror, batch_size=batch_size),
        output_settings=OutputSettings(kind=output_kind, dtype=dtype, chunk_shape=_shape(chunk_shape, "chunk shape"),
                                       shard_shape=_shape(shard_shape, "shard shape"), overwrite=overwrite, ome=ome, write_threads=write_threads,
                                       interior_threshold=interior_threshold, image=image),
        cluster=cluster, device=device, amp=amp, dry_run=dry_run, level=level, resume=resume, part=part,
        skip=SkipSpec(empty=skip_empty, threshold=skip_threshold, mask=mask), compile=compile_, nan_value=nan_value,
    )
    if config_file:
        config = _with_config_file(config, config_file)
    report = _segment(config, progress=progress)
    if dry_run:
        _print_plan(report.summary)
        return
    skipped = f", {report.blocks_skipped} already done" if getattr(report, "blocks_skipped", 0) else ""
    click.echo(
        f"wrote {output_path}: {report.blocks_done} blocks{skipped}, {report.voxels} voxels in {report.seconds:.1f}s "
        f"({report.voxels_per_second:.3g} voxels/s); report in {RunDir(output_path).path}/"
    )
    click.echo(f"telemetry: {report.telemetry.get('verdict', '')}")
    if config.part and config.output_settings.kind == "instances":
        click.echo("GPU blocks of this part done; once every part has finished, run this command with --resume instead of --part to label the instances")
    if config.output_settings.ome or output_path.rstrip("/").lower().endswith(".ome.zarr"):
        from unetflow.formats.omezarr import viewer_path

        click.echo(f"open it: napari --plugin napari-ome-zarr {viewer_path(output_path, kind=config.output_settings.kind, image=config.output_settings.image)}")


def _segment(config: Any, *, progress: bool) -> Any:
    """``run.segment``, with the cluster starting before this process imports torch: worker
    processes import torch meanwhile (~1.5 s each, side by side). Only where the input and
    the model are files that exist: other mistakes are found, with a cluster already
    starting, by the checks that follow (a second or two later)."""
    import os

    from unetflow import preflight, schedule
    from unetflow.resume import RunDir

    preflight.check(config)  # paths, --overwrite, device: before a cluster starts (issue 15)
    files = os.path.exists(config.input) and os.path.exists(config.model)
    with schedule.Dispatcher.for_run(config, log_directory=str(RunDir(config.output).log_dir), start=files) as dispatch:
        from unetflow import run

        return run.segment(config, progress=progress, dispatch=dispatch)


# CLI parameter -> RunConfig setting it fills (dotted), for flags that override --config
FLAG_SETTINGS = {
    "block_shape": "tiling.block_shape", "patch_shape": "tiling.patch_shape", "blend": "tiling.blend",
    "overlap": "tiling.overlap", "halo": "tiling.halo", "allow_small_halo": "tiling.allow_small_halo",
    "mirror": "tiling.mirror", "batch_size": "tiling.batch_size", "output_kind": "output_settings.kind",
    "interior_threshold": "output_settings.interior_threshold", "image": "output_settings.image",
    "dtype": "output_settings.dtype", "write_threads": "output_settings.write_threads", "chunk_shape": "output_settings.chunk_shape", "shard_shape": "output_settings.shard_shape",
    "overwrite": "output_settings.overwrite", "device": "device", "amp": "amp", "dry_run": "dry_run",
    "resume": "resume", "part": "part", "nan_value": "nan_value",
    "skip_empty": "skip.empty", "skip_threshold": "skip.threshold", "mask": "skip.mask", "compile_": "compile",
}
CLUSTER_FLAGS = ("workers", "gpus", "processes", "scheduler")


def _with_config_file(flags: Any, path: str) -> Any:
    """The YAML config at *path*, with every flag typed on the command line on top."""
    from unetflow.config import apply_overrides, load_yaml, run_config_from_mapping

    ctx = click.get_current_context()
    typed = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    base = run_config_from_mapping(load_yaml(path), input=flags.input, output=flags.output, model=flags.model)
    overrides = {key: getattr(flags, key.split(".")[0]) if "." not in key else getattr(getattr(flags, key.split(".")[0]), key.split(".")[1])
                 for name, key in FLAG_SETTINGS.items() if name in typed}
    if typed & set(CLUSTER_FLAGS):
        overrides["cluster"] = flags.cluster
    return apply_overrides(base, overrides)


def _print_plan(summary: dict[str, Any]) -> None:
    click.echo("plan (nothing computed):")
    for key, value in summary.items():
        click.echo(f"  {key:22s} {value}")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def info(path: str, as_json: bool) -> None:
    """Describe a Zarr array: shape, dtype, chunks, shards, codecs, dimension names, attributes."""
    from unetflow import store

    meta = store.describe(path)
    if as_json:
        click.echo(json.dumps(meta, indent=2, default=str))
        return
    for key, value in meta.items():
        if key == "attributes":
            value = json.dumps(value, default=str)[:400]
        click.echo(f"{key:16s} {value}")


@main.command()
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
    _setup_logging(verbose)
    from tqdm.auto import tqdm

    from unetflow import store
    from unetflow.formats import convert as conv

    store.check_apart(output_path, [("input", path) for path in inputs])  # before --overwrite could remove an input (issue 15)
    store.check_writable(output_path)
    source = store.open_input(inputs[0], level=level) if len(inputs) == 1 else _slices(list(inputs))
    total = conv.n_units(source.shape, _shape(chunks, "chunks"), _shape(shards, "shards"))
    with tqdm(total=total, unit="chunk" if not shards else "shard", disable=not progress, dynamic_ncols=True) as bar:
        out = conv.convert(source, output_path, chunks=_shape(chunks, "chunks"), shards=_shape(shards, "shards"), workers=workers,
                           overwrite=overwrite, ome=ome, on_progress=bar.update)
    click.echo(f"wrote {output_path}: shape {tuple(out.shape)} {out.dtype}, chunks {tuple(out.chunks)}")


def _slices(files: list[str]) -> Any:
    from unetflow.formats import tiff

    return tiff.open_slices(files)


@main.command()
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


@main.group()
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


from unetflow import cli_train  # noqa: E402,F401  (registers train, sample, evaluate, demo)

if __name__ == "__main__":  # pragma: no cover
    main()
