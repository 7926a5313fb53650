"""Where a block's time goes, and which stage bounds a run.

A :class:`Clock` times each stage of one block where it runs: host stages (reading,
compressing and writing, waiting) with ``perf_counter`` in their own threads, device
stages (uploading and normalising, cutting patches, the forward pass, blending,
converting, downloading) by CUDA events on the stream that runs them, or on a CPU with
``perf_counter`` too. "Model busy" is the forward pass only.

:func:`summary` adds the blocks of a run up per stage and per worker and names the
stage that bounds the run in a one-line verdict.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

# every stage, in pipeline order; the waits are the block loop idle on its neighbours
STAGES = ("read", "upload", "cut", "forward", "blend", "convert", "download", "write", "wait_read", "wait_model", "wait_write", "drain")
DEVICE_STAGES = ("upload", "cut", "forward", "blend", "convert", "download")

_NAMES = {
    "read": "reading the input", "upload": "host-to-device copies and normalising", "cut": "cutting patches",
    "forward": "the forward pass", "blend": "blending", "convert": "converting", "download": "device-to-host copies",
    "write": "compression and writing",
}
_HINTS = {
    "read": "faster storage, larger input chunks or more workers",
    "upload": "fewer channels or a smaller input dtype",
    "cut": "larger patches (fewer of them)",
    "forward": "the model bounds the run: --amp, a larger --batch-size or more GPUs",
    "blend": "larger patches or less --overlap (less blending); more workers on CPU",
    "convert": "--dtype float32 skips the conversion; more workers on CPU",
    "download": "a smaller --dtype (uint8) crosses faster",
    "write": "try --dtype uint8 (or float16), more --write-threads or faster storage",
}


class Clock:
    """Seconds per stage of one block.

    *stream_of*: on CUDA, which stream a device stage runs on (default: the current one).
    Device stages are timed by CUDA events there and added up once, by :meth:`totals`
    (which waits for the last of them): no synchronisation while the block runs.
    """

    def __init__(self, device: Any = None) -> None:
        self.cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    @contextlib.contextmanager
    def host(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    @contextlib.contextmanager
    def device(self, stage: str, stream: Any = None) -> Iterator[None]:
        """Time a device stage: CUDA events on *stream* (the current stream by default), else host time."""
        if not self.cuda:
            with self.host(stage):
                yield
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            with self._lock:
                self._events[stage].append((start, end))

    def totals(self) -> dict[str, float]:
        """Seconds per stage (every stage of :data:`STAGES`, zero where it did not run)."""
        with self._lock:
            out = {k: self._seconds.get(k, 0.0) for k in STAGES}
            for stage, pairs in self._events.items():
                if pairs:
                    pairs[-1][1].synchronize()
                out[stage] = out.get(stage, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1000.0
        return out


def bound(stages: dict[str, float], wall: float, *, lanes: int = 1, write_threads: int = 1) -> tuple[str, float]:
    """The stage with the most work per resource that runs it, and that work's seconds.

    Stages that run on several threads (forward on CPU lanes, writes on the writer
    pool) count per thread: the writer pool is busy for ``write / write_threads`` seconds.
    """
    load = {k: stages.get(k, 0.0) for k in _NAMES}
    load["forward"] /= max(1, lanes)
    load["write"] /= max(1, write_threads)
    name = max(load, key=lambda k: load[k])
    return name, load[name]


def verdict(stages: dict[str, float], wall: float, *, gpu: bool, lanes: int = 1, write_threads: int = 1) -> str:
    """One line: how busy the model was and which stage bounds the run, with a hint.

    >>> verdict({"forward": 1.0, "write": 6.0}, 8.0, gpu=True, write_threads=2)
    'GPU busy 12%, idle 88%: bound by compression and writing (3.00s of 8.00s block time); try --dtype uint8 (or float16), more --write-threads or faster storage'
    """
    busy = stages.get("forward", 0.0) / max(1, lanes) / wall if wall > 0 else 0.0
    name, seconds = bound(stages, wall, lanes=lanes, write_threads=write_threads)
    head = f"GPU busy {busy:.0%}, idle {max(0.0, 1 - busy):.0%}" if gpu else f"model busy {busy:.0%}"
    return f"{head}: bound by {_NAMES[name]} ({seconds:.2f}s of {wall:.2f}s block time); {_HINTS[name]}"


def summary(results: Sequence[Any]) -> dict[str, Any]:
    """Totals over a run's blocks (:class:`unetflow.job.BlockResult`): seconds per stage,
    per worker and in all, skips, peak RSS per worker, the model's busy fraction and the verdict."""
    ran = [r for r in results if not r.skipped]
    total = {k: round(sum(r.stages.get(k, 0.0) for r in ran), 3) for k in STAGES}
    wall = round(sum(r.seconds_wall for r in ran), 3)
    lanes = max((r.lanes for r in ran), default=1)
    write_threads = max((r.write_threads for r in ran), default=1)
    rss: dict[int, int] = {}
    per_worker: dict[str, dict[str, float]] = {}
    for r in results:
        rss[r.pid] = max(rss.get(r.pid, 0), r.peak_rss)
        if not r.skipped:
            mine = per_worker.setdefault(str(r.pid), defaultdict(float))
            for k in (*STAGES, "wall"):
                mine[k] += r.seconds_wall if k == "wall" else r.stages.get(k, 0.0)
    devices = sorted({r.device for r in ran})
    gpu = any(d.startswith("cuda") for d in devices)
    busy = total["forward"] / max(1, lanes) / wall if wall > 0 else 0.0
    checks = [r.amp_check for r in ran if r.amp_check]
    return {
        "seconds": {**total, "wall": wall},
        "busy": round(busy, 4),
        "bound_by": bound(total, wall, lanes=lanes, write_threads=write_threads)[0] if ran else None,
        "devices": devices,
        "per_worker": {pid: {k: round(v, 3) for k, v in s.items()} for pid, s in sorted(per_worker.items())},
        "blocks_skipped": {k: sum(r.skipped == k for r in results) for k in ("empty", "mask")},
        "peak_rss_per_worker_mb": {str(pid): round(v / 2**20, 1) for pid, v in sorted(rss.items())},
        "amp_check": checks[0] if checks else None,
        "verdict": verdict(total, wall, gpu=gpu, lanes=lanes, write_threads=write_threads) if ran else "no block ran",
    }
