"""What a worker process of a unetflow cluster does once, at its start: a Dask preload.

Clusters that unetflow starts name this module in ``distributed.worker.preload``
(:data:`unetflow.schedule.WORKER_PRELOAD`), so every worker runs :func:`dask_setup`
before it joins the scheduler. Workers that someone else started (``--scheduler``) can
use it too: ``dask worker ADDRESS --preload unetflow.worker``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

log = logging.getLogger(__name__)


def dask_setup(worker: Any) -> None:
    """Import the block code (and torch) now, then freeze the heap's objects.

    - The import costs about 1.5 s on a CPU. Done here, it runs while the worker starts,
      and the driver samples the input statistics meanwhile (the cluster starts in the
      background, see ``run.Executor``). Otherwise it would run when the first block arrives.
    - ``gc.freeze()`` moves every object alive now (mostly the modules of torch, numpy,
      zarr and distributed) out of the collector's reach: they live as long as the
      process anyway. Collections during blocks then skip them. So does the collection
      at interpreter exit: with torch loaded, the process exits about 0.2 s sooner
      (BENCHMARKS.md, issue 6). Objects created later are collected as usual.
    """
    import unetflow.infer  # noqa: F401  (torch, the model code, the block loop)

    gc.freeze()
    log.debug("worker %s: unetflow loaded, %d objects frozen", getattr(worker, "address", "?"), gc.get_freeze_count())
