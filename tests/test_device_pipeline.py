"""Tests for the device-side image pipeline (leap/data/device_pipeline.py), on CPU tensors: output layout,
the augmentation statistics of the PIL path (leap/data/transforms.py), resampling against PIL, the batched
ops against torchvision's per-image ops, determinism and resume, decoding fallbacks, the image folder's
skip-and-count rule, and a tiny ``leap distill --data-pipeline device`` run."""

from __future__ import annotations

import io
import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

from leap.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    SyntheticDataset,
    build_transforms,
    set_loader_epoch,
)
from leap.data.device_pipeline import (
    CROP_RATIO,
    CROP_SCALE,
    FLIP_P,
    GRAYSCALE_P,
    JITTER,
    JITTER_P,
    DeviceAugment,
    DeviceBatchLoader,
    EncodedImages,
    _apply,
    augment_params,
    build_device_loader,
    collate_encoded,
    resized_crops,
)
from leap.data.loaders import mix64
from leap.errors import ConfigError, DataError

N_STATS = 3000  # images per rate: a binomial std of at most 0.009, bounds at >= 3.3 std


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (h, w, 3) uint8: low-frequency sinusoids, different per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [
        128 + 80 * np.sin(rng.uniform(0.01, 0.05) * xx + rng.uniform(0.01, 0.05) * yy + rng.uniform(0, 6))
        for _ in range(3)
    ]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_folder(root, count: int = 8, classes: int = 2, size=(40, 56)) -> list[str]:
    """``count`` smooth JPEGs split over ``classes`` class folders (sizes alternate portrait/landscape)."""
    paths = []
    for i in range(count):
        folder = os.path.join(root, f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        h, w = size if i % 2 == 0 else size[::-1]
        path = os.path.join(folder, f"{i:03d}.jpg")
        with open(path, "wb") as f:
            f.write(encode(smooth(h, w, seed=i)))
        paths.append(path)
    return sorted(paths)


def to_uint8_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def seeds(n: int, base: int = 0) -> list[int]:
    return [mix64(base, i) for i in range(n)]


def pil_probabilities() -> tuple[float, float, float]:
    """(flip, jitter, grayscale) probabilities of the PIL path's training transform."""
    ops = build_transforms(224, train=True).transforms
    return ops[1].p, ops[2].p, ops[3].p


# --------------------------------------------------------------------------- layout


def test_output_shape_dtype_and_normalization(tmp_path):
    write_folder(tmp_path, 6)
    enc = EncodedImages(ImageFolderDataset(tmp_path))
    batch, labels = collate_encoded([enc[i] for i in range(6)])
    x, out_labels = DeviceAugment(32, fallback=enc.fallback)(batch, labels)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(out_labels, labels) and torch.isfinite(x).all()
    raw, _ = DeviceAugment(32, normalize=False)(batch, labels)
    assert raw.min() >= 0 and raw.max() <= 1 and raw.std() > 0.05
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, rtol=0, atol=1e-6)
    # Resampled to the 8-bit grid, like the PIL path (the jitter then runs in float: documented).
    plain, _ = DeviceAugment(32, augment=False, normalize=False)(batch, labels)
    torch.testing.assert_close(plain * 255, (plain * 255).round(), rtol=0, atol=1e-4)


def test_constants_are_the_pil_paths():
    ops = build_transforms(224, train=True).transforms
    crop, flip, jitter, gray = ops[0], ops[1], ops[2], ops[3]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(crop.scale) == CROP_SCALE and tuple(crop.ratio) == pytest.approx(CROP_RATIO)
    assert flip.p == FLIP_P and jitter.p == JITTER_P and gray.p == GRAYSCALE_P
    cj = jitter.transforms[0]
    ranges = [*cj.brightness, *cj.contrast, *cj.saturation, *cj.hue]
    assert ranges == pytest.approx(
        [1 - JITTER[0], 1 + JITTER[0], 1 - JITTER[1], 1 + JITTER[1]]
        + [1 - JITTER[2], 1 + JITTER[2], -JITTER[3], JITTER[3]]
    )


# --------------------------------------------------------------------------- statistics


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / len(a)
    fb = torch.searchsorted(b, grid, right=True) / len(b)
    return float((fa - fb).abs().max())


def test_crop_scale_and_aspect_ratio_match_the_pil_path():
    sizes = [(375, 500), (500, 375), (64, 640)] * 1334  # the last one often needs the central fallback
    n = len(sizes)
    p = augment_params(seeds(n), sizes)
    hw = torch.tensor(sizes, dtype=torch.float64)
    top, left, h, w = p.boxes.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all()
    ours_scale, ours_ratio = h * w / (hw[:, 0] * hw[:, 1]), w / h

    crop = build_transforms(224, train=True).transforms[0]
    pil_scale, pil_ratio = [], []
    for H, W in sizes:
        i, j, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, H, W), crop.scale, crop.ratio)
        pil_scale.append(ch * cw / (H * W))
        pil_ratio.append(cw / ch)
    pil_scale, pil_ratio = torch.tensor(pil_scale, dtype=torch.float64), torch.tensor(pil_ratio, dtype=torch.float64)
    # Same bounds (rounding to whole pixels moves them by < 2 %)...
    for ours, pil in ((ours_scale, pil_scale), (ours_ratio, pil_ratio)):
        assert ours.min() >= pil.min() * 0.98 - 0.02 and ours.max() <= pil.max() * 1.02 + 0.02
    tried = hw[:, 1] / hw[:, 0] < 2  # the usual sizes: a try always fits; 64 x 640 may fall back to < 0.14
    assert ours_scale[tried].min() >= CROP_SCALE[0] * 0.98 and ours_scale.max() <= 1.0
    # ... and the same distributions: D < 0.05 (the wrong scale range (0.08, 1) gives D ~ 0.09 here).
    assert _ks(ours_scale, pil_scale) < 0.05 and _ks(ours_ratio.log(), pil_ratio.log()) < 0.05
    wrong = augment_params(seeds(n), sizes, crop_scale=(0.08, 1.0)).boxes.double()
    assert _ks(wrong[:, 2] * wrong[:, 3] / (hw[:, 0] * hw[:, 1]), pil_scale) > 0.05


def test_jitter_factors_and_order_are_uniform():
    p = augment_params(seeds(N_STATS, 7), [(30, 40)] * N_STATS)
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = p.factors[:, k]
        assert f.min() >= lo and f.max() <= hi and abs(float(f.mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)
    # Every op is in every stage about a quarter of the time (a fixed order would put it at 0 or 1).
    share = torch.stack([(p.order == op).double().mean(0) for op in range(4)])
    assert (share - 0.25).abs().max() < 0.035


def test_flip_rate_from_outputs():
    ramp = np.tile(np.linspace(40, 120, 32), (24, 1)).astype(np.uint8)  # gray, dark left, bright right
    img = to_uint8_chw(np.repeat(ramp[..., None], 3, -1))
    out = DeviceAugment(8, normalize=False).augment_images([img] * N_STATS, seeds(N_STATS, 1))
    flipped = out[..., :4].mean((1, 2, 3)) > out[..., 4:].mean((1, 2, 3))
    assert abs(float(flipped.double().mean()) - pil_probabilities()[0]) < 0.03


def test_jitter_and_grayscale_rates_from_outputs():
    color = torch.tensor([180, 90, 40], dtype=torch.uint8).view(3, 1, 1)
    img = color.expand(3, 20, 30).contiguous()
    out = DeviceAugment(8, normalize=False).augment_images([img] * N_STATS, seeds(N_STATS, 2))
    gray = (out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-6
    changed = (out - color.view(1, 3, 1, 1) / 255).abs().amax((1, 2, 3)) > 1e-4
    _, jitter_p, gray_p = pil_probabilities()
    assert abs(float(gray.double().mean()) - gray_p) < 0.03
    assert abs(float(changed[~gray].double().mean()) - jitter_p) < 0.03


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("box", [(30, 50, 200, 260), (100, 120, 20, 30)], ids=["down", "up"])
def test_resampling_is_close_to_pil_bicubic(box):
    arr = smooth(300, 400, seed=3)
    top, left, h, w = box
    ours = resized_crops([to_uint8_chw(arr)], torch.tensor([box]), 64)[0]
    pil = TF.to_tensor(TF.resized_crop(Image.fromarray(arr), top, left, h, w, [64, 64], T.InterpolationMode.BICUBIC))
    diff = (ours - pil).abs() * 255
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    shifted = resized_crops([to_uint8_chw(arr)], torch.tensor([(top + 8, left, h, w)]), 64)[0]
    assert ((shifted - pil).abs() * 255).mean() > 2  # a crop 8 px off is seen


def test_no_augment_is_the_eval_centre_crop():
    arr = smooth(300, 420, seed=4)
    ours = DeviceAugment(56, augment=False, normalize=False).augment_images([to_uint8_chw(arr)], [123])[0]
    ref = build_transforms(56, train=True, augment=False, normalize=False)(Image.fromarray(arr))
    diff = (ours - ref).abs() * 255
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_batched_colour_ops_match_torchvision(op):
    x = torch.rand(5, 3, 9, 11)
    factors = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    lo, hi = factors[op]
    f = lo + (hi - lo) * torch.rand(5)
    ours = _apply(["brightness", "contrast", "saturation", "hue"].index(op), x.clone(), f)
    fn = getattr(F2, f"adjust_{op}")
    ref = torch.stack([fn(x[i], float(f[i])) for i in range(5)])
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def test_pipeline_matches_a_per_image_reference():
    images = [to_uint8_chw(smooth(20 + 3 * i, 30 - i, seed=i)) for i in range(24)]
    s = seeds(24, 5)
    out = DeviceAugment(12).augment_images(images, s)
    p = augment_params(s, [tuple(im.shape[1:]) for im in images])
    assert p.flip.any() and p.jitter.any() and p.gray.any() and (~p.gray).any()
    ops = [F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation, F2.adjust_hue]
    for i, img in enumerate(images):
        ref = resized_crops([img], p.boxes[i : i + 1], 12)[0]
        if p.flip[i]:
            ref = ref.flip(-1)
        if p.jitter[i]:
            for op in p.order[i].tolist():
                ref = ops[op](ref, float(p.factors[i, op]))
        if p.gray[i]:
            ref = F2.rgb_to_grayscale(ref, num_output_channels=3)
        ref = TF.normalize(ref, IMAGENET_MEAN, IMAGENET_STD)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=5e-5, msg=f"image {i}")


# --------------------------------------------------------------------------- determinism and resume


def test_same_seed_same_image_whatever_the_batch():
    images = [to_uint8_chw(smooth(30, 40, seed=i)) for i in range(6)]
    s = seeds(6, 9)
    aug = DeviceAugment(16)
    full = aug.augment_images(images, s)
    assert torch.equal(full, aug.augment_images(images, s))
    torch.testing.assert_close(aug.augment_images(images[2:5], s[2:5]), full[2:5], rtol=0, atol=0)
    other = aug.augment_images(images, seeds(6, 10))
    assert all(not torch.equal(full[i], other[i]) for i in range(6))


def test_loader_resumes_mid_epoch_and_matches_with_workers_and_prefetch(tmp_path):
    write_folder(tmp_path, 12, classes=3)
    ds = ImageFolderDataset(tmp_path)

    def epoch(start_batch=0, **kw):
        loader = build_device_loader(ds, 4, "cpu", img_size=16, seed=3, shuffle=True, drop_last=True, **kw)
        set_loader_epoch(loader, 1, start_batch=start_batch)
        return [(x.clone(), y.clone()) for x, y in loader]

    full = epoch(num_workers=0, prefetch=0)
    assert len(full) == 3 and full[0][0].shape == (4, 3, 16, 16)
    for batches in (epoch(1, num_workers=0, prefetch=0), epoch(1, num_workers=1, prefetch=1)):
        assert len(batches) == 2
        for (x, y), (fx, fy) in zip(batches, full[1:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)


def test_prefetch_thread_raises_the_loaders_error_and_stops():
    class Failing:
        sampler, batch_size, generator, dataset = None, 2, None, None

        def __len__(self):
            return 3

        def __iter__(self):
            data = torch.frombuffer(bytearray(encode(smooth(10, 12))), dtype=torch.uint8)
            yield collate_encoded([(data, 0, 1, 0), (data, 1, 2, 1)])
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal")

    threads = threading.active_count()
    loader = DeviceBatchLoader(Failing(), DeviceAugment(8), prefetch=1)
    it = iter(loader)
    x, y = next(it)
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        next(it)
    assert threading.active_count() == threads
    it = iter(loader)  # stopping early (max steps) joins the thread too
    next(it)
    it.close()
    assert threading.active_count() == threads


# --------------------------------------------------------------------------- decoding


def test_non_jpeg_files_decode_on_the_cpu_and_through_pil(tmp_path):
    rgb = smooth(14, 18, seed=1)
    wide = (np.arange(14 * 18, dtype=np.uint16).reshape(14, 18) * 200).astype(np.uint16)
    folder = tmp_path / "c0"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(rgb, "PNG"))  # torchvision's decode_image
    (folder / "b.bmp").write_bytes(encode(rgb, "BMP"))  # torchvision cannot: PIL
    (folder / "c.png").write_bytes(encode(wide, "PNG"))  # 16-bit: PIL, scaled to 8 bits like the folder does
    ds = ImageFolderDataset(tmp_path)
    enc = EncodedImages(ds)
    batch, labels = collate_encoded([enc[i] for i in range(3)])
    decoded = DeviceAugment(8, fallback=enc.fallback).decode(batch, labels)
    assert torch.equal(decoded[0], to_uint8_chw(rgb)) and torch.equal(decoded[1], to_uint8_chw(rgb))
    from leap.data.datasets import open_image

    assert torch.equal(decoded[2], TF.pil_to_tensor(open_image(folder / "c.png")))
    assert ds.decode_failures == 0


def test_undecodable_files_are_skipped_and_counted_like_the_image_folder(tmp_path, caplog):
    paths = write_folder(tmp_path, 6, classes=2)  # c0: 000 002 004; c1: 001 003 005
    bad_jpeg, bad_png = paths[1], paths[3]  # c0/002.jpg, c1/001.jpg
    with open(bad_jpeg, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    with open(bad_png, "wb") as f:
        f.write(b"\x89PNG garbage")
    ds = ImageFolderDataset(tmp_path)
    enc = EncodedImages(ds)
    batch, labels = collate_encoded([enc[i] for i in range(6)])
    aug = DeviceAugment(8, normalize=False, fallback=enc.fallback)
    with caplog.at_level("WARNING", logger="leap.data"):
        images = aug.decode(batch, labels.clone())
        x, out_labels = aug(batch, labels)
    assert x.shape == (6, 3, 8, 8)
    assert ds.decode_failures == 2 and sorted(ds.failed_paths()) == sorted([bad_jpeg, bad_png])
    assert sum("skipping undecodable image" in r.message for r in caplog.records) == 2  # logged once each
    # The PIL path's rule: the next index that decodes stands in, with its label.
    pil = ImageFolderDataset(tmp_path, transform=TF.pil_to_tensor)
    for i in range(6):
        ref, label = pil[i]
        assert int(out_labels[i]) == label and images[i].shape == ref.shape
        assert (images[i].float() - ref.float()).abs().mean() < 3  # libjpeg-turbo vs PIL: a few levels
    with pytest.raises(DataError, match="item 1"):
        DeviceAugment(8).decode(batch, labels.clone())


def test_sources_without_files_are_refused():
    with pytest.raises(ConfigError, match="--data-pipeline device.*SyntheticDataset.*--data-pipeline cpu"):
        EncodedImages(SyntheticDataset(4, 8))


# --------------------------------------------------------------------------- the trainer


def test_distill_runs_with_the_device_pipeline(tmp_path, capsys, monkeypatch):
    from leap.cli import main

    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")
    write_folder(tmp_path / "data", 8, classes=2, size=(36, 44))
    out = tmp_path / "run"
    tiny = ["--teacher", "vit_small_patch14_dinov2", "--teacher-overrides"]
    tiny += ['{"depth": 2, "embed_dim": 24, "num_heads": 2, "patch_size": 7}', "--student", "vit_small_patch14_dinov2"]
    tiny += ["--student-overrides", '{"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 7}']
    argv = ["distill", *tiny, "--img-size", "28", "--batch-size", "4", "--workers", "0", "--no-progress"]
    argv += ["--data", str(tmp_path / "data"), "--data-pipeline", "device", "--max-steps", "2", "--out", str(out)]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps if r["type"] == "step")
    assert json.loads((out / "summary.json").read_text())["config"]["data_pipeline"] == "device"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_the_cpu_path(tmp_path):
    write_folder(tmp_path, 8)
    enc = EncodedImages(ImageFolderDataset(tmp_path))
    batch, labels = collate_encoded([enc[i] for i in range(8)])
    cpu, _ = DeviceAugment(32, normalize=False)(batch, labels)
    cuda, _ = DeviceAugment(32, "cuda", normalize=False)(batch, labels)
    assert cuda.is_cuda and ((cuda.cpu() - cpu).abs() * 255).mean() < 3  # nvjpeg and float resampling
    loader = build_device_loader(ImageFolderDataset(tmp_path), 4, "cuda", img_size=32, num_workers=0, seed=0)
    set_loader_epoch(loader, 0)
    assert [x.shape for x, _ in loader] == [(4, 3, 32, 32)] * 2
