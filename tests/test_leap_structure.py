"""Structure of the ``leap`` package: every module imports alone, the import graph has no
cycle and points downward through the package's rooms, long modules say why (and none exceeds
the hard limit), every command has the one shape, long parameter lists are documented API, and
the ``leap`` command handles errors and missing optional dependencies as documented
(leap/cli/command.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "leap")
MAX_LINES = 500
LONG_MODULE_NOTE = "Why this module is long:"


def leap_modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every module of the ``leap`` package."""
    mods = {}
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


_IMPORT_EACH = """
import importlib, os, sys, traceback
import numpy, torch, timm, torchvision, leap_kernels  # third-party only: the slow part, loaded once
loaded = [m for m in sys.modules if m == "leap" or m.startswith("leap.")]
assert not loaded, loaded
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a child with no leap module loaded imports this one module
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone():
    # One fresh interpreter; each leap module is imported in its own forked child, before any
    # other leap module is loaded, so an import that only works after another one fails here.
    names = [n for n in leap_modules() if not n.endswith(".__main__")]  # those run a command
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0 and "FAILED []" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def _imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The ``leap`` modules that module ``name`` imports, at any level (function bodies included)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            # the longest known module that is a prefix: `from .cli.options import X` -> leap.cli.options
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_import_graph_has_no_cycle():
    mods = leap_modules()
    known = set(mods)
    graph = {n: _imports_of(n, p, known) for n, p in mods.items()}
    assert (
        "leap.run.build" in graph["leap.run.loop"] and "leap.objective" in graph["leap.run.timing"]
    )  # the parser works
    assert "leap.cli.options" in graph["leap.cli.report"] and "leap.config" in graph["leap.cli.options"]

    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_cost_model_runs_no_modules():
    # The analytic cost model and the errors/config/runlog layer stay free of the trainer.
    graph = {n: _imports_of(n, p, set(leap_modules())) for n, p in leap_modules().items()}
    assert graph["leap.errors"] == set()
    assert graph["leap.config"] <= {"leap.errors", "leap.runlog", "leap.config_schema", "leap.config_checks"}
    assert graph["leap.config_checks"] <= {"leap.errors"}
    assert graph["leap.config_schema"] <= {"leap.errors"}
    assert graph["leap.runlog"] <= {"leap.errors"}
    assert not graph["leap.cost"] & {"leap.run.loop", "leap.run.timing", "leap.objective", "leap.cli"}


def test_long_modules_say_why():
    too_long = []
    for name, path in leap_modules().items():
        text = open(path, encoding="utf-8").read()
        if text.count("\n") > MAX_LINES and LONG_MODULE_NOTE not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{name} ({text.count(chr(10))} lines)")
    assert not too_long, f"modules over {MAX_LINES} lines without '{LONG_MODULE_NOTE}' in the docstring: {too_long}"


HARD_MAX_LINES = 600
MAX_PARAMETERS = 8

#: The package's rooms, lowest first: a module may import its own room and the rooms below it.
#: ``base`` is every module directly in leap/ (errors, config, models, teacher, ...) and leap.data.
LAYERS = ("base", "leap.run", "leap.evaluation", "leap.apps", "leap.cli")


def _layer(name: str) -> int:
    for i, prefix in enumerate(LAYERS[1:], 1):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return 0


def kernel_modules() -> dict[str, str]:
    """``{path: path}`` of every module of the ``leap_kernels`` package."""
    root = os.path.join(ROOT, "leap_kernels")
    return {os.path.join(d, f): os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".py")}


def test_no_module_over_the_hard_limit():
    too_long = [
        f"{n} ({open(p, encoding='utf-8').read().count(chr(10))} lines)"
        for n, p in {**leap_modules(), **kernel_modules()}.items()
        if open(p, encoding="utf-8").read().count("\n") > HARD_MAX_LINES
    ]
    assert not too_long, f"modules over {HARD_MAX_LINES} lines: {too_long}"


def test_imports_point_downward():
    mods = leap_modules()
    known = set(mods)
    upward = []
    for name, path in mods.items():
        if name in ("leap", "leap.__main__") or name.endswith(".__main__"):  # entry points sit on top
            continue
        for dep in _imports_of(name, path, known):
            if dep != "leap" and _layer(dep) > _layer(name):
                upward.append(f"{name} -> {dep}")
    assert not upward, f"imports of a higher room ({' < '.join(LAYERS)}): {upward}"


def test_every_command_has_the_one_shape():
    import leap.cli as cli

    files = {n for n in leap_modules() if n.startswith("leap.cli.")} - {"leap.cli.command", "leap.cli.options"}
    assert files == {c.__name__ for c in cli.COMMANDS}, "every module of leap/cli/ but command/options is a command"
    for c in cli.COMMANDS:
        for attr in ("NAME", "HELP", "add_parser", "run", "main"):
            assert hasattr(c, attr), f"{c.__name__} has no {attr}"


def test_long_parameter_lists_are_documented_public_api():
    offenders = []
    for name, path in leap_modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        classes = {id(f): c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            if len(params) <= MAX_PARAMETERS:
                continue
            owner = classes.get(id(node))
            doc = ast.get_docstring(owner if node.name == "__init__" and owner is not None else node)
            public = not node.name.startswith("_") or node.name == "__init__"
            if not (public and doc):
                offenders.append(f"{name}.{node.name} ({len(params)} parameters)")
    assert not offenders, f"more than {MAX_PARAMETERS} parameters outside documented public API: {offenders}"


# --------------------------------------------------------------------------------------
# The leap command: errors and optional dependencies
# --------------------------------------------------------------------------------------


def test_defects_propagate_with_their_traceback(monkeypatch, capsys):
    from leap.cli import main
    from leap.errors import NonFiniteLossError
    from leap.run import loop as leap_train

    def broken(config):
        raise ValueError("a bug inside the trainer")

    monkeypatch.setattr(leap_train, "train", broken)
    argv = ["distill", "--teacher", "t", "--student", "s"]
    with pytest.raises(ValueError, match="a bug inside the trainer"):
        main(argv)

    def diverged(config):
        raise NonFiniteLossError("loss is nan at step 3")

    monkeypatch.setattr(leap_train, "train", diverged)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "leap: error: loss is nan at step 3\n"


@pytest.mark.slow
def test_a_defect_exits_1_with_a_traceback(tmp_path):
    code = (
        "import sys; import leap.run.loop as t\n"
        "def broken(config): raise KeyError('internal')\n"
        "t.train = broken\n"
        "from leap.cli import main\n"
        "sys.exit(main(['distill', '--teacher', 't', '--student', 's']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'internal'" in proc.stderr


@pytest.mark.slow
def test_without_timm_leap_names_the_extra(tmp_path):
    # `pip install .` without the train extra: help works, a command that needs timm says what to install.
    code = (
        "import sys\n"
        "sys.modules['timm'] = None  # as if timm were not installed\n"
        "from leap.cli import main\n"
        "assert main(['distill', '--help']) == 0\n"
        "sys.exit(main(['distill', '--teacher', 't', '--student', 's', '--data-source', 'synthetic', "
        f"'--out', {str(tmp_path / 'run')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "leap-kernels[train]" in proc.stderr and "'timm'" in proc.stderr and "Traceback" not in proc.stderr


def test_version_has_one_source(capsys):
    import leap
    import leap_kernels
    from leap.cli import main

    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "leap_kernels.__version__"' in pyproject
    assert "\nversion = " not in pyproject.split("[tool.setuptools.dynamic]")[0]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"leap {leap_kernels.__version__}" == f"leap {leap.__version__}"


def test_demo_teacher_is_package_data():
    from leap.apps.demo import DEFAULT_TEACHER

    assert os.path.dirname(DEFAULT_TEACHER) == os.path.join(PKG, "assets") and os.path.isfile(DEFAULT_TEACHER)
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'leap = ["assets/*.pth", "assets/*.json"]' in pyproject
