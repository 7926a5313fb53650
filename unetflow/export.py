"""Write a unetflow checkpoint as a bioimage.io model package (format 0.5, issue 19).

The package is what the BioImage Model Zoo shares and what Fiji/deepImageJ, ilastik,
QuPath, napari plugins and bioimageio.core run: an ``rdf.yaml`` built and validated by
``bioimageio.spec`` (never hand-written YAML), plus, in one zip:

- ``weights.torchscript.pt``: the net traced to TorchScript (runs anywhere torch runs);
- ``weights.state_dict.pt``: the plain state dict, with the architecture referenced as
  ``unetflow.model.zoo:build_unet`` and the :class:`ModelSpec` as its kwargs (for users
  who install unetflow);
- a test input (synthetic nuclei from :func:`unetflow.sample.make_sample`) and the
  output unetflow computes for it, a cover PNG (input | prediction) and a README with
  the training recipe, data shapes and validation scores kept in the checkpoint.

Sizes come from :class:`unetflow.model.geometry.UNetGeometry`: every space axis is
``min_input + k * 2**depth``; a ``valid`` net's output is smaller by ``2 * margin``
(the output axes' ``offset``). The stored normalisation becomes the preprocessing
(``scale_range`` with the model's percentiles, or ``zero_mean_unit_variance``, per
channel over the space axes) and the activation the postprocessing (``softmax`` over
channels, or ``sigmoid``). Nothing here reaches the internet: the description holds
no URL, so validation needs only the local files.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetflow import __version__
from unetflow.errors import ConfigError, OutputExistsError
from unetflow.model.checkpoint import LoadedCheckpoint, load_checkpoint
from unetflow.model.zoo import require_spec

log = logging.getLogger(__name__)

INPUT_ID = "raw"
OUTPUT_ID = "prediction"
TEST_SIZE = {2: 128, 3: 32}  # test input size per axis (at least: rounded up to a valid size)
UNET_CITATION = ("Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015",
                 "10.1007/978-3-319-24574-4_28")


def export_package(checkpoint: str, output: str, *, name: str | None = None, authors: tuple[str, ...] = (),
                   license: str = "CC-BY-4.0", seed: int = 0, overwrite: bool = False) -> Path:
    """Write the checkpoint *checkpoint* as the bioimage.io package *output* (a .zip).

    Returns
    -------
    Path of the written zip.

    Raises
    ------
    OutputExistsError
        *output* exists and *overwrite* is not set.
    ConfigError
        bioimageio.spec is missing, or the description it builds is not valid.
    """
    out = Path(output)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"package {out} already exists; pass --overwrite to replace it or choose another path")
    if out.suffix != ".zip":
        raise ConfigError(f"package path {out} does not end in .zip; name it like model.bioimageio.zip")
    require_spec()
    ckpt = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="unetflow-export-") as tmp:
        files = write_files(ckpt, Path(tmp), seed=seed)
        descr = build_description(ckpt, files, name=name or f"{Path(checkpoint).stem} (unetflow U-Net)", authors=authors, license=license)
        save_package(descr, out)
    log.info("wrote bioimage.io package %s", out)
    return out


# --- the files -----------------------------------------------------------------------------


def write_files(ckpt: LoadedCheckpoint, folder: Path, *, seed: int) -> dict[str, Path]:
    """Weights, test tensors, cover and README of *ckpt* into *folder*; their paths by role."""
    net = ckpt.net.eval()
    raw = test_input(ckpt, seed=seed)
    expected = expected_output(ckpt, raw)
    files = {
        "torchscript": folder / "weights.torchscript.pt",
        "state_dict": folder / "weights.state_dict.pt",
        "test_input": folder / "test_input.npy",
        "test_output": folder / "test_output.npy",
        "cover": folder / "cover.png",
        "readme": folder / "README.md",
    }
    torch.jit.save(trace(net, raw), str(files["torchscript"]))
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, files["state_dict"])
    np.save(files["test_input"], raw[None])
    np.save(files["test_output"], expected[None])
    write_cover(files["cover"], raw, expected)
    files["readme"].write_text(documentation(ckpt, raw.shape))
    return files


def test_input(ckpt: LoadedCheckpoint, *, seed: int) -> np.ndarray:
    """A synthetic nuclei image (C, *S) float32 of a valid input size: what the demo net was trained on."""
    from unetflow.sample import make_sample

    spec, geometry = ckpt.spec, ckpt.net.geometry
    size = geometry.nearest_valid_inputs(max(TEST_SIZE[spec.dims], geometry.min_input))[1]
    shape = (size,) * spec.dims
    channels = [make_sample(shape, seed=seed + c)[0] for c in range(spec.in_channels)]
    return np.stack(channels).astype(np.float32)


def expected_output(ckpt: LoadedCheckpoint, raw: np.ndarray) -> np.ndarray:
    """unetflow's prediction for the whole image *raw* (C, *S): normalised with its own
    statistics (as bioimageio.core does per sample), one forward pass, activated."""
    from unetflow.values import norm_stats, normalise

    norm = ckpt.spec.norm
    x = normalise(raw, norm, norm_stats(raw.reshape(raw.shape[0], -1), norm))
    with torch.inference_mode():
        y = ckpt.net(torch.from_numpy(x)[None])[0]
        y = torch.softmax(y, dim=0) if ckpt.spec.classes > 1 else torch.sigmoid(y)
    return y.numpy().astype(np.float32)


def trace(net: torch.nn.Module, raw: np.ndarray) -> torch.jit.ScriptModule:
    """*net* traced to TorchScript on an input like *raw*, checked at a second valid size.

    Raises
    ------
    ConfigError
        The trace gives a different result at another input size (shapes frozen in).
    """
    geometry = net.geometry
    example = torch.zeros((1, *raw.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about int() of sizes: checked below
        traced = torch.jit.trace(net, example, check_trace=False)
    other = tuple(n + geometry.input_multiple for n in raw.shape[1:])
    x = torch.randn((1, raw.shape[0], *other), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.allclose(traced(x), net(x), rtol=1e-5, atol=1e-5)
    if not same:
        raise ConfigError(f"the TorchScript trace of this net differs from the net at input size {other}; "
                          "report this as a unetflow bug")
    return traced


def write_cover(path: Path, raw: np.ndarray, prediction: np.ndarray) -> None:
    """A PNG of the middle slice: input (left) | prediction (right, last class), 8-bit grey."""
    import imageio.v3 as iio

    def middle(a: np.ndarray) -> np.ndarray:
        plane = a[a.shape[0] // 2] if a.ndim == 3 else a
        lo, hi = np.percentile(plane, [1, 99.8])
        return (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)

    left, right = middle(raw[0]), middle(prediction[-1])
    if right.shape != left.shape:  # valid nets: the output is smaller; centre it
        pad = [((a - b) // 2, a - b - (a - b) // 2) for a, b in zip(left.shape, right.shape)]
        right = np.pad(right, pad)
    iio.imwrite(path, np.concatenate([left, right], axis=1))


def documentation(ckpt: LoadedCheckpoint, test_shape: tuple[int, ...]) -> str:
    """The package README: architecture, sizes, normalisation, training recipe and scores."""
    spec, extra, geometry = ckpt.spec, ckpt.extra, ckpt.net.geometry
    lines = [
        f"# {spec.dims}-D U-Net ({spec.padding} convolutions), exported by unetflow {__version__}",
        "",
        f"The U-Net of Ronneberger et al. 2015: depth {spec.depth}, width {spec.width}, "
        f"{spec.in_channels} input channel(s), {spec.classes} classes {list(spec.class_names) or ''}.",
        f"Input sizes per space axis: {geometry.min_input} + k * {geometry.input_multiple}; "
        f"margin (valid nets: output smaller by 2 * margin) {geometry.margin}; "
        f"receptive field {geometry.receptive_field}, radius {geometry.receptive_radius}.",
        f"Normalisation: {spec.norm.kind} ({spec.norm.low}, {spec.norm.high} percentiles where it applies), "
        "statistics per image. unetflow computes them once over the whole dataset, never per block.",
        f"Test input: synthetic nuclei (`unetflow sample`), shape {tuple(test_shape)}.",
        "",
        "Run it blockwise over a large volume: `unetflow segment in.zarr out.zarr --model this.bioimageio.zip`.",
        "",
        "## Training",
        "",
        f"Made by: {extra.get('made_by', 'unknown')}; epochs trained: {extra.get('epoch', 'unknown')}; "
        f"best validation score: {extra.get('best_score', 'unknown')}.",
    ]
    if isinstance(extra.get("train_spec"), dict):
        recipe = {k: v for k, v in extra["train_spec"].items() if k not in ("resume", "init", "device")}
        lines += ["", "Recipe (unetflow TrainSpec):", "", "```json", json.dumps(recipe, indent=1), "```"]
    history = extra.get("history") or []
    if history:
        keys = [k for k in ("loss", "foreground_iou", "f1", "precision", "recall") if k in history[-1]]
        lines += ["", "## Validation", "", "Held-out validation scores of the last epochs (unetflow train):", "", "| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in history[-5:]:
            lines.append(f"| {row.get('epoch')} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    else:
        lines += ["", "## Validation", "", "No validation scores are stored in this checkpoint (it was not made by `unetflow train`)."]
    return "\n".join(lines) + "\n"


# --- the description ----------------------------------------------------------------------


def build_description(ckpt: LoadedCheckpoint, files: dict[str, Path], *, name: str, authors: tuple[str, ...], license: str) -> Any:
    """The validated ``bioimageio.spec`` ModelDescr (format 0.5) of the exported files.

    Raises
    ------
    ConfigError
        bioimageio.spec refuses the description (the message names the first error).
    """
    import pydantic
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as bmz

    spec = ckpt.spec
    space = ("z", "y", "x")[-spec.dims :]
    try:
        with ValidationContext(perform_io_checks=True):  # local files only: hashes, not downloads
            return bmz.ModelDescr(
                name=name,
                description=f"{spec.dims}-D {spec.padding} U-Net (depth {spec.depth}, width {spec.width}) for segmentation, exported by unetflow",
                authors=[bmz.Author(name=a) for a in (authors or ("unetflow user",))],
                cite=[bmz.CiteEntry(text=UNET_CITATION[0], doi=bmz.Doi(UNET_CITATION[1]))],
                license=bmz.LicenseId(license),
                documentation=bmz.FileDescr(source=files["readme"]),
                covers=[bmz.FileDescr(source=files["cover"])],
                tags=["unet", "segmentation", f"{spec.dims}d", "unetflow", "pytorch"],
                inputs=[input_tensor(bmz, ckpt, files, space)],
                outputs=[output_tensor(bmz, ckpt, files, space)],
                weights=weights(bmz, ckpt, files),
                config={"unetflow": {"version": __version__, "spec": spec.to_dict()}},
            )
    except pydantic.ValidationError as err:
        raise ConfigError(f"bioimageio.spec refuses the package description: {str(err).splitlines()[0]} "
                          f"({err.errors()[0].get('loc')}: {err.errors()[0].get('msg')})") from err


def input_tensor(bmz: Any, ckpt: LoadedCheckpoint, files: dict[str, Path], space: tuple[str, ...]) -> Any:
    spec, geometry = ckpt.spec, ckpt.net.geometry
    size = bmz.ParameterizedSize(min=geometry.min_input, step=geometry.input_multiple)
    axes = [bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier(f"channel{c}") for c in range(spec.in_channels)])]
    axes += [bmz.SpaceInputAxis(id=bmz.AxisId(a), size=size) for a in space]
    return bmz.InputTensorDescr(
        id=bmz.TensorId(INPUT_ID), axes=axes, test_tensor=bmz.FileDescr(source=files["test_input"]),
        data=bmz.IntervalOrRatioDataDescr(type="float32"), preprocessing=preprocessing(bmz, spec.norm, space),
        description="raw intensities, any range: the preprocessing normalises them",
    )


def preprocessing(bmz: Any, norm: Any, space: tuple[str, ...]) -> list[Any]:
    """The stored NormSpec as bioimage.io preprocessing, per channel over the space axes."""
    axes = [bmz.AxisId(a) for a in space]
    if norm.kind == "percentile":
        return [bmz.ScaleRangeDescr(kwargs=bmz.ScaleRangeKwargs(axes=axes, min_percentile=norm.low, max_percentile=norm.high))]
    if norm.kind == "meanstd":
        return [bmz.ZeroMeanUnitVarianceDescr(kwargs=bmz.ZeroMeanUnitVarianceKwargs(axes=axes))]
    return []


def output_tensor(bmz: Any, ckpt: LoadedCheckpoint, files: dict[str, Path], space: tuple[str, ...]) -> Any:
    spec, geometry = ckpt.spec, ckpt.net.geometry
    names = list(spec.class_names) or [f"class{k}" for k in range(spec.classes)]
    axes = [bmz.BatchAxis(), bmz.ChannelAxis(channel_names=[bmz.Identifier(n) for n in names])]
    axes += [
        bmz.SpaceOutputAxis(id=bmz.AxisId(a), size=bmz.SizeReference(tensor_id=bmz.TensorId(INPUT_ID), axis_id=bmz.AxisId(a),
                                                                     offset=-2 * geometry.margin))
        for a in space
    ]
    post = [bmz.SoftmaxDescr(kwargs=bmz.SoftmaxKwargs(axis=bmz.AxisId("channel")))] if spec.classes > 1 else [bmz.SigmoidDescr()]
    return bmz.OutputTensorDescr(
        id=bmz.TensorId(OUTPUT_ID), axes=axes, test_tensor=bmz.FileDescr(source=files["test_output"]),
        data=bmz.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)), postprocessing=post,
        description="class probabilities" + (f" ({', '.join(names)})" if spec.class_names else ""),
    )


def weights(bmz: Any, ckpt: LoadedCheckpoint, files: dict[str, Path]) -> Any:
    version = bmz.Version(torch.__version__.split("+")[0])
    architecture = bmz.ArchitectureFromLibraryDescr(callable=bmz.Identifier("build_unet"), import_from="unetflow.model.zoo",
                                                    kwargs=ckpt.spec.to_dict())
    return bmz.WeightsDescr(
        pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(source=files["state_dict"], architecture=architecture, pytorch_version=version,
                                                            comment="needs unetflow installed (pip install unetflow)"),
        torchscript=bmz.TorchscriptWeightsDescr(source=files["torchscript"], pytorch_version=version, parent="pytorch_state_dict",
                                                comment="traced by unetflow"),
    )


def save_package(descr: Any, out: Path) -> None:
    """Zip *descr* and its files to *out*, atomically (a temporary name, then a rename)."""
    from bioimageio.spec import save_bioimageio_package

    tmp = out.with_name(f".{out.name}.tmp.zip")
    try:
        save_bioimageio_package(descr, output_path=tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
