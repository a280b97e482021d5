"""A quick version of the demo pipeline on the committed Fashion-MNIST sample:
train-teacher -> baseline and LEAP distillation -> kNN -> plots and table."""

import json
import os

import pytest
import torch

from leap.apps.demo import DEFAULT_TEACHER, run_demo
from leap.apps.pretrain import TeacherTrainConfig, evaluate_accuracy, read_teacher_meta, train_teacher
from leap.data import build_dataset, build_loader
from leap.evaluation.knn import knn_accuracy
from leap.models import build_model, load_teacher_weights
from leap.runlog import load_run

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-sample")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, one_thread):
    # The Triton interpreter is for the kernel tests; the trainer runs the plain torch path here.
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


@pytest.mark.slow
def test_demo_pipeline_on_sample(tmp_path, capsys):
    teacher_path = str(tmp_path / "teacher.pth")
    meta = train_teacher(
        TeacherTrainConfig(
            model_overrides={"patch_size": 7, "depth": 4, "embed_dim": 32, "num_heads": 1},
            data=SAMPLE,
            epochs=1,
            batch_size=64,
            workers=0,
            out=teacher_path,
            progress=False,
        )
    )
    assert meta["train_images"] == 384 and meta["test_images"] == 128
    saved = read_teacher_meta(teacher_path)
    assert saved["model_overrides"]["depth"] == 4 and saved["test_accuracy"] == meta["test_accuracy"]
    # The accuracy is that of the saved (fp16) weights: recomputing it on the reloaded file agrees.
    net = build_model(saved["model"], img_size=saved["img_size"], **saved["model_overrides"])
    load_teacher_weights(net, teacher_path)
    raw = torch.load(teacher_path, weights_only=True)
    classifier = torch.nn.Linear(net.num_features, 10)
    classifier.load_state_dict(raw["classifier"])
    loader = build_loader(
        build_dataset("fashion-mnist", SAMPLE, "test", 28, augment=False),
        64,
        shuffle=False,
        num_workers=0,
        drop_last=False,
    )
    assert evaluate_accuracy(torch.nn.Sequential(net, classifier), loader, torch.device("cpu")) == pytest.approx(
        meta["test_accuracy"]
    )

    out = run_demo(
        data=SAMPLE,
        teacher=teacher_path,
        out=str(tmp_path / "demo"),
        epochs=2,
        limit_images=256,
        batch_size=64,
        knn_train=256,
        knn_test=64,
        workers=0,
        progress=False,
        student_overrides={"patch_size": 7, "depth": 2, "embed_dim": 16, "num_heads": 1},
        replay_rounds=2,
    )
    base, leap = out["results"]["baseline"], out["results"]["leap"]
    # Baseline always runs all 4 teacher blocks; LEAP runs at most that.
    assert base["summary"]["teacher_blocks_run"] == base["summary"]["teacher_blocks_full"]
    assert base["epoch_blocks"] == [4.0, 4.0]
    assert leap["summary"]["mode"] == "leap" and len(leap["epoch_blocks"]) == 2
    for r in (base, leap):
        # 64 test images: a kNN accuracy is a multiple of 1/64; 10 classes, so above chance.
        assert (r["knn_cls"] * 64).is_integer() and r["knn_cls"] > 0.1, r["knn_cls"]
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| baseline |" in table and "| leap |" in table and "kNN top-1" in table
    assert f"{base['knn_cls'] * 100:.2f}%" in table.split("| baseline |")[1].split("\n")[0]
    assert (tmp_path / "demo" / "leap" / "report" / "blocks.png").stat().st_size > 0
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["leap"]["epoch_blocks"] == leap["epoch_blocks"] and saved["teacher_knn_cls"] == out["teacher_knn"]
    assert saved["baseline"]["summary"]["teacher_blocks_run"] == base["summary"]["teacher_blocks_run"]
    for r in (base, leap):  # the linear probe of each student: best over 100 epochs >= the last epoch
        for kind in ("cls", "patch"):
            probe = r["linear"][kind]
            assert 1 <= probe["best_epoch"] <= 100 and probe["best_top1"] >= probe["last_top1"], probe
            assert (probe["best_top1"] * 64).is_integer(), probe  # 64 test images
        assert r["linear"]["patch"]["best_top1"] > 0.1, r["linear"]  # above chance (10 classes)
    header = table.split("\n")[0]
    assert "linear top-1 CLS (best epoch)" in header and "linear top-1 mean-patch (best epoch)" in header
    assert (
        f"{base['linear']['cls']['best_top1'] * 100:.2f}% ({base['linear']['cls']['best_epoch']})"
        in table.split("| baseline |")[1].split("\n")[0]
    )
    assert "after the last epoch" in table
    # Training time: wall and the process's CPU time, the LEAP row with its change against the baseline's.
    assert "training time: wall / CPU" in header and "compare runs made under the same load" in table
    leap_row, base_row = table.split("| leap |")[1].split("\n")[0], table.split("| baseline |")[1].split("\n")[0]
    for summary in (base["summary"], leap["summary"]):
        assert summary["train_cpu_time_s"] > 0 and summary["mean_step_cpu_time_s"] > 0
    change = 100 * (leap["summary"]["train_cpu_time_s"] / base["summary"]["train_cpu_time_s"] - 1)
    assert f"{leap['summary']['train_cpu_time_s']:.0f} s ({change:+.0f}%)" in leap_row, leap_row
    assert "%)" not in base_row.split("|")[5], base_row  # the baseline is the reference: no change of its own
    # Both runs' steps replayed interleaved: the LEAP run's blocks from its step records, the baseline at block 4.
    replay = out["replay"]
    assert replay["leap_blocks_from"] == "steps" and replay["baseline_steps"] == base["summary"]["steps"]
    assert replay["leap_steps"] == leap["summary"]["steps"] and replay["rounds"] == 2 and replay["num_blocks"] == 4
    assert set(replay["leap_step_times_s"]) == {int(b) for b in load_run(tmp_path / "demo" / "leap").step_blocks()}
    assert "training steps' time, replayed interleaved" in header and "over the same round's baseline step" in table
    low, high = replay["saving_interval"]
    assert low <= replay["saving"] <= high
    assert f"({-100 * replay['saving']:+.1f}%; {-100 * high:+.1f}% to {-100 * low:+.1f}%)" in leap_row, leap_row
    assert saved["replay"]["baseline_time_s"] == replay["baseline_time_s"]
    # Each student's evaluations are recorded in its run directory and listed by its report.
    report = (tmp_path / "demo" / "leap" / "report" / "report.md").read_text()
    assert "## Evaluations" in report and "linear probe top-1" in report and "kNN top-1" in report
    assert "teacher FLOPs saved" in capsys.readouterr().out


def test_knn_accuracy_on_separable_features():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.arange(3).repeat_interleave(20)
    feats = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(60, 8), dim=-1)
    assert knn_accuracy(feats, labels, feats, labels, k=5) == 1.0
    shuffled = labels[torch.randperm(60)]
    assert knn_accuracy(feats, shuffled, feats, labels, k=5) < 0.8


def test_committed_teacher_has_its_recipe():
    meta = read_teacher_meta(DEFAULT_TEACHER)
    assert meta is not None and meta["data_source"] == "fashion-mnist"
    assert 8 <= meta["model_overrides"]["depth"] <= 12
    assert os.path.getsize(DEFAULT_TEACHER) < 8 * 2**20
