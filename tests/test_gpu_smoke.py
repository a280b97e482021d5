"""tools/gpu_smoke.py, the GPU script's correctness smoke, rehearsed on the CPU at its smoke shapes.

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
smoke checks the triton, cpp and torch backends here and the cuda backend says why it cannot run.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import leap_kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import gpu_smoke  # noqa: E402


def test_every_op_and_backend_passes_against_float64():
    rows = gpu_smoke.run_checks("smoke", torch.device("cpu"), torch.float32)
    ops = {r["op"] for r in rows}
    assert ops == {
        "fused_feature_loss[mse]",
        "fused_feature_loss[token-normalized]",
        "token_normalized_mse",
        "teacher_attention",
    }
    ran = [r for r in rows if r["ok"] is not None]
    assert ran and all(r["ok"] for r in ran), [r for r in ran if not r["ok"]]
    by_backend = {(r["op"], r["backend"]): r for r in rows}
    for op in ops:
        assert by_backend[op, "torch"]["ok"] is True
        assert by_backend[op, "cuda"]["ok"] is None and "cpu" in by_backend[op, "cuda"]["skipped"]
    if leap_kernels.backends("cpu")["triton"].usable:
        assert by_backend["fused_feature_loss[mse]", "triton"]["ok"] is True
    for r in ran:
        if r["op"] != "teacher_attention":
            assert set(r["errors"]) == {"loss", "grad_input", "grad_weight", "grad_bias"} or set(r["errors"]) == {
                "loss",
                "grad_input",
            }
        assert all(0 <= v < 1e-3 for v in r["errors"].values()), r


def test_a_wrong_gradient_is_a_miss(monkeypatch):
    real = leap_kernels.token_normalized_mse

    def channels_reversed(x, t, **kw):  # a wrong kernel: reads the channels in the wrong order
        return real(x.flip(-1), t, **kw)

    monkeypatch.setattr(leap_kernels, "token_normalized_mse", channels_reversed)
    rows = [
        r
        for r in gpu_smoke.run_checks("smoke", torch.device("cpu"), torch.float32)
        if r["op"] == "token_normalized_mse" and r["ok"] is not None
    ]
    assert rows and all(r["ok"] is False for r in rows)
    assert all(r["errors"]["grad_input"] > 1e-2 for r in rows)


def test_nan_is_a_miss_not_a_pass():
    assert gpu_smoke.rel_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0])) == float("inf")


def test_main_writes_json_and_exit_status(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--size", "smoke", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["size"] == "smoke" and data["rows"]
    assert "smoke: " in capsys.readouterr().out


@pytest.mark.parametrize("size", ["full"])
def test_headline_shapes_are_the_benchmarked_ones(size):
    shapes = gpu_smoke.SIZES[size]
    assert (shapes["m"], shapes["d_s"], shapes["d_t"]) == (32768, 384, 1536)
    assert {n for _, _, n, _ in shapes["attention"]} == {261, 1025}
