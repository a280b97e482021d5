"""The benchmark harness runs end to end at tiny sizes (timings are not asserted)."""

import csv
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_feature_loss  # noqa: E402


def test_feature_loss_bench_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "fl.csv"
    assert bench_feature_loss.main(["--smoke", "--device", "cpu", "--iters", "2", "--warmup", "1",
                                    "--variants", "eager,compile,ours", "--compile-backend", "eager",
                                    "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {"eager", "compile", "ours"}
    assert all(r["device"] == "cpu" and r["git_sha"] and r["torch"] for r in rows)
    assert all(r["error"] == "" and float(r["median_ms"]) > 0 for r in rows), rows
    assert "| case | variant |" in capsys.readouterr().out
