"""Save and load U-Net checkpoints safely: a checkpoint never executes code.

A checkpoint is a ``torch.save`` of one plain dict::

    {"format": "unetflow-checkpoint", "format_version": 1,
     "unetflow_version": "0.1.0", "spec": ModelSpec.to_dict(),
     "state_dict": {name: tensor}, "extra": {...}}

It is always read with ``torch.load(..., weights_only=True)``, which refuses any
pickled object but tensors, dicts, lists, tuples, str, int, float, bool and None.
``extra`` carries training state (optimizer state dict, epoch, the command line)
under the same rule, and :func:`save_checkpoint` checks that before writing.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unetflow import __version__
from unetflow.config import ModelSpec
from unetflow.errors import CheckpointError, ConfigError, InputNotFoundError
from unetflow.model.unet import UNet

logger = logging.getLogger(__name__)

FORMAT = "unetflow-checkpoint"
FORMAT_VERSION = 1
_RESAVE = "re-save it with `unetflow model init` or `unetflow train`"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)
# torch.load raises these for files that are not (safe) torch checkpoints
# (OSError: a file cut short reaches torch's zip reader as "[Errno 22] Invalid argument")
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A loaded checkpoint: the net (in eval mode), its spec and what was saved with it."""

    net: UNet
    spec: ModelSpec
    unetflow_version: str
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike[str], net: UNet, *, extra: dict[str, Any] | None = None) -> Path:
    """Write *net* (spec and weights) and *extra* to *path*, atomically.

    The file is written next to *path* under a temporary name and moved into place
    with ``os.replace``, so a reader never sees half a checkpoint.

    Parameters
    ----------
    path : where to write; the folder must exist.
    net : the U-Net; its weights are stored on the CPU.
    extra : plain data only (tensors, dicts, lists, tuples, str, int, float, bool,
        None), e.g. ``{"optimizer": opt.state_dict(), "epoch": 3}``.

    Returns
    -------
    Path of the written checkpoint.

    Raises
    ------
    CheckpointError
        If *extra* holds something a safe load would refuse.
    InputNotFoundError
        If the folder of *path* does not exist.
    """
    path = Path(path)
    extra = dict(extra or {})
    _check_plain(extra, where="extra")
    if not path.parent.is_dir():
        raise InputNotFoundError(f"folder {path.parent} for checkpoint {path.name} does not exist; create it first")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "unetflow_version": __version__,
        "spec": net.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": extra,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("saved checkpoint %s (%s)", path, _summary(net.spec))
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint written by :func:`save_checkpoint`, never executing code.

    Parameters
    ----------
    path : the checkpoint file.
    map_location : device for the tensors and the net, as for ``torch.load``.

    Returns
    -------
    LoadedCheckpoint with the rebuilt net in eval mode.

    Raises
    ------
    InputNotFoundError
        If *path* does not exist.
    CheckpointError
        If the file is not a safe torch file, not a unetflow checkpoint, or its
        weights do not fit its spec (the message names the first bad keys).
    """
    path = Path(path)
    payload = _read_payload(path, map_location)
    spec = _spec_of(path, payload)
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict; {_RESAVE}")
    with torch.random.fork_rng(devices=[]):  # building a net must not move the caller's RNG
        net = UNet(spec)
    _check_state(path, net, state)
    net.load_state_dict(state)
    net.to(map_location).eval()
    extra = payload.get("extra") or {}
    version = str(payload.get("unetflow_version", "unknown"))
    logger.info("loaded checkpoint %s (%s, written by unetflow %s)", path, _summary(spec), version)
    return LoadedCheckpoint(net=net, spec=spec, unetflow_version=version, extra=dict(extra))


def read_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The :class:`ModelSpec` stored in a checkpoint, without building the net.

    Raises the same errors as :func:`load_checkpoint` for a missing, unsafe or
    foreign file; the weights are not checked.
    """
    path = Path(path)
    return _spec_of(path, _read_payload(path, "cpu"))


def _read_payload(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of *path*, every failure turned into one line."""
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint {path} does not exist; check the path or create one with `unetflow model init`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({_reason(err)}); {_RESAVE}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a unetflow checkpoint (format {found!r}); {_RESAVE}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {payload.get('format_version')!r} but this unetflow "
            f"reads {FORMAT_VERSION}; upgrade unetflow or {_RESAVE}"
        )
    return payload


def _spec_of(path: Path, payload: dict[str, Any]) -> ModelSpec:
    """The ModelSpec in *payload*, or a CheckpointError naming *path*."""
    if not isinstance(payload.get("spec"), dict):
        raise CheckpointError(f"checkpoint {path} has no model spec; {_RESAVE}")
    try:
        return ModelSpec.from_dict(payload["spec"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model spec ({err}); {_RESAVE}") from err


def _check_state(path: Path, net: UNet, state: dict[str, Any]) -> None:
    """Raise CheckpointError naming the first missing, unexpected and mis-shaped weights."""
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [
        f"{k} {_shape_of(state[k])} != {tuple(v.shape)}"
        for k, v in want.items()
        if k in state and _shape_of(state[k]) != tuple(v.shape)
    ]
    problems = [
        f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)} in all)"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} weights do not fit its spec ({_summary(net.spec)}): {'; '.join(problems)}; {_RESAVE}"
        )


def _shape_of(value: Any) -> tuple[int, ...] | str:
    """The shape of a tensor, or the type name of anything else."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_plain(value: Any, *, where: str) -> None:
    """Raise CheckpointError if *value* holds anything ``weights_only`` loading refuses."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            _check_plain(item, where=f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, where=f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(
            f"{where} holds a {type(value).__name__}, which a safe checkpoint load refuses; "
            "store only tensors, dicts, lists, str, int, float, bool or None"
        )


def _reason(err: BaseException) -> str:
    """A short, one-line reason from a torch.load error (its text can be pages long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled {found.group(1)} object"
    if isinstance(err, (EOFError, OSError)):
        return "the file is empty or cut short"
    if isinstance(err, KeyError) or "invalid load key" in text:
        return "not a torch file"
    first = text.strip().splitlines()[0].split(". ")[0][:120] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _summary(spec: ModelSpec) -> str:
    """``2-D valid U-Net, depth 4, width 64, 1 -> 2 channels``"""
    return f"{spec.dims}-D {spec.padding} U-Net, depth {spec.depth}, width {spec.width}, {spec.in_channels} -> {spec.classes} channels"


def check_replaceable(path: str | os.PathLike[str], *, overwrite: bool, what: str = "model file") -> None:
    """Refuse to write over *path* unless it is absent, or *overwrite* and it is a
    unetflow checkpoint (read safely: its ``format`` field is ``unetflow-checkpoint``).

    The guard of ``model init --overwrite`` and ``train --overwrite`` (issue 15): a
    folder, or a file that is not a checkpoint unetflow wrote, is never replaced.

    Raises
    ------
    OutputExistsError
    """
    from unetflow.errors import OutputExistsError

    path = Path(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it or choose another path")
    if path.is_symlink() or not path.is_file():
        found = f"a symbolic link to {os.readlink(path)}" if path.is_symlink() else "a folder"
    else:
        try:
            _read_payload(path, "cpu")
            return
        except (CheckpointError, InputNotFoundError, OSError):
            found = f"a file of {path.stat().st_size} bytes that is not a unetflow checkpoint"
    raise OutputExistsError(
        f"{what} {path} exists and is {found}; --overwrite replaces only unetflow checkpoints, never anything else: "
        "choose another path, or remove it yourself"
    )
