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
    "torch": ("model", "infer", "transfer", "values", "blend", "telemetry", "train", "export"),
    "bioimageio": ("model.zoo", "export"),  # an optional extra (issue 19): model/zoo.py and export.py only
}
LEAVES = ("geometry", "config", "errors")

# The direction data flows (DESIGN.md): cli -> run -> its rooms -> schedule -> infer ->
# (label, model, blend, plan) -> formats -> store -> leaves. A module may import modules of
# its own room (package) and of rooms further down this list, never one further up.
FLOW = (
    ("cli",),
    ("demo",),
    ("run",),
    ("report",),
    ("output",),
    ("instances",),
    ("resolve",),
    ("preflight",),
    ("train", "export"),
    ("evaluate",),
    ("schedule",),
    ("worker",),
    ("tuning",),
    ("infer",),
    ("read", "transfer"),
    ("values",),
    ("job",),
    ("label", "telemetry", "finite", "sample"),
    ("model", "blend", "plan"),
    ("formats",),
    ("store",),
    ("resume",),
    ("geometry", "config", "__init__"),
    ("memory", "errors"),
)


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


def rank(name):
    """The position in FLOW of module *name* (``model.unet`` is in room ``model``)."""
    room = name.split(".")[0]
    for i, rooms in enumerate(FLOW):
        if room in rooms:
            return i
    raise AssertionError(f"unetflow.{name} is in no room of FLOW (tests/test_architecture.py): add its room where data reaches it")


def unetflow_imports(path):
    """The unetflow modules *path* imports, anywhere in it (lazy imports included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "unetflow":
            if node.module == "unetflow":
                yield from (a.name for a in node.names)
            else:
                yield node.module.split(".", 1)[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".", 1)[1] for a in node.names if a.name.startswith("unetflow."))


@pytest.mark.parametrize("name, path", list(modules()))
def test_data_flows_one_way(name, path):
    for mod in unetflow_imports(path):
        if mod == "__version__" or mod.split(".")[0] == name.split(".")[0]:
            continue
        assert rank(mod) > rank(name), (
            f"unetflow.{name} imports unetflow.{mod}, a room further up the flow (FLOW in tests/test_architecture.py); "
            "pass what it needs down instead"
        )


def test_cli_commands_register_without_importing_back():
    for path in sorted((PKG / "cli").glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        for mod in unetflow_imports(path):
            assert mod != "cli", f"unetflow/cli/{path.name} imports the cli package; import unetflow.cli.common instead"


def test_cli_imports_lazily():
    heavy = {"torch", "zarr", "dask", "distributed", "numpy", "tifffile"}
    for path in sorted((PKG / "cli").glob("*.py")):
        for mod in imports(path, top_level_only=True):
            assert mod.split(".")[0] not in heavy, f"cli/{path.name} imports {mod} at module level"
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


def test_core_rooms_type_check():
    """mypy passes on the core rooms listed in pyproject.toml ([tool.mypy] files)."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    root = PKG.parent
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_ruff_clean():
    """The lint rules of pyproject.toml ([tool.ruff]) hold everywhere (the same check a developer runs)."""
    import subprocess
    import sys

    root = PKG.parent
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "unetflow", "tests", "bench", "pipelines"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


MAX_FUNCTION_LINES = 40


def code_lines(node, lines):
    """Lines of code in a function's body: no docstring, blank lines or comments."""
    body = node.body
    start = body[0].lineno
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
        start = body[0].end_lineno + 1
    return [line for line in lines[start - 1:node.end_lineno] if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name, path", list(modules()))
def test_functions_are_short_or_say_why(name, path):
    """No function over ~40 lines of code unless its first line states why (``# long: ...``)."""
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(code_lines(node, lines)) > MAX_FUNCTION_LINES:
            assert "# long:" in lines[node.lineno - 1], (
                f"unetflow.{name}.{node.name} (line {node.lineno}) has {len(code_lines(node, lines))} lines of code; "
                f"split it, or state the reason on its def line with '# long: ...'"
            )
