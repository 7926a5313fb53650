"""What a process that runs blocks does once, at its start: imports, quiet logs, tuning.

Clusters that unetflow starts name this module in ``distributed.worker.preload``
(:data:`unetflow.schedule.WORKER_PRELOAD`), so every worker runs :func:`dask_setup`
before it joins the scheduler. Workers that someone else started (``--scheduler``) can
use it too: ``dask worker ADDRESS --preload unetflow.worker``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from unetflow import tuning

log = logging.getLogger(__name__)


def dask_setup(worker: Any) -> None:
    """Import the block code (and torch) now, keep block tracebacks off the console, and
    apply :mod:`unetflow.tuning` where the run asked for it.

    The import costs about 1.5 s on a CPU. Done here, it runs while the worker starts,
    and the driver samples the input statistics meanwhile (the cluster starts in the
    background, see ``schedule.Dispatcher``). Otherwise it would run when the first
    block arrives.
    """
    quiet_compute_failed()
    import unetflow.infer  # noqa: F401  (torch, the model code, the block loop)

    tuning.tune_worker()
    log.debug("worker %s: unetflow loaded", getattr(worker, "address", "?"))


class _ComputeFailedFilter(logging.Filter):
    """Drops distributed's "Compute Failed" records (a task's traceback, at ERROR)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


_FILTER = _ComputeFailedFilter()
BATCH_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "_CONDOR_JOB_AD")


def quiet_compute_failed() -> None:
    """Keep block tracebacks off the console (issue 15): a block's failure is reported
    by the driver in one line, and its traceback goes to ``report.json``. Batch jobs keep
    the record: their output is the job log, not the console. Idempotent."""
    if any(os.environ.get(v) for v in BATCH_JOB_VARIABLES):
        return
    logger = logging.getLogger("distributed.worker")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
