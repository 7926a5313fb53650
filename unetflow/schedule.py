"""How blocks run: Dask distributed clusters, submission, progress and failures.

The only room that imports ``distributed``. ``run_blocks`` is independent of what a
block does: it maps a picklable function over block ids with a bounded number in
flight, reports each result as it arrives and collects failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from unetflow.config import ClusterSpec
from unetflow.errors import BlockFailedError, UnetflowError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockFailure:
    block_id: int
    error: str


def cpu_threads_per_worker(spec: ClusterSpec) -> int:
    """Torch threads per CPU worker so that workers do not oversubscribe the cores.

    All of a worker's share: the reader and writer threads spend ~2 % of a block's
    time (BENCHMARKS.md, issue 6), too little to reserve a core for.
    """
    if spec.threads > 0:
        return spec.threads
    return max(1, (os.cpu_count() or 1) // max(1, spec.workers))


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[Any]:
    """A ``distributed.Client`` for *spec*; starts (and stops) a cluster when it is local.

    ``--gpus N`` starts one single-threaded worker per GPU with ``CUDA_VISIBLE_DEVICES``
    pinned to it (the dask-cuda recipe); ``--workers N`` starts N CPU worker processes.
    """
    from distributed import Client

    if spec.kind == "address":
        with Client(spec.address, timeout="30s") as client:
            yield client
        return
    with worker_environ():
        cluster = _gpu_cluster(spec) if spec.gpus else _cpu_cluster(spec)
    with cluster, Client(cluster) as client:
        client.wait_for_workers(spec.gpus or spec.workers, timeout=120)
        yield client


@contextlib.contextmanager
def worker_environ() -> Iterator[None]:
    """Start workers without distributed's ``MALLOC_TRIM_THRESHOLD_``.

    Setting it turns off glibc's dynamic mmap threshold, so every activation tensor
    torch frees is unmapped and the next one page-faults afresh: the model ran 1.7x
    slower in a worker than in-process on the benchmark machine (issue 6).
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def _cpu_cluster(spec: ClusterSpec) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=spec.workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=spec.memory_limit,
        dashboard_address=":0",  # a free port: never collide with another cluster on 8787
        silence_logs=logging.WARNING,
    )


def _gpu_cluster(spec: ClusterSpec) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                "resources": {"GPU": 1},
                "memory_limit": spec.memory_limit,
            },
        }
        for i in range(spec.gpus)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING)


def run_blocks(
    client: Any,
    fn: Callable[[Any, int], Any],
    job: Any,
    block_ids: Sequence[int],
    *,
    on_result: Callable[[Any], None],
    max_in_flight: int | None = None,
) -> list[BlockFailure]:
    """Run ``fn(job, block_id)`` for every id on *client*; return the failures.

    A :class:`UnetflowError` (bad input found while reading, say) stops the run at
    once and is raised: it would fail every block alike.
    """
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    limit = max_in_flight or 2 * n_workers
    job_ref = client.scatter(job, broadcast=True)
    pending = iter(block_ids)
    failures: list[BlockFailure] = []

    def submit(block_id: int) -> Any:
        return client.submit(fn, job_ref, block_id, key=f"unetflow-block-{block_id}-{time.monotonic_ns()}", pure=False)

    futures = as_completed([submit(b) for _, b in zip(range(limit), pending)], with_results=False)
    for future in futures:
        try:
            result = future.result()
        except UnetflowError:
            client.cancel(list(futures.futures))
            raise
        except Exception as err:  # a block's own failure: recorded, reported, the others go on
            block_id = int(future.key.split("-")[2])
            failures.append(BlockFailure(block_id, f"{type(err).__name__}: {err}"))
            log.error("block %d failed: %s: %s", block_id, type(err).__name__, err)
        else:
            on_result(result)
        nxt = next(pending, None)
        if nxt is not None:
            futures.add(submit(nxt))
    return failures


def run_inline(fn: Callable[[Any, int], Any], job: Any, block_ids: Sequence[int], *, on_result: Callable[[Any], None]) -> list[BlockFailure]:
    """Run blocks one after another in this process (``cluster: inline``)."""
    for block_id in block_ids:
        on_result(fn(job, block_id))
    return []


def raise_failures(failures: Sequence[BlockFailure], total: int) -> None:
    if failures:
        first = failures[0]
        raise BlockFailedError(
            f"{len(failures)} of {total} blocks failed, first block {first.block_id}: {first.error}; "
            "fix the cause and run again"
        )
