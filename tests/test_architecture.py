"""The rooms of DESIGN.md, enforced: import direction and where heavy dependencies live."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "unetflow"

# each heavy dependency may be imported only by modules whose path starts with one of these
ROOMS = {
    "zarr": ("store", "formats"),
    "tifffile": ("store", "formats"),
    "h5py": ("store", "formats"),
    "distributed": ("schedule",),
    "dask_jobqueue": ("schedule",),
    "torch": ("model", "infer", "blend", "telemetry", "train", "run_train"),
    "bioimageio": ("model.zoo",),  # an optional extra (issue 19): model/zoo.py and model/zoo_export.py only
}
LEAVES = ("geometry", "config", "errors")


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield ".".join(rel.parts), path


def imports(path, *, top_level_only=False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("name, path", list(modules()))
def test_heavy_dependencies_stay_in_their_room(name, path):
    for mod in imports(path):
        root = mod.split(".")[0]
        if root in ROOMS:
            assert name.startswith(ROOMS[root]), f"unetflow.{name} imports {mod}, which belongs in {ROOMS[root]}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_only_errors(leaf):
    for mod in imports(PKG / f"{leaf}.py"):
        if mod.startswith("unetflow"):
            assert mod == "unetflow.errors", f"leaf {leaf} imports {mod}"


def test_cli_imports_lazily():
    heavy = {"torch", "zarr", "dask", "distributed", "numpy", "tifffile"}
    for mod in imports(PKG / "cli.py", top_level_only=True):
        assert mod.split(".")[0] not in heavy, f"cli imports {mod} at module level"
    code = "import sys, unetflow.cli; print(sorted(m for m in ('torch', 'zarr', 'distributed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_print_in_library_code():
    for name, path in modules():
        if name.startswith("cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                pytest.fail(f"unetflow.{name} calls print at line {node.lineno}; use logging")


def test_ruff_clean():
    """The lint rules of ruff.toml hold everywhere (the same check a developer runs)."""
    import subprocess
    import sys

    root = PKG.parent
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "unetflow", "tests", "bench", "pipelines"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
