"""bench/sections.py: a benchmark rewrites its own section of BENCHMARKS.md and no other."""

import doctest
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sections  # noqa: E402


def test_doctest():
    assert doctest.testmod(sections).failed == 0


def test_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    sections.replace_section(path, "## CPU:", ["## CPU: day 1", "", "a"])
    sections.replace_section(path, "## GPU:", ["## GPU: day 1", "", "g"])
    sections.replace_section(path, "## CPU:", ["## CPU: day 2", "", "b"])
    assert path.read_text() == "# Benchmarks\n\n## GPU: day 1\n\ng\n\n## CPU: day 2\n\nb\n"
