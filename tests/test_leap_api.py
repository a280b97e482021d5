"""The Python API (leap/apps/api.py, exposed as leap.distill / leap.evaluate / leap.export): the same tiny
run as the command, the same option checks and errors, and `import leap` stays light."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tiny import STUDENT, as_argv, fast_cpu, tiny_options

import leap
from leap.cli import main
from leap.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
OPTIONS = tiny_options(teacher_depth=3)  # teacher, student, data and schedule of the tiny run


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def cli_argv(out) -> list[str]:
    return ["distill", *as_argv(**OPTIONS, out=out)]


def test_distill_runs_the_same_tiny_run_as_the_command(tmp_path, capsys):
    summary = leap.distill(out=tmp_path / "api", **OPTIONS)
    assert main(cli_argv(tmp_path / "cli")) == 0, capsys.readouterr().err
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["status"] == cli["status"] == "completed" and summary["steps"] == cli["steps"] == 4
    for key in ("final_loss", "start_block", "final_block", "level_ups", "teacher_blocks_run", "flops"):
        assert summary[key] == cli[key], key
    a = torch.load(tmp_path / "api" / "checkpoint.pt", weights_only=True)["student"]
    b = torch.load(tmp_path / "cli" / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same code path, bit for bit


def test_distill_config_sources_and_precedence(tmp_path):
    from leap.apps.api import train_config
    from leap.config import TrainConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher: a\nstudent: b\nepochs: 7\nbatch-size: 16\n")
    cfg = train_config(cfg_file, epochs=3)
    assert (cfg.teacher, cfg.student, cfg.epochs, cfg.batch_size) == ("a", "b", 3, 16)  # explicit wins
    cfg = train_config({"teacher": "a", "student": "b", "no_mixup": True}, data=tmp_path, out=tmp_path / "r")
    assert cfg.mixup is False and cfg.data == str(tmp_path) and cfg.out == str(tmp_path / "r")
    base = TrainConfig(teacher="a", student="b", tau=0.5)
    assert train_config(base, tau=0.9).tau == 0.9 and train_config(base).tau == 0.5


@pytest.mark.parametrize(
    "options,message",
    [
        ({"batchsize": 4}, "did you mean 'batch_size'"),
        ({"tau": -1.0}, "--tau: must be in [0, 1]"),
        ({"curriculum": "sometimes"}, "--curriculum: invalid choice 'sometimes'"),
        ({"epochs": "many"}, "epochs"),
    ],
)
def test_distill_refuses_bad_options_like_the_command(tmp_path, options, message):
    with pytest.raises(ConfigError) as info:
        leap.distill(teacher="t", student="s", out=tmp_path / "r", **options)
    assert message in str(info.value)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="a model name is required"):
        leap.distill(student="s", out=tmp_path / "r")


def test_distill_with_tensorboard_missing_fails_before_training(tmp_path, monkeypatch):
    from leap.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    from leap.run import loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("training started"))
    with pytest.raises(MissingDependencyError, match="tensorboard"):
        leap.distill(teacher="t", student="s", out=tmp_path / "r", tensorboard=True)


def test_the_command_is_a_layer_over_the_api(tmp_path, monkeypatch, capsys):
    from leap.apps import api

    seen = {}

    def fake_distill(**kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(api, "distill", fake_distill)
    assert main(cli_argv(tmp_path / "r")) == 2
    assert "stop here" in capsys.readouterr().err and seen["config"].student_overrides == STUDENT


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    with fast_cpu():
        leap.distill(out=run, **OPTIONS)
    return run


def test_evaluate_appends_the_record(api_run, tmp_path):
    record = leap.evaluate(
        api_run, "knn", SAMPLE, k=5, limit_train=64, limit_val=32, workers=0, no_cache=True, progress=False
    )
    assert record["protocol"] == "knn" and set(record["numbers"]) == {"cls"}
    assert 0 <= record["numbers"]["cls"] <= 1 and record["settings"]["k"] == 5
    lines = (api_run / "eval.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["numbers"] == record["numbers"] and record["log"] == str(api_run / "eval.jsonl")
    pixels = leap.evaluate({"pixels": True}, "knn", SAMPLE, limit_train=64, limit_val=32, write_record=False)
    assert pixels["model"]["kind"] == "pixels"


def test_evaluate_refuses_unknown_protocols_and_options(api_run):
    from leap.apps.api import protocols

    assert {"knn", "linear", "retrieval"} <= set(protocols())
    with pytest.raises(ConfigError, match="protocol: expected one of .*knn.*got 'knm'"):
        leap.evaluate(api_run, "knm", SAMPLE)
    with pytest.raises(ConfigError, match=r"leap.evaluate\('knn'\).*kk.*options: .*temperature"):
        leap.evaluate(api_run, "knn", SAMPLE, kk=3)
    with pytest.raises(ConfigError, match="model_or_run"):
        leap.evaluate(42, "knn", SAMPLE)


def test_export_returns_the_path(api_run, tmp_path):
    path = leap.export(api_run, "safetensors", tmp_path / "s.safetensors")
    assert path == str(tmp_path / "s.safetensors") and os.path.isfile(path + ".json")
    card = json.loads(pathlib.Path(path + ".json").read_text())
    assert card["export"]["check"]["strict"] and card["source"]["selected"] == "last"
    with pytest.raises(ConfigError, match=r"leap.export.*int9"):
        leap.export(api_run, "onnx", tmp_path / "m.onnx", int9=True)
    with pytest.raises(ConfigError, match="--format: expected one of timm, safetensors, onnx"):
        leap.export(api_run, "tflite", tmp_path / "m.tflite")


def test_the_api_names_are_the_functions():
    api = __import__("leap.apps.api", fromlist=["distill"])
    assert leap.distill is api.distill and leap.export is api.export
    assert leap.evaluate is __import__("leap.apps.api", fromlist=["evaluate"]).evaluate
    assert {"distill", "evaluate", "export"} <= set(leap.__all__)


def test_import_leap_stays_light():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, leap; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
