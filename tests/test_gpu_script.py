"""bench/gpu_check.sh, the one-call GPU run, rehearsed on CPU.

The fast tests drive the script with a stand-in interpreter (a shell script that answers the
script's calls: pip, pytest, the benchmarks) to check its flow: sections, results under $OUT,
failure and time-budget handling, the summary. The slow one is the real dry run
(``GPU_CHECK_DRY_RUN=1``): the project's interpreter, the GPU tests collected and skipped, the
benchmarks at their ``--smoke`` sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in interpreter for bench/gpu_check.sh: records each call, answers like the real tools.
echo "$*" >> "$FAKE_LOG"
out_arg() { local prev=""; for a in "$@"; do [[ $prev == --out ]] && echo "$a"; prev=$a; done; }
case "$1" in
    -c) echo fake-gpu ;;
    -m)
        case "$2" in
            pip) echo "building"; exit "${FAKE_PIP_RC:-0}" ;;
            pytest)
                for a in "$@"; do
                    if [[ $a == --junitxml=* ]]; then
                        cat > "${a#--junitxml=}" <<'XML'
<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="6">
<testcase classname="tests.test_gpu" name="test_a[triton]"/>
<testcase classname="tests.test_gpu" name="test_b[cuda]"><failure message="relative error 3e-1 &gt; 1e-2">x</failure></testcase>
</testsuite></testsuites>
XML
                    fi
                done
                exit "${FAKE_PYTEST_RC:-0}" ;;
        esac ;;
    -) if [[ $# -gt 1 ]]; then exec /usr/bin/env python3 - "${@:2}"; fi
       cat > /dev/null; echo "torch 9.9 fake"; echo "backend triton: usable" ;;
    bench/*)
        out=$(out_arg "$@")
        [[ -n $out ]] && printf 'case,variant,median_ms\nx,ours,1.0\n' > "$out"
        exit "${FAKE_BENCH_RC:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    python = tmp_path / "fakepython"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    log = tmp_path / "calls.log"

    def run(**env):
        full_env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "FAKE_LOG": str(log), **env}
        proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=full_env, timeout=120)
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, out, calls

    return run


def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_all_sections_in_order_with_results_under_out(fake):
    proc, out, calls = fake()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the fake junit XML has a failed test
    # install: editable, no deps, no build isolation; then the GPU tests, then each benchmark to $OUT.
    pip = [c for c in calls if c.startswith("-m pip")]
    assert pip == ["-m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e ."], calls
    pytest_call = next(c for c in calls if c.startswith("-m pytest"))
    assert "-m gpu tests/test_gpu.py" in pytest_call and f"--junitxml={out}/junit-gpu.xml" in pytest_call
    benches = [c for c in calls if c.startswith("bench/")]
    assert benches == [
        f"bench/bench_feature_loss.py --out {out}/feature_loss-fake-gpu.csv",
        f"bench/bench_attention.py --out {out}/attention-fake-gpu.csv",
        f"bench/bench_attention.py --teacher --out {out}/attention-teacher-fake-gpu.csv",
    ]
    for name in ("summary.txt", "env.txt", "junit-gpu.xml", "install.log", "tests.log",
                 "feature_loss-fake-gpu.csv", "attention-fake-gpu.csv", "attention-teacher-fake-gpu.csv"):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    assert "install: ok" in summary and "env: ok" in summary and "teacher: ok" in summary
    assert "tests: 3 passed, 1 failed, 0 errors, 2 skipped" in summary
    assert "FAILED test_b[cuda]: relative error 3e-1 > 1e-2" in summary
    assert "wrote attention-fake-gpu.csv (1 rows)" in proc.stdout


def test_clean_run_exits_zero(fake):
    proc, out, _ = fake(SECTIONS="env,feature_loss")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no section failed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "env.log", "env.txt", "feature_loss-fake-gpu.csv", "feature_loss.log", "summary.txt"]


def test_sections_switch_and_unknown_section(fake):
    proc, out, calls = fake(SECTIONS="attention")
    assert proc.returncode == 0
    expected = [f"bench/bench_attention.py --out {out}/attention-fake-gpu.csv"]
    assert [c for c in calls if not c.startswith("-c")] == expected
    proc, _, _ = fake(SECTIONS="attention,nonsense")
    assert proc.returncode == 2 and "unknown section 'nonsense'" in proc.stderr


def test_failed_build_is_recorded_and_the_run_goes_on(fake):
    proc, out, calls = fake(FAKE_PIP_RC="1", SECTIONS="install,feature_loss")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "install: FAILED, exit 1" in summary and "continuing without a fresh leap_kernels._C" in summary
    assert "feature_loss: ok" in summary and any(c.startswith("bench/bench_feature_loss.py") for c in calls)


def test_failing_benchmark_fails_the_run(fake):
    proc, out, _ = fake(FAKE_BENCH_RC="3", SECTIONS="teacher")
    assert proc.returncode == 1
    assert "teacher: FAILED, exit 3" in (out / "summary.txt").read_text()


def test_time_budget_skips_what_no_longer_fits(fake):
    proc, out, calls = fake(GPU_CHECK_BUDGET_S="20", SECTIONS="tests,attention")
    assert proc.returncode == 0
    summary = (out / "summary.txt").read_text()
    assert "tests: SKIPPED (time budget" in summary and "attention: SKIPPED (time budget" in summary
    assert not [c for c in calls if not c.startswith("-c")]


def test_dry_run_uses_smoke_sizes_and_no_install(fake):
    proc, out, calls = fake(GPU_CHECK_DRY_RUN="1")
    assert not any(c.startswith("-m pip") for c in calls)
    assert "install: skipped (dry run)" in (out / "summary.txt").read_text()
    benches = [c for c in calls if c.startswith("bench/")]
    assert all("--smoke" in c for c in benches) and len(benches) == 3


@pytest.mark.slow
def test_real_dry_run_on_cpu(tmp_path):
    """The whole flow with the project's interpreter: GPU tests collected and skipped, benchmark CLIs
    at --smoke sizes writing their CSVs under $OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "tests: 0 passed, 0 failed, 0 errors" in summary  # every GPU test skips without CUDA
    for name in ("env.txt", "junit-gpu.xml", "feature_loss-cpu.csv", "attention-cpu.csv", "attention-teacher-cpu.csv"):
        assert (out / name).is_file(), name
    for name in ("feature_loss-cpu.csv", "attention-cpu.csv", "attention-teacher-cpu.csv"):
        lines = (out / name).read_text().splitlines()
        assert len(lines) >= 3 and "ours" in "\n".join(lines), name
