"""Frozen settings: every default and every validation of user-chosen values.

Settings are built once at the edge (CLI flags, YAML, a checkpoint) and passed down:
each value is parsed and checked here, in the spec's ``__post_init__``, and nowhere
else. The CLI flags and the YAML keys of a run are derived from the fields of
:class:`RunConfig` (:func:`settings`), so a new field cannot be forgotten by either.
Nothing here imports another unetflow room but :mod:`unetflow.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence, get_args

from unetflow.errors import ConfigError, ShapeError

Padding = Literal["valid", "same"]
Normalisation = Literal["percentile", "meanstd", "none"]
Blend = Literal["gaussian", "constant", "crop"]
Mirror = Literal["reflect", "symmetric"]
OutputKind = Literal["probabilities", "labels", "instances"]
ImageMode = Literal["copy", "link", "none"]  # the input image at the root of an OME-Zarr labels output
ProbabilityDtype = Literal["float32", "float16", "uint8"]
ClusterKind = Literal["local", "inline", "address", "slurm", "pbs", "lsf", "sge", "htcondor"]
JobqueueKind = Literal["slurm", "pbs", "lsf", "sge", "htcondor"]
Targets = Literal["auto", "instances", "classes"]
Loss = Literal["ce", "dice", "ce+dice"]

PADDINGS: tuple[str, ...] = get_args(Padding)
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
BLENDS: tuple[str, ...] = get_args(Blend)
MIRRORS: tuple[str, ...] = get_args(Mirror)
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)
IMAGE_MODES: tuple[str, ...] = get_args(ImageMode)
PROB_DTYPES: tuple[str, ...] = get_args(ProbabilityDtype)
CLUSTER_KINDS: tuple[str, ...] = get_args(ClusterKind)
JOBQUEUE_KINDS: tuple[str, ...] = get_args(JobqueueKind)
TARGET_KINDS: tuple[str, ...] = get_args(Targets)
LOSSES: tuple[str, ...] = get_args(Loss)


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


DEVICES = ("auto", "cpu", "cuda", "mps")


def parse_device(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else is refused here,
    on the driver, with a did-you-mean (whether the device exists is checked later, by
    :func:`unetflow.model.devices.check_device`).

    >>> parse_device("CUDA:1")
    'cuda:1'
    """
    text = str(value).strip().lower()
    head, _, index = text.partition(":")
    if head in DEVICES and (not index or (head == "cuda" and index.isdigit())):
        return text
    close = difflib.get_close_matches(head, DEVICES, n=1)
    hint = f" did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"device '{value}' is not one of auto, cpu, cuda, cuda:N, mps;{hint} pass --device with one of them")


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


def fit_shape(shape: tuple[int, ...], ndim: int, *, what: str) -> tuple[int, ...]:
    """A parsed shape for an image of *ndim* spatial axes: one number is repeated.

    >>> fit_shape((4,), 3, what="patch shape")
    (4, 4, 4)
    """
    return parse_shape(shape, what=what, ndim=ndim)


def _parse_shapes(spec: Any, *names: str) -> None:
    """Parse the shape fields *names* of a frozen *spec* in place (``"64,64"``, 64, a list)."""
    for name in names:
        value = getattr(spec, name)
        if value is not None:
            object.__setattr__(spec, name, parse_shape(value, what=name.replace("_", " ")))


@dataclass(frozen=True)
class NormSpec:
    """How image intensities are normalised before the network sees them.

    ``percentile``: map the ``low``..``high`` percentiles of the image to 0..1.
    ``meanstd``: subtract the mean, divide by the standard deviation.
    ``none``: cast to float32 only. The statistics themselves are measured per image
    (on a bounded sample of its chunks) and recorded in the run config.
    """

    kind: Normalisation = "percentile"
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
    padding: Padding = "same"
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


@dataclass(frozen=True)
class TilingSpec:
    """How the image is cut: blocks (work units) and patches (forward passes).

    ``None`` shapes are chosen from the model and the image (see ``run.resolve``).
    """

    block_shape: tuple[int, ...] | None = None
    patch_shape: tuple[int, ...] | None = None
    blend: Blend = "gaussian"
    overlap: float = 0.25
    halo: tuple[int, ...] | None = None
    allow_small_halo: bool = False
    mirror: Mirror = "reflect"
    batch_size: int = 0  # 0: chosen from the device (model.predictor.auto_batch_size)

    def __post_init__(self) -> None:
        _parse_shapes(self, "block_shape", "patch_shape", "halo")
        object.__setattr__(self, "mirror", choose(self.mirror, MIRRORS, what="mirror mode"))
        object.__setattr__(self, "blend", choose(self.blend, BLENDS, what="blend mode"))
        if self.batch_size < 0:
            raise ConfigError(f"batch size {self.batch_size} must be >= 1, or 0 to choose it from the device")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap {self.overlap} must be in [0, 1); 0.25 or 0.5 are usual")


@dataclass(frozen=True)
class OutputSettings:
    """What is written and how: kind, dtype, chunks, shards, compression."""

    kind: OutputKind = "probabilities"
    dtype: str | None = None
    chunk_shape: tuple[int, ...] | None = None
    shard_shape: tuple[int, ...] | None = None
    compression_level: int = field(default=3, metadata={"cli": False})
    overwrite: bool = False
    ome: bool = False  # OME-Zarr 0.5 output (also when the path ends in .ome.zarr)
    interior_threshold: float | None = None  # instances: None = unetflow.label.INTERIOR_THRESHOLD
    write_threads: int = 0  # compress + write threads per worker; 0: unetflow.job.WRITE_THREADS
    image: ImageMode = "copy"  # OME-Zarr labels / instances: the input image at the root (copy, link) or not (none)

    def __post_init__(self) -> None:
        _parse_shapes(self, "chunk_shape", "shard_shape")
        if not 0 <= int(self.compression_level) <= 22:
            raise ConfigError(f"compression level {self.compression_level} must be in 0..22 (zstd); 3 is the default")
        object.__setattr__(self, "kind", choose(self.kind, OUTPUT_KINDS, what="output kind"))
        object.__setattr__(self, "image", choose(self.image, IMAGE_MODES, what="image mode"))
        if int(self.write_threads) < 0:
            raise ConfigError(f"write threads {self.write_threads} must be >= 1, or 0 for the default")
        if self.interior_threshold is not None and not 0.0 <= float(self.interior_threshold) < 1.0:
            raise ConfigError(f"interior threshold {self.interior_threshold} must be in [0, 1); pass e.g. 0.8 (0 is the plain argmax)")
        if self.kind == "probabilities" and self.dtype is not None:
            object.__setattr__(self, "dtype", choose(self.dtype, PROB_DTYPES, what="probability dtype"))
        if self.kind != "probabilities" and self.dtype is not None and not str(self.dtype).startswith("uint"):
            raise ConfigError(f"labels dtype {self.dtype} must be an unsigned integer type like uint8; or leave it out")


# field metadata: a setting only a YAML config sets (no CLI flag): cluster site settings
SITE = {"cli": False}
# field metadata: a setting the CLI takes as an argument (INPUT, OUTPUT) or a required option
ARGUMENT = {"cli": "argument", "yaml": False}


@dataclass(frozen=True)
class ClusterSpec:
    """Where blocks run: ``local`` (a LocalCluster the run starts), ``address`` or ``inline``.

    ``inline`` computes blocks one after another in this process, without Dask:
    for debugging and small tests.

    ``processes`` (local CPU workers): ``True`` starts each worker in a process of its
    own (a nanny restarts it if it overruns its memory limit; it imports torch, ~2 s);
    ``False`` runs the workers as threads of this process (dask's threaded worker: it
    starts in ~0.2 s and shares this process's torch and model); ``None`` (default):
    processes when there are several workers, this process for one. GPU workers are
    always processes (each is pinned to its GPU).
    """

    kind: ClusterKind = field(default="local", metadata=SITE)  # the CLI derives it from --workers / --scheduler
    workers: int = 1
    gpus: int = 0
    processes: bool | None = None
    address: str | None = None
    threads: int = field(default=0, metadata=SITE)
    memory_limit: str = field(default="auto", metadata=SITE)
    # dask-jobqueue (slurm, pbs, lsf, sge, htcondor): one dask worker per job. Site
    # settings (queue, account, modules) come from the user's config, never from here.
    queue: str | None = field(default=None, metadata=SITE)
    account: str | None = field(default=None, metadata=SITE)
    cores: int = field(default=1, metadata=SITE)
    memory: str = field(default="4GB", metadata=SITE)
    walltime: str | None = field(default=None, metadata=SITE)
    disk: str | None = field(default=None, metadata=SITE)  # htcondor needs it
    gpus_per_job: int = field(default=0, metadata=SITE)
    job_extra_directives: tuple[str, ...] = field(default=(), metadata=SITE)
    job_script_prologue: tuple[str, ...] = field(default=(), metadata=SITE)
    jobs: int = field(default=1, metadata=SITE)
    minimum_jobs: int = field(default=0, metadata=SITE)
    maximum_jobs: int = field(default=0, metadata=SITE)
    interface: str | None = field(default=None, metadata=SITE)
    log_directory: str | None = field(default=None, metadata=SITE)
    python: str | None = field(default=None, metadata=SITE)
    # every kind: worker resources such as {"GPU": 1}; blocks then ask for them, so
    # each worker runs one block at a time and blocks spread over all workers
    resources: tuple[tuple[str, float], ...] = field(default=(), metadata=SITE)
    retries: int = field(default=3, metadata=SITE)
    wait_timeout: float = field(default=300.0, metadata=SITE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", choose(self.kind, CLUSTER_KINDS, what="cluster kind"))
        if self.workers < 1 or self.gpus < 0:
            raise ConfigError(f"workers {self.workers} / gpus {self.gpus} must be >= 1 / >= 0")
        if self.processes is False and self.gpus:
            raise ConfigError(f"processes: false with gpus {self.gpus}: GPU workers are processes, each pinned to its GPU; drop processes: false")
        if self.kind == "address" and not self.address:
            raise ConfigError("cluster kind 'address' needs a scheduler address like tcp://host:8786; pass --scheduler")
        if isinstance(self.resources, dict):
            object.__setattr__(self, "resources", tuple(sorted((str(k), float(v)) for k, v in self.resources.items())))
        for name in ("job_extra_directives", "job_script_prologue"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.cores < 1 or self.jobs < 0 or self.retries < 0 or self.minimum_jobs < 0:
            raise ConfigError(f"cluster cores {self.cores}, jobs {self.jobs}, retries {self.retries} must be >= 1, >= 0, >= 0")
        if self.maximum_jobs and self.maximum_jobs < self.minimum_jobs:
            raise ConfigError(f"maximum_jobs {self.maximum_jobs} is below minimum_jobs {self.minimum_jobs}; raise maximum_jobs")
        if self.gpus_per_job > 1:
            raise ConfigError(
                f"gpus_per_job {self.gpus_per_job}: one worker process per job drives one GPU; "
                "use gpus_per_job: 1 and more jobs (jobs: N)"
            )

    @property
    def is_jobqueue(self) -> bool:
        return self.kind in JOBQUEUE_KINDS


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

    input: str = field(metadata=ARGUMENT)
    output: str = field(metadata=ARGUMENT)
    model: str = field(metadata=ARGUMENT)
    tiling: TilingSpec = field(default_factory=TilingSpec)
    output_settings: OutputSettings = field(default_factory=OutputSettings, metadata={"yaml": "output"})
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    device: str = "auto"
    amp: bool | None = None
    dry_run: bool = False
    skip: SkipSpec = field(default_factory=SkipSpec)
    compile: bool = False
    level: int | None = None  # resolution level of a multiscale input (OME-Zarr, pyramidal TIFF)
    resume: bool = False
    part: tuple[int, int] | None = None
    nan_value: float | None = None  # replaces NaN and Inf in the input (unetflow.finite); None: refuse them
    tuning: bool = False  # unetflow.tuning: allocator and Dask housekeeping settings, opt-in
    trust_model_code: bool = False  # a bioimage.io package may run Python code it carries (issue 19)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", parse_device(self.device))
        if self.nan_value is not None:
            value = float(self.nan_value)
            if not math.isfinite(value):
                raise ConfigError(f"--nan-value {self.nan_value} must be a finite number, e.g. 0; it replaces NaN and Inf in the input")
            object.__setattr__(self, "nan_value", value)
        if self.part is not None:
            object.__setattr__(self, "part", parse_part(self.part))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def parse_part(value: Any) -> tuple[int, int]:
    """``"3/8"`` or ``(3, 8)`` -> ``(3, 8)``: part 3 of 8, counted from 1.

    >>> parse_part("3/8")
    (3, 8)
    """
    try:
        i, n = (int(v) for v in (value.split("/") if isinstance(value, str) else value))
    except (ValueError, TypeError):
        raise ConfigError(f"part '{value}' is not like 3/8; pass --part i/n with 1 <= i <= n") from None
    if not 1 <= i <= n:
        raise ConfigError(f"part {i}/{n} needs 1 <= i <= n; pass --part i/n, e.g. --part 1/{max(n, 1)}")
    return i, n


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a dict; a clear error for a missing or bad file."""
    import yaml  # pyyaml: light, but only needed when a config file is given

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping like 'cluster: {{kind: slurm}}', not {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Setting:
    """One user setting of a run: a leaf field of :class:`RunConfig`.

    ``path`` is dotted (``tiling.block_shape``); ``param`` is its CLI parameter name
    (``tiling__block_shape``); ``yaml`` its dotted YAML key (``tiling.block_shape``,
    ``output.kind``); ``cli`` is True for a flag, False for a YAML-only site setting,
    ``"argument"`` for INPUT / OUTPUT / --model.
    """

    path: str
    yaml: str | None
    cli: bool | str
    default: Any
    choices: tuple[str, ...] = ()  # the options of a Literal-typed setting

    @property
    def param(self) -> str:
        return self.path.replace(".", "__")


def _sections(cls: type) -> dict[str, type]:
    """The fields of *cls* that are settings sections (frozen dataclasses)."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            out[f.name] = factory
    return out


def settings(cls: type | None = None, prefix: str = "", yaml_prefix: str = "") -> Iterator[Setting]:
    """Every leaf setting of *cls* (default :class:`RunConfig`), depth first.

    >>> next(s for s in settings() if s.path == "output_settings.kind").yaml
    'output.kind'
    """
    cls = cls or RunConfig
    sections = _sections(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yaml_name = f.metadata.get("yaml", f.name)
        if f.name in sections:
            yield from settings(sections[f.name], f"{prefix}{f.name}.", f"{yaml_prefix}{yaml_name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        yield Setting(prefix + f.name, None if yaml_name is False else yaml_prefix + yaml_name, f.metadata.get("cli", True), default, choices)


def setting(path: str) -> Setting:
    """The setting at dotted *path*, e.g. ``setting("tiling.overlap").default == 0.25``."""
    for s in settings():
        if s.path == path:
            return s
    raise KeyError(path)


def _known(cls: type, data: dict[str, Any], *, what: str) -> dict[str, Any]:
    """*data*'s keys as *cls* field names (YAML names mapped, dashes allowed); unknown keys refused."""
    names = {f.metadata.get("yaml", f.name): f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml") is not False}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(names))
    if unknown:
        close = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        hints = ", ".join(f"'{u}'" + (f" (did you mean '{c[0]}'?)" if c else "") for u, c in close.items())
        raise ConfigError(f"{what} has unknown settings {hints}; known: {', '.join(sorted(names))}")
    return {names[k]: v for k, v in data.items()}


def from_mapping(cls: type, data: Any, *, what: str = "config", **fields: Any) -> Any:
    """A *cls* from a YAML-style mapping: sections become nested specs, every value is
    checked by the spec it lands in. *fields* (input, output, model) are added as given.
    ``cluster: local`` is short for ``cluster: {kind: local}``; a cluster with only an
    ``address`` is of kind ``address``."""
    if isinstance(data, str) and cls is ClusterSpec:
        data = {"kind": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of settings, not {data!r}")
    kwargs = _known(cls, data, what=what)
    if cls is ClusterSpec and "address" in kwargs and "kind" not in kwargs:
        kwargs["kind"] = "address"
    for name, section in _sections(cls).items():
        if name in kwargs:
            yaml_name = next(f.metadata.get("yaml", f.name) for f in dataclasses.fields(cls) if f.name == name)
            kwargs[name] = from_mapping(section, kwargs[name], what=f"config section '{yaml_name}'")
    kwargs.update(fields)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{what}: {err}") from None


def run_config_from_mapping(data: dict[str, Any], **fields: Any) -> RunConfig:
    """A :class:`RunConfig` from a YAML mapping plus *fields* (input, output, model...).

    The mapping's keys are the settings of :func:`settings`: sections ``tiling``,
    ``output``, ``cluster`` (a mapping, or a kind such as ``local``) and ``skip``, and
    top-level ``device``, ``amp``, ``level``, ``compile``, ``resume``, ``part``...
    """
    return from_mapping(RunConfig, data, what="config", **fields)


def cluster_from_flags(workers: int = 1, gpus: int = 0, processes: bool | None = None, address: str | None = None) -> ClusterSpec:
    """The cluster the CLI's ``--workers / --gpus / --processes / --scheduler`` describe:
    a running scheduler, this process (``--workers 0``) or a local cluster."""
    if address:
        return ClusterSpec(kind="address", address=address)
    if workers == 0 and not gpus:
        return ClusterSpec(kind="inline")
    return ClusterSpec(kind="local", workers=max(workers, 1), gpus=gpus, processes=None if gpus else processes)


def from_flags(arguments: dict[str, Any], typed: dict[str, Any], *, yaml: dict[str, Any] | None = None) -> RunConfig:
    """The run the CLI describes: the YAML config (if any), then every flag the user typed.

    *typed* maps setting paths (``tiling.overlap``) to values; untyped flags are left
    out, so defaults come from the specs alone. Typed cluster flags (workers, gpus,
    processes, address) replace the YAML's cluster with the one they describe.
    """
    base = run_config_from_mapping(yaml or {}, **arguments)
    cluster = {k.split(".", 1)[1]: v for k, v in typed.items() if k.startswith("cluster.")}
    overrides = {k: v for k, v in typed.items() if not k.startswith("cluster.")}
    if cluster:
        overrides["cluster"] = cluster_from_flags(**cluster)
    return apply_overrides(base, overrides)


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Replace settings named by dotted keys, e.g. ``{"tiling.block_shape": (64, 64)}``.

    The CLI passes only the flags the user typed, so they win over the config file.
    """
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, values in nested.items():
        top[head] = dataclasses.replace(getattr(config, head), **values)
    return dataclasses.replace(config, **top)


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
    targets: Targets = "auto"
    patch_shape: tuple[int, ...] | None = None
    epochs: int = 50
    steps_per_epoch: int = 50
    batch_size: int = 4
    learning_rate: float = 1e-3
    loss: Loss = "ce"
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
        _parse_shapes(self, "patch_shape")
        object.__setattr__(self, "device", parse_device(self.device))
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
