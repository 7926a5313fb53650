#!/usr/bin/env python
"""Nightly segmentation: every input of a YAML list through ``unetflow.run.segment``.

    python pipelines/nightly.py pipelines/configs/nightly.yaml

The config names the model, the inputs (paths or globs), where outputs go, and the
run settings (the sections of a ``--config`` file). Each input runs with ``--resume``
semantics: finished outputs are skipped block by block (no block is computed twice),
an interrupted one is finished, and one made with other settings or another model is
reported as failed rather than touched. One failing input does not stop the others.
All inputs run on one cluster, started once (a batch system queues its jobs once a
night, not once an input). At the end a JSON summary is written and the exit code is 1
if anything failed.

Config keys::

    model: /models/unet.pt           # a unetflow checkpoint
    inputs: [/data/in/*.zarr, ...]   # paths or globs (sorted, de-duplicated)
    outputs: /data/pred              # folder for <input name><output_suffix>
    output_suffix: _pred.zarr        # default
    summary: /data/pred/nightly-summary.json   # default: <outputs>/nightly-summary.json
    settings: {cluster: ..., tiling: ..., output: ...}

``model_source: {factory: "module:Class", args: {...}}`` replaces ``model`` with a
Python source such as the test oracle ``unetflow.model.testing:ScaleNetSource``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unetflow.config import load_yaml, run_config_from_mapping
from unetflow.errors import ConfigError, UnetflowError, one_line

log = logging.getLogger("unetflow.nightly")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths and globs -> sorted unique paths; a pattern that matches nothing is kept (and fails)."""
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        found += matches or [pattern]
    return list(dict.fromkeys(found))


def output_for(input_path: str, outputs: str, suffix: str) -> str:
    name = Path(input_path.rstrip("/")).name
    for ext in (".zarr", ".zr"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return str(Path(outputs) / f"{name}{suffix}")


def model_source(cfg: dict[str, Any]) -> Any:
    spec = cfg.get("model_source")
    if not spec:
        return None
    module, _, name = str(spec["factory"]).partition(":")
    return getattr(importlib.import_module(module), name)(**spec.get("args", {}))


def run_nightly(path: str) -> tuple[int, dict[str, Any]]:
    """Run every input of the config at *path*; return (exit code, summary)."""
    cfg = load_yaml(path)
    for key in ("inputs", "outputs"):
        if key not in cfg:
            raise ConfigError(f"nightly config {path} has no '{key}'; see pipelines/configs/nightly.yaml")
    source = model_source(cfg)
    model = str(cfg.get("model", "(model_source)"))
    outputs = os.path.expanduser(str(cfg["outputs"]))
    suffix = str(cfg.get("output_suffix", "_pred.zarr"))
    summary_path = cfg.get("summary") or os.path.join(outputs, "nightly-summary.json")
    inputs = cfg["inputs"] if isinstance(cfg["inputs"], list) else [cfg["inputs"]]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        night = Night(cfg, model, source, outputs, suffix, stack)
        entries = [night.run_input(inp) for inp in expand_inputs([str(i) for i in inputs])]
    failed = [e["input"] for e in entries if e["status"] == "failed"]
    summary = {
        "config": os.path.abspath(path),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 3),
        "counts": {s: sum(e["status"] == s for e in entries) for s in ("done", "skipped", "failed")},
        "failed": failed,
        "inputs": entries,
    }
    Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
    Path(summary_path).write_text(json.dumps(summary, indent=1))
    return (1 if failed or not entries else 0), summary


@dataclass
class Night:
    """The inputs of one night share one cluster (on a batch system, one set of jobs that
    queue once): the first input that reaches the blocks opens it, the others reuse it."""

    cfg: dict[str, Any]
    model: str
    source: Any
    outputs: str
    suffix: str
    stack: contextlib.ExitStack
    dispatch: Any = None

    def run_input(self, inp: str) -> dict[str, Any]:
        """One input with ``--resume`` semantics; a failure is recorded, not raised."""
        from unetflow import run, schedule

        out = output_for(inp, self.outputs, self.suffix)
        entry: dict[str, Any] = {"input": inp, "output": out}
        t1 = time.perf_counter()
        try:
            config = run_config_from_mapping(self.cfg.get("settings", {}), input=inp, output=out, model=self.model, resume=True)
            if self.dispatch is None:  # batch job logs go to <outputs>/.nightly-logs (local clusters write none)
                logs = os.path.join(self.outputs, ".nightly-logs")
                self.dispatch = self.stack.enter_context(schedule.Dispatcher(config.cluster, log_directory=logs, tuned=config.tuning))
            report = run.segment(config, source=self.source, progress=False, dispatch=self.dispatch)
            entry["status"] = "done" if report.blocks_done else "skipped"
            entry["blocks_done"], entry["blocks_skipped"] = report.blocks_done, report.blocks_skipped
        except UnetflowError as err:
            entry["status"], entry["error"] = "failed", one_line(str(err))
        except Exception as err:  # an unexpected bug in one input must not stop the others
            log.exception("input %s failed unexpectedly", inp)
            entry["status"], entry["error"] = "failed", f"{type(err).__name__}: {one_line(str(err))}"
        entry["seconds"] = round(time.perf_counter() - t1, 3)
        log.info(json.dumps({"event": "nightly_input", **entry}))
        return entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python pipelines/nightly.py CONFIG.yaml\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code, summary = run_nightly(argv[0])
    except UnetflowError as err:
        sys.stderr.write(f"error: {one_line(str(err))}\n")
        return 1
    counts = summary["counts"]
    sys.stdout.write(f"nightly: {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed\n")
    for entry in summary["inputs"]:
        if entry["status"] == "failed":
            sys.stdout.write(f"  FAILED {entry['input']}: {entry['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
