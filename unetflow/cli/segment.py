"""``unetflow segment``: flags (and a YAML config) -> one frozen RunConfig -> ``run.segment``.

Each run setting's flag is declared with :func:`setting_option`, which takes its
parameter name, default and choices from the setting in :mod:`unetflow.config`;
tests/test_settings.py checks that every setting has a flag (or is a YAML-only site
setting) and a YAML key.
"""

from __future__ import annotations

from typing import Any, Callable

import click
from click.core import ParameterSource

from unetflow.cli.common import friendly_errors, setup_logging
from unetflow.config import setting


def setting_option(*decls: str, path: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option for the run setting at dotted *path* (``tiling.overlap``): its
    parameter is named after the path, its default and choices are the setting's."""
    s = setting(path)
    kwargs.setdefault("default", s.default)
    if s.choices and "type" not in kwargs:
        kwargs["type"] = click.Choice(list(s.choices))
    return click.option(*decls, s.param, **kwargs)


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("output_path", metavar="OUTPUT")
@click.option("--model", "model", required=True, type=click.Path(), help="A unetflow checkpoint (.pt: `unetflow model init` or `unetflow train` makes one), or a bioimage.io model package (.zip, rdf.yaml or its folder).")
@setting_option("--trust-model-code", path="trust_model_code", is_flag=True, help="Let a bioimage.io package run Python code it carries (an architecture file). Without it such packages are refused; torchscript and unetflow architectures need no code.")
@setting_option("--workers", path="cluster.workers", type=int, show_default=True, help="CPU workers. Each holds one block and one model (more workers: more memory) and uses cores/N of the CPU. One worker runs as threads of this process; several get a process each (see --processes). 0 runs blocks in this process without Dask (debugging).")
@setting_option("--gpus", path="cluster.gpus", type=int, show_default=True, help="One worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES. Overrides --workers.")
@setting_option("--processes/--threads", path="cluster.processes", help="CPU workers as processes of their own, or as threads of this process [default: threads for one worker, processes for several]. A process costs a second start of torch (~2 s) and its memory, and buys a nanny that restarts a worker past its memory limit, and glibc settings at start.")
@setting_option("--scheduler", path="cluster.address", help="Address of a running Dask scheduler (tcp://host:8786) to use instead of starting a cluster.")
@setting_option("--block-shape", path="tiling.block_shape", help="Write box per block (default 3-D 512x512 across and, along Z, up to 2048 deep, split so that every worker gets a block; 2-D 4096 across, up to 16384 along Y). A block streams along its first axis, so memory grows with the other axes only (about 1.5 GB per worker at 512x512 planes, see --dry-run). A patch on a block border is computed by both blocks: smaller blocks cost about 1 + patch/block more compute per split axis, but give more blocks to share among workers and a finer unit of --resume. Must be whole output chunks (or shards).")
@setting_option("--patch-shape", path="tiling.patch_shape", help="Input shape of one forward pass (default 3-D 64^3, 2-D 256^2, fitted to the model). Larger patches: less overlap overhead and blend work, more GPU memory and more re-computed border per block.")
@setting_option("--chunk-shape", path="output_settings.chunk_shape", help="Output chunk shape (spatial; default 64^3 / 256^2 or the block shape).")
@setting_option("--shard-shape", path="output_settings.shard_shape", help="Output shard shape (Zarr v3 sharding; whole chunks). Blocks then align to shards.")
@setting_option("--blend", path="tiling.blend", show_default=True, help="For `same` nets: blend overlapping patches with a gaussian or flat window, or keep each patch's centre (crop, exact but needs a halo >= the receptive radius). `valid` nets always overlap-tile exactly.")
@setting_option("--overlap", path="tiling.overlap", type=float, show_default=True, help="Blend overlap as a fraction of the patch. More overlap: smoother seams, more compute (0.5 doubles it per axis).")
@setting_option("--halo", path="tiling.halo", help="Crop mode: voxels dropped on each side of a patch (default: the receptive radius).")
@setting_option("--allow-small-halo", path="tiling.allow_small_halo", is_flag=True, help="Crop mode: accept a halo smaller than the receptive radius (results then depend on the tiling; warns).")
@setting_option("--mirror", path="tiling.mirror", show_default=True, help="How context outside the image is filled (numpy names).")
@setting_option("--batch-size", path="tiling.batch_size", type=int, show_default=True, help="Patches per forward pass. 0: on CPU one per core of the worker, run side by side with one torch thread each (measured 1.7x faster than one patch on all threads); on GPU as many as fit in half the free memory. Larger: better GPU use, more memory.")
@setting_option("--skip-empty", path="skip.empty", is_flag=True, help="Leave blocks whose input is constant to the fill value (0) without running the model.")
@setting_option("--skip-threshold", path="skip.threshold", type=float, help="With --skip-empty: also skip blocks whose input maximum is below this value.")
@setting_option("--mask", path="skip.mask", help="A Zarr foreground mask of any resolution (scaled to the image); blocks with no nonzero mask voxel are skipped and stay 0.")
@setting_option("--tta", path="tiling.tta", is_flag=True, help="Test-time augmentation: every patch is predicted under all flips of its axes (4 in 2-D, 8 in 3-D) and averaged before blending. That many times the model work; smoother probabilities, fewer split or merged objects on a weakly trained model. Blockwise results stay equal to whole-image ones.")
@setting_option("--compile", path="compile", is_flag=True, help="torch.compile the model (slower start, often faster on GPUs).")
@setting_option("--output", path="output_settings.kind", show_default=True, help="Class probabilities (C, ...), argmax labels, or instances: one 64-bit id per object for models trained on instance labels (background/interior/border), consistent across blocks (a CPU merge phase after the blocks).")
@setting_option("--interior-threshold", path="output_settings.interior_threshold", type=float, help="Instances: interior probability a voxel needs to seed an object (default 0.6; 0 is the plain argmax). Higher splits more touching objects, lower merges more.")
@setting_option("--dtype", path="output_settings.dtype", help="Probabilities: float32 (default), float16 or uint8 (x255, 4x smaller). Labels: the smallest unsigned type that fits.")
@setting_option("--write-threads", path="output_settings.write_threads", type=int, show_default=True, help="Threads per worker that convert (on CPU), compress and write finished planes. 0: 2. More keep a fast GPU fed when compression bounds the run (the verdict says so); each holds one output chunk layer of the block in memory.")
@setting_option("--nan-value", path="nan_value", type=float, help="Replace NaN and Inf in the input by this value before the model (statistics ignore them). Without it an input holding NaN or Inf is refused, naming the count.")
@setting_option("--overwrite", path="output_settings.overwrite", is_flag=True, help="Replace an existing output, only if unetflow segment made it (or it is an empty folder); anything else is refused. Without it an existing output is never touched.")
@setting_option("--dry-run", path="dry_run", is_flag=True, help="Print the plan (blocks, shapes, redundancy, memory per worker) and stop.")
@setting_option("--device", path="device", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N or mps. A device this machine does not have is refused before any work.")
@setting_option("--amp/--no-amp", path="amp", help="Mixed precision (bf16, fp16 where bf16 is missing). Default: on for GPUs (about 2x faster, probabilities differ ~1e-2), off on CPU.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@setting_option("--ome", path="output_settings.ome", is_flag=True, help="Write OME-Zarr 0.5 (multiscales, voxel size, a pyramid for viewers; labels under labels/segmentation). On by default for OUTPUT ending in .ome.zarr.")
@setting_option("--image", path="output_settings.image", show_default=True, help="OME-Zarr labels/instances: put the input image at OUTPUT's root with the labels under labels/, so viewers open OUTPUT as image + labels. copy: its chunk files (re-encoded where they are not Zarr v3), as much disk as the input levels used; link: symlinks to a local OME-Zarr 0.5 input's levels (no copy; the output breaks if the input moves); none: the labels alone (open OUTPUT/labels/segmentation). Not used when OUTPUT is INPUT/labels/NAME: the labels then go into the input OME-Zarr's own labels group.")
@setting_option("--level", path="level", type=int, help="Resolution level of a multiscale INPUT (OME-Zarr, pyramidal OME-TIFF); 0 is full resolution.")
@click.option("-v", "--verbose", count=True, help="-v: a log line per block; -vv: debug.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="YAML run config (cluster, tiling, output, device); see pipelines/configs/. Flags given on the command line override it.")
@setting_option("--resume", path="resume", is_flag=True, help="Finish an existing output: skip blocks with a done marker, after checking it was made with the same settings and model. Takes over the stale lock of a dead run. With --output instances every labelling phase resumes too, from the files it left in OUTPUT.unetflow/instances/ (a merge cut short restarts from its pair files).")
@setting_option("--part", path="part", help="i/n: compute only every n-th block starting at block i-1; n independent jobs with --part 1/n .. n/n write one output together. With --output instances a part runs only the GPU blocks: a final run with --resume (no --part) labels the instances once every part has finished (a CPU pass over every block, a merge on the driver, a second pass that writes the output).")
@setting_option("--tuning/--no-tuning", path="tuning", show_default=True, help="Apply unetflow's allocator and Dask housekeeping settings (glibc trim and mmap thresholds, transparent huge pages for torch, a slower Dask memory monitor) to this process and to the workers it starts. Measured on a 2-core CPU machine only (docs/performance.md); off, every process keeps the system's defaults.")
@friendly_errors
def segment(input_path: str, output_path: str, model: str, progress: bool, verbose: int, config_file: str | None, **params: Any) -> None:
    """Segment INPUT into OUTPUT (a new Zarr v3 array, or OME-Zarr for *.ome.zarr / --ome).

    INPUT is a Zarr array, an OME-Zarr image (--level), a TIFF / BigTIFF / OME-TIFF,
    a folder or quoted glob of one TIFF per z-slice, file.h5:/dataset, or an fsspec
    URL (s3://, gs://, https://) of Zarr; credentials come from the environment.
    OUTPUT given as INPUT/labels/NAME (--output labels|instances, a local OME-Zarr 0.5
    INPUT) writes the labels into the input's own labels group, the NGFF way; nothing
    else of INPUT is written, and a read-only INPUT is refused before any block runs.

    \b
    Examples:
      unetflow segment raw.zarr pred.zarr --model unet.pt --gpus 4
      unetflow segment stack.ome.tif pred.ome.zarr --model unet.pt
      unetflow segment em.h5:/volumes/raw pred.zarr --model unet.pt
      unetflow segment s3://bucket/raw.ome.zarr pred.ome.zarr --model unet.pt --level 1
      unetflow segment data.zarr/em/raw pred.zarr --model unet.pt --workers 2 --block-shape 256,256,256
      unetflow segment raw.ome.zarr raw.ome.zarr/labels/nuclei --model unet.pt --output labels   # into the input's labels
      unetflow segment raw.zarr pred.zarr --model unet.pt --dry-run
      unetflow segment raw.zarr pred.zarr --model unet.pt --config pipelines/configs/slurm.yaml
      unetflow segment raw.zarr pred.zarr --model unet.pt --resume      # after a crash or a lost job
      unetflow segment raw.zarr pred.zarr --model unet.pt --part 3/8    # one of 8 independent jobs
      unetflow segment raw.zarr pred.zarr --model zoo-model.bioimageio.zip   # a bioimage.io package
    """
    setup_logging(verbose)
    from unetflow.config import from_flags, load_yaml
    from unetflow.resume import RunDir

    config = from_flags({"input": input_path, "output": output_path, "model": model}, typed_settings(params),
                        yaml=load_yaml(config_file) if config_file else None)
    report = _segment(config, progress=progress)
    if config.dry_run:
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
    from unetflow.formats.omezarr import viewer_path, wants_ome

    if wants_ome(output_path, ome=config.output_settings.ome):
        click.echo(f"open it: napari --plugin napari-ome-zarr {viewer_path(output_path, kind=config.output_settings.kind, image=config.output_settings.image)}")


def typed_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The settings the user typed on the command line, by dotted path (flags left at
    their defaults are left out: the defaults are the specs' own)."""
    ctx = click.get_current_context()
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name.replace("__", "."): value for name, value in params.items() if ctx.get_parameter_source(name) in typed}


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

        return run.segment(config, progress=progress, dispatch=dispatch, checked=True)


def _print_plan(summary: dict[str, Any]) -> None:
    click.echo("plan (nothing computed):")
    for key, value in summary.items():
        click.echo(f"  {key:22s} {value}")
