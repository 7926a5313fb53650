"""The only orchestration: ``segment(config)`` as a sequence of named steps.

Data flows one way: config -> :mod:`~unetflow.resolve` (input and model checks, the
plan) -> :mod:`~unetflow.output` (created or claimed, locked) -> blocks dispatched by
:mod:`~unetflow.schedule` and computed by :mod:`~unetflow.infer` -> instance phases ->
:mod:`~unetflow.report`. Everything a user can get wrong is checked before the output
is touched or any block runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Iterator


from unetflow import instances, output, preflight, report, resume, schedule, store, telemetry, tuning
from unetflow.config import RunConfig
from unetflow.errors import BlockFailedError, OutputWriteError
from unetflow.infer import cancel_blocks, run_block
from unetflow.job import BlockJob
from unetflow.model.predictor import NetSource, torch_threads_kept
from unetflow.report import RunReport
from unetflow.resolve import RunPlan, check_room, input_stats, make_job, resolve

log = logging.getLogger(__name__)


def segment(config: RunConfig, *, source: NetSource | None = None, progress: bool = True, dispatch: schedule.Dispatcher | None = None,
            checked: bool = False) -> RunReport:
    """Run a whole segmentation: check, plan, create the output, run every block, report.

    With ``config.resume`` (or ``config.part``) an existing output made with the same
    settings and model is finished: blocks with a done marker are skipped. The run
    holds the output's lock throughout and writes ``<output>.unetflow/report.json``.

    *dispatch*: a :class:`schedule.Dispatcher` to run the blocks on, shared by several
    runs (the nightly pipeline keeps one cluster, and its batch jobs, for all its
    inputs). The run leaves it open, except after a failure, when blocks may still be
    running: then it is closed (a later dispatch starts a new cluster). By default the
    run opens its own and closes it before it releases the output's lock.

    *checked*: :func:`unetflow.preflight.check` has passed for *config* already (the CLI
    runs it before it starts a cluster); otherwise the run runs it first.

    Raises
    ------
    UnetflowError
        Bad input or settings (before anything is written), a locked output, or failed
        blocks (after the others finished and the report was written).
    """
    if config.tuning and not config.dry_run and schedule.computes_here(config.cluster):
        tuning.tune_allocator()  # before this process first allocates for torch (loading the model)
    if not checked:
        preflight.check(config)
    p = resolve(config, source=source)
    rep = RunReport(summary=p.summary())
    if config.dry_run:
        return rep
    check_room(p)
    run_dir = resume.RunDir(config.output)
    own = dispatch is None
    d = schedule.Dispatcher(config.cluster, log_directory=str(run_dir.log_dir), tuned=config.tuning) if dispatch is None else dispatch
    with d if own else contextlib.nullcontext(), torch_threads_kept():
        if schedule.starts_early(config):
            d.start()  # the cluster starts while the input statistics are sampled (a no-op when started already)
        failures, block_ids = _segment(p, rep, run_dir, d, progress=progress, close=own)
    if failures:
        raise BlockFailedError(report.failure_message(p, failures, len(block_ids)))
    return rep


def _segment(p: RunPlan, rep: RunReport, run_dir: resume.RunDir, dispatch: schedule.Dispatcher, *, progress: bool,
             close: bool) -> tuple[list[Any], list[int]]:
    """:func:`segment` from the input statistics on: claim the output, run the blocks, report.
    The cluster stops before the lock goes: always when *close*, else after a failure."""
    config = p.config
    stats = input_stats(store.sample_voxels(p.image, layout=p.layout), p.norm, nan_value=config.nan_value, name=config.input)
    ident = output.run_identity(p, stats)
    with output.storage_errors(config.output), output.claim_output(p, stats, ident, run_dir) as lock:
        block_ids = resume.part_blocks(p.plan.n_blocks, config.part)
        done = run_dir.done_blocks()
        todo = [b for b in block_ids if b not in done]
        rep.blocks_skipped = len(block_ids) - len(todo)
        if rep.blocks_skipped:
            log.info("resuming: %d of %d blocks already done, %d to do", rep.blocks_skipped, len(block_ids), len(todo))
        job = make_job(p, stats, output.block_output(p))
        t0 = time.perf_counter()
        try:
            with _closing(dispatch, always=close):
                record = instances.block_record if p.output.kind == "instances" else None  # numbering reads the counts back
                failures = _run_blocks(p, job, todo, rep, dispatch, resume.MarkDone(run_block, str(run_dir.done_dir), lock.holder["token"], record),
                                       progress=progress)
        except OutputWriteError as err:  # a full or read-only output: the run stops at the first block that met it
            rep.failures = [{"error": str(err)}]
            report.write_report(run_dir, config.part, report.report_dict(p, rep, ident, len(block_ids)))
            raise
        rep.seconds = time.perf_counter() - t0
        rep.telemetry = telemetry.summary(rep.results)
        log.info("telemetry: %s", rep.telemetry["verdict"])
        rep.failures = [report.failure_entry(p, f) for f in failures]
        if not failures:
            output.finish_ome(p, run_dir, blocks_done=rep.blocks_done)
        report.write_report(run_dir, config.part, report.report_dict(p, rep, ident, len(block_ids)))
    return failures, block_ids


def _run_blocks(p: RunPlan, job: BlockJob, todo: list[int], rep: RunReport, dispatch: schedule.Dispatcher, fn: Any, *,
                progress: bool) -> list[Any]:
    """Dispatch *todo*'s blocks (then, for instances, the labelling phases); tally each result into *rep*."""
    t0 = time.perf_counter()
    with _progress(len(todo), enabled=progress) as bar:
        def on_result(outcome: Any) -> None:
            result = outcome.result
            rep.results.append(result)
            rep.blocks_done += 1
            rep.voxels += result.voxels
            rep.workers.setdefault(outcome.worker, resume.Tally()).add(outcome, result.voxels, result.seconds, result.stages)
            bar.update(1)
            bar.set_postfix_str(f"{rep.voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
            log.info(json.dumps(report.block_log(p, result, outcome)))

        failures = dispatch(fn, job, todo, on_result=on_result)
        if p.output.kind == "instances" and not failures:
            label_instances(p, resume.RunDir(p.config.output), dispatch, fn.run_id)
    return failures


@contextlib.contextmanager
def _closing(dispatch: schedule.Dispatcher, *, always: bool) -> Iterator[None]:
    """Close *dispatch* after the run (*always*) or only after a failure or an interrupt
    (a shared one). Blocks of this run may still be running then, and must stop before
    the output's lock goes: those in this process (the threaded worker) are told to
    stop at their next forward pass; worker processes end with their cluster."""
    try:
        yield
    except BaseException:
        cancel_blocks()
        try:
            dispatch.close()
        finally:
            cancel_blocks(False)
        raise
    if always:
        dispatch.close()


def label_instances(p: RunPlan, run_dir: resume.RunDir, dispatch: Any, token: str) -> None:
    """Phases 2-4 of instances (:func:`unetflow.instances.label`), once every block of
    every part is done: a ``--part`` job leaves them to the final ``--resume``."""
    if p.config.part is not None:
        log.info("part %d/%d done; label the instances with `unetflow segment ... --resume` once every part has finished", *p.config.part)
        return
    out = os.path.abspath(output.output_array_path(p.config, p.output.kind))
    instances.label(p.plan, run_dir=run_dir, scratch=output.scratch_path(p.config.output), output=out, dispatch=dispatch, token=token)


def train(spec: Any, *, progress: bool = True) -> Any:
    """Train a U-Net (``unetflow train``): see :mod:`unetflow.train.loop`."""
    from unetflow.train.loop import train as train_loop

    return train_loop(spec, progress=progress)


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="block", disable=not enabled, dynamic_ncols=True, mininterval=0.5)
