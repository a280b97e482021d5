"""Tests for the ``leap`` command line (leap/cli/, leap/__main__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from tiny import as_argv, tiny_argv

from leap.cli import build_parser, main
from leap.cli.distill import config_from_args

TINY = tiny_argv(teacher_depth=3)


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    # fast leap_kernels path on CPU; tiny models: one thread is faster
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_distill_options(capsys):
    code, out, _ = run_cli(["distill", "--help"], capsys)
    assert code == 0
    for opt in (
        "--teacher",
        "--teacher-weights",
        "--student",
        "--data",
        "--data-source",
        "--curriculum",
        "--tau",
        "--loss",
        "--optimizer",
        "--resume",
        "--config",
        "--max-steps",
        "--precision",
        "--no-mixup",
        "--no-augment",
        "--student-overrides",
    ):
        assert opt in out, opt
    assert "examples:" in out and "(default: 0.85)" in out and "sqrt(global_batch" in out

    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "distill" in out
    code, _, err = run_cli([], capsys)
    assert code == 2 and "COMMAND" in err


def test_two_step_run_writes_log_and_summary(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["distill", *TINY, *as_argv(data_source="synthetic", synthetic_size=16, start_block=1, tau=0, out=out_dir)]
    code, out, err = run_cli([*argv, "--max-steps", "2"], capsys)
    assert code == 0, err
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and [r["block"] for r in steps] == [1, 2]
    assert any(r["type"] == "level_up" for r in log)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "stopped_at_max_steps"
    assert (out_dir / "checkpoint.pt").is_file()
    assert "2 steps" in out and "teacher blocks run" in out  # printed summary

    # Continue the same run from the CLI.
    code, out, err = run_cli([*argv, "--max-steps", "3", "--resume", "auto"], capsys)
    assert code == 0, err
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 3


def test_config_file_and_cli_override(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "teacher": "vit_small_patch14_dinov2",
                "student": "vit_small_patch14_dinov2",
                "teacher_overrides": {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 7},
                "student-overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 7},
                "img_size": 28,
                "data_source": "synthetic",
                "synthetic_size": 8,
                "batch_size": 8,
                "workers": 0,
                "progress": False,
                "max_steps": 1,
                "loss": "token-mse",
                "tau": 0.5,
                "min_lr_ratio": "1e-3",
            }
        )
    )
    out_dir = tmp_path / "run"
    code, _, err = run_cli(
        ["distill", "--config", str(cfg_file), "--batch-size", "4", "--tau", "0.7", "--out", str(out_dir)], capsys
    )
    assert code == 0, err
    cfg = json.loads((out_dir / "summary.json").read_text())["config"]
    assert cfg["batch_size"] == 4 and cfg["tau"] == 0.7  # CLI wins
    assert cfg["loss"] == "token-mse" and cfg["synthetic_size"] == 8 and cfg["min_lr_ratio"] == 1e-3  # from file

    # JSON works too, and --print-config shows the merge without training.
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"teacher": "t", "student": "s", "epochs": 7}))
    code, out, _ = run_cli(["distill", "--config", str(json_file), "--epochs", "9", "--print-config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["epochs"] == 9 and printed["teacher"] == "t"


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("teacher: a\nstudent: b\nlearning_rate: 0.1\ncurriculm: cka\n")
    code, _, err = run_cli(["distill", "--config", str(cfg_file)], capsys)
    assert code == 2
    assert err.startswith("leap: error:") and "'learning_rate'" in err and "'curriculm'" in err
    assert "did you mean 'curriculum'" in err and "Traceback" not in err


def test_parser_merge_order():
    parser = build_parser()
    args = parser.parse_args(["distill", "--teacher", "t", "--student", "s", "--no-mixup", "--lr", "0.1"])
    cfg = config_from_args(args)
    assert (cfg.mixup, cfg.augment, cfg.lr, cfg.tau) == (False, True, 0.1, 0.85)


@pytest.mark.parametrize(
    "case", ["missing-data", "empty-data", "grid-mismatch", "unknown-model", "corrupt-checkpoint", "missing-required"]
)
def test_bad_input_is_a_clean_error(tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["distill", *TINY, "--out", str(tmp_path / "run")]
    if case == "missing-data":
        argv += ["--data", str(tmp_path / "nope")]
        expect = "not found"
    elif case == "empty-data":
        argv += ["--data", str(empty), "--data-source", "folder"]
        expect = "no class folders"
    elif case == "grid-mismatch":  # student patch 14 -> 2x2 grid vs teacher 4x4
        argv += ["--data-source", "synthetic", "--student-overrides", '{"depth": 1, "embed_dim": 32, "num_heads": 2}']
        expect = "patch grid"
    elif case == "unknown-model":
        argv += ["--data-source", "synthetic", "--student", "vit_tiny_patch14_dinovv2"]
        expect = "unknown ViT model name"
    elif case == "corrupt-checkpoint":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"\x00garbage")
        argv += ["--data-source", "synthetic", "--resume", str(bad)]
        expect = "corrupt"
    else:
        argv = ["distill", "--data-source", "synthetic"]
        expect = "--teacher"
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "leap: error:" in err and expect in err and "Traceback" not in err


@pytest.mark.slow
def test_python_dash_m_leap(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "leap", "distill", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: leap distill")


def test_options_are_generated_from_the_config_fields(capsys):
    from leap.config import field_specs

    code, out, _ = run_cli(["distill", "--help"], capsys)
    assert code == 0
    help_text = " ".join(out.split())
    for spec in field_specs().values():
        flag = f"--no-{spec.name.replace('_', '-')}" if spec.kind is bool else spec.flag
        assert flag in out, flag
        assert " ".join(spec.help.split()[:4]) in help_text, spec.name  # the field's own help text
    # Other commands take the same option under the same name, with the field's type and bounds.
    code, _, err = run_cli(["flops", "--teacher", "t", "--student", "s", "--img-size", "0"], capsys)
    assert code == 2 and "--img-size" in err and "expected an integer >= 1, got 0" in err
    code, _, err = run_cli(["demo", "--loss", "l1"], capsys)
    assert code == 2 and "invalid choice: 'l1'" in err
