"""Benchmark: what ``leap distill``'s step costs against the loop a user would write for the same work.

The point of LEAP is time saved, so the trainer must not spend it itself. Both sides train the same
models with the same loss, optimizer, clipping, batch and data:

- teacher and student: timm ViTs (``--size small``: teacher 8 blocks x 128 wide, patch 7, 28 px;
  student 4 x 64; ``--size vitg``: ViT-g/14 reg4 -> ViT-S/14 at 224 px, bf16, CUDA only);
- loss: MSE of the projected patch tokens + 0.05 x MSE of the projected CLS token (one shared
  ``Linear(D_s -> D_t)``), AdamW, gradient clipping at 1.0;
- data: leap's own synthetic images through a DataLoader (no augmentation, no mixup).

Cases:

- ``baseline``: ``leap distill --curriculum off`` (the teacher's last block) against the plain loop
  with timm's ``forward_features``;
- ``leap-k``: LEAP held at teacher block k (``--start-block k``, a threshold it never reaches), its CKA
  included, against the plain loop that runs blocks ``1..k`` + the final norm and computes the same
  linear CKA each step.

leap's step time is the trainer's own per-step wall time (the loop's ``images_per_s`` in ``log.jsonl``:
data loading, step, logging, from one step's end to the next); the plain loop is timed the same way. On
a GPU a step between the trainer's read points shows only the time to queue it and a read point the wait
for the device, so the table's main column is the mean over the timed steps (their sum is the wall
time), with the median beside it. The two run interleaved, in rounds (``--rounds``; which side runs first
alternates, each after a full garbage collection), first steps of each round dropped as warm-up. The
synthetic source's cost per image (the same for both) is printed too.

    python bench/trainer_overhead.py                 # CPU, small models
    python bench/trainer_overhead.py --smoke         # a few steps (harness check; make bench-smoke)
    python bench/trainer_overhead.py --size vitg     # CUDA: the paper's models, bf16, batch 128
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SIZES = {
    "small": dict(
        teacher="vit_small_patch14_dinov2",
        teacher_overrides={"patch_size": 7, "depth": 8, "embed_dim": 128, "num_heads": 2},
        student="vit_small_patch14_dinov2",
        student_overrides={"patch_size": 7, "depth": 4, "embed_dim": 64, "num_heads": 2},
        img_size=28,
        batch=128,
        ks=(4,),
    ),
    "vitg": dict(
        teacher="vit_giant_patch14_reg4_dinov2",
        teacher_overrides={},
        student="vit_small_patch14_dinov2",
        student_overrides={},
        img_size=224,
        batch=128,
        ks=(10, 40),
    ),
}


def leap_config(spec: dict, out: str, steps: int, k: int | None, device: str) -> dict:
    """The ``leap distill`` settings of one timed run (``k``: LEAP held at block k; None: the baseline)."""
    cfg = dict(
        teacher=spec["teacher"],
        teacher_overrides=spec["teacher_overrides"],
        student=spec["student"],
        student_overrides=spec["student_overrides"],
        img_size=spec["img_size"],
        data_source="synthetic",
        synthetic_size=spec["batch"] * (steps + 1),
        augment=False,
        mixup=False,
        workers=0,
        batch_size=spec["batch"],
        max_steps=steps,
        epochs=1,
        optimizer="adamw",
        clip_grad=1.0,
        warmup_epochs=0.0,
        cls_weight=0.05,
        out=out,
        progress=False,
        device=device,
        ckpt_every=0,
    )
    if k is None:
        cfg.update(curriculum="off")
    else:
        cfg.update(curriculum="cka", start_block=k, tau=1.5, max_epochs_per_block=1000)  # held at block k
    return cfg


def run_leap(spec: dict, steps: int, k: int | None, device: str) -> list[float]:
    """Seconds per step of ``leap distill`` (its own loop timing, from ``log.jsonl``)."""
    from leap.run.loop import train

    with tempfile.TemporaryDirectory() as out:
        train(leap_config(spec, out, steps, k, device))
        with open(os.path.join(out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return [spec["batch"] / r["images_per_s"] for r in records if r.get("type") == "step" and r.get("images_per_s")]


def run_plain(spec: dict, steps: int, k: int | None, device: str) -> list[float]:
    """Seconds per step of the loop a user would write with timm and PyTorch for the same work."""
    from leap.cka import linear_cka
    from leap.data import build_dataset
    from leap.models import build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    teacher = build_model(spec["teacher"], spec["img_size"], **spec["teacher_overrides"]).to(dev).eval()
    teacher.requires_grad_(False)
    student = build_model(spec["student"], spec["img_size"], **spec["student_overrides"]).to(dev)
    head = torch.nn.Linear(student.embed_dim, teacher.embed_dim).to(dev)
    params = list(student.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    dataset = build_dataset("synthetic", None, "train", spec["img_size"], augment=False,
                            num_images=spec["batch"] * (steps + 1), seed=0)  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch"], shuffle=True, drop_last=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    teacher_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # as leap's teacher: bf16 weights on a GPU
    teacher.to(teacher_dtype)
    n_prefix = teacher.num_prefix_tokens

    def teacher_tokens(images: torch.Tensor) -> torch.Tensor:
        if k is None:
            return teacher.forward_features(images)
        x = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(images)))
        for block in teacher.blocks[:k]:
            x = block(x)
        return teacher.norm(x)

    times = []
    t_last = time.perf_counter()
    for step, (images, _labels) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(dev, non_blocking=True)
        with torch.no_grad():
            t = teacher_tokens(images.to(teacher_dtype))
        t_patch, t_cls = t[:, n_prefix:].float(), t[:, 0].float()
        with amp:
            s = student.forward_features(images)
        s_patch, s_cls = head(s[:, student.num_prefix_tokens :].float()), head(s[:, 0].float())
        loss = F.mse_loss(s_patch, t_patch) + 0.05 * F.mse_loss(s_cls, t_cls)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if k is not None:  # the CKA of the projected student to the target, as LEAP computes it each step
            with torch.no_grad():
                cka = linear_cka(s_patch.detach().flatten(0, 1), t_patch.flatten(0, 1))
            cka.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            loss.item()  # a user's loop reads its loss now and then (a log line)
        if dev.type == "cuda" and step + 1 == steps:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - t_last)
        t_last = now
    return times


def synthetic_ms_per_image(spec: dict, count: int = 512) -> float:
    """Milliseconds per image of leap's synthetic source with its per-item seed (as the loader calls it)."""
    from leap.data import build_dataset
    from leap.data.loaders import SeededIndex

    dataset = build_dataset("synthetic", None, "train", spec["img_size"], augment=False, num_images=count, seed=0)
    items = [SeededIndex(i, 7919 * i + 1) for i in range(count)]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for item in items:
            dataset[item]
        best = min(best, (time.perf_counter() - t0) / count * 1e3)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=12, help="steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="3 steps, 1 round, a smaller batch")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/trainer-overhead-<device>.csv)")
    args = parser.parse_args(argv)
    spec = dict(SIZES[args.size])
    if args.smoke:
        args.steps, args.rounds, args.warmup = 3, 1, 1
        spec["batch"] = 16
    if args.size == "vitg" and not args.device.startswith("cuda"):
        parser.error("--size vitg needs a CUDA device")
    cases = [("baseline", None)] + [(f"leap-k{k}", k) for k in spec["ks"]]
    timed: dict[tuple[str, str], list[float]] = {}
    sides = [("leap", run_leap), ("plain", run_plain)]
    for round_index in range(args.rounds):
        for name, k in cases:
            # Sides alternate which runs first, and each starts after a full garbage collection: the
            # previous run's models are not collected during this one's timed steps.
            for side, fn in sides if round_index % 2 == 0 else sides[::-1]:
                gc.collect()
                times = fn(spec, args.steps + args.warmup, k, args.device)[args.warmup :]
                timed.setdefault((name, side), []).extend(times)
    env = harness.environment()
    device = harness.device_class(args.device)
    print(f"device: {device} | torch {env['torch']} | size {args.size}, batch {spec['batch']}")
    print(f"synthetic images: {synthetic_ms_per_image(spec):.3f} ms per image (one worker, the same for both sides)")
    print("| case | leap ms/step (mean / median) | plain loop ms/step (mean / median) | leap / plain (mean) |")
    print("|---|---|---|---|")
    rows = []
    for name, _ in cases:
        leap_t, plain_t = timed[(name, "leap")], timed[(name, "plain")]
        lm, pm = statistics.fmean(leap_t) * 1e3, statistics.fmean(plain_t) * 1e3
        lmed, pmed = statistics.median(leap_t) * 1e3, statistics.median(plain_t) * 1e3
        print(f"| {name} | {lm:.1f} / {lmed:.1f} | {pm:.1f} / {pmed:.1f} | {lm / pm:.3f} |")
        rows.append((name, lm, lmed, pm, pmed, lm / pm, len(leap_t)))
    if not args.smoke:
        out = args.out or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", f"trainer-overhead-{device}.csv"
        )
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("date,device,torch,git_sha,size,batch,case,leap_mean_ms,leap_median_ms,plain_mean_ms,"
                    "plain_median_ms,ratio_mean,steps\n")  # fmt: skip
            for name, lm, lmed, pm, pmed, ratio, n in rows:
                f.write(f"{env['date']},{device},{env['torch']},{env['git_sha']},{args.size},{spec['batch']},{name},"
                        f"{lm:.2f},{lmed:.2f},{pm:.2f},{pmed:.2f},{ratio:.4f},{n}\n")  # fmt: skip
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
