"""Learning curves: `leap distill --save-every-epochs N` keeps per-epoch checkpoints (and prints their disk
cost), `leap eval ... --all-checkpoints` appends one record per checkpoint, and `leap report --compare` plots
accuracy vs epoch and vs teacher FLOPs, one line per run. Tiny models on 16 synthetic 28 px images."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_leap_reliability import tiny_config

from leap.apps.report import PNG_MAGIC, learning_curves, make_report
from leap.cli.evaluate import main as eval_main
from leap.cli.report import main as report_main
from leap.evaluation import EvaluationError
from leap.evaluation.common import run_checkpoints
from leap.evaluation.records import curve_metrics, read_records
from leap.run.loop import Trainer
from leap.run.resume import epoch_checkpoints, previous_run_files


def labelled_folder(root) -> str:
    """train/ and val/ with two classes (dark and bright 28 px images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for c, level in (("dark", 50), ("bright", 200)):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                arr = np.clip(level + rng.normal(0, 20, (28, 28, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 3-epoch runs of 2 steps per epoch (the baseline and LEAP's curriculum), every epoch kept, and
    labelled images."""
    root = tmp_path_factory.mktemp("curves")
    out = {}
    for name, curriculum in (("baseline", "off"), ("leap", "cka")):
        run = str(root / name)
        cfg = tiny_config(run, epochs=3, save_every_epochs=1, curriculum=curriculum, tau=0.05, synthetic_size=8)
        Trainer(cfg).fit()
        out[name] = run
    out["data"] = labelled_folder(root / "data")
    return out


def _knn_all(run: str, data: str, *extra: str) -> int:
    args = ["knn", "--model", run, "--all-checkpoints", "--data", data, "--workers", "0", "--k", "3"]
    return eval_main([*args, "--no-cache", "--no-progress", *extra])


def test_save_every_epochs_keeps_one_checkpoint_per_epoch(runs):
    run = runs["baseline"]
    kept = epoch_checkpoints(run)
    assert [e for e, _ in kept] == [1, 2, 3]
    for epoch, path in kept:  # each is the checkpoint of that epoch's end, not a copy of the last one
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        assert ckpt["epoch"] == epoch and ckpt["step"] == 2 * epoch and ckpt["step_in_epoch"] == 0
    # --keep-checkpoints pruning leaves them alone; a new run in the directory is refused because of them too.
    assert {os.path.basename(p) for _, p in kept} <= {os.path.basename(p) for p in previous_run_files(run)}
    # The last epoch's checkpoint is checkpoint.pt itself (a hard link, no copy).
    assert os.path.samefile(kept[-1][1], os.path.join(run, "checkpoint.pt"))


def test_save_every_n_epochs_keeps_every_nth_and_the_last_and_prints_the_disk_cost(tmp_path, caplog):
    run = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="leap.train"):
        Trainer(tiny_config(run, epochs=3, save_every_epochs=2, synthetic_size=8)).fit()
    assert [e for e, _ in epoch_checkpoints(run)] == [2, 3]
    size = os.path.getsize(os.path.join(run, "checkpoint-epoch0002.pt")) / 2**20
    lines = [r.getMessage() for r in caplog.records if "checkpoint-epoch" in r.getMessage()]
    assert len(lines) == 2
    assert f"kept checkpoint-epoch0002.pt ({size:.1f} MiB); 1 epoch checkpoint(s)" in lines[0]
    assert "2 epoch checkpoint(s)" in lines[1] and "for the 2 of this run (--save-every-epochs 2)" in lines[1]
    # Off by default: no epoch checkpoints.
    Trainer(tiny_config(str(tmp_path / "plain"), epochs=2, synthetic_size=8)).fit()
    assert epoch_checkpoints(str(tmp_path / "plain")) == []


def test_resumed_run_keeps_adding_epoch_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(run, epochs=1, save_every_epochs=1, synthetic_size=8)).fit()
    Trainer(tiny_config(run, epochs=2, save_every_epochs=1, synthetic_size=8, resume="auto")).fit()
    assert [e for e, _ in epoch_checkpoints(run)] == [1, 2]
    first = torch.load(os.path.join(run, "checkpoint-epoch0001.pt"), weights_only=True, map_location="cpu")
    assert first["epoch"] == 1  # the resumed run did not overwrite the earlier epoch's checkpoint


def test_eval_all_checkpoints_appends_one_record_per_checkpoint(runs, capsys):
    run, data = runs["leap"], runs["data"]
    assert [os.path.basename(p) for p in run_checkpoints(run)] == [f"checkpoint-epoch000{e}.pt" for e in (1, 2, 3)]
    assert _knn_all(run, data) == 0
    out = capsys.readouterr().out
    assert out.count("kNN (k=3") == 3 and "3 checkpoint(s)" in out
    recs = read_records(run)
    assert len(recs) == 3
    training = [r["model"]["training"] for r in recs]
    assert [t["epoch"] for t in training] == [1, 2, 3] and [t["step"] for t in training] == [2, 4, 6]
    flops = [t["teacher_flops"] for t in training]
    assert flops[0] > 0 and flops[0] < flops[1] < flops[2]  # teacher FLOPs spent so far, from each checkpoint
    assert len({r["model"]["checkpoint_sha256"] for r in recs}) == 3
    assert all(r["model"]["source"].endswith(f"checkpoint-epoch000{t['epoch']}.pt") for r, t in zip(recs, training))


def test_all_checkpoints_takes_checkpoint_pt_when_it_is_newer(tmp_path):
    run = str(tmp_path / "run")
    Trainer(tiny_config(run, epochs=2, save_every_epochs=1, max_steps=6)).fit()  # 4 steps per epoch: stops in epoch 2
    names = [os.path.basename(p) for p in run_checkpoints(run)]
    assert names == ["checkpoint-epoch0001.pt", "checkpoint.pt"]
    with pytest.raises(EvaluationError, match="--all-checkpoints: expected --model RUN_DIR"):
        run_checkpoints(os.path.join(run, "checkpoint.pt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="holds no checkpoint-epochE.pt nor checkpoint.pt"):
        run_checkpoints(str(empty))


def test_curve_metrics_of_each_protocol():
    assert curve_metrics({"protocol": "linear", "numbers": {"cls": {"best_top1": 0.5}}}) == {"linear top-1 (cls)": 0.5}
    assert curve_metrics({"protocol": "knn", "numbers": {"patch": 0.25}}) == {"kNN top-1 (patch)": 0.25}
    rec = {"protocol": "retrieval", "data": {"dataset": "rparis6k"}, "numbers": {"medium": {"mAP": 0.3}}}
    assert curve_metrics(rec) == {"rparis6k mAP (medium)": 0.3}
    assert curve_metrics({"protocol": "robustness", "numbers": {"cls": {"mean_top1": 0.4}}}) == {
        "corruption top-1 (cls)": 0.4
    }
    assert curve_metrics({"protocol": "segmentation", "numbers": {"mIoU": None}}) == {}  # NaN is left out


def test_report_plots_accuracy_vs_epoch_and_teacher_flops_one_line_per_run(runs, tmp_path):
    data = runs["data"]
    for name in ("baseline", "leap"):
        if not read_records(runs[name]):
            assert _knn_all(runs[name], data, "--json") == 0
    curves = learning_curves([runs["baseline"], runs["leap"]])
    assert list(curves) == ["kNN top-1 (cls)"]
    lines = curves["kNN top-1 (cls)"]
    assert sorted(lines) == ["baseline", "leap"]  # one line per run
    for points in lines.values():
        assert [p["epoch"] for p in points] == [1, 2, 3]
        assert all(0 <= p["value"] <= 1 for p in points)
    # At each epoch LEAP's teacher (early exit from block 1 up) has spent no more than the baseline's (always
    # at the last block); by the end, strictly less.
    base, leap = ([p["teacher_flops"] for p in lines[n]] for n in ("baseline", "leap"))
    assert all(a <= b for a, b in zip(leap, base)) and leap[-1] < base[-1]
    # The teacher FLOPs fall back to the run log's epoch records when a checkpoint did not carry them.
    path = os.path.join(runs["leap"], "eval.jsonl")
    recs = [json.loads(line) for line in open(path)]
    for r in recs:
        r["model"]["training"]["teacher_flops"] = None
    alt = tmp_path / "leap-old"
    alt.mkdir()
    (alt / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (alt / "log.jsonl").write_text(open(os.path.join(runs["leap"], "log.jsonl")).read())
    assert [p["teacher_flops"] for p in learning_curves([str(alt)])["kNN top-1 (cls)"]["leap-old"]] == leap
    # `leap report --compare`: the figure, and the Markdown section.
    out = tmp_path / "report"
    assert report_main([runs["leap"], "--compare", runs["baseline"], "--out", str(out), "--no-cost-model"]) == 0
    png = out / "learning_curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    md = (out / "report.md").read_text()
    assert "## Learning curves" in md and "- `baseline`: epoch 1:" in md and "- `leap`: epoch 1:" in md
    res = make_report(runs["leap"], str(tmp_path / "alone"), use_cost_model=False)
    assert list(res["curves"]["kNN top-1 (cls)"]) == ["leap"]
    assert report_main([runs["leap"], "--compare", str(tmp_path / "missing"), "--out", str(out)]) == 2
