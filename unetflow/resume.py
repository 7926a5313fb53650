"""What makes a run resumable and safe to share: fingerprint, done markers, locks, report.

Everything lives in one folder next to the output, ``<output>.unetflow/`` (issue 18:
outside the store, so Zarr listings of an OME-Zarr group never meet it; a new output,
``--overwrite`` included, clears what an earlier output left there, see :meth:`RunDir.clear`)::

    <output>.unetflow/
      run.json                 fingerprint of the settings and model that made the output
      done/<block_id>.json     one marker per finished block, written after its write
      instances/               the phases of --output instances after the blocks (unetflow.instances)
      lock.json                the run writing now (lock.part-3-of-8.json for --part 3/8)
      report.json              the last run's report (report.part-3-of-8.json for parts)
      logs/                    cluster job logs (dask-jobqueue)

A marker is written (temporary name, then ``os.replace``) only after the block's
output chunks are written, so a marker always means "this block's output is on disk".
Resuming reads markers and ``run.json`` only, never output data. No zarr, no dask.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from unetflow.errors import ConfigError, LockedError, OutputWriteError
from unetflow.memory import peak_rss

log = logging.getLogger(__name__)

RUN_DIR = ".unetflow"  # the run folder is the output's path plus this suffix
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0  # a lock of another host whose heartbeat is older is stale


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write *data* as JSON atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except OSError:  # a full disk: leave no half-written temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


INSTANCES_FINISHED = "finished.json"  # the instances phases' last marker (unetflow.instances.Folder.finished)


def part_suffix(part: tuple[int, int] | None) -> str:
    return f".part-{part[0]}-of-{part[1]}" if part else ""


def part_blocks(n_blocks: int, part: tuple[int, int] | None) -> list[int]:
    """Block ids of *part* (i, n): every n-th block starting at i - 1.

    >>> part_blocks(7, (2, 3))
    [1, 4]
    """
    if part is None:
        return list(range(n_blocks))
    i, n = part
    return list(range(i - 1, n_blocks, n))


# ---- labels written into an input image (issue 18): OUTPUT = IMAGE/labels/NAME ---------

LABELS = "labels"


@dataclass(frozen=True)
class Target:
    """A label image to write inside an image group: ``image/labels/name``."""

    image: str  # the image group's folder
    name: str

    @property
    def labels(self) -> str:
        return os.path.join(self.image, LABELS)

    @property
    def path(self) -> str:
        return os.path.join(self.labels, self.name)

    @property
    def beside(self) -> str:
        """Where the run keeps its own files (run folder, instances scratch): beside the image, outside it."""
        return f"{self.image.rstrip('/')}.{LABELS}-{self.name}"


def target(output: str) -> Target | None:
    """The label image *output* names, when it is ``IMAGE/labels/NAME`` and IMAGE is a Zarr group.

    Looks only at the path and whether IMAGE holds Zarr metadata (``zarr.json``,
    ``.zgroup`` or ``.zattrs``); a folder merely called ``labels`` elsewhere is not one.

    >>> target("/nowhere/raw.ome.zarr/labels/nuclei") is None  # no Zarr group there
    True
    """
    output = str(output)
    if "://" in output:
        return None
    parent, name = os.path.split(output.rstrip("/"))
    image, group = os.path.split(parent)
    if group != LABELS or not name or not image:
        return None
    if not any(os.path.isfile(os.path.join(image, f)) for f in ("zarr.json", ".zgroup", ".zattrs")):
        return None
    return Target(image, name)


def beside(output: str) -> str:
    """The path a run's own files are named after: *output*, or for labels written into an
    input image, ``IMAGE.labels-NAME`` beside that image (never inside its Zarr hierarchy)."""
    t = target(output)
    return t.beside if t is not None else str(output).rstrip("/")


@dataclass(frozen=True)
class RunDir:
    """The run folder of one output: ``<output>.unetflow``, beside the store, never inside it.

    Every caller finds the folder through this class (never by building the path), so
    its place is decided here only. Local paths only, as are outputs. Labels written into
    an input image (``IMAGE/labels/NAME``) have it beside the image, outside its Zarr
    hierarchy: ``IMAGE.labels-NAME.unetflow`` (:func:`beside`).
    """

    output: str

    @property
    def path(self) -> Path:
        return Path(beside(str(self.output)) + RUN_DIR)

    @property
    def done_dir(self) -> Path:
        return self.path / "done"

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def lock_file(self, part: tuple[int, int] | None = None) -> Path:
        return self.path / f"lock{part_suffix(part)}.json"

    def report_file(self, part: tuple[int, int] | None = None) -> Path:
        return self.path / f"report{part_suffix(part)}.json"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    @property
    def instances_dir(self) -> Path:
        """Phases 2-4 of ``--output instances`` (see :mod:`unetflow.instances`)."""
        return self.path / "instances"

    @property
    def instances_finished(self) -> Path:
        """Written once every phase of ``--output instances`` has finished."""
        return self.instances_dir / INSTANCES_FINISHED

    def done_blocks(self) -> set[int]:
        """Ids of blocks whose marker exists."""
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return set()
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def clear(self) -> None:
        """Forget an earlier output's run: its markers, fingerprint, reports and stale locks.

        Called right after this run created a new output (``--overwrite`` or a path whose
        store was deleted by hand), so nothing here can describe the new store. Live
        locks stay (the next :func:`acquire` names their holder) and so do job logs.
        """
        if not self.path.is_dir():
            return
        shutil.rmtree(self.done_dir, ignore_errors=True)
        shutil.rmtree(self.instances_dir, ignore_errors=True)
        for path in [self.run_file, self.path / "ome-finished", *self.path.glob("report*.json")]:
            path.unlink(missing_ok=True)
        for path in self.path.glob("lock*.json"):
            found = _read_lock(path)
            if found and lock_is_stale(*found):
                path.unlink(missing_ok=True)

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every marker's content by block id (for tests and reports)."""
        return {b: read_json(self.done_dir / f"{b}.json") for b in sorted(self.done_blocks())}


def is_unetflow_output(output: str | os.PathLike[str]) -> bool:
    """Whether *output* is one that ``unetflow segment`` created: its run folder holds
    the run's identity (``run.json`` with a fingerprint). The one test of ownership that
    ``--overwrite`` relies on (:func:`unetflow.store.written_by`); it finds the run folder
    through :class:`RunDir` only, wherever that puts it."""
    for run_file in (RunDir(str(output)).run_file, Path(output) / RUN_DIR / "run.json"):  # the latter: unetflow 0.1's, inside the store
        try:
            data = read_json(run_file)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "fingerprint" in data and "identity" in data:
            return True
    return False


# ---- fingerprint: "same settings and model" -----------------------------------------

IGNORED = {
    # where and how a run executes does not change what it writes
    ("output",), ("model",), ("cluster",), ("dry_run",), ("resume",), ("part",), ("device",), ("tuning",), ("trust_model_code",),
    ("output_settings", "overwrite"), ("output_settings", "write_threads"), ("tiling", "batch_size"),
}


def _strip(data: Any, prefix: tuple[str, ...] = ()) -> Any:
    if isinstance(data, dict):
        return {k: _strip(v, prefix + (k,)) for k, v in sorted(data.items()) if prefix + (k,) not in IGNORED}
    return data


def file_sha256(path: str) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def identity(config: dict[str, Any], model: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """What decides the output's bytes: settings (not paths or cluster), model, input, stats.

    *config* is ``RunConfig.to_dict()``, *model* the source's description; a checkpoint
    is identified by the hash of its file, not its path.
    """
    model = dict(model)
    if model.get("kind") == "checkpoint" and model.get("path"):
        model["sha256"] = file_sha256(str(model["path"]))
        model.pop("path")
    return {"settings": _strip(config), "model": model, **extra}


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_run(run_dir: RunDir, ident: dict[str, Any]) -> None:
    """Refuse to resume into an output made with other settings or another model."""
    try:
        old = read_json(run_dir.run_file)
    except FileNotFoundError:
        raise ConfigError(
            f"output {run_dir.output} has no {run_dir.run_file}, so it was not made by a resumable unetflow run; "
            "pass --overwrite to replace it"
        ) from None
    if old.get("fingerprint") == fingerprint(ident):
        return
    diffs = sorted(_diff(old.get("identity", {}), json.loads(json.dumps(ident, default=str))))
    raise ConfigError(
        f"output {run_dir.output} was made with other settings or another model ({'; '.join(diffs[:5]) or 'fingerprint differs'}); "
        "run with the same settings and model to resume, or pass --overwrite to start again"
    )


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    elif a != b:
        yield f"{path}: was {a!r}, now {b!r}"


def record_run(run_dir: RunDir, ident: dict[str, Any]) -> None:
    write_json(run_dir.run_file, {"fingerprint": fingerprint(ident), "identity": ident})


# ---- done markers (written by workers) ----------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A block's result plus where it ran: host, pid, cluster job, peak memory."""

    result: Any
    host: str
    pid: int
    job_id: str | None
    peak_rss: int

    @property
    def worker(self) -> str:
        return f"{self.host}:{self.pid}" + (f" (job {self.job_id})" if self.job_id else "")


@dataclass(frozen=True)
class MarkDone:
    """``fn(job, block_id)``, then the block's done marker: what workers run.

    *record*, when given, adds fields of the block's result to its marker (the object
    count of an instances block, which numbering reads back). Picklable when *fn* and
    *record* are module-level functions.
    """

    fn: Callable[[Any, int], Any]
    done_dir: str
    run_id: str
    record: Callable[[Any], dict[str, Any]] | None = None

    def __call__(self, job: Any, block_id: int) -> Outcome:
        try:
            result = self.fn(job, block_id)
            host, pid = socket.gethostname(), os.getpid()
            job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or os.environ.get("LSB_JOBID") or os.environ.get("JOB_ID")
            marker = {"block_id": block_id, "run_id": self.run_id, "host": host, "pid": pid, "job_id": job_id, "finished": _now()}
            if self.record is not None:
                marker.update(self.record(result))
            write_json(Path(self.done_dir) / f"{block_id}.json", marker)
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            raise OutputWriteError(storage_failure(job, block_id, err)) from None
        peak = peak_rss()
        return Outcome(result, host, pid, job_id, peak)


# Errors of the output's storage that every later block would meet too: the run stops
# at the first (issue 15) instead of failing each block in turn.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def storage_failure(job: Any, block_id: int, err: OSError) -> str:
    """One line: the block, its write box, the cause, and what to do."""
    plan = getattr(job, "plan", None)
    where = ""
    if plan is not None:
        wb = plan.block(block_id).write_box
        where = f" (write box offset {list(wb.offset)} shape {list(wb.shape)})"
    return (
        f"block {block_id}{where} could not write the output: {err.strerror or err} (errno {err.errno}); "
        "the blocks done so far are kept: free space or make the location writable, then rerun with --resume"
    )


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---- locks -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(holder: dict[str, Any], age: float) -> bool:
    """A lock is stale when its pid is gone (same host) or its heartbeat stopped (any host)."""
    if holder.get("host") == socket.gethostname():
        return not _pid_alive(int(holder.get("pid", -1)))
    return age > STALE_AFTER_SECONDS


def describe_holder(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _read_lock(path: Path) -> tuple[dict[str, Any], float] | None:
    try:
        holder = read_json(path)
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except ValueError:  # half-written by a killed run
        holder, age = {"host": "?", "pid": -1, "started": "?"}, STALE_AFTER_SECONDS + 1
    return holder, age


def check_unlocked(run_dir: RunDir, part: tuple[int, int] | None, *, takeover: bool) -> None:
    """Refuse when a live run holds a conflicting lock; stale ones need *takeover*.

    A whole run conflicts with every lock; ``--part i/n`` with the whole run's lock
    and its own part's.
    """
    if not run_dir.path.is_dir():
        return
    names = [run_dir.lock_file(None)]
    names += [run_dir.lock_file(part)] if part else sorted(run_dir.path.glob("lock.part-*.json"))
    for path in names:
        found = _read_lock(path)
        if found is None:
            continue
        holder, age = found
        if lock_is_stale(holder, age):
            if takeover:
                continue
            raise LockedError(
                f"output {run_dir.output} has a stale lock of a dead run ({describe_holder(holder)}); "
                "pass --resume to take it over and finish that run"
            )
        raise LockedError(
            f"output {run_dir.output} is being written by another run ({describe_holder(holder)}); "
            f"wait for it to finish, or remove {path} if that run is gone"
        )


class Lock:
    """This run's lock file, with a heartbeat thread that keeps its mtime fresh."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="unetflow-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        try:
            if read_json(self.path).get("token") == self.holder["token"]:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass
        except OSError as err:  # a location that turned read-only: say so, do not hide the run's own error
            log.warning("could not remove the lock %s (%s); remove it once the location is writable, or take it over with --resume", self.path, err)


def acquire(run_dir: RunDir, part: tuple[int, int] | None, *, takeover: bool) -> Lock:
    """Take the lock of *part* (or the whole run) atomically; refuse a live holder.

    A stale lock is moved aside and replaced only with *takeover* (``--resume``).
    """
    check_unlocked(run_dir, part, takeover=takeover)
    path = run_dir.lock_file(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "token": os.urandom(8).hex(), "part": part}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _read_lock(path)
            if found and not (takeover and lock_is_stale(*found)):
                raise LockedError(
                    f"output {run_dir.output} is being written by another run ({describe_holder(found[0])}); "
                    "wait for it to finish" + ("" if takeover else ", or pass --resume if that run is gone")
                ) from None
            if found:
                log.warning("taking over the stale lock of a dead run (%s)", describe_holder(found[0]))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path.with_name(f"{path.name}.stale-{holder['token']}"))
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return Lock(path, holder)
    raise LockedError(f"could not take the lock {path}; another run keeps taking it")


# ---- the run report ----------------------------------------------------------------


@dataclass
class Tally:
    """Per-worker totals for the report."""

    blocks: int = 0
    voxels: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (unetflow.telemetry.STAGES)

    def add(self, outcome: Outcome, voxels: int, seconds: float, stages: dict[str, float] | None = None) -> None:
        self.blocks += 1
        for k, v in (stages or {}).items():
            self.stages[k] = self.stages.get(k, 0.0) + v
        self.voxels += voxels
        self.seconds += seconds
        self.peak_rss = max(self.peak_rss, outcome.peak_rss)
        self.extra = {"host": outcome.host, "pid": outcome.pid, "job_id": outcome.job_id}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra, "blocks": self.blocks, "voxels": self.voxels, "seconds": round(self.seconds, 3),
            "voxels_per_second": round(self.voxels / self.seconds, 1) if self.seconds > 0 else 0.0,
            "peak_memory_mb": round(self.peak_rss / 2**20, 1),
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
        }
