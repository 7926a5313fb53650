"""The documents stay true to the code: every ``unetflow`` command line in README.md
and docs/ names a real command and real options, and every relative link (with its
``#anchor``) points at a file and heading that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from unetflow.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """``unetflow ...`` commands in fenced code blocks (several per line with ``&&``)."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("unetflow "):
                    out.append(part)
    return out


def options_of(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


CASES = [(doc.name, line) for doc in DOCS for line in command_lines(doc.read_text())]


def test_the_documents_show_commands():
    assert len(CASES) >= 20, CASES


@pytest.mark.parametrize(("doc", "line"), CASES)
def test_documented_command_exists(doc, line):
    words = shlex.split(line)[1:]
    command: click.Command = main
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    assert not isinstance(command, click.Group), f"{doc}: `{line}` names no command of `unetflow {command.name}`"
    unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in options_of(command)]
    assert not unknown, f"{doc}: `{line}`: {unknown} are not options of `unetflow {command.name}`"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


LINKS = [(doc, target) for doc in DOCS for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize(("doc", "target"), LINKS, ids=[f"{d.name}->{t}" for d, t in LINKS])
def test_relative_links_resolve(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name} links to {target}: no such file"
    if anchor:
        headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
        assert anchor in {slug(h) for h in headings}, f"{doc.name} links to {target}: no such heading in {file.name}"
