"""Opt-in process settings (``--tuning``, ``tuning: true``): the allocator and Dask's
housekeeping, for this process and the worker processes a run starts.

Everything here was measured on one machine class only, a 2-core CPU VM
(docs/performance.md), so it is off by default: without ``--tuning`` a run leaves
glibc, transparent huge pages, the garbage collector and Dask's timers as the system
set them, in this process and in its workers. With it:

- worker processes start with ``GLIBC_TUNABLES`` (:data:`WORKER_MALLOC_TUNABLES`) and
  without distributed's ``MALLOC_TRIM_THRESHOLD_``; a worker in this process gets the
  same effects from :func:`tune_allocator`, as far as a running process can;
- workers freeze the objects alive after their imports out of the collector's reach
  (``gc.freeze``);
- workers run Dask's profiler off and its timers once a second
  (:data:`HOUSEKEEPING`; the nanny then enforces a memory limit up to a second later).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)

ENV = "UNETFLOW_TUNING"  # set to 1 in the environment of tuned worker processes

# Arrays of this size and more get their own mappings (see WORKER_MALLOC_TUNABLES)
MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc mallopt() parameters
_M_TRIM_THRESHOLD = -1
# Free memory at the heap's top kept for reuse, at most. glibc's default (128 KiB; a fixed
# mmap threshold also fixes it) returned the top to the OS after nearly every free of a
# block loop temporary (1-4 MiB: patch outputs, converted slabs), which faulted straight
# back in: 0.5 M page faults and 1.1 s of system time in a 1.0 s block.
TRIM_THRESHOLD = 8 * 2**20

# glibc malloc settings for worker processes (read by glibc at process start). Arrays of
# 4 MiB and more (activations, rows of patches, accumulator planes) get their own
# mappings, returned to the OS when freed, so the heap does not fragment block after
# block; those mappings use transparent huge pages (madvise), which makes the model's
# large buffers cheaper to fault in. A GLIBC_TUNABLES that the user set wins; glibc <
# 2.35 ignores the hugetlb tunable.
WORKER_MALLOC_TUNABLES = (
    f"glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
)

# A worker's periodic housekeeping (the statistical profiler every 10 ms, the event-loop
# tick every 20 ms, the memory monitor every 100 ms) woke up often enough on a 2-core
# machine to slow the model by 8 %: the profiler off, the others once a second.
HOUSEKEEPING = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}

_TUNED: dict[str, bool] = {}
_LOCK = threading.Lock()


def dask_config(enabled: bool) -> dict[str, Any]:
    """The Dask settings of a run's cluster that tuning adds (none when off)."""
    return dict(HOUSEKEEPING) if enabled else {}


def worker_env(enabled: bool) -> dict[str, str]:
    """Environment variables a run sets for the worker processes it starts (none when off)."""
    if not enabled:
        return {}
    return {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES") or WORKER_MALLOC_TUNABLES, ENV: "1"}


@contextlib.contextmanager
def spawn_environ(enabled: bool) -> Iterator[None]:
    """While a cluster starts: its nannies give their workers :func:`worker_env`, and not
    distributed's ``MALLOC_TRIM_THRESHOLD_`` (which, on its own, turns off glibc's dynamic
    mmap threshold so that every activation tensor is unmapped and faulted in afresh)."""
    if not enabled:
        yield
        return
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update(worker_env(True))
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def tune_worker() -> None:
    """A worker process's start (``unetflow.worker.dask_setup``): tuned only where the run
    that started it asked for tuning (:data:`ENV`)."""
    if os.environ.get(ENV) != "1":
        return
    tune_allocator()
    gc.freeze()  # the imported modules live as long as the process: collections skip them
    log.debug("worker process %d tuned, %d objects frozen", os.getpid(), gc.get_freeze_count())


def tune_allocator() -> dict[str, bool]:
    """Give this process the effects of :data:`WORKER_MALLOC_TUNABLES` where it started
    without them. Idempotent; returns what took effect.

    - Nothing when ``GLIBC_TUNABLES`` is set: a tuned worker process has its settings
      already, and a user who set their own keeps them.
    - ``huge_pages``: torch's ``THP_MEM_ALLOC_ENABLE=1``, so its large CPU buffers (the
      model's activations) are backed by transparent huge pages. Torch reads the
      variable at its first CPU allocation: it takes effect only where torch has not
      allocated yet (checked on a probe buffer).
    - ``mmap_threshold``: ``mallopt(M_MMAP_THRESHOLD, 4 MiB)`` and ``M_TRIM_THRESHOLD``
      8 MiB (:data:`TRIM_THRESHOLD`). Only together with huge pages: without them every
      activation would be faulted in 4 KiB at a time again (the model ran ~45 % slower).
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
