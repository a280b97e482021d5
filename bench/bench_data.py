"""Benchmark: the image pipeline's throughput per worker, and whether a LEAP step would wait for it.

A LEAP step that runs only 10 teacher blocks is about 3x shorter than a full-depth step, so the data
pipeline can become the bottleneck and eat the wall-clock saving. This measures, in one process (what
one DataLoader worker does), images per second of the trainer's own pipeline
(:class:`leap.data.ImageFolderDataset` with :func:`leap.data.build_transforms`, DINO-style augmentation)
on JPEG files written here (photo-like content, ImageNet-like sizes, quality 90):

  decode       open + decode + RGB convert (PIL), the image folder's own loader
  augment      the training transform alone on decoded images (RandomResizedCrop bicubic, flip,
               colour jitter, grayscale, ToTensor, Normalize)
  total        both, as a worker runs them (dataset[i])

and the images per second a step needs at batch 128 from the measured H200 step times in
../shared/ANCHORS.md (stock timm, eager and torch.compile, k = 10 and 40) and the project's targets,
against ``--workers`` workers at the measured rate (workers scale about linearly while they have cores).

    python bench/bench_data.py                        # 256 images, 224 px, writes bench/results/data-<cpu>.csv
    python bench/bench_data.py --images 64 --smoke    # a quick check
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

#: Step times (ms, batch 128, bf16, one H200) of ../shared/ANCHORS.md: stock timm + PyTorch and the targets.
STEP_MS = {
    ("k=10", "stock eager"): 84.4,
    ("k=10", "stock compiled"): 62.3,
    ("k=40", "stock eager"): 220.8,
    ("k=40", "stock compiled"): 181.3,
    ("k=40", "target"): 140.0,
}
BATCH = 128


def write_jpegs(folder: str, count: int, seed: int = 0) -> list[str]:
    """``count`` photo-like JPEGs (smooth colour fields, edges and noise; 500 x 375 and 375 x 500,
    like ImageNet's common sizes) under ``folder/class0``; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    paths = []
    for i in range(count):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., c] = 128 + 90 * np.sin(fx * xx + fy * yy + phase)
        img[(xx // rng.integers(40, 120) + yy // rng.integers(40, 120)) % 2 == 0] *= 0.7  # edges
        img += rng.normal(0, 12, img.shape)  # texture
        path = os.path.join(folder, "class0", f"{i:05d}.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(fn, count: int, repeats: int) -> tuple[float, float]:
    """(median, min) images/s of ``fn(i)`` over ``count`` items, ``repeats`` passes (the first is warm-up)."""
    rates = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for i in range(count):
            fn(i)
        if r:
            rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates), min(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16, help="DataLoader workers of the GPU machine (default 16)")
    parser.add_argument("--smoke", action="store_true", help="few images, one pass")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/data-<cpu>.csv)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.repeats = min(args.images, 16), 1

    from leap.data import ImageFolderDataset, build_transforms
    from leap.data.datasets import open_image

    torch.set_num_threads(1)  # one worker = one core; torchvision's tensor ops would otherwise use more
    transform = build_transforms(args.img_size, train=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, args.images)
        dataset = ImageFolderDataset(folder, transform=transform)
        decoded = [open_image(p) for p in paths]
        measured = {
            "decode": images_per_second(lambda i: open_image(paths[i]), args.images, args.repeats),
            "augment": images_per_second(lambda i: transform(decoded[i]), args.images, args.repeats),
            "total": images_per_second(lambda i: dataset[i], args.images, args.repeats),
        }
    env = harness.environment()
    cpu = harness.cpu_name()
    print(f"cpu: {cpu} | torch {env['torch']} | one worker (1 thread), {args.images} JPEGs ~500x375 q90")
    print("| stage | images/s per worker (median) | min | ms per image |")
    print("|---|---|---|---|")
    for stage, (median, low) in measured.items():
        print(f"| {stage} | {median:.1f} | {low:.1f} | {1e3 / median:.2f} |")
        rows.append({"stage": stage, "images_per_s": f"{median:.2f}", "min_images_per_s": f"{low:.2f}"})
    per_worker = measured["total"][0]
    supply = per_worker * args.workers
    print(f"\nneeded at batch {BATCH} (H200 step times of ../shared/ANCHORS.md) vs {args.workers} workers:")
    print(
        f"| step | step ms | images/s needed | workers needed at {per_worker:.0f}/s | data-bound with {args.workers}? |"
    )
    print("|---|---|---|---|---|")
    for (k, variant), ms in STEP_MS.items():
        need = BATCH / (ms * 1e-3)
        bound = "yes" if need > supply else "no"
        print(f"| {k}, {variant} | {ms:.1f} | {need:.0f} | {need / per_worker:.1f} | {bound} |")
        rows.append({"stage": f"need {k} {variant}", "images_per_s": f"{need:.2f}", "min_images_per_s": ""})
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"data-{harness.device_slug(cpu)}.csv"
    )
    if not args.smoke:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=["date", "device", "torch", "stage", "images_per_s", "min_images_per_s"]
            )
            writer.writeheader()
            for row in rows:
                writer.writerow({"date": env["date"], "device": cpu, "torch": env["torch"], **row})
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
