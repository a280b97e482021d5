"""CI's own files: .ci/run runs the README's test command hermetically, the CPU workflow tests the
oldest supported torch/Triton pair."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_RUN = os.path.join(ROOT, ".ci", "run")


def test_ci_runs_make_test():
    with open(CI_RUN) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1] == "make test"
    assert subprocess.run(["bash", "-n", CI_RUN]).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_ci_hides_the_system_datasets_and_the_hub_caches(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "fashion-mnist").mkdir(parents=True)
    (datasets / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    # A copy of .ci/run whose last command reports what the test run would see instead of running it.
    fake_root = tmp_path / "repo"
    (fake_root / ".ci").mkdir(parents=True)
    with open(CI_RUN) as f:
        script = f.read()
    probe = 'echo "datasets=[$(ls -A "$DATASETS")] hf=$HF_HOME offline=$HF_HUB_OFFLINE"'
    (fake_root / ".ci" / "run").write_text(script.replace("\nmake test\n", f"\n{probe}\n"))
    env = {**os.environ, "LEAP_CI_DATASETS_DIR": str(datasets)}
    env.pop("LEAP_CI_HERMETIC", None)
    proc = subprocess.run(["bash", str(fake_root / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "datasets=[]" in proc.stdout and "offline=1" in proc.stdout, proc.stdout
    hf_home = proc.stdout.split("hf=")[1].split()[0]
    assert hf_home.startswith(tempfile.gettempdir()) and hf_home != os.environ.get("HF_HOME")  # a fresh, empty cache
    assert (datasets / "fashion-mnist").is_dir()  # hidden for the run, untouched outside it


def test_cpu_workflow_tests_the_oldest_supported_pair():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, ".github", "workflows", "cpu.yml")) as f:
        jobs = yaml.safe_load(f)["jobs"]
    assert {"lint", "test", "oldest-supported"} <= set(jobs)
    assert any("make test" in step.get("run", "") for step in jobs["test"]["steps"])
    oldest = "\n".join(step.get("run", "") for step in jobs["oldest-supported"]["steps"])
    assert "torch==2.11.0" in oldest and "triton==3.6.0" in oldest and "-m pytest -q tests" in oldest
    assert any("make lint" in step.get("run", "") for step in jobs["lint"]["steps"])
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"torch>=2.11"' in f.read()  # the oldest pair is the one the package claims


def test_dev_requirements_are_exact_pins():
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        reqs = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    loose = [r for r in reqs if "==" not in r and not r.startswith(("setuptools", "wheel"))]
    assert not loose, f"unpinned requirements: {loose}"
