"""Each benchmark measurement runs in a child process of its own (``python SCRIPT _one NAME JSON``),
so peak memory and allocator settings are per measurement. Used by bench/run.py and bench/ceiling.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout on PYTHONPATH (and *extra* set)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def run_child(script: str, name: str, spec: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script _one name spec`` and return the JSON its last line prints; stop on failure."""
    proc = subprocess.run([sys.executable, script, "_one", name, spec], capture_output=True, text=True,
                          env=env or child_env(), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_or_child(main: Callable[[], Any], one: Callable[[str, str], dict[str, Any]]) -> None:
    """The script's entry point: ``_one NAME JSON`` prints ``one(NAME, JSON)`` as JSON, else ``main()``."""
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        print(json.dumps(one(sys.argv[2], sys.argv[3]), default=str))
    else:
        main()
