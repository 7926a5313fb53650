"""Run bioimage.io model packages on the block engine (issue 19).

A package (a ``.zip``, its ``rdf.yaml`` / ``bioimageio.yaml``, or an unpacked folder)
is read with ``bioimageio.spec`` (never executing anything) and mapped onto what the
engine already knows, so that it runs blockwise like a unetflow checkpoint:

- axes: the input's (batch, channel, space) and the output's are mapped to unetflow's
  (B, C, [Z,] Y, X); a missing batch or channel axis is added and removed around the
  net, extra axes of size 1 likewise;
- sizes: each space axis's ``min + k * step`` and the output ``offset`` (a ``valid``
  net's margin) give a :class:`PackageGeometry`; its receptive radius is the declared
  output halo or, for ``same`` nets without one, what :func:`probe_radius` measures;
- values: the package's statistics preprocessing (``scale_range``,
  ``zero_mean_unit_variance``) becomes a :class:`NormSpec`, whose statistics the driver
  samples once over the whole dataset (never per block: per-block statistics make
  seams); fixed pointwise steps (``scale_linear``, ``clip``, ...) run in
  :class:`PackageNet`'s forward, and a final ``softmax``/``sigmoid`` is the activation.

Weights: TorchScript first; ``pytorch_state_dict`` only with an architecture unetflow
provides (``unetflow.*``), always loaded with ``weights_only=True``. Anything that needs
Python code from the package is refused, naming the formats present, unless the user
trusts it (``--trust-model-code``).
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from unetflow.config import ModelSpec, NormSpec
from unetflow.errors import CheckpointError, ConfigError, InputNotFoundError, ShapeError

log = logging.getLogger(__name__)

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
INSTALL = "pip install 'unetflow[bioimageio]'"
TRUST_FLAG = "--trust-model-code"
SPACE_ORDER = ("z", "y", "x")
STAT_OPS = {"scale_range", "zero_mean_unit_variance"}
FIXED_OPS = {"scale_linear", "clip", "binarize", "fixed_zero_mean_unit_variance", "sigmoid", "softmax", "ensure_dtype"}


def require_spec() -> None:
    """Raise ConfigError naming the install command if bioimageio.spec is missing."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError(f"bioimage.io packages need bioimageio.spec, which is not installed; {INSTALL}") from None


def is_package(path: str) -> bool:
    """Whether *path* names a bioimage.io package: a zip holding an rdf.yaml, the yaml
    itself, or a folder holding one. Reads at most the zip's table of contents."""
    p = Path(path)
    if p.is_dir():
        return any((p / n).is_file() for n in RDF_NAMES)
    if p.name in RDF_NAMES or p.name.endswith(".bioimageio.yaml"):
        return True
    if p.suffix == ".zip" and p.is_file():
        try:
            with zipfile.ZipFile(p) as z:
                return any(n in RDF_NAMES for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def build_unet(**spec: Any) -> nn.Module:
    """unetflow's U-Net from :class:`ModelSpec` fields: the architecture callable that
    exported packages' ``pytorch_state_dict`` weights name."""
    from unetflow.model.unet import UNet

    return UNet(ModelSpec.from_dict(spec))


def read_description(path: str) -> Any:
    """The package's ModelDescr (format 0.5; 0.4 is updated), read without IO checks.

    Raises
    ------
    InputNotFoundError, CheckpointError
    """
    require_spec()
    from bioimageio.spec import load_model_description

    if not os.path.exists(path):
        raise InputNotFoundError(f"model package {path} does not exist; check the path")
    source = next((str(Path(path) / n) for n in RDF_NAMES if (Path(path) / n).is_file()), path) if os.path.isdir(path) else path
    try:
        return load_model_description(source, format_version="latest", perform_io_checks=False)
    except (ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a valid bioimage.io model package ({first}); validate it with `bioimageio validate`") from err


# --- the mapping: axes, sizes, values -------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One pre- or postprocessing step of the package: its id and keyword arguments."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if v is not None)
        return f"{self.id}({args})"


@dataclass(frozen=True)
class Mapping:
    """A package described in unetflow's terms (see the module docstring).

    ``in_order``/``out_order``: the package's axes as unetflow letters (``b``, ``c``, the
    space ids, ``1`` for extra axes of size 1); ``space``: the space ids in unetflow's
    order; ``sizes``: (min, step) per space axis (step 0: a fixed size); ``offset``: the
    output size minus the input size, per space axis; ``halo``: the declared output halo.
    """

    name: str
    dims: int
    in_channels: int
    classes: int
    space: tuple[str, ...]
    in_order: tuple[str, ...]
    out_order: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    offset: tuple[int, ...]
    halo: tuple[int, ...]
    norm: NormSpec
    pre: tuple[Step, ...]
    post: tuple[Step, ...]
    activation: str
    formats: tuple[str, ...]
    known_radius: int | None = None  # a package unetflow exported: its UNetGeometry's radius, not probed


def map_description(descr: Any, *, name: str) -> Mapping:
    """Map a ModelDescr (format 0.5) onto the engine, or refuse what it cannot run.

    Raises
    ------
    CheckpointError
        Several inputs or outputs, unsupported axes, resampling outputs, or processing
        the engine cannot apply; the message names the package and the thing.
    """
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise CheckpointError(f"model package {name} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; "
                              "unetflow runs packages with one input and one output")
    inp, out = descr.inputs[0], descr.outputs[0]
    in_order, space, in_channels = _axes_order(inp.axes, name=name, what="input")
    out_order, out_space, classes = _axes_order(out.axes, name=name, what="output")
    if sorted(out_space) != sorted(space):
        raise CheckpointError(f"model package {name}: output space axes {out_space} differ from the input's {space}")
    sizes = tuple(_input_size(_axis(inp.axes, a), name=name) for a in space)
    offset, halo = zip(*(_output_size(_axis(out.axes, a), inp, sizes[i], name=name) for i, a in enumerate(space)))
    norm, pre = _preprocessing(inp.preprocessing, in_channels, name=name)
    post, activation = _postprocessing(out.postprocessing, name=name)
    formats = tuple(f for f in ("torchscript", "pytorch_state_dict", "onnx", "keras_hdf5", "keras_v3", "tensorflow_saved_model_bundle",
                                "tensorflow_js") if getattr(descr.weights, f, None) is not None)
    return Mapping(name, len(space), in_channels, classes, space, in_order, out_order, sizes, tuple(offset), tuple(halo),
                   norm, pre, post, activation, formats, _exported_radius(descr, sizes))


def _exported_radius(descr: Any, sizes: tuple[tuple[int, int], ...]) -> int | None:
    """The receptive radius of a U-Net unetflow exported (its spec is in ``config.unetflow``),
    if that spec's sizes are the package's (an edited package falls back to the probe)."""
    extra = getattr(descr.config, "model_extra", None) or {}
    spec = extra.get("unetflow", {}).get("spec") if isinstance(extra.get("unetflow"), dict) else None
    if not isinstance(spec, dict):
        return None
    try:
        geometry = _unet_geometry(ModelSpec.from_dict(spec))
    except (ConfigError, TypeError):
        return None
    if any((lo, step) != (geometry.min_input, geometry.input_multiple) for lo, step in sizes):
        return None
    return int(geometry.receptive_radius)


def _unet_geometry(spec: ModelSpec) -> Any:
    from unetflow.model.geometry import UNetGeometry

    return UNetGeometry.from_spec(spec)


def _axes_order(axes: Any, *, name: str, what: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(the axes as letters, the space ids in unetflow's order, the channel count)."""
    order, space, channels = [], [], 1
    for ax in axes:
        kind = ax.type
        if kind == "batch":
            order.append("b")
        elif kind == "channel":
            order.append("c")
            channels = len(ax.channel_names)
        elif kind == "space":
            order.append(str(ax.id))
            space.append(str(ax.id))
        elif isinstance(getattr(ax, "size", None), int) and ax.size == 1:
            order.append("1")
        else:
            raise CheckpointError(f"model package {name}: {what} axis {ax.id!r} of type {kind} is not batch, channel or space; "
                                  "unetflow runs 2-D and 3-D images (time and index axes only of size 1)")
    if len(space) not in (2, 3) or order.count("c") > 1 or order.count("b") > 1:
        raise CheckpointError(f"model package {name}: {what} axes {tuple(order)} are not 2 or 3 space axes with at most one "
                              "batch and one channel axis")
    if set(space) <= set(SPACE_ORDER):
        space = sorted(space, key=SPACE_ORDER.index)  # the image's (Z, Y, X) order
    return tuple(order), tuple(space), channels


def _axis(axes: Any, axis_id: str) -> Any:
    return next(ax for ax in axes if str(ax.id) == axis_id)


def _input_size(ax: Any, *, name: str) -> tuple[int, int]:
    size = ax.size
    if isinstance(size, int):
        return size, 0
    if hasattr(size, "step"):
        return int(size.min), int(size.step)
    raise CheckpointError(f"model package {name}: input axis {ax.id} takes its size from another tensor ({size}); "
                          "unetflow needs a fixed or parameterized size")


def _output_size(ax: Any, inp: Any, size: tuple[int, int], *, name: str) -> tuple[int, int]:
    """(offset, halo) of one output space axis: output size = input size + offset."""
    ref = ax.size
    halo = int(getattr(ax, "halo", 0) or 0)
    in_ax = _axis(inp.axes, str(ax.id))
    if float(getattr(ax, "scale", 1.0)) != float(getattr(in_ax, "scale", 1.0)):
        raise CheckpointError(f"model package {name}: output axis {ax.id} has scale {ax.scale} but the input {in_ax.scale}; "
                              "unetflow runs nets whose output has the input's resolution")
    if isinstance(ref, int):
        if size[1] != 0:
            raise CheckpointError(f"model package {name}: output axis {ax.id} has a fixed size {ref} for a variable input; "
                                  "unetflow needs an output size that references the input")
        return ref - size[0], halo
    if str(ref.axis_id) != str(ax.id):
        raise CheckpointError(f"model package {name}: output axis {ax.id} takes its size from input axis {ref.axis_id}; "
                              "unetflow maps each output axis to the input axis of the same name")
    return int(ref.offset), halo


def _steps(ops: Any) -> list[Step]:
    return [Step(str(op.id), dict(op.kwargs.model_dump()) if getattr(op, "kwargs", None) is not None else {}) for op in ops]


def _preprocessing(ops: Any, channels: int, *, name: str) -> tuple[NormSpec, tuple[Step, ...]]:
    """The statistics step as a NormSpec (per channel over space, dataset-wide) and the
    fixed steps after it. A statistics step must come first (after ``ensure_dtype``)."""
    steps = [s for s in _steps(ops) if s.id != "ensure_dtype"]
    norm = NormSpec(kind="none")
    if steps and steps[0].id in STAT_OPS:
        norm = _norm_of(steps[0], channels, name=name)
        steps = steps[1:]
    for s in steps:
        _check_axis(s, name=name)
        if s.id not in FIXED_OPS:
            where = "after a fixed step" if s.id in STAT_OPS else "that unetflow cannot apply per block"
            raise CheckpointError(f"model package {name}: preprocessing step {s.describe()} {where}; unetflow applies one "
                                  "statistics step (scale_range, zero_mean_unit_variance) first, then fixed pointwise steps")
    return norm, tuple(steps)


def _norm_of(step: Step, channels: int, *, name: str) -> NormSpec:
    axes = step.kwargs.get("axes")
    if channels > 1 and (axes is None or "channel" in [str(a) for a in axes]):
        raise CheckpointError(f"model package {name}: preprocessing {step.describe()} pools statistics over channels; "
                              "unetflow measures them per channel (give the step axes without 'channel')")
    if step.id == "scale_range":
        return NormSpec(kind="percentile", low=float(step.kwargs.get("min_percentile", 0.0)),
                        high=float(step.kwargs.get("max_percentile", 100.0)))
    return NormSpec(kind="meanstd")


def _check_axis(step: Step, *, name: str) -> None:
    """Per-axis arguments (``scale_linear`` along an axis, ...) are applied per channel only."""
    axis = step.kwargs.get("axis")
    if step.id != "softmax" and axis is not None and str(axis) != "channel":
        raise CheckpointError(f"model package {name}: {step.describe()} varies along axis {axis}; "
                              "unetflow applies per-axis arguments along the channel axis only")


def _postprocessing(ops: Any, *, name: str) -> tuple[tuple[Step, ...], str]:
    """Fixed pointwise steps run in the forward pass; a final sigmoid/softmax is the activation."""
    steps = [s for s in _steps(ops) if s.id != "ensure_dtype"]
    for s in steps:
        _check_axis(s, name=name)
        if s.id not in FIXED_OPS:
            raise CheckpointError(f"model package {name}: postprocessing step {s.describe()} needs statistics or code "
                                  "that unetflow does not apply per block; use a package without it")
        if s.id == "softmax" and str(s.kwargs.get("axis", "channel")) != "channel":
            raise CheckpointError(f"model package {name}: softmax over axis {s.kwargs.get('axis')}; unetflow takes it over channels")
    if steps and steps[-1].id in ("sigmoid", "softmax"):
        return tuple(steps[:-1]), steps[-1].id
    return tuple(steps), "none"


# --- the geometry ------------------------------------------------------------------------------


class PackageGeometry:
    """What the plan needs of a package's net (:class:`unetflow.plan.NetGeometry`).

    One rule for every space axis: sizes ``min_input + k * input_multiple`` valid on all
    of the package's axes; a ``valid`` net's output is smaller by ``2 * margin``. The
    receptive radius is the declared halo, or measured by *probe* on first use (``same``
    nets without a halo: only the driver asks, for crop mode and ``model info``).
    """

    def __init__(self, mapping: Mapping, probe: Callable[[], int] | None = None) -> None:
        m = mapping
        if len(set(m.offset)) > 1 or m.offset[0] > 0 or m.offset[0] % 2:
            raise CheckpointError(f"model package {m.name}: output offsets {m.offset} per axis are not one even, non-positive "
                                  "number; unetflow needs the same margin on every axis")
        self.margin = -m.offset[0] // 2
        self.padding = "valid" if self.margin else "same"
        self.min_input, self.input_multiple = _common_sizes(m)
        self.fixed = any(step == 0 for _, step in m.sizes)
        self.declared_halo = max(m.halo)
        self.known_radius = m.known_radius
        self._probe = probe

    def is_valid_input(self, n: int) -> bool:
        if self.fixed:
            return n == self.min_input
        return n >= self.min_input and (n - self.min_input) % self.input_multiple == 0

    def output_size(self, n: int) -> int:
        """Output size for an input of size *n* along any axis; ShapeError naming valid sizes."""
        if not self.is_valid_input(int(n)):
            rule = f"{self.min_input} only" if self.fixed else f"{self.min_input} + k*{self.input_multiple}"
            raise ShapeError(f"input size {n} does not fit this model package (valid sizes are {rule}); "
                             f"use --patch-shape {self.nearest_valid(int(n))}")
        return int(n) - 2 * self.margin

    def nearest_valid(self, n: int) -> int:
        if self.fixed or n <= self.min_input:
            return self.min_input
        return self.min_input + math.ceil((n - self.min_input) / self.input_multiple) * self.input_multiple

    @cached_property
    def receptive_radius(self) -> int:
        if self.padding == "valid":
            return self.margin + self.input_multiple - 1  # as UNetGeometry: the pooling phase's shift
        if self.declared_halo:
            return self.declared_halo
        if self.known_radius is not None:
            return self.known_radius
        return self._probe() if self._probe is not None else 0

    def describe(self) -> dict[str, Any]:
        return {
            "padding": self.padding, "input_multiple": self.input_multiple, "min_input": self.min_input,
            "fixed_size": self.fixed, "margin": self.margin, "declared_halo": self.declared_halo,
            "receptive_radius": self.receptive_radius,
            "receptive_field": 2 * self.receptive_radius + 1,
        }


def _common_sizes(m: Mapping) -> tuple[int, int]:
    """(min, step) valid on every space axis: step the lcm, min the first common size."""
    steps = [s for _, s in m.sizes if s > 0]
    step = math.lcm(*steps) if steps else 1
    start = max(lo for lo, _ in m.sizes)
    fixed = [lo for lo, s in m.sizes if s == 0]
    for n in ([start] if fixed else range(start, start + step * max(1, len(m.sizes)) + 1)):
        if all((s == 0 and n == lo) or (s > 0 and n >= lo and (n - lo) % s == 0) for lo, s in m.sizes):
            return n, step
    raise CheckpointError(f"model package {m.name}: no input size is valid on every space axis (min, step per axis {m.sizes}); "
                          "unetflow cuts patches of one size rule for all axes")


# --- the net ---------------------------------------------------------------------------------


class PackageNet(nn.Module):
    """A package's network in unetflow's layout: (B, C, *S) normalised -> (B, K, *S').

    Attributes ``dims``, ``in_channels``, ``classes``, ``activation``, ``geometry`` and
    ``norm`` are what :func:`unetflow.model.predictor.net_info` and ``run.prepare`` read.
    """

    def __init__(self, net: nn.Module, mapping: Mapping) -> None:
        super().__init__()
        self.net = net
        self.mapping = mapping
        self.dims, self.in_channels, self.classes = mapping.dims, mapping.in_channels, mapping.classes
        self.activation = mapping.activation
        self.norm = mapping.norm
        self.geometry = PackageGeometry(mapping, probe=self.probe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mapping
        x = apply_steps(x, m.pre)
        if "b" not in m.in_order:  # one sample at a time
            return torch.cat([self._one(x[i : i + 1]) for i in range(x.shape[0])])
        return self._one(x)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mapping
        y = self.net(to_package(x, m.in_order, m.space))
        return apply_steps(from_package(y, m.out_order, m.space), m.post)

    def probe(self) -> int:
        """The measured receptive radius (see :func:`probe_radius`)."""
        return probe_radius(self, self.geometry)


def to_package(x: torch.Tensor, order: tuple[str, ...], space: tuple[str, ...]) -> torch.Tensor:
    """(B, C, *space) -> the package's axis order (missing axes dropped, size-1 extras added)."""
    have = ["b", "c", *space]
    if "b" not in order:
        x, have = x[0], have[1:]
    if "c" not in order:
        x, have = x[:, 0] if have[0] == "b" else x[0], [a for a in have if a != "c"]
    x = x.permute([have.index(a) for a in order if a != "1"])
    for i, a in enumerate(order):
        if a == "1":
            x = x.unsqueeze(i)
    return x


def from_package(y: torch.Tensor, order: tuple[str, ...], space: tuple[str, ...]) -> torch.Tensor:
    """The package's output axes -> (B, K, *space)."""
    keep = [i for i, a in enumerate(order) if a != "1"]
    y = y.reshape([y.shape[i] for i in keep])
    names = [order[i] for i in keep]
    for a in ("b", "c"):
        if a not in names:
            y, names = y.unsqueeze(0), [a, *names]
    return y.permute([names.index(a) for a in ("b", "c", *space)])


def apply_steps(x: torch.Tensor, steps: tuple[Step, ...]) -> torch.Tensor:
    """Fixed pointwise steps on (B, C, *S); per-channel arguments broadcast over C."""
    for s in steps:
        k = s.kwargs
        if s.id == "scale_linear":
            x = x * _per_channel(k.get("gain", 1.0), x) + _per_channel(k.get("offset", 0.0), x)
        elif s.id == "fixed_zero_mean_unit_variance":
            x = (x - _per_channel(k["mean"], x)) / (_per_channel(k["std"], x) + float(k.get("eps", 1e-6)))
        elif s.id == "clip":
            x = x.clamp(min=k.get("min"), max=k.get("max"))
        elif s.id == "binarize":
            x = (x > _per_channel(k["threshold"], x)).to(x.dtype)
        elif s.id == "sigmoid":
            x = torch.sigmoid(x)
        elif s.id == "softmax":
            x = torch.softmax(x, dim=1)
    return x


def _per_channel(value: Any, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, *([1] * (x.ndim - 2)))
    return float(value)


PROBE_LIMIT = {2: 512, 3: 192}  # longest probe image along one axis


@torch.no_grad()
def probe_radius(net: nn.Module, geometry: PackageGeometry) -> int:
    """Measure how far one input voxel changes the output: an impulse on a random
    background (seeded), once per pooling phase, along each axis of an image long along
    it and thin across; the image grows until the change stays clear of its ends.

    A lower bound for the net's weights (a dead ReLU can hide a path). A net whose every
    output depends on the whole input (instance or layer normalisation) reaches the
    ends at every size: the limit is returned with a warning, and crop mode then
    cannot be exact (blend, or patches as large as the image).
    """
    thin = geometry.nearest_valid(max(geometry.min_input, geometry.input_multiple))
    dims, limit = net.dims, PROBE_LIMIT[net.dims]
    radius = 0
    for axis in range(dims):
        size = geometry.nearest_valid(64)
        while True:
            reach = _probe_axis(net, geometry, size, thin, axis)
            if reach < size // 2 - geometry.input_multiple or size >= limit or geometry.fixed:
                break
            size = geometry.nearest_valid(2 * size)
        if reach >= size // 2 - geometry.input_multiple:
            log.warning("the model's receptive field reaches the ends of a %d-voxel probe (instance or layer normalisation?): "
                        "crop-mode halos cannot make tiles exact; use --blend gaussian", size)
        radius = max(radius, reach)
    log.info("probed receptive radius %d", radius)
    return radius


def _probe_axis(net: nn.Module, geometry: PackageGeometry, size: int, thin: int, axis: int) -> int:
    shape = [thin] * net.dims
    shape[axis] = size
    g = torch.Generator().manual_seed(0)
    base = torch.rand((1, net.in_channels, *shape), generator=g)
    ref = net(base)
    margin, reach = geometry.margin, 0
    start = size // 2 - geometry.input_multiple // 2
    for bright in range(start, start + geometry.input_multiple):
        where = [n // 2 for n in shape]
        where[axis] = bright
        x = base.clone()
        x[(0, slice(None), *where)] += 10.0
        diff = (net(x) - ref).abs().amax(dim=(0, 1))
        changed = torch.nonzero(diff > 1e-6 * (1.0 + float(ref.abs().amax())))[:, axis]
        if len(changed):
            reach = max(reach, int((changed + margin - bright).abs().max()))
    return reach


# --- the weights -----------------------------------------------------------------------------


def load_weights(descr: Any, mapping: Mapping, *, trust_code: bool) -> nn.Module:
    """The package's network on the CPU, in eval mode: TorchScript first, then a
    ``pytorch_state_dict`` whose architecture unetflow provides (or, trusted, any).

    Raises
    ------
    CheckpointError
        No weights unetflow may run (the message names the formats present and the
        flag), or a state dict that is not plain tensors (pickled objects are refused).
    """
    w, name = descr.weights, mapping.name
    if w.torchscript is not None:
        module = torch.jit.load(io.BytesIO(_local_bytes(w.torchscript, name=name)), map_location="cpu")
        return module.eval()
    sd = w.pytorch_state_dict
    if sd is not None and (trust_code or _unetflow_architecture(sd.architecture)):
        net = _architecture(sd.architecture, name=name)
        net.load_state_dict(_state_dict(sd, name=name))
        return net.eval()
    why = ""
    if sd is not None:
        arch = sd.architecture
        where = f"file {arch.source}" if hasattr(arch, "source") else f"module {arch.import_from}"
        why = f"; its pytorch_state_dict needs Python code from {where} ({arch.callable}): pass {TRUST_FLAG} if you trust it"
    raise CheckpointError(f"model package {name} has weights in {', '.join(mapping.formats) or 'no format'}; unetflow runs "
                          f"torchscript, or pytorch_state_dict with an architecture from unetflow{why}")


def _local_bytes(file: Any, *, name: str) -> bytes:
    """The bytes of a file of the package; never a download (workers may have no internet).

    Raises
    ------
    CheckpointError
        The file is a URL: the message says to download the package first.
    """
    source = str(file.source)
    if "://" in source and not source.startswith("file://"):
        raise CheckpointError(f"model package {name}: {source} is on the internet; unetflow reads local files only: "
                              "download the package (.zip) first, e.g. from bioimage.io, and pass its path")
    return bytes(file.get_reader().read())


def _unetflow_architecture(arch: Any) -> bool:
    return hasattr(arch, "import_from") and (arch.import_from == "unetflow" or arch.import_from.startswith("unetflow."))


def _architecture(arch: Any, *, name: str) -> nn.Module:
    """Build the architecture: a unetflow callable, or (trusted) the package's code."""
    kwargs = dict(arch.kwargs)
    if hasattr(arch, "import_from"):
        module = importlib.import_module(arch.import_from)
    else:
        source = _local_bytes(arch, name=name)
        module = type(sys)(f"unetflow_package_code_{abs(hash(name))}")
        exec(compile(source, str(arch.source), "exec"), module.__dict__)  # noqa: S102 - only with --trust-model-code
    return getattr(module, str(arch.callable))(**kwargs)


def _state_dict(weights: Any, *, name: str) -> dict[str, Any]:
    import pickle

    try:
        state = torch.load(io.BytesIO(_local_bytes(weights, name=name)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        from unetflow.model.checkpoint import _reason

        raise CheckpointError(f"model package {name}: pytorch_state_dict {weights.source} cannot be loaded safely "
                              f"({_reason(err)}); unetflow loads only plain tensors, never pickled objects") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"model package {name}: pytorch_state_dict {weights.source} holds a {type(state).__name__}, not a state dict")
    return state


# --- the source the engine loads ----------------------------------------------------------


@dataclass(frozen=True)
class PackageSource:
    """A network from a bioimage.io package (path: zip, rdf.yaml or folder), loaded on
    each worker; *trust_code* allows architectures that are code from the package."""

    path: str
    trust_code: bool = False

    def load(self) -> PackageNet:
        descr = read_description(self.path)
        mapping = map_description(descr, name=self.path)
        net = PackageNet(load_weights(descr, mapping, trust_code=self.trust_code), mapping)
        log.debug("loaded model package %s (%s)", self.path, mapping.formats)
        return net.eval()

    def describe(self) -> dict[str, object]:
        return {"kind": "bioimageio", "path": os.path.abspath(self.path), "trust_code": self.trust_code}


def package_info(path: str) -> dict[str, Any]:
    """What ``unetflow model info`` prints for a package, without loading its weights."""
    descr = read_description(path)
    m = map_description(descr, name=path)
    geometry = PackageGeometry(m)
    info: dict[str, Any] = {
        "kind": "bioimage.io package", "name": descr.name, "format_version": descr.format_version,
        "dims": m.dims, "in_channels": m.in_channels, "classes": m.classes, "axes_in": "".join(m.in_order),
        "axes_out": "".join(m.out_order), "weights": ", ".join(m.formats),
        "preprocessing": ", ".join([_norm_text(m.norm)] + [s.describe() for s in m.pre]),
        "postprocessing": ", ".join([s.describe() for s in m.post] + ([m.activation] if m.activation != "none" else [])) or "none",
    }
    info.update({k: v for k, v in geometry.describe().items() if k not in ("receptive_radius", "receptive_field")})
    info["known_radius"] = m.known_radius
    return info


def _norm_text(norm: NormSpec) -> str:
    if norm.kind == "percentile":
        return f"percentile {norm.low}..{norm.high} (dataset-wide, per channel)"
    return "meanstd (dataset-wide, per channel)" if norm.kind == "meanstd" else "none"
