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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from unetflow.config import ClusterSpec, RunConfig
from unetflow.errors import BlockFailedError, UnetflowError
from unetflow import tuning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockFailure:
    block_id: int
    error: str
    traceback: str = ""  # the worker-side traceback: for report.json, never the console


def cpu_threads_per_worker(spec: ClusterSpec) -> int:
    """Torch threads per CPU worker so that workers do not oversubscribe the cores.

    All of a worker's share: the reader and writer threads spend ~2 % of a block's
    time (BENCHMARKS.md, issue 6), too little to reserve a core for.
    """
    if spec.threads > 0:
        return spec.threads
    return max(1, (os.cpu_count() or 1) // max(1, spec.workers))


@contextlib.contextmanager
def open_client(spec: ClusterSpec, *, log_directory: str | None = None, tuned: bool = False) -> Iterator[Any]:
    """A ``distributed.Client`` for *spec*; starts (and stops) a cluster when it is local.

    ``--gpus N`` starts one single-threaded worker per GPU with ``CUDA_VISIBLE_DEVICES``
    pinned to it (the dask-cuda recipe); ``--workers N`` starts N CPU workers (processes
    when N > 1, a threaded worker in this process for one: :func:`worker_processes`).
    ``slurm``, ``pbs``, ``lsf``, ``sge`` and ``htcondor`` start a dask-jobqueue cluster
    whose workers are batch jobs (job logs go to *log_directory* unless the spec names one).
    A worker lost mid-block (a cancelled job) has its blocks rerun elsewhere: the
    scheduler allows ``spec.retries`` such losses per block. *tuned*: the workers get
    :mod:`unetflow.tuning`'s settings.
    """
    import dask
    from distributed import Client

    settings = {"distributed.scheduler.allowed-failures": max(1, spec.retries), **worker_dask_config(tuned)}
    if spec.kind == "address":
        with dask.config.set(settings), contextlib.closing(Client(spec.address, timeout="30s", set_as_default=False)) as client:
            yield client
        return
    with dask.config.set(settings), tuning.spawn_environ(tuned), environ_restored():
        if spec.is_jobqueue:
            cluster = _jobqueue_cluster(spec, log_directory=log_directory, tuned=tuned)
        else:
            cluster = _gpu_cluster(spec) if spec.gpus else _cpu_cluster(spec)
        # not the default client: a default is bound to the thread that made it, and a
        # Dispatcher starts the cluster in one thread and closes it in another
        with cluster, contextlib.closing(Client(cluster, set_as_default=False)) as client:
            wait = (1, spec.wait_timeout) if spec.is_jobqueue else (expected_workers(spec), 120)
            client.wait_for_workers(wait[0], timeout=wait[1])
            yield client


@contextlib.contextmanager
def environ_restored() -> Iterator[None]:
    """Give this process its environment back when a local cluster stops: distributed's
    nannies write their workers' variables (``pre-spawn-environ``) into the parent's
    ``os.environ`` before they spawn, and the parent is the caller's process."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


class Dispatcher:
    """Runs a segmentation's blocks: in this process (``inline``) or on one Dask cluster
    that lives as long as the run (as a context manager; :meth:`close` is idempotent).

    ``dispatcher(fn, job, block_ids, on_result=...)`` returns the failures (see
    :func:`run_blocks`). :meth:`start` begins opening the cluster in a background thread,
    so the cluster and its worker processes (which import torch, about 1.5 s) start while
    the driver does other work; the first dispatch waits for it. Without :meth:`start` the first
    dispatch opens the cluster; a run with no blocks to do opens none.
    """

    def __init__(self, spec: ClusterSpec, *, log_directory: str | None = None, tuned: bool = False) -> None:
        self.spec = spec
        self.log_directory = log_directory
        self.tuned = tuned
        self._stack = contextlib.ExitStack()
        self._client: Future[Any] | None = None

    @classmethod
    def for_run(cls, config: RunConfig, *, log_directory: str | None = None, start: bool = True) -> "Dispatcher":
        """The dispatcher of one run, already starting its cluster when *start* and
        :func:`starts_early` allow it (otherwise its first dispatch starts it)."""
        dispatch = cls(config.cluster, log_directory=log_directory, tuned=config.tuning)
        if start and starts_early(config):
            dispatch.start()
        return dispatch

    def start(self) -> None:
        """Begin opening the cluster in a background thread (nothing inline or when started)."""
        if self.spec.kind == "inline" or self._client is not None:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="unetflow-cluster-start")
        self._client = pool.submit(self._stack.enter_context, open_client(self.spec, log_directory=self.log_directory, tuned=self.tuned))
        pool.shutdown(wait=False)

    def __call__(self, fn: Callable[[Any, int], Any], job: Any, block_ids: Sequence[int], *, on_result: Callable[[Any], None]) -> list[BlockFailure]:
        if self.spec.kind == "inline" or not block_ids:
            return run_inline(fn, job, block_ids, on_result=on_result)
        self.start()
        assert self._client is not None
        return run_blocks(
            self._client.result(), fn, job, block_ids, on_result=on_result, max_in_flight=2 * expected_workers(self.spec),
            retries=self.spec.retries, resources=worker_resources(self.spec),
        )

    def close(self) -> None:
        """Stop the cluster (after its start, when one is still under way: it cannot be
        interrupted). A later dispatch starts a new one."""
        if self._client is not None:
            with contextlib.suppress(Exception):  # a failed start was raised to whoever dispatched
                self._client.result()
            self._client = None
        stack, self._stack = self._stack, contextlib.ExitStack()
        stack.close()

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def starts_early(config: RunConfig) -> bool:
    """Whether a run's cluster may start before its output is claimed: a new output (or an
    ``--overwrite``), where every block is to do, on a cluster that does not write into
    the output (a batch job's logs go there, and ``--overwrite`` deletes it first)."""
    c = config.cluster
    if config.dry_run or c.kind == "inline" or c.is_jobqueue or config.resume or config.part is not None:
        return False
    return config.output_settings.overwrite or not os.path.exists(config.output)


def expected_workers(spec: ClusterSpec) -> int:
    """How many workers *spec* asks for (jobqueue: one per job, at most the maximum)."""
    if spec.is_jobqueue:
        return max(1, spec.maximum_jobs or spec.jobs or spec.minimum_jobs)
    return spec.gpus or spec.workers


def worker_resources(spec: ClusterSpec) -> dict[str, float] | None:
    """Resources every worker declares, which every block then asks for.

    Declaring ``GPU=1`` on a worker does nothing by itself: tasks that do not ask for
    it ignore it, and a multi-threaded worker then takes several blocks at once while
    others idle. Asking for it caps each worker at one block and spreads the rest.
    """
    if spec.resources:
        return dict(spec.resources)
    if spec.gpus or spec.gpus_per_job:
        return {"GPU": 1.0}
    return None


JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster", "htcondor": "HTCondorCluster"}


def jobqueue_class(kind: str) -> Any:
    """The dask-jobqueue cluster class for *kind*, imported without writing to $HOME.

    dask-jobqueue copies its default ``jobqueue.yaml`` into ``~/.config/dask`` on
    import; pointing ``dask.config.PATH`` at a temporary folder meanwhile keeps the
    user's home untouched (site settings belong in unetflow configs).
    """
    import sys
    import tempfile

    import dask.config

    if "dask_jobqueue" not in sys.modules:
        saved = dask.config.PATH
        with tempfile.TemporaryDirectory(prefix="unetflow-dask-config-") as tmp:
            dask.config.PATH = tmp
            try:
                import dask_jobqueue  # noqa: F401
            finally:
                dask.config.PATH = saved
    import dask_jobqueue

    return getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind])


def jobqueue_options(spec: ClusterSpec, *, log_directory: str | None = None, tuned: bool = False) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster class: one worker process per job."""
    import sys

    directives = list(spec.job_extra_directives)
    if spec.gpus_per_job and spec.kind == "slurm":
        directives.append(f"--gres=gpu:{spec.gpus_per_job}")
    worker_args: list[str] = []
    resources = worker_resources(spec)
    if resources:
        worker_args += ["--resources", ",".join(f"{k}={v:g}" for k, v in resources.items())]
    extra: list[str] | dict[str, str] = directives
    if spec.kind == "htcondor":  # HTCondor takes submit-file lines "key = value" as a dict
        extra = {key.strip(): value.strip() for key, value in (d.split("=", 1) for d in directives)}
    options: dict[str, Any] = {
        "cores": spec.cores,
        "processes": 1,
        "memory": spec.memory,
        "job_extra_directives": extra,
        "job_script_prologue": [f"export {k}={v!r}" for k, v in job_env(tuned).items()] + list(spec.job_script_prologue),
        "worker_extra_args": worker_args,
        "python": spec.python or sys.executable,
        "log_directory": spec.log_directory or log_directory,
        "scheduler_options": {"dashboard_address": ":0"},
    }
    if spec.queue and spec.kind != "htcondor":
        options["queue"] = spec.queue
    if spec.account:  # each scheduler names the account differently
        if spec.kind in ("slurm", "pbs"):
            options["account"] = spec.account
        elif spec.kind == "lsf":
            options["project"] = spec.account
        elif spec.kind == "sge":
            options["job_extra_directives"] = directives + [f"-A {spec.account}"]
    if spec.walltime:
        options["walltime"] = spec.walltime
    if spec.disk:
        options["disk"] = spec.disk
    if spec.interface:
        options["interface"] = spec.interface
    return options


def _jobqueue_cluster(spec: ClusterSpec, *, log_directory: str | None = None, tuned: bool = False) -> Any:
    cls = jobqueue_class(spec.kind)
    options = jobqueue_options(spec, log_directory=log_directory, tuned=tuned)
    if options["log_directory"]:
        os.makedirs(options["log_directory"], exist_ok=True)
    cluster = cls(**options)
    log.info("%s job script:\n%s", spec.kind, cluster.job_script())
    # adapt keeps the job count: a lost job (scancel, walltime) is replaced
    low = spec.minimum_jobs if spec.maximum_jobs else spec.jobs
    high = spec.maximum_jobs or spec.jobs
    cluster.adapt(minimum_jobs=low, maximum_jobs=high, interval="1s")
    return cluster


# The preload every worker of a unetflow cluster runs at its start (imports torch and the
# block code before the first block arrives: see unetflow/worker.py).
WORKER_PRELOAD = "unetflow.worker"


def worker_dask_config(tuned: bool = False) -> dict[str, Any]:
    """:data:`WORKER_PRELOAD` added to the user's own preloads, and with *tuned* the
    housekeeping settings of :mod:`unetflow.tuning`."""
    import dask

    preload = list(dask.config.get("distributed.worker.preload", None) or [])
    return {**tuning.dask_config(tuned), "distributed.worker.preload": preload + [WORKER_PRELOAD] * (WORKER_PRELOAD not in preload)}


def job_env(tuned: bool = False) -> dict[str, str]:
    """:func:`unetflow.tuning.worker_env` plus :func:`worker_dask_config` as ``DASK_*``
    variables, for batch jobs: a local cluster's nannies hand the driver's Dask config to
    their workers, a batch job's worker reads its own."""
    env = tuning.worker_env(tuned)
    for key, value in worker_dask_config(tuned).items():
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    return env


def worker_processes(spec: ClusterSpec) -> bool:
    """Whether a local cluster's CPU workers are processes of their own (see
    :attr:`ClusterSpec.processes`): by default only when there are several.

    One worker gains little from a process but pays for it: a second start of torch
    (~2 s, the largest fixed cost of a short run: BENCHMARKS.md, issue 6) and a second
    copy of torch and the model in memory. Threads suit it: torch, numpy, zarr and the
    compressors release the GIL. Several workers on one machine get a process each, so
    that each has its own torch threads and allocator.
    """
    return spec.processes if spec.processes is not None else spec.workers > 1


def computes_here(spec: ClusterSpec) -> bool:
    """Whether blocks run in this process: ``inline``, or a local CPU cluster of threads."""
    return spec.kind == "inline" or (spec.kind == "local" and not spec.gpus and not worker_processes(spec))


def _cpu_cluster(spec: ClusterSpec) -> Any:
    from distributed import LocalCluster

    extra = {"resources": dict(spec.resources)} if spec.resources else {}
    return LocalCluster(
        **extra,
        n_workers=spec.workers,
        threads_per_worker=max(1, spec.threads) if spec.resources else 1,
        processes=worker_processes(spec),
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
    retries: int = 0,
    resources: dict[str, float] | None = None,
) -> list[BlockFailure]:
    """Run ``fn(job, block_id)`` for every id on *client*; return the failures.

    A :class:`UnetflowError` (bad input found while reading, say) stops the run at
    once and is raised: it would fail every block alike. Any other error of a block
    is retried *retries* times, then recorded; the other blocks go on. *resources*
    (``{"GPU": 1}``) must match what the workers declare (see :func:`worker_resources`).
    """
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    limit = max_in_flight or 2 * n_workers
    # The job (a few kB) travels with each task rather than being scattered: scattered
    # data lives on the workers present at that moment, and losing them (a cancelled
    # batch job) would cancel every block that depends on it ("lost dependencies").
    job_ref = job
    pending = iter(block_ids)
    failures: list[BlockFailure] = []

    def submit(block_id: int) -> Any:
        return client.submit(
            fn, job_ref, block_id, key=f"unetflow-block-{block_id}-{time.monotonic_ns()}", pure=False,
            retries=retries or None, resources=resources,
        )

    futures = as_completed([submit(b) for _, b in zip(range(limit), pending)], loop=client.loop, with_results=False)
    for future in futures:
        try:
            result = future.result()
        except UnetflowError:
            client.cancel(list(futures.futures))
            raise
        except Exception as err:  # a block's own failure: recorded, reported, the others go on
            block_id = int(future.key.split("-")[2])
            failures.append(BlockFailure(block_id, f"{type(err).__name__}: {err}", _traceback_text(future.traceback())))
            log.error("block %d failed: %s: %s", block_id, type(err).__name__, err)
        else:
            on_result(result)
        nxt = next(pending, None)
        if nxt is not None:
            futures.add(submit(nxt))
    return failures


def run_inline(fn: Callable[[Any, int], Any], job: Any, block_ids: Sequence[int], *, on_result: Callable[[Any], None]) -> list[BlockFailure]:
    """Run blocks one after another in this process (``cluster: inline``).

    As in :func:`run_blocks`, a block's own error is recorded and the others go on;
    a :class:`UnetflowError` stops the run.
    """
    failures: list[BlockFailure] = []
    for block_id in block_ids:
        try:
            result = fn(job, block_id)
        except UnetflowError:
            raise
        except Exception as err:  # recorded and reported; the other blocks go on
            failures.append(BlockFailure(block_id, f"{type(err).__name__}: {err}", _traceback_text(err.__traceback__)))
            log.error("block %d failed: %s: %s", block_id, type(err).__name__, err)
            continue
        on_result(result)
    return failures


def _traceback_text(tb: Any) -> str:
    import traceback

    return "".join(traceback.format_tb(tb)) if tb is not None else ""


def failure_message(failures: Sequence[BlockFailure], total: int, *, where: Callable[[int], str] | None = None,
                    details: str | None = None) -> str:
    """The one message for failed blocks (the probability blocks and the labelling phases):
    how many, which, the first one's error (*where* describes a block), and the fix."""
    first = failures[0]
    at = f" {where(first.block_id)}" if where else ""
    more = f"details in {details}; " if details else ""
    return (
        f"{len(failures)} of {total} blocks failed (ids {[f.block_id for f in failures][:10]}); first: block {first.block_id}{at}: "
        f"{first.error}; {more}fix the cause and rerun with --resume to redo only the failed blocks"
    )


def raise_failures(failures: Sequence[BlockFailure], total: int) -> None:
    if failures:
        raise BlockFailedError(failure_message(failures, total))
