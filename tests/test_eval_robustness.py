"""`leap eval robustness`: the 15 ImageNet-C corruptions (imagecorruptions-imaug), seeded and cached, and the
clean-trained linear probe on the corrupted images, on tiny generated image folders with known answers."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from leap.cli.evaluate import main as eval_main
from leap.errors import MissingDependencyError
from leap.evaluation import EvaluationError
from leap.evaluation import robustness as R
from leap.evaluation.records import read_records, report_lines
from leap.evaluation.run import evaluate_robustness

PIXELS = {"pixels": True, "img_size": 32}  # the raw-pixel baseline at 32 px: corrupted without resampling


def dark_and_bright(root, size=40) -> str:
    """train/ (6 per class) and val/ (4 per class): `dark` images (grey 50) and `bright` ones (grey 200), with
    pixel noise. A linear probe on the pixels separates them exactly."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for c, level in (("bright", 200), ("dark", 50)):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                arr = np.clip(level + rng.normal(0, 15, (size, size, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def _run(data, cache, **kw):
    opts = dict(epochs=20, features="cls", workers=0, progress=False, cache_dir=str(cache), write_record=False)
    return evaluate_robustness(PIXELS, data, **{**opts, **kw})


# ----------------------------------------------------------------------------- the corruptions themselves


def test_the_15_corruptions_are_imagenet_c_and_seeded():
    pytest.importorskip("imagecorruptions", reason="the robustness extra (imagecorruptions-imaug) is not installed")
    from imagecorruptions import corrupt, get_corruption_names

    assert R.CORRUPTIONS == tuple(get_corruption_names("common")) and len(R.CORRUPTIONS) == 15
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))
    for name in R.CORRUPTIONS:
        a = R.corrupt_image(img, name, 3, seed=11)
        assert a.size == img.size and a.mode == "RGB", name
        assert np.array_equal(np.asarray(a), np.asarray(R.corrupt_image(img, name, 3, seed=11))), name  # same seed
        assert not np.array_equal(np.asarray(a), np.asarray(img)), name  # it changed the image
    # Exactly the package's corruption under that seed (numpy's global generator; glass blur takes its own).
    for name in ("gaussian_noise", "glass_blur", "contrast"):
        np.random.seed(11)
        extra = {"seed": 11} if name == "glass_blur" else {}
        ref = corrupt(np.asarray(img), severity=3, corruption_name=name, **extra)
        assert np.array_equal(np.asarray(R.corrupt_image(img, name, 3, seed=11)), ref), name
    # The random ones depend on the seed; a stronger severity changes the image more.
    noisy = [np.asarray(R.corrupt_image(img, "shot_noise", 2, seed=s)) for s in (1, 2)]
    assert not np.array_equal(*noisy)
    change = [
        np.abs(np.asarray(R.corrupt_image(img, "contrast", s, 0), float) - np.asarray(img)).mean() for s in (1, 5)
    ]
    assert change[1] > change[0]
    # Images under the package's 32 px minimum are corrupted at 32 px and brought back to their size.
    small = R.corrupt_image(img.resize((28, 28)), "pixelate", 5, seed=0)
    assert small.size == (28, 28)
    assert R.image_seed(0, "fog", 1, 5) != R.image_seed(0, "fog", 1, 6) != R.image_seed(1, "fog", 1, 6)


def test_missing_package_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "leap-kernels\[robustness\]"'):
        R.corruption_backend()
    data = dark_and_bright(tmp_path / "data")
    assert eval_main(["robustness", "--pixels", "--data", data, "--no-cache", "--no-record", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leap: error: eval: leap eval robustness needs") and "\n" not in err


def test_bad_corruptions_and_severities_are_refused(tmp_path):
    data = dark_and_bright(tmp_path / "data")
    with pytest.raises(EvaluationError, match="--corruptions: expected some of gaussian_noise"):
        _run(data, tmp_path / "c", corruptions=["gaussian_noise", "rain"])
    with pytest.raises(EvaluationError, match="--severities: expected some of 1, 2, 3, 4, 5, got 0, 6"):
        _run(data, tmp_path / "c", severities=[0, 6])


# ----------------------------------------------------------------------------- known answers


def test_known_answer_with_stand_in_corruptions_and_the_image_cache(tmp_path, monkeypatch):
    """Stand-in corruptions whose effect is known: severities 1-2 leave the image as it is (top-1 = the clean
    top-1, 100%), severities 3-5 invert it (dark <-> bright: top-1 0%). Per corruption: (1+1+0+0+0)/5 = 40%."""
    pytest.importorskip("imagecorruptions", reason="the robustness extra (imagecorruptions-imaug) is not installed")
    seeds = []

    def stand_in(image, severity, corruption_name, **extra):
        seeds.append((corruption_name, severity, int(np.random.randint(1 << 30))))
        return image if severity <= 2 else 255 - image

    monkeypatch.setattr(R, "_corrupt_fn", lambda: stand_in)
    data = dark_and_bright(tmp_path / "data")
    cache = tmp_path / "cache"
    rec = _run(data, cache, corruptions=["gaussian_noise", "fog"])
    n = rec["numbers"]["cls"]
    assert n["clean_top1"] == 1.0
    for name in ("gaussian_noise", "fog"):
        assert n["corruptions"][name]["top1"] == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0, "5": 0.0}
        assert n["corruptions"][name]["mean_top1"] == pytest.approx(0.4)
    assert n["mean_top1"] == pytest.approx(0.4)
    assert n["severity_mean_top1"] == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0, "5": 0.0}
    assert rec["corrupted_images_made"] == 8 * 2 * 5 and len(seeds) == 80
    assert (
        rec["settings"]["severities"] == [1, 2, 3, 4, 5]
        and "imagecorruptions-imaug" in rec["settings"]["implementation"]
    )
    # Seeded per image: a second generation (another cache) draws the same numbers, image by image.
    first = list(seeds)
    seeds.clear()
    _run(data, tmp_path / "cache2", corruptions=["gaussian_noise", "fog"])
    assert sorted(seeds) == sorted(first) and len({s for _, _, s in first}) == 80
    # Cached: with the features dropped, the images are read back from the cache, not made again.
    for entry in os.scandir(cache):
        if entry.is_file():
            os.unlink(entry.path)

    def never(*args, **kw):
        pytest.fail("a cached corrupted image was made again")

    monkeypatch.setattr(R, "_corrupt_fn", lambda: never)
    again = _run(data, cache, corruptions=["gaussian_noise", "fog"])
    assert again["numbers"] == rec["numbers"] and again["corrupted_images_made"] == 0


def test_known_answer_with_the_real_corruptions(tmp_path, capsys):
    """Two corruptions of the package whose effect on dark/bright images is known: `contrast` pulls pixels
    toward the image's mean, which it keeps, so every image stays on its side (100% at every severity);
    `brightness` at severity 5 adds 0.5 to the HSV value, which turns every dark image bright (50%)."""
    pytest.importorskip("imagecorruptions", reason="the robustness extra (imagecorruptions-imaug) is not installed")
    data = dark_and_bright(tmp_path / "data")
    run_dir = tmp_path / "evals"
    args = ["robustness", "--pixels", "--img-size", "32", "--data", data, "--features", "cls", "--epochs", "20"]
    args += ["--corruptions", "contrast,brightness", "--severities", "1,5", "--workers", "0", "--no-progress"]
    assert eval_main([*args, "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "clean top-1 100.00%" in out and "contrast" in out and "s5 100.00%" in out
    (rec,) = read_records(run_dir)
    n = rec["numbers"]["cls"]
    assert n["corruptions"]["contrast"]["top1"] == {"1": 1.0, "5": 1.0}
    assert n["corruptions"]["brightness"]["top1"]["5"] == 0.5
    assert rec["protocol"] == "robustness" and rec["settings"]["corruptions"] == ["contrast", "brightness"]
    assert rec["data"]["corrupted_images"].startswith(str(tmp_path / "cache"))
    assert "corruption top-1 (2 corruptions x 2 severities): cls:" in report_lines(run_dir)[0]
