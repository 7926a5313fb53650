"""Frozen settings: every default and every validation of user-chosen values.

Settings are built once at the edge (CLI flags, YAML, a checkpoint) and passed down.
Nothing here imports another unetflow room but :mod:`unetflow.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

from unetflow.errors import ConfigError, ShapeError

PADDINGS = ("valid", "same")
NORMALISATIONS = ("percentile", "meanstd", "none")


def choose(value: str, options: Sequence[str], *, what: str) -> str:
    """Return *value* if it is one of *options*, else raise with a did-you-mean hint.

    >>> choose("same", PADDINGS, what="padding")
    'same'
    """
    text = str(value).strip().lower()
    if text in options:
        return text
    close = difflib.get_close_matches(text, options, n=1)
    hint = f" did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{what} '{value}' is not one of {', '.join(options)};{hint} pass one of them")


def parse_shape(value: Any, *, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """Turn ``"64,64"``, ``64`` or ``(64, 64)`` into a tuple of positive ints.

    A single int is repeated *ndim* times when *ndim* is given.

    >>> parse_shape("8,16", what="block shape")
    (8, 16)
    >>> parse_shape(4, what="patch shape", ndim=3)
    (4, 4, 4)
    """
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{what} '{value}' is not a list of integers; write it like 64,256,256") from None
    elif isinstance(value, int):
        items = [value] * (ndim or 1)
    else:
        items = [int(v) for v in value]
    if len(items) == 1 and ndim:
        items = items * ndim
    if ndim is not None and len(items) != ndim:
        raise ShapeError(f"{what} {tuple(items)} has {len(items)} axes but the image has {ndim} spatial axes; give {ndim} numbers")
    if not items or any(v <= 0 for v in items):
        raise ShapeError(f"{what} {tuple(items)} must be positive integers; give sizes >= 1")
    return tuple(items)


@dataclass(frozen=True)
class NormSpec:
    """How image intensities are normalised before the network sees them.

    ``percentile``: map the ``low``..``high`` percentiles of the image to 0..1.
    ``meanstd``: subtract the mean, divide by the standard deviation.
    ``none``: cast to float32 only. The statistics themselves are measured per image
    (on a bounded sample of its chunks) and recorded in the run config.
    """

    kind: str = "percentile"
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", choose(self.kind, NORMALISATIONS, what="normalisation"))
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ConfigError(f"normalisation percentiles ({self.low}, {self.high}) must satisfy 0 <= low < high <= 100")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a U-Net: stored in every checkpoint and output.

    Parameters
    ----------
    dims : 2 or 3 spatial dimensions.
    in_channels : image channels the net expects.
    classes : output channels (class scores).
    padding : ``valid`` (the paper: unpadded convolutions) or ``same``.
    depth : number of 2x poolings; the input must be a multiple of ``2**depth``.
    width : channels of the first level; doubled at each level down.
    norm : intensity normalisation used in training and inference.
    class_names : what each output channel means, e.g. ``("background", "interior", "border")``.
    """

    dims: int = 3
    in_channels: int = 1
    classes: int = 2
    padding: str = "same"
    depth: int = 3
    width: int = 16
    norm: NormSpec = field(default_factory=NormSpec)
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "padding", choose(self.padding, PADDINGS, what="padding"))
        if self.dims not in (2, 3):
            raise ConfigError(f"model dims {self.dims} is not 2 or 3; pass --dims 2 or --dims 3")
        for name in ("in_channels", "classes", "width"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model {name} {getattr(self, name)} must be >= 1")
        if not 0 <= self.depth <= 6:
            raise ConfigError(f"model depth {self.depth} must be between 0 and 6")
        if isinstance(self.norm, dict):
            object.__setattr__(self, "norm", NormSpec(**self.norm))
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model spec has unknown keys {unknown}; it was written by a newer unetflow, upgrade unetflow")
        if isinstance(data.get("norm"), dict):
            data["norm"] = NormSpec(**data["norm"])
        return cls(**data)


def to_dict(obj: Any) -> Any:
    """A frozen dataclass tree as plain JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


MIRRORS = ("reflect", "symmetric")
OUTPUT_KINDS = ("probabilities", "labels", "instances")
PROB_DTYPES = ("float32", "float16", "uint8")
CLUSTER_KINDS = ("local", "inline", "address")


@dataclass(frozen=True)
class TilingSpec:
    """How the image is cut: blocks (work units) and patches (forward passes).

    ``None`` shapes are chosen from the model and the image (see ``run.resolve``).
    """

    block_shape: tuple[int, ...] | None = None
    patch_shape: tuple[int, ...] | None = None
    blend: str = "gaussian"
    overlap: float = 0.25
    halo: tuple[int, ...] | None = None
    allow_small_halo: bool = False
    mirror: str = "reflect"
    batch_size: int = 0  # 0: chosen from the device (infer.auto_batch_size)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirror", choose(self.mirror, MIRRORS, what="mirror mode"))
        object.__setattr__(self, "blend", choose(self.blend, ("gaussian", "constant", "crop"), what="blend mode"))
        if self.batch_size < 0:
            raise ConfigError(f"batch size {self.batch_size} must be >= 1, or 0 to choose it from the device")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap {self.overlap} must be in [0, 1); 0.25 or 0.5 are usual")


@dataclass(frozen=True)
class OutputSettings:
    """What is written and how: kind, dtype, chunks, shards, compression."""

    kind: str = "probabilities"
    dtype: str | None = None
    chunk_shape: tuple[int, ...] | None = None
    shard_shape: tuple[int, ...] | None = None
    compression_level: int = 3
    overwrite: bool = False
    ome: bool = False  # OME-Zarr 0.5 output (also when the path ends in .ome.zarr)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", choose(self.kind, OUTPUT_KINDS, what="output kind"))
        if self.kind == "probabilities" and self.dtype is not None:
            object.__setattr__(self, "dtype", choose(self.dtype, PROB_DTYPES, what="probability dtype"))
        if self.kind != "probabilities" and self.dtype is not None and not str(self.dtype).startswith("uint"):
            raise ConfigError(f"labels dtype {self.dtype} must be an unsigned integer type like uint8; or leave it out")


@dataclass(frozen=True)
class ClusterSpec:
    """Where blocks run: ``local`` (a LocalCluster the run starts), ``address`` or ``inline``.

    ``inline`` computes blocks one after another in this process, without Dask:
    for debugging and small tests.
    """

    kind: str = "local"
    workers: int = 1
    gpus: int = 0
    address: str | None = None
    threads: int = 0
    memory_limit: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", choose(self.kind, CLUSTER_KINDS, what="cluster kind"))
        if self.workers < 1 or self.gpus < 0:
            raise ConfigError(f"workers {self.workers} / gpus {self.gpus} must be >= 1 / >= 0")
        if self.kind == "address" and not self.address:
            raise ConfigError("cluster kind 'address' needs a scheduler address like tcp://host:8786; pass --scheduler")


@dataclass(frozen=True)
class SkipSpec:
    """Blocks left to the output's fill value (0) without running the model.

    ``empty``: the block's input is constant, or (with ``threshold``) all below it.
    ``mask``: a Zarr array of any resolution, scaled to the image; blocks whose write
    box covers no nonzero mask voxel are skipped.
    """

    empty: bool = False
    threshold: float | None = None
    mask: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """One segmentation run: built by the CLI (or YAML), recorded in the output's attributes."""

    input: str
    output: str
    model: str
    tiling: TilingSpec = field(default_factory=TilingSpec)
    output_settings: OutputSettings = field(default_factory=OutputSettings)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    device: str = "auto"
    amp: bool | None = None
    dry_run: bool = False
    skip: SkipSpec = field(default_factory=SkipSpec)
    compile: bool = False
    level: int | None = None  # resolution level of a multiscale input (OME-Zarr, pyramidal TIFF)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


TARGET_KINDS = ("auto", "instances", "classes")
LOSSES = ("ce", "dice", "ce+dice")


@dataclass(frozen=True)
class TrainSpec:
    """How to train: data pairs, patches, schedule, loss and augmentation.

    ``pairs`` are (image path, labels path). Labels are instance labels (one id per
    object: trained as background / interior / border) or a class map (0..K-1).
    The last ``val_fraction`` of each pair along its first spatial axis is held out.
    """

    pairs: tuple[tuple[str, str], ...]
    output: str
    model: ModelSpec = field(default_factory=ModelSpec)
    targets: str = "auto"
    patch_shape: tuple[int, ...] | None = None
    epochs: int = 50
    steps_per_epoch: int = 50
    batch_size: int = 4
    learning_rate: float = 1e-3
    loss: str = "ce"
    w0: float = 10.0
    sigma: float = 5.0
    elastic_strength: float = 10.0
    elastic_grid: int = 3
    val_fraction: float = 0.2
    seed: int = 0
    resume: bool = False
    init: str | None = None
    device: str = "auto"
    amp: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", choose(self.targets, TARGET_KINDS, what="targets"))
        object.__setattr__(self, "loss", choose(self.loss, LOSSES, what="loss"))
        object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
        if not self.pairs:
            raise ConfigError("training needs at least one image:labels pair")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs {self.epochs}, steps {self.steps_per_epoch} and batch size {self.batch_size} must be >= 1")
        if not 0.0 <= self.val_fraction < 0.9:
            raise ConfigError(f"validation fraction {self.val_fraction} must be in [0, 0.9)")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
