"""Wall-clock time of one LEAP training step per target block, and the realized time saving
of a trajectory (``leap flops --measure``).

The step timed is the trainer's own: :class:`leap.objective.DistillModule` (student + head +
fused loss), the truncated teacher, the per-step CKA and an optimizer step. The analytic
counterpart is :mod:`leap.cost`; the measured saving is lower, because data loading, the
optimizer and kernel overheads do not shrink with ``k``.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from leap_kernels import FeatureDistillationHead

from ..cka import linear_cka
from ..cost import pair
from ..objective import DistillModule
from ..precision import DTYPES, auto_precision
from ..runlog import Trajectory
from ..teacher import TruncatedTeacher
from ..vit import unwrap_vit

__all__ = ["measure_step_times", "wall_clock_savings"]


def measure_step_times(
    teacher: nn.Module,
    student: nn.Module,
    ks: Iterable[int],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    warmup: int = 2,
    repeats: int = 5,
    cls_weight: float = 0.05,
    include_cka: bool = True,
    normalize: bool = False,
) -> dict[int, float]:
    """Time one LEAP training step per distinct target block ``k``.

    One step: teacher forward to block ``k`` (no grad), student forward (autocast to
    ``dtype`` when it is bf16/fp16) + ``leap_kernels.fused_feature_loss`` on patch tokens
    ``+ cls_weight *`` on CLS through one ``Linear(D_s -> D_t)`` head, backward, an AdamW
    step, and (``include_cka``) the per-step CKA on the re-projected student.

    Args:
        teacher: :class:`leap.teacher.TruncatedTeacher`, or a timm ViT that is wrapped in one
            (which casts it to ``dtype``, freezes it and puts it in eval mode **in place**).
            It is moved to ``device``.
        student: timm ViT; a deep copy is trained, the original is left untouched.
        ks: target blocks to time (duplicates are timed once).
        batch_size: images per step (random inputs at the teacher's image size).
        device: e.g. ``"cuda"`` or ``"cpu"``.
        dtype: teacher dtype and student autocast dtype (default bf16 on CUDA, fp32 on CPU).
        warmup, repeats: untimed steps per ``k``, then timed steps (median reported); the
            timed steps run in interleaved rounds over all ``k``.
        cls_weight: weight of the CLS loss term (paper: 0.05).
        include_cka: also compute the per-step CKA (as LEAP does).
        normalize: token-normalized MSE instead of the paper's plain MSE.

    Returns:
        ``{k: seconds per step}`` (median of ``repeats``); CUDA events on GPU,
        ``time.perf_counter`` on CPU.
    """
    device = torch.device(device)
    dtype = dtype or DTYPES[auto_precision(device)]
    if not isinstance(teacher, TruncatedTeacher):
        teacher = TruncatedTeacher(unwrap_vit(teacher).to(device), dtype=dtype)
    teacher = teacher.to(device)
    ks = sorted({int(k) for k in ks})
    for k in ks:
        teacher._check_k(k)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")

    use_amp = dtype in (torch.bfloat16, torch.float16)
    s_model = copy.deepcopy(unwrap_vit(student))
    head = FeatureDistillationHead(int(s_model.embed_dim), teacher.embed_dim, normalize=normalize)
    # The trainer's own student + head + loss composition (patch loss + cls_weight * CLS loss).
    module = DistillModule(s_model, head, cls_weight, compute_dtype=dtype if use_amp else None).to(device).train()
    opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6, **opt_kwargs)
    h, w = pair(teacher.model.patch_embed.img_size)
    x = torch.randn(batch_size, 3, h, w, device=device)

    def step(k: int) -> None:
        t_patch, t_cls = teacher(x, k)
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss, _, _, s_patch = module(x, t_patch, t_cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if include_cka:
            with torch.no_grad():
                linear_cka(module.head.project(s_patch), t_patch)
        opt.step()

    cuda = device.type == "cuda"

    def timed(k: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            step(k)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        step(k)
        return time.perf_counter() - t0

    # Warm up every k first, then time in interleaved rounds so slow drift (clocks, other
    # load) affects all blocks alike.
    for k in ks:
        for _ in range(warmup):
            step(k)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            samples[k].append(timed(k))
    times = {k: statistics.median(v) for k, v in samples.items()}
    return times


def _interp_time(k: float, step_times: Mapping[int, float]) -> float:
    """Step time at ``k``: the measured one, else linear interpolation between measured
    neighbours, else a least-squares line through all points (teacher cost is linear in k)."""
    pts = sorted((float(a), float(b)) for a, b in step_times.items())
    for a, b in pts:
        if a == k:
            return b
    if len(pts) < 2:
        raise ValueError(f"step time for k={k} not measured and cannot be interpolated from one point")
    for (a0, b0), (a1, b1) in zip(pts, pts[1:]):
        if a0 < k < a1:
            return b0 + (b1 - b0) * (k - a0) / (a1 - a0)
    n = len(pts)
    mx, my = sum(a for a, _ in pts) / n, sum(b for _, b in pts) / n
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    slope = sum((a - mx) * (b - my) for a, b in pts) / sxx
    return my + slope * (k - mx)


def wall_clock_savings(
    trajectory: Any,
    step_times: Mapping[int, float],
    num_blocks: int | None = None,
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Realized time saving of a trajectory vs. every step at the last block.

    Args:
        trajectory: target block per epoch or per step (as for :func:`savings`).
        step_times: ``{k: seconds per step}`` from :func:`measure_step_times`. Blocks of the
            trajectory that were not measured are interpolated linearly.
        num_blocks: L (default: the largest measured ``k``).
        weights: optional weight per trajectory entry.

    Returns:
        dict with ``num_blocks``, ``mean_step_time_s`` (weighted mean over the trajectory),
        ``baseline_step_time_s`` (time at L), ``saving = 1 - mean/baseline``, and
        ``interpolated`` (blocks whose time was interpolated).
    """
    if not step_times:
        raise ValueError("wall_clock_savings: step_times is empty")
    traj = Trajectory.of(trajectory, weights)
    L = int(num_blocks if num_blocks is not None else max(step_times))
    w = traj.weights or [1.0] * len(traj.blocks)
    cache: dict[float, float] = {}
    for b in set(traj.blocks) | {float(L)}:
        cache[b] = _interp_time(b, step_times)
    mean_t = math.fsum(cache[b] * wi for b, wi in zip(traj.blocks, w)) / math.fsum(w)
    base = cache[float(L)]
    measured = {float(k) for k in step_times}
    return {
        "num_blocks": L,
        "mean_block": traj.mean(),
        "mean_step_time_s": mean_t,
        "baseline_step_time_s": base,
        "saving": 1.0 - mean_t / base,
        "interpolated": sorted(b for b in cache if b not in measured),
    }
