"""A plain ``pip install .`` (build isolation: no torch at build time, so no prebuilt extension) gives
a usable ``cpp`` backend: the wheel carries the C++ CPU sources and ``leap_kernels`` compiles them on
first use, once (leap_kernels/_ext.py)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("leap_kernels", "leap", "csrc", "setup.py", "pyproject.toml", "README.md")

PROBE = """
import torch, leap_kernels
from leap_kernels.ops.naive import fused_feature_loss_reference
print("FROM", leap_kernels.__file__)
status = leap_kernels.backends("cpu")["cpp"]
print("CPP", status.usable, "|".join(status.reasons))
s, w = torch.randn(33, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
b, t = torch.randn(40, dtype=torch.float64), torch.randn(33, 40, dtype=torch.float64)
with leap_kernels.use_backend("cpp"):
    loss = leap_kernels.fused_feature_loss(s.float(), w.float(), b.float(), t.float(), normalize=True)
ref = fused_feature_loss_reference(s, w, b, t, normalize=True)
print("ERR", abs(float(loss) - float(ref)) / abs(float(ref)))
"""


@pytest.mark.slow
def test_plain_pip_install_compiles_the_cpu_kernels_on_first_use(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        ignore = shutil.ignore_patterns("_C*.so", "__pycache__", "*.egg-info", "_csrc")
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    site = tmp_path / "site"
    # Build isolation on (pip's default): the build environment has setuptools and wheel, not torch.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "setuptools" in proc.stderr and "No matching distribution" in proc.stderr:
        pytest.skip("pip's isolated build needs setuptools from a package index, and none is reachable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not glob.glob(str(site / "leap_kernels" / "_C*.so"))  # nothing was compiled at install time
    assert (site / "leap_kernels" / "_csrc" / "ops.cpp").is_file()

    # `python -S` with the installed packages on PYTHONPATH: torch and the rest come from this environment,
    # but not its .pth files, whose editable-install finder would serve this checkout's leap_kernels._C.
    purelib = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{purelib}", "LEAP_KERNELS_CACHE_DIR": str(tmp_path / "c")}
    env.update(TRITON_INTERPRET="0")
    for key in ("LEAP_KERNELS_BACKEND", "LEAP_KERNELS_JIT"):
        env.pop(key, None)
    runs = [
        subprocess.run(
            [sys.executable, "-S", "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"FROM {site}" in run.stdout, run.stdout
        assert "CPP True" in run.stdout, run.stdout
        assert float(run.stdout.split("ERR")[1]) < 1e-5, run.stdout
    assert "compiling the C++ CPU kernels" in runs[0].stderr, runs[0].stderr
    assert "compiling" not in runs[1].stderr, runs[1].stderr  # compiled once, then loaded from the cache


@pytest.mark.slow
def test_failed_compile_falls_back_to_the_torch_backend_with_one_warning(tmp_path):
    # A compiler that cannot run: the import still works, the warning names the reason, torch runs the op.
    probe = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'leap_kernels._C':\n"
        "            raise ImportError('hidden by the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import warnings; warnings.simplefilter('always')\n"
        "import torch, leap_kernels\n"
        "print('CPP', leap_kernels.backends('cpu')['cpp'].usable)\n"
        "print('LOSS', float(leap_kernels.token_normalized_mse(torch.randn(5, 16), torch.randn(5, 16))))\n"
    )
    env = {**os.environ, "LEAP_KERNELS_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/nonexistent/c++"}
    env.update(TRITON_INTERPRET="0")
    for key in ("LEAP_KERNELS_BACKEND", "LEAP_KERNELS_JIT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPP False" in proc.stdout and "LOSS" in proc.stdout, proc.stdout
    warning_lines = [line for line in proc.stderr.splitlines() if "compiling the C++ sources failed" in line]
    assert len(warning_lines) == 1, proc.stderr[-3000:]
    assert "The torch backend runs instead" in warning_lines[0]
