"""`leap eval segmentation`: the linear segmentation probe on frozen patch tokens, on tiny generated datasets
in the ADE20K layout and the generic images/ + masks/ layout whose right answers are known."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_linear import tiny_run

from leap.cli.evaluate import main as eval_main
from leap.evaluation import EvaluationError
from leap.evaluation import segmentation as S
from leap.evaluation.features import load_model
from leap.evaluation.records import read_records, report_lines
from leap.evaluation.run import evaluate_segmentation

# ADE20K mask values 1, 2, 3 (classes 0, 1, 2) painted in these colours; value 0 ("other", ignored) in a colour
# of its own that the probe never learns.
COLOURS = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 0: (200, 200, 30)}
FAST = dict(epochs=40, lr=0.05, probe_batch_size=4, workers=0, progress=False, no_cache=True, write_record=False)


def _regions(rng, h, w) -> np.ndarray:
    """A mask of up to four rectangles (split at a random row and column), values from COLOURS' keys."""
    r, c = int(rng.integers(1, h)), int(rng.integers(1, w))
    mask = np.zeros((h, w), np.uint8)
    for rows in (slice(0, r), slice(r, h)):
        for cols in (slice(0, c), slice(c, w)):
            mask[rows, cols] = rng.choice([0, 1, 2, 3])
    return mask


def _paint(mask: np.ndarray, colours=COLOURS) -> Image.Image:
    img = np.zeros((*mask.shape, 3), np.uint8)
    for value, colour in colours.items():
        img[mask == value] = colour
    return Image.fromarray(img)


def ade20k(root, n_train=6, n_val=4, *, other_sizes=True) -> str:
    """ADEChallengeData2016/images/{training,validation}/*.jpg (lossless content under a .jpg name, as the tests
    of retrieval do) and annotations/.../*.png. 28 x 28 images of coloured rectangles; with ``other_sizes``,
    two uniform images of other sizes per split (resized to 28 for the model, scored at their own size)."""
    rng = np.random.default_rng(0)
    base = os.path.join(root, S.ADE_DIR)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(base, "images", split))
        os.makedirs(os.path.join(base, "annotations", split))
        masks = [_regions(rng, 28, 28) for _ in range(n)]
        if other_sizes:
            masks += [np.full((35, 42), 2, np.uint8), np.full((30, 24), 3, np.uint8)]
        for i, mask in enumerate(masks):
            name = f"ADE_{split[:5]}_{i:08d}"
            _paint(mask).save(os.path.join(base, "images", split, name + ".jpg"), format="PNG")
            Image.fromarray(mask).save(os.path.join(base, "annotations", split, name + ".png"))
    return str(root)


# ----------------------------------------------------------------------------- the scores


def test_miou_against_hand_computed_values():
    # 2 x 3 labels (class 0, 1, ignored) against predictions; class 2 is never labelled nor predicted.
    target = torch.tensor([[0, 0, 1], [1, -1, 1]])
    pred = torch.tensor([[0, 1, 1], [0, 2, 1]])  # the ignored pixel's prediction does not count
    conf = S.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    s = S.segmentation_scores(conf)
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (3 + 3 - 2) = 1/2, class 2 left out.
    assert s["mIoU"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert s["aAcc"] == pytest.approx(3 / 5) and s["mAcc"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["iou"][2] is None and s["classes_scored"] == 2
    # A class predicted but never labelled counts, with IoU 0.
    s = S.segmentation_scores(S.confusion_matrix(torch.tensor([2, 1]), torch.tensor([1, 1]), 3))
    assert s["iou"][2] == 0 and s["mIoU"] == pytest.approx(0.25)
    with pytest.raises(EvaluationError, match="label 5 is outside the 3 classes"):
        S.confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def test_ade20k_labels_shift_and_ignore_zero(tmp_path):
    data = S.find_segmentation_data(ade20k(tmp_path, 1, 1, other_sizes=False))
    assert data.layout == "ade20k" and data.num_classes == 150 and data.reduce_zero_label
    m = data.map_mask(np.array([[0, 1], [150, 3]]), "m.png")
    assert m.tolist() == [[-1, 0], [149, 2]]
    with pytest.raises(EvaluationError, match=r"m.png: mask value 151 is not a class \(expected 1..150, 0 = ignored\)"):
        data.map_mask(np.array([[151]]), "m.png")
    # ROOT may be ADEChallengeData2016 itself.
    assert S.find_segmentation_data(os.path.join(tmp_path, S.ADE_DIR)).train == data.train


# ----------------------------------------------------------------------------- known answers


def test_known_answer_ade20k_layout_pixel_tokens_learn_the_masks_exactly(tmp_path):
    """Pixel tokens (the raw-pixel baseline: one token per pixel, its RGB) separate the three colours linearly, so
    the probe must label every scored pixel right: mIoU = aAcc = 100%, whatever it says on the ignored region,
    and on the images of other sizes through the bilinear upsampling to their masks' size."""
    root = ade20k(tmp_path)
    rec = evaluate_segmentation({"pixels": True, "img_size": 28}, root, **FAST)
    n = rec["numbers"]
    assert n["mIoU"] == 1.0 and n["aAcc"] == 1.0 and n["mAcc"] == 1.0
    assert n["classes_scored"] == 3 and n["iou"][:3] == [1.0, 1.0, 1.0] and n["iou"][3] is None
    assert rec["data"]["classes"] == 150 and rec["data"]["layout"] == "ade20k"
    assert rec["data"]["train_images"] == 8 and rec["data"]["val_images"] == 6
    assert rec["settings"]["head"] == "bn-linear" and rec["settings"]["upsampling"] == "bilinear to the label size"
    # Either head learns it.
    assert (
        evaluate_segmentation({"pixels": True, "img_size": 28}, root, head="linear", **FAST)["numbers"]["mIoU"] == 1.0
    )


def test_known_answer_folders_layout_with_a_known_mistake(tmp_path):
    """Generic images/ + masks/ folders, classes 0 and 1 (red, blue), 255 ignored. The validation image is all
    red, its lower half labelled 1: the probe says 0 everywhere, so IoU_0 = 1/2, IoU_1 = 0, mIoU = 25%,
    aAcc = 50%, mAcc = 50%."""
    colours = {0: (200, 30, 30), 1: (30, 30, 200), 255: (30, 200, 30)}
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        os.makedirs(tmp_path / "images" / split)
        os.makedirs(tmp_path / "masks" / split)
    for i in range(6):
        mask = np.where(_regions(rng, 28, 28) % 2 == 0, 0, 1).astype(np.uint8)
        mask[:3, :3] = 255
        _paint(mask, colours).save(tmp_path / "images" / "train" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / "train" / f"{i}.png")
    mask = np.zeros((28, 28), np.uint8)
    mask[14:] = 1
    _paint(np.zeros((28, 28), np.uint8), colours).save(tmp_path / "images" / "val" / "a.jpg", format="PNG")
    Image.fromarray(mask).save(tmp_path / "masks" / "val" / "a.png")
    rec = evaluate_segmentation({"pixels": True, "img_size": 28}, str(tmp_path), **FAST)
    n = rec["numbers"]
    assert rec["data"]["layout"] == "folders" and rec["data"]["classes"] == 2  # from the training masks
    assert n["iou"] == [0.5, 0.0] and n["mIoU"] == 0.25 and n["aAcc"] == 0.5 and n["mAcc"] == 0.5
    # Ignored pixels are not scored: relabel the wrong half 255 and the image is right.
    mask[14:] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "val" / "a.png")
    n = evaluate_segmentation({"pixels": True, "img_size": 28}, str(tmp_path), **FAST)["numbers"]
    assert n["mIoU"] == 1.0 and n["classes_scored"] == 1
    # A validation label beyond the classes of the training masks needs --num-classes.
    mask[14:] = 2
    Image.fromarray(mask).save(tmp_path / "masks" / "val" / "a.png")
    with pytest.raises(EvaluationError, match=r"a.png: mask value 2 is not a class \(expected 0..1, 255 = ignored\)"):
        evaluate_segmentation({"pixels": True, "img_size": 28}, str(tmp_path), **FAST)
    assert evaluate_segmentation({"pixels": True}, str(tmp_path), num_classes=3, **FAST)["data"]["classes"] == 3


# ----------------------------------------------------------------------------- a model, the cache, the command


def test_student_patch_tokens_cache_record_and_command(tmp_path, capsys):
    run = tiny_run(tmp_path)  # patch 7 at 28 px: a 4 x 4 grid of 32-dim tokens
    root = ade20k(tmp_path / "data", 4, 2)
    cache = str(tmp_path / "cache")
    kw = dict(epochs=2, workers=0, progress=False, cache_dir=cache)
    first = evaluate_segmentation({"model": run}, root, **kw)
    assert first["settings"]["grid"] == [4, 4] and first["feature_cache_hits"] == 0
    assert 0.0 <= first["numbers"]["mIoU"] <= 1.0 and len(first["numbers"]["iou"]) == 150
    second = evaluate_segmentation({"model": run}, root, **kw)
    assert second["feature_cache_hits"] == 2 and second["numbers"] == first["numbers"]
    assert [r["protocol"] for r in read_records(run)] == ["segmentation", "segmentation"]
    assert "linear segmentation (ade20k): mIoU" in report_lines(run)[0]
    # The extracted tokens are the model's patch tokens after the final norm, row-major over the grid.
    loaded = load_model(run)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.extractor.patch_tokens(x), loaded.extractor.vit.forward_features(x)[:, 1:])
    args = ["segmentation", "--model", run, "--data", root, "--epochs", "2", "--workers", "0", "--no-progress"]
    assert eval_main([*args, "--cache-dir", cache, "--head", "linear"]) == 0
    out = capsys.readouterr().out
    assert "linear segmentation [student" in out and "mIoU" in out and "head linear" in out
    assert read_records(run)[-1]["settings"]["head"] == "linear"


def test_bad_segmentation_data_is_refused(tmp_path):
    root = ade20k(tmp_path, 2, 1, other_sizes=False)
    ann = os.path.join(root, S.ADE_DIR, "annotations", "validation")
    first = sorted(os.listdir(ann))[0]
    os.rename(os.path.join(ann, first), os.path.join(ann, "elsewhere.png"))
    with pytest.raises(EvaluationError, match="1 of 1 images .* have no mask"):
        S.find_segmentation_data(root)
    with pytest.raises(EvaluationError, match="--layout: expected one of auto, ade20k, folders"):
        S.find_segmentation_data(root, "coco")
    with pytest.raises(EvaluationError, match="expected ADEChallengeData2016/images"):
        S.find_segmentation_data(str(tmp_path / S.ADE_DIR / "images"))
    colour = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(colour)
    with pytest.raises(EvaluationError, match="expected a single-channel mask of class indices, got mode RGB"):
        S.read_mask(str(colour))
    with pytest.raises(EvaluationError, match="--head: expected one of bn-linear, linear"):
        S.train_segmentation_head(torch.zeros(1, 4, 3), torch.zeros(1, 2, 2), grid=(2, 2), num_classes=2, head="mlp")
