"""tools/gpu_check.sh, the one-call GPU run, rehearsed on CPU.

The fast tests drive the script with a stand-in interpreter (a shell script that answers the
script's calls: pip, pytest, the benchmark suite, bench/compare.py, bench/whole_run.py) to check its
flow: sections, results under $OUT, failure and time-budget handling, the summary. The slow one is
the real dry run (``GPU_CHECK_DRY_RUN=1``): the project's interpreter, the GPU tests collected and
skipped, the benchmark suite at ``--bench-size=smoke``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in interpreter for tools/gpu_check.sh: records each call, answers like the real tools.
echo "$*" >> "$FAKE_LOG"
out_arg() { local prev=""; for a in "$@"; do [[ $prev == --out ]] && echo "$a"; prev=$a; done; }
case "$1" in
    -c) echo fake-gpu ;;
    -m)
        case "$2" in
            pip) echo "building"; exit "${FAKE_PIP_RC:-0}" ;;
            pytest)
                suite=0
                for a in "$@"; do
                    [[ $a == bench/* ]] && suite=1
                    if [[ $a == --junitxml=* ]]; then
                        cat > "${a#--junitxml=}" <<'XML'
<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="6">
<testcase classname="tests.test_gpu" name="test_a[triton]"/>
<testcase classname="tests.test_gpu" name="test_b[cuda]"><failure message="relative error 3e-1 &gt; 1e-2">x</failure></testcase>
</testsuite></testsuites>
XML
                    fi
                    if [[ $a == --benchmark-json=* ]]; then
                        printf '{"benchmarks": [{"name": "t[x]", "fullname": "bench/t.py::t[x]"}]}\n' > "${a#--benchmark-json=}"
                    fi
                done
                if (( suite )); then echo "4 passed in 1.00s"; exit "${FAKE_BENCH_RC:-0}"; fi
                exit "${FAKE_PYTEST_RC:-0}" ;;
        esac ;;
    -) if [[ $# -gt 1 ]]; then exec /usr/bin/env python3 - "${@:2}"; fi
       cat > /dev/null; echo "torch 9.9 fake"; echo "backend triton: usable" ;;
    bench/compare.py)
        if [[ " $* " == *" --show "* ]]; then echo "| t[x] | 1.0 | |"; exit 0; fi
        echo "1 benchmarks: 0 regressed, 0 faster, 0 missing from the new run, 0 new"
        [[ ${FAKE_COMPARE_RC:-0} == 0 ]] && echo OK || echo FAILED
        exit "${FAKE_COMPARE_RC:-0}" ;;
    tools/gpu_smoke.py)
        out=$(out_arg "$@")
        [[ -n $out ]] && echo '{"rows": []}' > "$out"
        echo "| fused_feature_loss[mse] | M32768-384x1536 | triton | ok | 1.0e-03 | 0.5 |"
        echo "smoke: 9 passed, ${FAKE_SMOKE_RC:-0} failed, 3 cannot run (2.0 s, full, torch.bfloat16, cuda)"
        exit "${FAKE_SMOKE_RC:-0}" ;;
    bench/whole_run.py)
        out=$(out_arg "$@")
        [[ -n $out ]] && echo '{"variants": {}}' > "$out"
        echo "whole run over the trajectory (mean block 29.35 of 40); step times in ms"
        echo "| ours | 2.00x |" ;;
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


def _pytest_calls(calls):
    return [c for c in calls if c.startswith("-m pytest")]


def test_all_sections_in_order_with_results_under_out(fake):
    proc, out, calls = fake()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the fake junit XML has a failed test
    # install: editable, no deps, no build isolation; then the GPU tests, then each benchmark run to $OUT.
    pip = [c for c in calls if c.startswith("-m pip")]
    assert pip == ["-m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e ."], calls
    # The headline numbers first, the full GPU test matrix last, one pytest call per test file.
    bench, teacher, step, tests_gpu, tests_fp8, tests_rope, tests_dinov3, tests_data, tests_syncs = _pytest_calls(calls)
    assert bench.startswith("-m pytest bench/test_bench_ops.py -k not 192x1536 and not vits ")
    assert f"--benchmark-json={out}/bench-fake-gpu.json" in bench
    assert teacher.startswith("-m pytest bench/test_bench_teacher.py --teacher-ks=20,40 ")
    assert f"--benchmark-json={out}/teacher-fake-gpu.json" in teacher
    assert step.startswith("-m pytest bench/test_bench_step.py --step-ks=10,40 ")
    assert (
        tests_gpu.startswith("-m pytest -m gpu tests/test_gpu.py ")
        and f"--junitxml={out}/junit-gpu-test_gpu.xml" in tests_gpu
    )
    assert tests_fp8.startswith("-m pytest -m gpu tests/test_leap_fp8.py ")
    assert f"--junitxml={out}/junit-gpu-test_leap_fp8.xml" in tests_fp8
    for call, name in (
        (tests_rope, "test_teacher_attention_rope"),
        (tests_dinov3, "test_dinov3"),
        (tests_data, "test_device_pipeline"),
        (tests_syncs, "test_host_syncs"),
    ):
        assert call.startswith(f"-m pytest -m gpu tests/{name}.py ") and f"junit-gpu-{name}.xml" in call, call
    # The build is checked for its CUDA kernels; the smoke runs before any benchmark.
    assert any("with_cuda()" in c for c in calls if c.startswith("-c"))
    assert calls.index(f"tools/gpu_smoke.py --out {out}/smoke.json") < calls.index(bench)
    assert f"--benchmark-json={out}/step-fake-gpu.json" in step
    for call in (bench, teacher, step):
        assert "--bench-size" not in call and "-o timeout=0" in call  # full sizes; no per-test timeout
    scripts = [c for c in calls if c.startswith(("bench/", "tools/")) and "--show" not in c]
    assert scripts == [
        f"tools/gpu_smoke.py --out {out}/smoke.json",
        f"bench/compare.py --baseline-dir bench/baselines --threshold 1.25 {out}/bench-fake-gpu.json",
        f"bench/whole_run.py {out}/step-fake-gpu.json --out {out}/whole-run-fake-gpu.json",
        f"bench/trainer_overhead.py --size vitg --rounds 1 --steps 6 --out {out}/trainer-overhead-fake-gpu.csv",
        f"tools/fp8_teacher.py --model vit_giant_patch14_reg4_dinov2 --images 8 --batch 8 --time-batch 32 "
        f"--out {out}/fp8_teacher-fake-gpu.csv",
    ]
    for name in (
        "summary.txt",
        "env.txt",
        "junit-gpu-test_gpu.xml",
        "junit-gpu-test_leap_fp8.xml",
        "install.log",
        "tests.log",
        "tables.md",
        "compare.log",
        "smoke.json",
        "bench-fake-gpu.json",
        "teacher-fake-gpu.json",
        "step-fake-gpu.json",
        "whole-run-fake-gpu.json",
    ):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    assert "install: ok" in summary and "env: ok" in summary and "teacher: ok" in summary and "step: ok" in summary
    assert "smoke: ok" in summary and "smoke: 9 passed, 0 failed" in summary
    # The plan with each section's estimate comes first.
    assert summary.startswith("gpu_check plan (budget 540 s") and "  smoke    ~45 s" in summary
    assert "tests: 18 passed, 6 failed, 0 errors, 12 skipped" in summary  # six files, one fake XML each
    assert "FAILED test_b[cuda]: relative error 3e-1 > 1e-2" in summary
    assert "bench: 4 passed in 1.00s" in summary and "compare: OK" in summary
    assert "whole run over the trajectory" in summary and "| ours | 2.00x |" in summary
    assert (out / "tables.md").read_text().count("| t[x] |") == 3
    assert "wrote bench-fake-gpu.json (1 benchmarks)" in proc.stdout


def test_clean_run_exits_zero(fake):
    proc, out, _ = fake(SECTIONS="env,bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no section failed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "bench-fake-gpu.json",
        "bench.log",
        "compare.log",
        "env.log",
        "env.txt",
        "summary.txt",
        "tables.md",
    ]


def test_failed_smoke_fails_the_run_and_the_benchmarks_still_run(fake):
    proc, out, calls = fake(FAKE_SMOKE_RC="1", SECTIONS="smoke,bench")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "smoke: FAILED, exit 1" in summary and "smoke: 9 passed, 1 failed" in summary
    assert "bench: ok" in summary


def test_sections_switch_and_unknown_section(fake):
    proc, out, calls = fake(SECTIONS="teacher")
    assert proc.returncode == 0
    assert [c for c in calls if not c.startswith(("-c", "bench/compare.py --show"))] == [
        f"-m pytest bench/test_bench_teacher.py --teacher-ks=20,40 -q -rfEs -p no:cacheprovider -o timeout=0 "
        f"--benchmark-json={out}/teacher-fake-gpu.json --benchmark-columns=median,iqr,rounds"
    ]
    proc, _, _ = fake(SECTIONS="teacher,nonsense")
    assert proc.returncode == 2 and "unknown section 'nonsense'" in proc.stderr
    proc, _, calls = fake(SECTIONS="step", GPU_CHECK_STEP_KS="20,40", GPU_CHECK_BENCH_ARGS="-k ours")
    assert "--step-ks=20,40 -k ours " in _pytest_calls(calls)[-1]  # the calls log accumulates


def test_failed_build_is_recorded_and_the_run_goes_on(fake):
    proc, out, calls = fake(FAKE_PIP_RC="1", SECTIONS="install,bench")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "install: FAILED, exit 1" in summary and "continuing without a usable leap_kernels._C" in summary
    assert "bench: ok" in summary and any(c.startswith("-m pytest bench/test_bench_ops.py") for c in calls)


def test_failing_benchmark_fails_the_run(fake):
    proc, out, _ = fake(FAKE_BENCH_RC="3", SECTIONS="teacher")
    assert proc.returncode == 1
    assert "teacher: FAILED, exit 3" in (out / "summary.txt").read_text()


def test_regression_against_the_baseline_fails_the_run(fake):
    proc, out, _ = fake(FAKE_COMPARE_RC="1", SECTIONS="bench")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "bench: ok" in summary and "compare: FAILED, exit 1" in summary and "compare: FAILED" in summary


def test_time_budget_skips_what_no_longer_fits(fake):
    proc, out, calls = fake(GPU_CHECK_BUDGET_S="20", SECTIONS="tests,bench,step")
    assert proc.returncode == 0
    summary = (out / "summary.txt").read_text()
    for name in ("tests", "bench", "step"):
        assert f"{name}: SKIPPED (time budget" in summary
    assert not [c for c in calls if not c.startswith("-c")]
    assert not (out / "tables.md").exists()


def test_dry_run_uses_smoke_sizes_and_no_install(fake):
    proc, out, calls = fake(GPU_CHECK_DRY_RUN="1")
    assert not any(c.startswith("-m pip") for c in calls)
    assert "install: skipped (dry run)" in (out / "summary.txt").read_text()
    benches = [c for c in _pytest_calls(calls) if "bench/" in c]
    assert len(benches) == 3
    assert f"tools/fp8_teacher.py --images 4 --batch 4 --out {out}/fp8_teacher-fake-gpu.csv" in calls
    for call in benches:
        assert "--bench-size=smoke --bench-compile-backend=eager" in call
        assert "--teacher-ks" not in call and "--step-ks" not in call  # the smoke models' own k


@pytest.mark.slow
def test_real_dry_run_on_cpu(tmp_path):
    """The whole flow with the project's interpreter: GPU tests collected and skipped, the benchmark
    suite at --bench-size=smoke writing its JSON under $OUT, the whole-run table from the step JSON."""
    import json

    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "tests: 0 passed, 0 failed, 0 errors" in summary  # every GPU test skips without CUDA
    assert "whole run over the trajectory" in summary and "fp8: ok" in summary
    assert "smoke: ok" in summary and " 0 failed" in summary
    for name in (
        "env.txt",
        "junit-gpu-test_gpu.xml",
        "junit-gpu-test_leap_fp8.xml",
        "tables.md",
        "whole-run-cpu.json",
        "smoke.json",
        "fp8_teacher-cpu.csv",
    ):
        assert (out / name).is_file(), name
    for name, test in (
        ("bench-cpu.json", "test_fused_loss"),
        ("teacher-cpu.json", "test_teacher_forward"),
        ("step-cpu.json", "test_leap_step"),
    ):
        data = json.loads((out / name).read_text())
        assert data["machine_info"]["leap_bench"]["size"] == "smoke", name
        names = [b["name"] for b in data["benchmarks"]]
        assert any(n.startswith(test) for n in names) and any("ours" in n for n in names), names
    variants = json.loads((out / "whole-run-cpu.json").read_text())["variants"]
    assert set(variants) == {"ours", "stock-eager", "stock-compile"}
    assert all(v["mean_step_s"] > 0 for v in variants.values())
