"""What a run reports: the RunReport it returns, its log lines, ``report.json`` beside the output."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from unetflow import resume, schedule
from unetflow.job import BlockResult
from unetflow.resolve import RunPlan

log = logging.getLogger(__name__)

@dataclass
class RunReport:
    """What a finished run reports (and writes next to the output)."""

    summary: dict[str, Any]
    blocks_done: int = 0
    seconds: float = 0.0
    voxels: int = 0
    results: list[BlockResult] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)
    blocks_skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    workers: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


def write_report(run_dir: resume.RunDir, part: tuple[int, int] | None, data: dict[str, Any]) -> None:
    """Write report.json; on a full or read-only location say so, and let the run's own result stand."""
    try:
        resume.write_json(run_dir.report_file(part), data)
    except OSError as err:
        log.warning("could not write the report %s (%s)", run_dir.report_file(part), err)


def _box(box: Any) -> dict[str, list[int]]:
    return {"offset": list(box.offset), "shape": list(box.shape)}


def block_log(p: RunPlan, result: BlockResult, outcome: Any) -> dict[str, Any]:
    """The structured log line of one finished block."""
    block = p.plan.block(result.block_id)
    return {
        "event": "block_done", "block_id": result.block_id, "write_box": _box(block.write_box), "read_box": _box(block.read_box),
        "patches": result.n_patches, "seconds": round(result.seconds, 4), "device": result.device, "worker": outcome.worker,
    }


def failure_entry(p: RunPlan, failure: schedule.BlockFailure) -> dict[str, Any]:
    block = p.plan.block(failure.block_id)
    return {"block_id": failure.block_id, "write_box": _box(block.write_box), "read_box": _box(block.read_box), "error": failure.error,
            "traceback": failure.traceback}


def failure_message(p: RunPlan, failures: Sequence[schedule.BlockFailure], total: int) -> str:
    """The message of a run whose blocks failed: each block named by its write box."""
    def where(block_id: int) -> str:
        wb = p.plan.block(block_id).write_box
        return f"write box offset {list(wb.offset)} shape {list(wb.shape)}"

    return schedule.failure_message(failures, total, where=where, details=str(resume.RunDir(p.config.output).report_file()))


def report_dict(p: RunPlan, report: RunReport, ident: dict[str, Any], n_blocks: int) -> dict[str, Any]:
    """The JSON report written next to the output."""
    return {
        "status": "failed" if report.failures else "complete",
        "output": os.path.abspath(p.config.output),
        "part": list(p.config.part) if p.config.part else None,
        "fingerprint": resume.fingerprint(ident),
        "blocks": {"total": n_blocks, "done": report.blocks_done, "skipped": report.blocks_skipped, "failed": len(report.failures)},
        "seconds": round(report.seconds, 3),
        "voxels": report.voxels,
        "voxels_per_second": round(report.voxels_per_second, 1),
        "workers": {name: tally.to_dict() for name, tally in sorted(report.workers.items())},
        "failures": report.failures,
        "plan": p.plan.summary(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
