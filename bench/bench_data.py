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

and the device path (``--data-pipeline device``, :mod:`leap.data.device_pipeline`), batch by batch
(``--device-batch`` images) on ``--device`` (default: CUDA if there is one, else this CPU with one thread,
i.e. per core):

  read         what its workers do: the file's bytes (per worker)
  dev decode   one batched decode_jpeg (nvjpeg on CUDA, libjpeg-turbo on a CPU)
  dev params   the random parameters and the op plan, on the CPU, from the per-image seeds
  dev augment  the device work: crop-resize, flip, jitter, grayscale, normalization
  dev total    all three, as the training process runs them

timed with CUDA events on CUDA, a host clock on a CPU; plus the number of aten ops the augmentation
dispatches per batch (each a kernel launch on CUDA, where every crop adds one more for its float copy).

Then the images per second a step needs at batch 128 from the measured H200 step times in
../shared/ANCHORS.md (stock timm, eager and torch.compile, k = 10 and 40) and the project's targets,
against ``--workers`` workers at the measured rate (workers scale about linearly while they have cores),
and against the device path's rate where it ran on a GPU ("not measured" on a CPU).

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


class OpCounter:
    """Counts the aten ops (views and allocations excluded: they launch no kernel) run inside ``with``."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not func.is_view and name not in ("empty", "empty_strided", "detach", "lift_fresh"):
                    counter.ops[name] = counter.ops.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.ops: dict[str, int] = {}
        self.mode = _Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def device_path(paths: list[str], folder: str, args) -> tuple[dict[str, tuple[float, float]], dict]:
    """Images/s of the device path's stages on ``args.device`` (median, min over ``args.repeats`` passes of
    batches of ``args.device_batch``) and the op counts of one batch."""
    from leap.data import ImageFolderDataset
    from leap.data.device_pipeline import DeviceAugment, EncodedImages, augment_params, collate_encoded, op_plan

    device = torch.device(args.device)
    encoded = EncodedImages(ImageFolderDataset(folder))
    rates = {"read": images_per_second(lambda i: encoded[i], len(paths), args.repeats)}
    aug = DeviceAugment(args.img_size, device, fallback=encoded.fallback)
    size = min(args.device_batch, len(paths))
    batches = [collate_encoded([encoded[i] for i in range(s, s + size)]) for s in range(0, len(paths) - size + 1, size)]

    def clock(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def stage(name: str, fn) -> None:  # fn(batch, labels, state) for every batch of a pass
        per_pass = []
        for r in range(args.repeats + 1):
            seconds = sum(clock(lambda b=b: fn(*b)) for b in batches)
            if r:
                per_pass.append(size * len(batches) / seconds)
        rates[name] = (statistics.median(per_pass), min(per_pass))

    decoded = {id(b): aug.decode(b, labels.clone()) for b, labels in batches}
    sizes = {id(b): [(int(x.shape[1]), int(x.shape[2])) for x in decoded[id(b)]] for b, _ in batches}
    drawn = {id(b): augment_params(b.seeds, sizes[id(b)]) for b, _ in batches}
    plans = {id(b): (drawn[id(b)].boxes, op_plan(drawn[id(b)])) for b, _ in batches}
    stage("dev decode", lambda b, labels: aug.decode(b, labels.clone()))
    stage("dev params", lambda b, labels: op_plan(augment_params(b.seeds, sizes[id(b)])))
    stage("dev augment", lambda b, labels: aug.apply(decoded[id(b)], *plans[id(b)]))
    stage("dev total", lambda b, labels: aug(b, labels))
    with OpCounter() as count:
        aug.apply(decoded[id(batches[0][0])], *plans[id(batches[0][0])])
    ops = {"batch": size, "augment_ops": count.total, "resample_ops": count.ops.get("_upsample_bicubic2d_aa", 0)}
    ops["cuda_launches"] = count.total + (size if device.type == "cpu" else 0)  # + the crops' float copies
    return rates, ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16, help="DataLoader workers of the GPU machine (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device path's device")
    parser.add_argument("--device-batch", type=int, default=BATCH, help=f"device path's batch (default {BATCH})")
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
        device_rates, ops = device_path(paths, folder, args)
    env = harness.environment()
    cpu = harness.cpu_name()
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else f"{cpu}, 1 thread"
    print(f"cpu: {cpu} | torch {env['torch']} | one worker (1 thread), {args.images} JPEGs ~500x375 q90")
    print(f"device path on {args.device} ({where}), batches of {ops['batch']}")
    print("| stage | images/s (median) | min | ms per image |")
    print("|---|---|---|---|")
    for stage, (median, low) in {**measured, **device_rates}.items():
        print(f"| {stage} | {median:.1f} | {low:.1f} | {1e3 / median:.2f} |")
        rows.append({"stage": stage, "images_per_s": f"{median:.2f}", "min_images_per_s": f"{low:.2f}"})
    print(
        f"\ndevice augmentation of a batch of {ops['batch']}: {ops['augment_ops']} aten ops here "
        f"({ops['resample_ops']} resamples); on CUDA about {ops['cuda_launches']} kernel launches"
    )
    rows.append({"stage": f"ops per batch of {ops['batch']}", "images_per_s": str(ops["cuda_launches"])})
    per_worker = measured["total"][0]
    supply = per_worker * args.workers
    device_rate = device_rates["dev total"][0] if on_gpu else None
    print(f"\nneeded at batch {BATCH} (H200 step times of ../shared/ANCHORS.md) vs {args.workers} workers:")
    print(
        f"| step | step ms | images/s needed | workers needed at {per_worker:.0f}/s | data-bound with {args.workers}? "
        "| device path keeps up? |"
    )
    print("|---|---|---|---|---|---|")
    for (k, variant), ms in STEP_MS.items():
        need = BATCH / (ms * 1e-3)
        bound = "yes" if need > supply else "no"
        device = "not measured (no GPU)" if device_rate is None else ("yes" if device_rate >= need else "no")
        print(f"| {k}, {variant} | {ms:.1f} | {need:.0f} | {need / per_worker:.1f} | {bound} | {device} |")
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
