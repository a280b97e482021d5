"""The benchmark harness runs end to end at tiny sizes (timings are not asserted)."""

import csv
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_feature_loss  # noqa: E402
import cases  # noqa: E402


def test_feature_loss_bench_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "fl.csv"
    assert (
        bench_feature_loss.main(
            [
                "--smoke",
                "--device",
                "cpu",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--variants",
                "eager,compile,ours",
                "--compile-backend",
                "eager",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {"eager", "compile", "ours"}
    assert all(r["device"] == "cpu" and r["git_sha"] and r["torch"] for r in rows)
    assert all(r["error"] == "" and float(r["median_ms"]) > 0 for r in rows), rows
    assert "| case | variant |" in capsys.readouterr().out


def test_csv_scripts_and_suite_share_the_cases_and_timing():
    # The CSV harnesses are thin layers: the variants come from bench/cases.py, the timing from harness.
    import bench_attention
    import bench_cpu
    import harness

    assert bench_feature_loss.make_case is cases.feature_loss_variants
    assert bench_attention.kernel_variants is cases.attention_variants
    assert bench_attention.build_teacher is cases.build_teacher and bench_cpu.forced is cases.forced
    variants = cases.feature_loss_variants("mse", 8, 4, 6, bench_feature_loss.torch.float32, "cpu")
    assert set(variants) == {"eager", "compile", "ours", "gemm-floor"}
    times, peak = harness.measure(variants["eager"](), iters=2, warmup=1, device=harness.torch.device("cpu"))
    assert len(times) == 2 and all(t > 0 for t in times) and peak > 0
