"""`leap eval retrieval` end to end on a tiny revisitop-layout dataset (random tiny student)."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_linear import tiny_run
from torchvision import transforms as T

from leap.cli.evaluate import main as eval_main
from leap.data.transforms import IMAGENET_MEAN as MEAN
from leap.data.transforms import IMAGENET_STD as STD
from leap.evaluation import EvaluationError
from leap.evaluation.records import report_lines
from leap.evaluation.retrieval import RevisitopImages, find_dataset, retrieval_transform
from leap.evaluation.run import evaluate_retrieval


def _dataset(tmp_path):
    """6 database images (random noise, different sizes); db image 5 is exactly the region (8, 4, 48, 34)
    of db image 2. Query 0 = db image 2 cropped to that box -> its nearest image is db 5 (identical pixels),
    not db 2. Query 1 = db image 1 whole (bbx = the full image)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "datasets" / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    sizes = [(40, 30), (50, 36), (60, 45), (33, 47), (44, 44)]
    arrays = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for w, h in sizes]
    arrays.append(arrays[2][4:34, 8:48].copy())
    names = [f"img_{i}" for i in range(6)]
    for name, a in zip(names, arrays):
        Image.fromarray(a).save(root / "jpg" / f"{name}.jpg", format="PNG")  # lossless content, .jpg name
    gnd = {
        "imlist": names,
        "qimlist": ["img_2", "img_1"],
        "gnd": [
            {"bbx": [8.0, 4.0, 48.0, 34.0], "easy": np.array([5]), "hard": np.array([2]), "junk": np.array([], int)},
            {"bbx": [0.0, 0.0, 50.0, 36.0], "easy": np.array([1]), "hard": np.array([], int), "junk": np.array([3])},
        ],
    }
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=2))
    return str(tmp_path / "datasets")


def test_retrieval_end_to_end(tmp_path, capsys):
    run = tiny_run(tmp_path, step=1)
    data = _dataset(tmp_path)
    cache = str(tmp_path / "cache")
    rec = evaluate_retrieval(
        {"model": run}, data, "roxford5k", cache_dir=cache, workers=0, batch_size=4, progress=False
    )
    n = rec["numbers"]
    # Query 0 (crop of db 2) finds db 5 (its exact pixels) first: Easy AP = 1 (hard db 2 ignored).
    # Query 1 (all of db 1) finds db 1 first: AP = 1 in Easy and Medium; no hard positive -> skipped in Hard.
    assert n["easy"]["mAP"] == pytest.approx(1.0)
    assert n["hard"]["skipped"] == 1 and n["hard"]["queries"] == 1
    assert n["medium"]["skipped"] == 0 and n["easy"]["mP@1"] == pytest.approx(1.0)
    assert rec["data"]["database_images"] == 6 and rec["data"]["queries"] == 2
    # The transform is recorded: the paper's by default.
    assert rec["settings"]["transform"] == "center-crop"
    assert rec["data"]["transform"] == "resize32-centercrop28-bicubic-imagenet-norm"
    recs = [json.loads(line) for line in open(f"{run}/eval.jsonl")]
    assert recs[-1]["protocol"] == "retrieval" and recs[-1]["numbers"]["easy"]["mAP"] == pytest.approx(1.0)
    # The command prints the three settings; the second run reads cached features.
    assert (
        eval_main(
            [
                "retrieval",
                "--model",
                run,
                "--data",
                data,
                "--dataset",
                "roxford5k",
                "--workers",
                "0",
                "--cache-dir",
                cache,
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mAP  E: 100.00%" in out and "left out" in out
    assert len(open(f"{run}/eval.jsonl").readlines()) == 2
    lines = report_lines(run)
    assert len(lines) == 2 and "retrieval mAP roxford5k: easy 100.00%; medium" in lines[0]


def test_query_crop_and_transform(tmp_path):
    data = _dataset(tmp_path)
    folder, gnd = find_dataset(data, "roxford5k")
    for mode in ("center-crop", "keep-aspect"):
        transform, tid = retrieval_transform(28, 7, mode)
        q = RevisitopImages(folder, ["img_2"], transform, bbxs=[(8.0, 4.0, 48.0, 34.0)])
        db = RevisitopImages(folder, ["img_5", "img_2"], transform)
        assert torch.equal(q[0][0], db[0][0])  # the crop is exactly the stored region
    # keep-aspect: 60 x 45 -> longer side 28, shorter 21 (a multiple of 7)
    assert db[1][0].shape == (3, 21, 28) and tid == "revisitop-long28-snap7-bicubic-imagenet-norm"
    # The default is the paper's: Resize 256 -> CenterCrop 224, scaled to 28 px (Resize 32 -> CenterCrop 28).
    transform, tid = retrieval_transform(28, 7)
    assert tid == "resize32-centercrop28-bicubic-imagenet-norm"
    img = Image.open(f"{folder}/jpg/img_2.jpg").convert("RGB")
    bicubic = T.InterpolationMode.BICUBIC
    paper = T.Compose([T.Resize(32, interpolation=bicubic), T.CenterCrop(28), T.ToTensor(), T.Normalize(MEAN, STD)])
    assert torch.equal(transform(img), paper(img)) and transform(img).shape == (3, 28, 28)
    with pytest.raises(EvaluationError, match="--transform: expected one of center-crop, keep-aspect"):
        retrieval_transform(28, 7, "multi-scale")
    with pytest.raises(EvaluationError, match="no gnd_rparis6k"):
        find_dataset(data, "rparis6k")
    with pytest.raises(EvaluationError, match="--dataset"):
        find_dataset(data, "holidays")


def test_retrieval_keep_aspect_option_is_recorded_and_cached_apart(tmp_path):
    run = tiny_run(tmp_path, step=1)
    data = _dataset(tmp_path)
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, workers=0, batch_size=4, progress=False)
    crop = evaluate_retrieval({"model": run}, data, "roxford5k", **kw)
    aspect = evaluate_retrieval({"model": run}, data, "roxford5k", transform="keep-aspect", **kw)
    assert aspect["settings"]["transform"] == "keep-aspect"
    assert aspect["data"]["transform"] == "revisitop-long28-snap7-bicubic-imagenet-norm"
    assert aspect["numbers"]["easy"]["mAP"] == pytest.approx(1.0)  # query 0's crop is db 5's pixels either way
    recs = [json.loads(line) for line in open(f"{run}/eval.jsonl")]
    assert [r["settings"]["transform"] for r in recs] == ["center-crop", "keep-aspect"]
    assert crop["data"]["transform"] != aspect["data"]["transform"]
    with pytest.raises(EvaluationError, match="--transform"):
        evaluate_retrieval({"model": run}, data, "roxford5k", transform="long-side", **kw)
    # The command takes the option.
    args = ["retrieval", "--model", run, "--data", data, "--dataset", "roxford5k", "--workers", "0"]
    assert eval_main([*args, "--cache-dir", cache, "--no-progress", "--transform", "keep-aspect"]) == 0
    assert json.loads(open(f"{run}/eval.jsonl").readlines()[-1])["settings"]["transform"] == "keep-aspect"
