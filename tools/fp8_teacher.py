"""FP8 teacher: how far the block-k targets move, and (on a GPU) how much faster the teacher runs.

For a teacher and a batch of real images, per block k (1-indexed) the LEAP target (patch tokens
after block k and the teacher's final norm) of three teachers built from the same weights:

  fp32   linears and everything else in fp32 (the reference)
  bf16   ``--teacher-dtype bf16`` (the default of bf16 runs)
  fp8    bf16 teacher with ``--teacher-precision fp8`` (block linears in e4m3, per-row scales)

and, for fp8 vs bf16, bf16 vs fp32 and fp8 vs fp32: the relative error ||a - b|| / ||b|| of the
tokens and the linear CKA between them (float64), so FP8's error reads next to bf16's.

On a CUDA GPU it also times the truncated teacher (forward up to block k) in bf16 and fp8
(``torch._scaled_mm`` where the GPU has FP8 tensor cores; the emulated path, which is slower,
elsewhere: the table says which). Without a GPU the timing columns read "not measured".

    python tools/fp8_teacher.py                                   # the bundled demo teacher
    python tools/fp8_teacher.py --teacher-weights FILE            # a train-teacher checkpoint
    python tools/fp8_teacher.py --model vit_giant_patch14_reg4_dinov2 --images 2   # random init

Images: the Fashion-MNIST test images of the sample committed under tests/data (``--data`` names
another folder of idx files; ``--random-images`` uses Gaussian noise instead), resized to the
teacher's input size. Nothing is read from a system dataset, so the check runs on any machine.
A random-init model (``--model``) keeps timm's init: DINOv2's LayerScale
starts at 1e-5, so its blocks barely change the tokens; ``--unit-init`` sets LayerScale to 1 and
the linear weights to N(0, 1/fan_in) so every block matters (a harder, synthetic case).

A ``--model`` is built directly on the device (a ViT-g does not go through the CPU first).

Writes bench/results/fp8_teacher-<device>.csv (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import harness  # noqa: E402

from leap.apps.demo import DEFAULT_TEACHER  # noqa: E402
from leap.apps.pretrain import read_teacher_meta  # noqa: E402
from leap.cka import linear_cka_reference  # noqa: E402
from leap.models import build_model, load_teacher_weights  # noqa: E402
from leap.teacher import TruncatedTeacher  # noqa: E402
from leap_kernels.ops.fp8_linear import describe_paths  # noqa: E402

NOT_MEASURED = "not measured"
#: The Fashion-MNIST sample committed with the tests (idx files, a few hundred images per split).
SAMPLE_DATA = os.path.join(ROOT, "tests", "data", "fashion-mnist-sample")
PAIRS = (("fp8", "bf16"), ("bf16", "fp32"), ("fp8", "fp32"))


def build_teacher_model(args, device: torch.device) -> tuple[nn.Module, int, str]:
    """``(model with weights, img_size, description)`` from ``--model`` (random init, built on
    ``device``) or ``--teacher-weights``."""
    if args.model:
        img = args.img_size or 224
        with device:
            model = build_model(args.model, img_size=img)
        desc = f"{args.model} (random init{', unit' if args.unit_init else ''}) at {img} px"
        if args.unit_init:
            with torch.no_grad():
                for mod in model.modules():
                    if isinstance(mod, nn.Linear):
                        mod.weight.normal_(std=mod.in_features**-0.5)
                    if hasattr(mod, "gamma"):
                        mod.gamma.fill_(1.0)
        return model, img, desc
    meta = read_teacher_meta(args.teacher_weights)
    if meta is None:
        raise SystemExit(f"{args.teacher_weights}: no train-teacher recipe inside; pass --model NAME for a timm model")
    img = args.img_size or int(meta["img_size"])
    model = build_model(meta["model"], img_size=img, **meta.get("model_overrides", {}))
    load_teacher_weights(model, args.teacher_weights)
    name = os.path.basename(args.teacher_weights)
    return model, img, f"{name} ({meta['model']} {meta.get('model_overrides', {})}) at {img} px"


def load_images(args, img_size: int) -> tuple[torch.Tensor, str]:
    """``(images (n, 3, img_size, img_size), description)``."""
    if args.random_images:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(args.images, 3, img_size, img_size, generator=gen), "random (Gaussian) images"
    from leap.data import build_dataset

    root = args.data or SAMPLE_DATA
    ds = build_dataset("fashion-mnist", root, "test", img_size, augment=False)
    n = min(args.images, len(ds))
    return torch.stack([ds[i][0] for i in range(n)]), f"Fashion-MNIST test images from {root}"


def block_targets(teacher: TruncatedTeacher, images: torch.Tensor, batch: int) -> torch.Tensor:
    """``(L, B, N, D)`` float32 patch targets of every block, computed ``batch`` images at a time."""
    blocks = list(range(1, teacher.num_blocks + 1))
    parts = []
    for chunk in images.split(batch):
        patch, _ = teacher.collect(chunk, blocks)
        parts.append(patch.float().cpu())
    return torch.cat(parts, dim=1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def time_teacher(teacher: TruncatedTeacher, images: torch.Tensor, k: int, iters: int, warmup: int) -> float:
    """Median ms of ``teacher(images, k)`` (CUDA events)."""
    for _ in range(warmup):
        teacher(images, k)
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        teacher(images, k)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher-weights",
        default=DEFAULT_TEACHER,
        help="train-teacher checkpoint (default: the demo teacher bundled with leap)",
    )
    p.add_argument(
        "--model", default=None, help="a timm model name instead, random init (e.g. vit_giant_patch14_reg4_dinov2)"
    )
    p.add_argument(
        "--unit-init",
        action="store_true",
        help="with --model: LayerScale 1 and N(0, 1/fan_in) linear weights, so every block changes the tokens",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's, 224 for --model)")
    p.add_argument(
        "--data",
        default=None,
        help="folder with the Fashion-MNIST idx files (default: the sample committed under tests/data)",
    )
    p.add_argument("--random-images", action="store_true", help="Gaussian-noise images instead of Fashion-MNIST")
    p.add_argument("--images", type=int, default=256, help="images compared (default 256)")
    p.add_argument("--batch", type=int, default=64, help="images per teacher forward (default 64)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--time-batch", type=int, default=None, help="GPU timing batch (default: --batch)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per variant and k on a GPU (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/fp8_teacher-<device>.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)

    model, img_size, desc = build_teacher_model(args, device)
    images, images_desc = load_images(args, img_size)
    images = images.to(device)
    # Copies for the smaller teachers first, the original last: one fp32 copy at a time (ViT-g).
    teachers = {
        "fp8": TruncatedTeacher(copy.deepcopy(model).to(device), dtype=torch.bfloat16, precision="fp8"),
        "bf16": TruncatedTeacher(copy.deepcopy(model).to(device), dtype=torch.bfloat16),
        "fp32": TruncatedTeacher(model.to(device), dtype=torch.float32),
    }
    del model
    counts, reasons = describe_paths(teachers["fp8"].model, device)
    fp8_path = (
        "torch._scaled_mm"
        if not counts["emulated"]
        else ("emulated" if not counts["scaled_mm"] else f"mixed ({counts['emulated']} layers emulated)")
    )
    env = harness.environment()
    print(f"teacher: {desc}, {teachers['fp32'].num_blocks} blocks, {images.shape[0]} {images_desc}")
    print(f"device: {env['device']}; fp8 path: {fp8_path}" + (f" ({'; '.join(reasons)})" if reasons else ""))

    t0 = time.perf_counter()
    targets = {name: block_targets(t, images, args.batch) for name, t in teachers.items()}
    accuracy_s = time.perf_counter() - t0

    num_blocks = teachers["fp32"].num_blocks
    timed_ks = sorted({max(1, round(num_blocks * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    times: dict[tuple[str, int], float] = {}
    if device.type == "cuda":
        timing_images = images[: args.time_batch or args.batch]
        for k in timed_ks:
            for name in ("bf16", "fp8"):
                times[name, k] = time_teacher(teachers[name], timing_images, k, args.iters, args.warmup)

    rows = []
    for k in range(1, num_blocks + 1):
        row = {"teacher": desc, "images": images.shape[0], "k": k}
        for a, b in PAIRS:
            x, y = targets[a][k - 1], targets[b][k - 1]
            row[f"{a}_vs_{b}_rel_err"] = f"{rel_error(x, y):.4e}"
            row[f"{a}_vs_{b}_cka"] = f"{linear_cka_reference(x, y).item():.6f}"
        for name in ("bf16", "fp8"):
            row[f"{name}_ms"] = f"{times[name, k]:.3f}" if (name, k) in times else NOT_MEASURED
        row["fp8_path"] = fp8_path
        row.update(env)
        rows.append(row)

    cols = ["k", *[f"{a}_vs_{b}_{m}" for a, b in PAIRS for m in ("rel_err", "cka")], "bf16_ms", "fp8_ms"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if device.type != "cuda":
        print(f"\ntiming (bf16 vs fp8 truncated teacher): {NOT_MEASURED} (no CUDA GPU)")
    else:
        for k in timed_ks:
            print(
                f"k={k}: bf16 {times['bf16', k]:.3f} ms, fp8 {times['fp8', k]:.3f} ms, "
                f"speedup {times['bf16', k] / times['fp8', k]:.2f}x (batch {timing_images.shape[0]})"
            )
    print(f"(accuracy pass: {accuracy_s:.1f} s)")

    out = args.out or os.path.join(harness.RESULTS_DIR, f"fp8_teacher-{harness.device_slug(env['device'])}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    bad = [r["k"] for r in rows if not all(math.isfinite(float(r[f"{a}_vs_{b}_rel_err"])) for a, b in PAIRS)]
    if bad:
        print(f"non-finite errors at blocks {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
