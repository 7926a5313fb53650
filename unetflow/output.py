"""Create, claim and finish a run's output: its arrays, its attributes, its lock.

A fresh output is created and then locked; an existing one (``--resume``, ``--part``)
is locked and checked to come from the same settings and model (:mod:`unetflow.resume`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator, Sequence

import unetflow
from unetflow import preflight, resume, store
from unetflow.config import RunConfig, to_dict
from unetflow.errors import OutputExistsError, OutputWriteError, UnetflowError
from unetflow.resolve import RunPlan, is_ome

log = logging.getLogger(__name__)

def output_attributes(p: RunPlan, stats: Sequence[Sequence[float]]) -> dict[str, Any]:
    return {
        "unetflow": {
            "version": unetflow.__version__,
            "config": p.config.to_dict(),
            "model": {"spec": p.spec, "source": p.source.describe() if hasattr(p.source, "describe") else repr(p.source)},
            "plan": p.plan.summary(),
            "norm_stats": [list(s) for s in stats],
            "output": to_dict(p.output),
        }
    }


@contextlib.contextmanager
def storage_errors(output: str) -> Iterator[None]:
    """An OSError while the output or its run folder is created or claimed (read-only,
    full, permissions) -> one line naming the output and the cause."""
    try:
        yield
    except UnetflowError:
        raise
    except OSError as err:
        raise OutputWriteError(
            f"output {output} could not be written: {err.strerror or err} (errno {err.errno}) at {err.filename or output}; "
            "free space or make the location writable, then run again (with --resume if blocks were done)"
        ) from None


@contextlib.contextmanager
def claim_output(p: RunPlan, stats: Sequence[Sequence[float]], ident: dict[str, Any], run_dir: resume.RunDir) -> Iterator[resume.Lock]:
    """Create the output (or join it: ``--resume``, ``--part``) and hold its lock.

    A fresh output is created, then locked; an existing one is locked, then checked to
    have been made with the same settings and model. A live run's lock is refused
    (naming its host, pid and start), a dead run's stale lock is taken over on resume.
    """
    c = p.config
    joining = c.resume or c.part is not None
    exists = os.path.exists(c.output)
    if exists and c.output_settings.overwrite:
        resume.check_unlocked(run_dir, None, takeover=True)  # never delete under a live run
    if exists and not c.output_settings.overwrite:
        if not joining:
            resume.check_unlocked(run_dir, c.part, takeover=False)
            raise OutputExistsError(
                f"output {c.output} already exists; pass --resume to finish it, --overwrite to replace it, or choose another path"
            )
        lock = resume.acquire(run_dir, c.part, takeover=True)
        try:
            resume.check_same_run(run_dir, ident)
        except BaseException:
            lock.release()
            raise
    else:
        try:
            create_output_array(p, stats)
        except OutputExistsError:  # another --part job created it first
            if not joining:
                raise
            _wait_for(run_dir.run_file)
        else:
            run_dir.clear()  # a new store: markers beside it are an earlier output's (issue 18)
            resume.record_run(run_dir, ident)
        lock = resume.acquire(run_dir, c.part, takeover=c.resume)
        resume.check_same_run(run_dir, ident)
    try:
        yield lock
    finally:
        lock.release()


def _wait_for(path: Any, seconds: float = 30.0) -> None:
    t_end = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < t_end:
        time.sleep(0.2)


def run_identity(p: RunPlan, stats: Sequence[Sequence[float]]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue an output (see ``resume.identity``)."""
    model = p.source.describe() if hasattr(p.source, "describe") else {"repr": repr(p.source)}
    extra = {
        "input": {"path": store.absolute_input(p.config.input), "shape": list(p.layout.spatial_shape), "channels": p.layout.channels},
        "norm_stats": [[float(v) for v in s] for s in stats],
        "output": to_dict(p.output),
        "unetflow": unetflow.__version__,
    }
    return resume.identity(p.config.to_dict(), dict(model), extra)


scratch_path = preflight.scratch_path


def block_output(p: RunPlan) -> str:
    """The array the blocks write: the instances' uint64 scratch array, or the output's level 0."""
    if p.output.kind == "instances":
        return scratch_path(p.config.output)
    return os.path.abspath(output_array_path(p.config, p.output.kind))


def finish_ome(p: RunPlan, run_dir: resume.RunDir, *, blocks_done: int) -> None:
    """Write the OME-Zarr pyramid and metadata once every block (of every part) is done."""
    finished = run_dir.path / "ome-finished"
    if not is_ome(p.config) or len(run_dir.done_blocks()) < p.plan.n_blocks or (finished.exists() and not blocks_done):
        return
    if p.output.kind == "instances" and not run_dir.instances_finished.exists():  # after the labelling (a --part leaves it)
        return
    from unetflow.formats import omezarr

    c = p.config
    names = tuple((p.spec or {}).get("class_names") or ())
    contents = omezarr.Contents(p.info.classes, names, c.output_settings.image, p.image, p.layout.has_channel)
    omezarr.finish_prediction(c.output, kind=p.output.kind, input_path=c.input, level=c.level, contents=contents)
    finished.touch()


def output_array_path(config: RunConfig, kind: str) -> str:
    """The array the blocks write: the output itself, or level 0 inside an OME-Zarr group."""
    if not is_ome(config):
        return config.output
    from unetflow.formats import omezarr

    return omezarr.level0_path(config.output, kind=kind)


def create_output_array(p: RunPlan, stats: Sequence[Sequence[float]]) -> None:
    o = p.config.output_settings
    spatial = p.layout.spatial_shape
    names = ("z", "y", "x")[-len(spatial):]
    if p.output.kind == "probabilities":
        k = p.info.classes
        shape, chunks = (k, *spatial), (k, *p.chunk_shape)
        shards = (k, *p.shard_shape) if p.shard_shape else None
        dim_names = ("c", *names)
    else:
        shape, chunks, shards, dim_names = spatial, p.chunk_shape, p.shard_shape, names
    path = p.config.output
    if is_ome(p.config):
        from unetflow.formats import omeroot, omezarr

        if p.output.kind != "probabilities" and not omezarr.into_input(path):  # before anything is written (issue 18)
            omeroot.check_root_image(p.config.input, level=p.config.level, mode=o.image)
        path = omezarr.prepare_output(path, kind=p.output.kind, overwrite=o.overwrite)
    store.create_output(
        path, shape=shape, chunks=chunks, shards=shards, dtype=p.output.dtype, dimension_names=dim_names,
        attributes=output_attributes(p, stats), overwrite=o.overwrite, compression_level=o.compression_level,
    )
    if p.output.kind == "instances":
        scratch = scratch_path(p.config.output)
        store.create_output(scratch, shape=shape, chunks=chunks, dtype="uint64", overwrite=True, kinds=("scratch",),
                            attributes={"unetflow": {"scratch_of": os.path.abspath(p.config.output)}})
