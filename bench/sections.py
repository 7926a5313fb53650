"""Each benchmark script owns one section of BENCHMARKS.md and rewrites only that one,
with the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

HEADER = "# Benchmarks\n"


def replace_section(path: Path, marker: str, lines: list[str], header: str = HEADER) -> None:
    """Write *lines* (a section: its ``## `` heading starts with *marker*) as the last
    section of *path*, dropping the section that held *marker* before; others stay as they are.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "B.md"
    >>> p.write_text("# B\\n\\n## A: 1\\n\\nold\\n\\n## C: 2\\n\\nc\\n")
    30
    >>> replace_section(p, "## A:", ["## A: 3", "", "new"]); print(p.read_text(), end="")
    # B
    <BLANKLINE>
    ## C: 2
    <BLANKLINE>
    c
    <BLANKLINE>
    ## A: 3
    <BLANKLINE>
    new
    """
    text = path.read_text() if path.exists() else header
    if marker in text:
        head, _, rest = text.partition(marker)
        nxt = rest.find("\n## ")
        text = head + ("" if nxt < 0 else rest[nxt + 1 :])
    path.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


def machine(gpu: bool) -> str:
    """The machine line of a section: architecture, cores, memory, and the GPU or "CPU only"."""
    import psutil

    text = f"{platform.machine()} Linux, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    if gpu:
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    else:
        text += ", CPU only"
    return text
