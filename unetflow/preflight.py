"""Checks of a segmentation's settings before any work (issue 15): touches nothing.

:func:`check` runs once, before the model loads or a cluster starts (the CLI calls it
first, else :func:`unetflow.run.segment` does): where the output lies against the input, mask and
model; what ``--overwrite`` would remove; whether the output exists; whether its
location is writable; whether the device exists. Torch is imported only when a GPU or
a named device is asked for. Checks that need the image and the plan (zero-size
inputs, room for the output) are in :mod:`unetflow.resolve`.
"""

from __future__ import annotations

import os

from unetflow import resume, store
from unetflow.config import RunConfig
from unetflow.errors import OutputExistsError


def check(config: RunConfig) -> None:
    """Every check that needs neither the model nor the image.

    Raises
    ------
    UnetflowError
        One line naming the path or setting, what was found, and the fix.
    """
    check_paths(config)
    check_existing_output(config)
    if not config.dry_run:
        store.check_writable(config.output)
    check_device_here(config)


def check_paths(config: RunConfig) -> None:
    """The output (and its run folder) may not be, lie inside or contain the input, the
    mask or the model (resolved paths, symlinks and URLs compared); except labels written
    into the input's own ``labels`` group, if the input can take them (:mod:`unetflow.formats.attach`)."""
    from unetflow.formats import attach

    others = [("input", config.input), ("mask", config.skip.mask), ("model", config.model)]
    into = attach.target(config.output)
    if into is not None:  # labels into the input's own labels group (issue 18): refused unless it can take them
        attach.check(into, input_path=config.input, kind=config.output_settings.kind, level=config.level)
        if not config.dry_run:
            attach.check_writable(into)
    store.check_apart(config.output, others[1:] if into is not None else others)
    store.check_apart(str(resume.RunDir(config.output).path), others, what="run folder")


def check_existing_output(config: RunConfig) -> None:
    """An existing output: refused without ``--overwrite``, ``--resume`` or ``--part``
    (after naming a live run's lock); with ``--overwrite`` it must be one that
    ``unetflow segment`` created, or an empty folder (:func:`unetflow.store.check_output_free`)."""
    o = config.output_settings
    joining = config.resume or config.part is not None
    if os.path.lexists(config.output) and not o.overwrite and not joining and not config.dry_run:
        resume.check_unlocked(resume.RunDir(config.output), config.part, takeover=False)
        raise OutputExistsError(
            f"output {config.output} already exists; pass --resume to finish it, --overwrite to replace it, or choose another path"
        )
    if o.overwrite:
        store.check_output_free(config.output, overwrite=True, kinds=("segment",))
    if o.kind == "instances":
        store.check_output_free(scratch_path(config.output), overwrite=True, kinds=("scratch",), what="instances scratch")


def scratch_path(output: str) -> str:
    """Where phase 1 of instance labelling writes local ids (removed when the run ends):
    beside the output, or beside the input image that labels are written into."""
    from unetflow.formats import attach

    return os.path.abspath(attach.beside(output)) + ".instances-scratch"


def check_device_here(config: RunConfig) -> None:
    """The device exists, where blocks run on this machine (``inline`` or a local
    cluster); a remote scheduler's or batch jobs' workers are not checked here."""
    c = config.cluster
    if c.kind not in ("local", "inline"):
        return
    if config.device in ("auto", "cpu") and not c.gpus:
        return
    from unetflow.model.devices import check_device

    check_device(config.device, gpus=c.gpus if c.kind == "local" else 0)
