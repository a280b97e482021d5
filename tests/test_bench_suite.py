"""The benchmark suite's tools on CPU: bench/compare.py and bench/whole_run.py on synthetic
pytest-benchmark JSON, the GPU workflow file, and ``pytest bench/`` itself at smoke sizes
(timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import compare  # noqa: E402
import whole_run  # noqa: E402

CLASS = "cpu-2core-test-cpu"


def bench_json(path, medians: dict, *, device_class=CLASS, size="small", stats_only=()):
    """A pytest-benchmark JSON: ``medians`` maps (case, variant) -> median ms; the test name is
    ``test_op[<case>-<variant>]``. Names in ``stats_only`` keep their median in ``stats`` only."""
    benchmarks = []
    for (case, variant), ms in medians.items():
        name = f"test_op[{case}-{variant}]"
        extra = {"case": case, "variant": variant}
        if name not in stats_only:
            extra["median_ms"] = ms
        benchmarks.append(
            {
                "name": name,
                "fullname": f"bench/test_bench_ops.py::{name}",
                "group": case,
                "stats": {"median": ms / 1e3},
                "extra_info": extra,
            }
        )
    data = {
        "machine_info": {"leap_bench": {"device_class": device_class, "size": size, "device": "cpu"}},
        "commit_info": {"id": "abc"},
        "benchmarks": benchmarks,
    }
    path.write_text(json.dumps(data))
    return str(path)


BASE = {
    ("mse", "eager"): 100.0,
    ("mse", "compile"): 80.0,
    ("mse", "ours-cpp"): 50.0,
    ("tn", "eager"): 10.0,
    ("tn", "ours-cpp"): 4.0,
}


def run_compare(capsys, *args):
    code = compare.main([str(a) for a in args])
    return code, capsys.readouterr()


def status_of(out: str, name: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    return line.rstrip(" |").rsplit("| ", 1)[-1]


def test_same_run_passes(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    code, out = run_compare(capsys, base, base)
    assert code == 0 and "0 regressed" in out.out and out.out.rstrip().endswith("OK")
    assert status_of(out.out, "test_op[mse-ours-cpp]") == "ok"


def test_regression_fails_and_names_the_benchmark(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    new = bench_json(tmp_path / "new.json", {**BASE, ("mse", "ours-cpp"): 70.0})  # 1.4x slower, eager unchanged
    code, out = run_compare(capsys, base, new)
    assert code == 1 and "1 regressed" in out.out and out.out.rstrip().endswith("FAILED")
    assert status_of(out.out, "test_op[mse-ours-cpp]") == "REGRESSION (time, vs eager)"
    assert status_of(out.out, "test_op[tn-ours-cpp]") == "ok"
    # Within the threshold: passes.
    code, out = run_compare(capsys, base, new, "--threshold", "1.5")
    assert code == 0, out.out


def test_improvement_passes(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    new = bench_json(tmp_path / "new.json", {**BASE, ("mse", "ours-cpp"): 20.0})
    code, out = run_compare(capsys, base, new)
    assert code == 0 and "1 faster" in out.out
    assert status_of(out.out, "test_op[mse-ours-cpp]") == "faster"


def test_ratio_and_absolute_checks(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    # A machine twice as slow: every time doubles, no ratio changes.
    slow = bench_json(tmp_path / "slow.json", {k: 2 * v for k, v in BASE.items()})
    code, out = run_compare(capsys, base, slow, "--check", "ratio")
    assert code == 0, out.out
    code, out = run_compare(capsys, base, slow, "--check", "absolute")
    assert code == 1 and status_of(out.out, "test_op[mse-eager]") == "REGRESSION (time)"
    # Eager got faster, ours did not: only the ratio sees it; compile's ratio is torch's and not checked.
    ratio = bench_json(tmp_path / "ratio.json", {**BASE, ("mse", "eager"): 60.0})
    code, out = run_compare(capsys, base, ratio, "--check", "ratio")
    assert code == 1 and status_of(out.out, "test_op[mse-ours-cpp]") == "REGRESSION (vs eager)"
    assert status_of(out.out, "test_op[mse-compile]") == "ok"
    code, out = run_compare(capsys, base, ratio, "--check", "absolute")
    assert code == 0, out.out


def test_missing_and_new_benchmarks_are_reported(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    changed = {k: v for k, v in BASE.items() if k != ("tn", "ours-cpp")}
    changed[("tn", "ours-cuda")] = 3.0
    new = bench_json(tmp_path / "new.json", changed)
    code, out = run_compare(capsys, base, new)
    assert code == 1 and "1 missing from the new run, 1 new" in out.out
    assert "missing: test_op[tn-ours-cpp]" in out.out and "new: test_op[tn-ours-cuda]" in out.out
    code, out = run_compare(capsys, base, new, "--allow-missing")
    assert code == 0 and "missing: test_op[tn-ours-cpp]" in out.out


def test_median_from_stats_when_extra_info_lacks_it(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE, stats_only=("test_op[mse-ours-cpp]",))
    new = bench_json(tmp_path / "new.json", {**BASE, ("mse", "ours-cpp"): 90.0})
    code, out = run_compare(capsys, base, new)
    assert code == 1 and status_of(out.out, "test_op[mse-ours-cpp]").startswith("REGRESSION")


def test_absolute_check_needs_one_device_class(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", BASE)
    other = bench_json(tmp_path / "other.json", BASE, device_class="nvidia-h200")
    code, out = run_compare(capsys, base, other)
    assert code == 2 and "only within one device class" in out.err and "--check ratio" in out.err
    code, out = run_compare(capsys, base, other, "--check", "ratio")
    assert code == 0, out.out


def test_bad_input_names_the_file(tmp_path, capsys):
    good = bench_json(tmp_path / "base.json", BASE)
    code, out = run_compare(capsys, good, tmp_path / "absent.json")
    assert code == 2 and "absent.json: no such file" in out.err
    (tmp_path / "bad.json").write_text("{not json")
    code, out = run_compare(capsys, good, tmp_path / "bad.json")
    assert code == 2 and "bad.json: not a readable JSON file" in out.err
    (tmp_path / "list.json").write_text("[1, 2]")
    code, out = run_compare(capsys, good, tmp_path / "list.json")
    assert code == 2 and "list.json: not a pytest-benchmark JSON" in out.err
    with pytest.raises(SystemExit):
        compare.main([good, good, "--threshold", "0.9"])
    assert "--threshold: expected a factor > 1, got 0.9" in capsys.readouterr().err


def test_baseline_dir_picks_the_device_class(tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    new = bench_json(tmp_path / "new.json", {**BASE, ("mse", "ours-cpp"): 70.0})
    code, out = run_compare(capsys, "--baseline-dir", baselines, new)
    assert code == 0 and f"no baseline for device class {CLASS}" in out.out
    code, out = run_compare(capsys, "--baseline-dir", baselines, new, "--require-baseline")
    assert code == 1
    bench_json(baselines / f"{CLASS}.json", BASE)
    code, out = run_compare(capsys, "--baseline-dir", baselines, new)
    assert code == 1 and "REGRESSION" in out.out
    smoke = bench_json(tmp_path / "smoke.json", BASE, size="smoke")
    code, out = run_compare(capsys, "--baseline-dir", baselines, smoke)
    assert code == 0 and "is size small, this run is size smoke: not compared" in out.out


def test_show_prints_ratios_to_the_reference(tmp_path, capsys):
    path = bench_json(tmp_path / "run.json", BASE)
    code, out = run_compare(capsys, "--show", path)
    assert code == 0 and "| test_op[mse-ours-cpp] | 50.000 | 0.500 x eager |" in out.out


# ----------------------------------------------------------------------------- whole_run


def test_paper_trajectory_shape():
    traj = whole_run.paper_trajectory()
    assert len(traj) == 100 and traj[0] == 7.0 and traj[1] == 12.0 and traj[18] == 24.0
    assert traj[94:] == [40.0] * 6 and max(traj) == 40.0
    assert all(b >= a for a, b in zip(traj[1:], traj[2:]))  # never goes back
    assert sum(traj) / len(traj) == pytest.approx(29.35)  # the paper: about 30 of 40
    assert whole_run.paper_trajectory(20) == [k / 2 for k in traj]
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        whole_run.paper_trajectory(0)


def step_json(path, times_ms: dict):
    benchmarks = [
        {
            "name": f"test_leap_step[k{k}-{v}]",
            "fullname": f"x::test_leap_step[k{k}-{v}]",
            "extra_info": {"case": f"leap-step-k{k}", "variant": v, "k": k, "median_ms": ms},
        }
        for (k, v), ms in times_ms.items()
    ]
    benchmarks.append({"name": "test_other", "extra_info": {"case": "mse", "variant": "eager", "median_ms": 1.0}})
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return str(path)


def test_whole_run_integrates_step_times_over_the_trajectory(tmp_path, capsys):
    # Step time linear in k: t(k) = a + b k, so the run's mean step time is a + b * mean(k).
    lines = {"ours": (20.0, 2.0), "stock-eager": (40.0, 4.5), "stock-compile": (30.0, 3.8)}
    times = {(k, v): a + b * k for v, (a, b) in lines.items() for k in (10, 20, 40)}
    path = step_json(tmp_path / "step.json", times)
    out = tmp_path / "whole.json"
    assert whole_run.main([path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    mean_k = sum(whole_run.paper_trajectory()) / 100
    assert result["num_blocks"] == 40 and result["mean_block"] == pytest.approx(mean_k)
    eager_full = lines["stock-eager"][0] + 40 * lines["stock-eager"][1]
    for variant, (a, b) in lines.items():
        r = result["variants"][variant]
        assert r["mean_step_s"] * 1e3 == pytest.approx(a + b * mean_k)
        assert r["saving_vs_own_full_depth"] == pytest.approx(1 - (a + b * mean_k) / (a + b * 40))
        assert r["speedup_vs_stock_eager_full_depth"] == pytest.approx(eager_full / (a + b * mean_k))
    assert "| ours | 40.0 | 60.0 | 100.0 |" in printed and "target >= 2x" in printed


def test_whole_run_with_a_given_trajectory_and_bad_input(tmp_path, capsys):
    path = step_json(tmp_path / "step.json", {(10, "ours"): 10.0, (40, "ours"): 40.0, (40, "stock-eager"): 80.0})
    traj = tmp_path / "blocks.txt"
    traj.write_text("10\n40\n")
    out = tmp_path / "whole.json"
    assert whole_run.main([path, "--trajectory", str(traj), "--out", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert variants["ours"]["mean_step_s"] == pytest.approx(0.025)
    assert variants["ours"]["speedup_vs_stock_eager_full_depth"] == pytest.approx(80 / 25)
    assert "cannot be interpolated from one point" in variants["stock-eager"]["error"]  # one k measured
    assert "| stock-eager |  | 80.0 | n/a (step time" in capsys.readouterr().out
    (tmp_path / "empty.json").write_text('{"benchmarks": []}')
    with pytest.raises(SystemExit, match="no LEAP-step benchmarks"):
        whole_run.main([str(tmp_path / "empty.json")])


# ----------------------------------------------------------------------------- the GPU workflow


def test_gpu_workflow_parses_and_runs_the_steps():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, ".github", "workflows", "gpu-bench.yml")) as f:
        workflow = yaml.safe_load(f)
    job = workflow["jobs"]["gpu-bench"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert job["defaults"]["run"]["shell"] == "bash"  # -eo pipefail
    steps = {s["name"]: s for s in job["steps"]}
    install = steps["Install the package with the CUDA extension"]
    assert install["env"]["LEAP_KERNELS_BUILD_CUDA"] == "1"
    assert "pip install --no-deps --no-build-isolation -e ." in install["run"]
    assert "-m pytest -m gpu tests/test_gpu.py" in steps["GPU tests"]["run"]
    suite = steps["Benchmark suite"]["run"]
    assert "-m pytest bench/ " in suite and "--benchmark-json=" in suite
    assert (
        "bench/compare.py --baseline-dir bench/baselines --threshold 1.25"
        in steps["Compare with the committed baseline"]["run"]
    )
    assert "bench/whole_run.py" in steps["Whole-run time over the paper's trajectory"]["run"]
    upload = steps["Upload the results"]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    assert upload["with"]["path"].rstrip("/") == job["env"]["RESULTS"]
    order = list(steps)
    assert (
        order.index("GPU tests") < order.index("Benchmark suite") < order.index("Compare with the committed baseline")
    )


# ----------------------------------------------------------------------------- pytest bench/ itself


@pytest.mark.parametrize("plugin", ["pytest-benchmark", "fallback"])
def test_suite_runs_at_smoke_size_and_writes_the_json(tmp_path, plugin):
    """``pytest bench/`` end to end (a few fused-loss benchmarks at smoke size), with pytest-benchmark
    and with bench/benchmark_fallback.py (pytest-benchmark not loaded): the JSON carries the device
    class, versions and commit, and each benchmark its case, variant, median and peak memory."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    without = ["-p", "no:benchmark"] if plugin == "fallback" else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench/test_bench_ops.py",
            "-k",
            "test_fused_loss and not token",
            "--bench-size=smoke",
            "--bench-compile-backend=eager",
            "--bench-rounds=2",
            "-q",
            "-p",
            "no:cacheprovider",
            *without,
            f"--benchmark-json={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("leap fallback timer" in proc.stdout) == (plugin == "fallback")
    data = json.loads(out.read_text())
    info = data["machine_info"]["leap_bench"]
    assert info["size"] == "smoke" and info["device_class"].startswith("cpu-") and info["torch"]
    assert data["commit_info"]["leap_git_sha"]
    variants = {b["extra_info"]["variant"] for b in data["benchmarks"]}
    assert {"eager", "compile", "gemm-floor", "ours-torch"} <= variants, variants
    for b in data["benchmarks"]:
        extra = b["extra_info"]
        assert extra["case"] == "mse-fp32-M514-64x256" and b["group"] == extra["case"]
        assert extra["median_ms"] > 0 and extra["peak_extra_mb"] >= 0 and b["stats"]["rounds"] == 2
    assert compare.main([str(out), str(out)]) == 0


def test_round_timer_on_cpu():
    import harness
    import torch

    calls = []
    timer = harness.RoundTimer(lambda: calls.append(1), torch.device("cpu"))
    assert timer.host_ms() >= 0 and calls == [1] and timer.device_ms == []
    assert harness.device_class("cpu").startswith(f"cpu-{torch.get_num_threads()}core-")
