"""What a process that runs blocks does once, at its start: allocator settings and imports.

Clusters that unetflow starts name this module in ``distributed.worker.preload``
(:data:`unetflow.schedule.WORKER_PRELOAD`), so every worker runs :func:`dask_setup`
before it joins the scheduler. Workers that someone else started (``--scheduler``) can
use it too: ``dask worker ADDRESS --preload unetflow.worker``.

A worker *process* gets its allocator settings from its environment at exec
(``GLIBC_TUNABLES``, :data:`unetflow.schedule.WORKER_MALLOC_TUNABLES`). A worker that
runs in the driver's process (the default single CPU worker, or ``--workers 0``) starts
too late for that: :func:`tune_allocator` gives it the same two effects, as far as a
running process can take them.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

# Arrays of this size and more get their own mappings (see WORKER_MALLOC_TUNABLES)
MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc mallopt() parameters
_M_TRIM_THRESHOLD = -1
# Free memory at the heap's top kept for reuse, at most. glibc's default (128 KiB; a fixed
# mmap threshold also fixes it) returned the top to the OS after nearly every free of a
# block loop temporary (1-4 MiB: patch outputs, converted slabs), which faulted straight
# back in: 0.5 M page faults and 1.1 s of system time in a 1.0 s block (issue 14).
TRIM_THRESHOLD = 8 * 2**20
_TUNED: dict[str, bool] = {}
_LOCK = threading.Lock()


def dask_setup(worker: Any) -> None:
    """Tune the allocator (where the process started without ``GLIBC_TUNABLES``: a worker
    in the driver's process, or one started by hand), import the block code (and torch)
    now, then freeze the heap's objects.

    - The import costs about 1.5 s on a CPU. Done here, it runs while the worker starts,
      and the driver samples the input statistics meanwhile (the cluster starts in the
      background, see ``schedule.Dispatcher``). Otherwise it would run when the first block arrives.
    - ``gc.freeze()`` moves every object alive now (mostly the modules of torch, numpy,
      zarr and distributed) out of the collector's reach: they live as long as the
      process anyway. Collections during blocks then skip them. So does the collection
      at interpreter exit: with torch loaded, the process exits about 0.2 s sooner
      (BENCHMARKS.md, issue 6). Objects created later are collected as usual.
    """
    tune_allocator()
    quiet_compute_failed()
    import unetflow.infer  # noqa: F401  (torch, the model code, the block loop)

    gc.freeze()
    log.debug("worker %s: unetflow loaded, %d objects frozen", getattr(worker, "address", "?"), gc.get_freeze_count())


def tune_allocator() -> dict[str, bool]:
    """Give this process the effects of :data:`~unetflow.schedule.WORKER_MALLOC_TUNABLES`
    where it started without them. Idempotent; returns what took effect.

    - Nothing when ``GLIBC_TUNABLES`` is set: a worker process unetflow started has its
      settings already, and a user who set their own keeps them.
    - ``huge_pages``: torch's ``THP_MEM_ALLOC_ENABLE=1``, so its large CPU buffers (the
      model's activations) are backed by transparent huge pages. Torch reads the
      variable at its first CPU allocation: it takes effect only where torch has not
      allocated yet (checked on a probe buffer).
    - ``mmap_threshold``: ``mallopt(M_MMAP_THRESHOLD, 4 MiB)``, which keeps the peak memory
      flat block after block (the heap does not fragment), and ``M_TRIM_THRESHOLD``
      8 MiB (:data:`TRIM_THRESHOLD`), so that the heap's top is not handed back and
      faulted in again around every temporary. Only together with huge
      pages: without them every activation would be faulted in 4 KiB at a time again,
      and the model ran ~45 % slower (BENCHMARKS.md, issue 6).
    """
    with _LOCK:
        if not _TUNED:
            _TUNED.update(_tune())
            log.debug("allocator tuned in process %d: %s", os.getpid(), _TUNED)
        return dict(_TUNED)


def _tune() -> dict[str, bool]:
    if os.environ.get("GLIBC_TUNABLES"):
        return {"huge_pages": False, "mmap_threshold": False, "skipped": True}
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from unetflow.model.predictor import torch_huge_pages

    huge = torch_huge_pages()
    threshold = False
    if huge:
        try:
            libc = ctypes.CDLL("libc.so.6")
            # the trim threshold fixed too: freeing large buffers before this call (the
            # probe, torch's import) raised it with the dynamic mmap threshold
            threshold = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):  # not glibc
            threshold = False
    return {"huge_pages": huge, "mmap_threshold": threshold, "skipped": False}


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
