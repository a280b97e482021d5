"""``leap export`` (leap/apps/export*.py, leap/cli/export.py): a tiny ``leap distill`` run, then each format.

timm / safetensors: timm's ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH, ...))``
loads the file with ``strict=True`` and gives exactly the student's features. ONNX: onnxruntime's outputs
match the evaluation's features within 1e-4 at batch sizes other than the exported one. The model card, the
checkpoint choice, atomic writes and the errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib

import pytest
import torch
from tiny import STUDENT, fast_cpu, tiny_argv
from torch import nn

from leap.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
TINY = tiny_argv(
    teacher_depth=3,
    data_source="synthetic",
    synthetic_size=16,
    epochs=2,
    warmup_epochs=0.5,
    ckpt_every=3,
    keep_checkpoints=3,
)


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny `leap distill` run (8 steps, kept checkpoints) with one `leap eval knn` record."""
    run = tmp_path_factory.mktemp("export") / "run"
    with fast_cpu():
        assert main(["distill", *TINY, "--out", str(run)]) == 0
        argv = ["eval", "knn", "--model", str(run), "--data", SAMPLE, "--no-cache", "--no-progress"]
        assert main([*argv, "--limit-train", "64", "--limit-val", "32", "--workers", "0"]) == 0
    return str(run)


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def student_of(run_or_checkpoint):
    """The student as `leap eval` loads it (its features are what an export must reproduce)."""
    from leap.evaluation.features import load_model

    return load_model(str(run_or_checkpoint)).extractor


def export(argv, capsys):
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt,name", [("timm", "student.pth"), ("safetensors", "student.safetensors")])
def test_state_dict_loads_strictly_in_timm_with_exact_features(run_dir, tmp_path, capsys, monkeypatch, fmt, name):
    import timm

    out = tmp_path / name
    code, printed, err = export([run_dir, "--format", fmt, "--out", str(out)], capsys)
    assert code == 0, err
    assert "strict=True" in printed and "model card" in printed
    card = json.loads((tmp_path / (name + ".json")).read_text())
    recipe = card["student"]["timm"]

    calls = []
    original = nn.Module.load_state_dict

    def recording(module, state_dict, strict=True, assign=False):
        calls.append(strict)
        return original(module, state_dict, strict=strict, assign=assign)

    with monkeypatch.context() as patched:
        patched.setattr(nn.Module, "load_state_dict", recording)
        loaded = timm.create_model(
            recipe["model_name"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(out), num_classes=0),
            **recipe["kwargs"],
        )
    assert calls == [True]  # timm's own load of the file was strict
    extractor = student_of(run_dir)
    student = extractor.vit
    assert set(loaded.state_dict()) == set(student.state_dict())  # the backbone only: no head, no trainer state
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(x), student.forward_features(x))

    # The model card.
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert card["student"]["name"] == "vit_small_patch14_dinov2" and card["student"]["overrides"] == STUDENT
    assert recipe["kwargs"] == {**STUDENT, "num_classes": 0, "img_size": 28}
    assert card["input"]["img_size"] == 28 and card["input"]["mean"] == [0.485, 0.456, 0.406]
    assert card["input"]["std"] == [0.229, 0.224, 0.225]
    assert card["teacher"]["name"] == "vit_small_patch14_dinov2" and card["teacher"]["overrides"]["depth"] == 3
    trajectory = card["teacher"]["trajectory"]
    assert trajectory["num_blocks"] == 3 and trajectory["final_block"] == ckpt["curriculum"]["block"]
    assert [list(u.values()) for u in trajectory["level_ups"]] == [list(u) for u in ckpt["curriculum"]["level_ups"]]
    assert len(trajectory["epoch_mean_blocks"]) == 2
    assert card["recipe"] == ckpt["config"]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "eval.jsonl"))]
    assert card["evaluations"] == records and records[0]["protocol"] == "knn"
    assert card["source"]["checkpoint_sha256"] == sha256(os.path.join(run_dir, "checkpoint.pt"))
    assert card["source"]["selected"] == "last" and card["source"]["step"] == 8
    assert card["export"]["sha256"] == sha256(out) and card["export"]["check"]["features_equal"] is True
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            meta = json.loads(f.metadata()["leap_model_card"])
        assert meta["source"]["checkpoint_sha256"] == card["source"]["checkpoint_sha256"]


def test_leap_only_student_name_exports_as_its_timm_base(tmp_path, capsys):
    # vit_tiny_patch14_dinov2 is leap's (timm's vit_tiny_patch16_224 at patch 14, whose pretrained config has
    # a 1000-class head): the card names the timm model and arguments that rebuild it, strictly.
    import timm

    from leap.checkpoint import CHECKPOINT_FORMAT
    from leap.models import build_model

    overrides = {"depth": 2, "embed_dim": 24, "num_heads": 2}
    net = build_model("vit_tiny_patch14_dinov2", img_size=28, **overrides)
    (tmp_path / "run").mkdir()
    config = {"student": "vit_tiny_patch14_dinov2", "student_overrides": overrides, "img_size": 28, "teacher": "t"}
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "step": 5, "student": net.state_dict(), "config": config}
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    code, printed, err = export([str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    recipe = json.loads((tmp_path / "student.safetensors.json").read_text())["student"]["timm"]
    assert recipe["model_name"] == "vit_tiny_patch16_224" and recipe["kwargs"]["patch_size"] == 14
    loaded = timm.create_model(
        recipe["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "student.safetensors"), **recipe["pretrained_cfg_overlay"]),
        **recipe["kwargs"],
    )
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(x), net.eval().forward_features(x))


def test_dinov3_eva_student_exports_in_every_format(tmp_path, capsys):
    # A DINOv3 (timm Eva: rotary positions, CLS + 4 storage tokens) student, in a leap distill checkpoint.
    from leap.checkpoint import CHECKPOINT_FORMAT
    from leap.errors import ModelError
    from leap.models import build_model

    overrides = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    try:
        net = build_model("vit_small_patch16_dinov3", img_size=32, **overrides)
    except ModelError as e:  # pragma: no cover - a timm without the DINOv3 models
        pytest.skip(f"no DINOv3 models here: {e}")
    (tmp_path / "run").mkdir()
    config = {"student": "vit_small_patch16_dinov3", "student_overrides": overrides, "img_size": 32, "teacher": "t"}
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "step": 1, "student": net.state_dict(), "config": config}
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    extractor = student_of(tmp_path / "run")
    code, printed, err = export([str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path)], capsys)
    assert code == 0 and "strict=True" in printed, err
    card = json.loads((tmp_path / "student.safetensors.json").read_text())
    assert card["student"]["num_prefix_tokens"] == 5 and card["export"]["check"]["features_equal"]
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        return
    import onnxruntime as ort

    code, printed, err = export([str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path)], capsys)
    assert code == 0 and "max abs error" in printed, err
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    cls, patch, tokens = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_cls, ref_patch = extractor(x)
    assert tokens.shape == (2, 4, 32)  # the 2x2 patches, without the 5 prefix tokens
    torch.testing.assert_close(torch.from_numpy(cls), ref_cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(patch), ref_patch, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def onnx_export(run_dir, tmp_path_factory):
    """`leap export --format onnx --int8 --eval-data SAMPLE` of the run: (path, printed output)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    argv = ["export", run_dir, "--format", "onnx", "--out", str(out), "--int8", "--eval-data", SAMPLE]
    import contextlib
    import io

    buf = io.StringIO()
    with fast_cpu(), contextlib.redirect_stdout(buf):
        assert main([*argv, "--eval-limit", "96"]) == 0
    return out, buf.getvalue()


def test_onnx_matches_pytorch_with_a_dynamic_batch(run_dir, onnx_export):
    import onnxruntime as ort

    path, printed = onnx_export
    assert "onnxruntime vs PyTorch" in printed and "max abs error cls" in printed
    card = json.loads(pathlib.Path(str(path) + ".json").read_text())
    check = card["export"]["check"]
    assert check["within_tolerance"] and max(check["max_abs_error"].values()) <= 1e-4
    assert card["export"]["inputs"] == {"images": ["batch", 3, 28, 28]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["cls", "patch", "patch_tokens"]
    extractor = student_of(run_dir)
    for batch in (1, 2, 5):  # exported with batch 2, checked with 1 and 3
        x = torch.randn(batch, 3, 28, 28)
        cls, patch, tokens = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref_cls, ref_patch = extractor(x)  # `leap eval`'s two features
            ref_tokens = extractor.vit.forward_features(x)[:, 1:]
        for got, ref in ((cls, ref_cls), (patch, ref_patch), (tokens, ref_tokens)):
            assert got.shape == tuple(ref.shape)
            torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-4, rtol=1e-4)


def test_onnx_int8_reports_size_and_accuracy(onnx_export):
    import onnxruntime as ort

    path, printed = onnx_export
    int8 = json.loads(pathlib.Path(str(path) + ".json").read_text())["export"]["int8"]
    q = path.parent / "tiny.int8.onnx"
    assert int8["file"] == q.name and int8["bytes"] == q.stat().st_size < int8["fp32_bytes"] == path.stat().st_size
    acc = int8["accuracy"]
    assert acc["data"]["val_images"] == 96 and acc["protocol"] == "knn"
    for kind in ("cls", "patch"):
        assert 0 <= acc[kind]["fp32"] <= 1 and acc[kind]["change"] == pytest.approx(
            acc[kind]["int8"] - acc[kind]["fp32"]
        )
    assert "int8 vs fp32, kNN top-1" in printed and "points" in printed
    x = torch.randn(2, 3, 28, 28).numpy()
    outs = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    assert [o.shape for o in outs] == [(2, 32), (2, 32), (2, 16, 32)]


def test_register_tokens_are_not_patch_tokens():
    # The ONNX graph's outputs are the evaluation's: CLS first, registers skipped, patches averaged.
    from leap.apps.export_onnx import StudentFeatures
    from leap.evaluation.features import TokenFeatures
    from leap.models import build_model

    net = build_model("vit_small_patch14_reg4_dinov2", img_size=28, **STUDENT).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        cls, patch, tokens = StudentFeatures(net)(x)
        ref_cls, ref_patch = TokenFeatures(net)(x)
    assert tokens.shape == (2, 16, 32) and torch.equal(cls, ref_cls) and torch.equal(patch, ref_patch)


# ----------------------------------------------------------------------------- which checkpoint


def _record(sha: str, top1: float, block: int = 2) -> dict:
    return {
        "type": "eval",
        "protocol": "knn",
        "model": {"checkpoint_sha256": sha, "block": block},
        "numbers": {"cls": top1, "patch": top1 / 2},
    }


def test_best_checkpoint_by_the_eval_records(run_dir, tmp_path, capsys):
    import shutil

    from leap.evaluation.records import append_record

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    os.remove(run / "eval.jsonl")
    kept = sorted(run.glob("checkpoint-step*.pt"))
    assert len(kept) == 2  # steps 4 and 6 (checkpoint.pt is step 8)
    append_record(run, _record(sha256(run / "checkpoint.pt"), 0.50))
    append_record(run, _record(sha256(kept[0]), 0.70))
    append_record(run, _record(sha256(kept[1]), 0.90, block=1))  # a cut model: does not rank
    code, printed, err = export(
        [str(run), "--format", "timm", "--out", str(tmp_path / "b.pth"), "--checkpoint", "best"], capsys
    )
    assert code == 0, err
    card = json.loads((tmp_path / "b.pth.json").read_text())
    assert card["source"]["checkpoint"] == str(kept[0]) and card["source"]["selected"] == "best"
    assert card["source"]["step"] == 4 and "knn" in card["source"]["why"] and "0.7000" in printed

    # An explicit checkpoint file, and the student in it.
    code, _, err = export(
        [str(run), "--format", "timm", "--out", str(tmp_path / "c.pth"), "--checkpoint", str(kept[1])], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "c.pth.json").read_text())["source"]["step"] == 6
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    expected = student_of(kept[1]).vit.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_best_without_records_and_runs_without_checkpoints_are_clear_errors(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = export([str(tmp_path / "empty"), "--format", "timm", "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no checkpoint.pt" in err
    (tmp_path / "empty" / "checkpoint.pt").write_bytes((pathlib.Path(run_dir) / "checkpoint.pt").read_bytes())
    argv = [str(tmp_path / "empty"), "--format", "timm", "--out", str(tmp_path / "x.pth"), "--checkpoint", "best"]
    code, _, err = export(argv, capsys)
    assert code == 2 and "no record in" in err and "leap eval knn" in err
    argv[-1] = str(tmp_path / "nope.pt")
    code, _, err = export(argv, capsys)
    assert code == 2 and "no such checkpoint file" in err
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # nothing written


# ----------------------------------------------------------------------------- atomic writes, errors


def test_a_failed_check_leaves_nothing_behind(run_dir, tmp_path, capsys, monkeypatch):
    import timm

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the previous export")

    create = timm.create_model

    def broken(*a, **kw):  # the check's load of the written file fails
        if kw.get("pretrained_cfg_overlay"):
            raise RuntimeError("simulated: timm cannot load it")
        return create(*a, **kw)

    monkeypatch.setattr(timm, "create_model", broken)
    code, _, err = export([run_dir, "--format", "safetensors", "--out", str(out)], capsys)
    assert code == 2 and "timm could not load the exported state dict" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["model.safetensors"] and out.read_bytes() == b"the previous export"


def test_a_failed_onnx_check_leaves_nothing_behind(run_dir, tmp_path, capsys, monkeypatch):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    from leap.apps import export_onnx

    monkeypatch.setitem(export_onnx.TOLERANCE, "atol", -1.0)  # nothing can pass
    code, _, err = export([run_dir, "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "differ from PyTorch" in err and "max abs error" in err
    assert os.listdir(tmp_path) == []


def test_missing_onnx_packages_name_the_extra(run_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, _, err = export([run_dir, "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and err.count("\n") == 1 and "onnxruntime" in err and "leap-kernels[export]" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--format", "safetensors", "--out", "m.pth"], "must end in .safetensors"),
        (["--format", "timm", "--out", "m.safetensors"], "use --format safetensors"),
        (["--format", "onnx", "--out", "m.bin"], "must end in .onnx"),
        (["--format", "timm", "--out", "m.pth", "--int8"], "--format onnx only"),
        (["--format", "onnx", "--out", "m.onnx", "--eval-data", "x"], "add --int8"),
    ],
)
def test_bad_options(run_dir, tmp_path, capsys, argv, message):
    argv = [a if not a.startswith("m.") else str(tmp_path / a) for a in argv]
    code, _, err = export([run_dir, *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_help_and_formats(capsys):
    from leap.apps.export import FORMATS
    from leap.cli import export as command

    assert tuple(FORMATS) == command.FORMATS
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--format", "--out", "--checkpoint", "--int8", "--eval-data", "strict=True", "patch_tokens"):
        assert opt in out, opt
