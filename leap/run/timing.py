"""Wall-clock time of one LEAP training step per target block, the realized time saving
of a trajectory (``leap flops --measure``), and a baseline run's and a LEAP run's steps
replayed interleaved (``leap demo``: a time saving that other jobs' load does not bias).

The step timed is the trainer's own: :class:`leap.objective.DistillModule` (student + head +
fused loss), the truncated teacher, the per-step CKA and an optimizer step. The analytic
counterpart is :mod:`leap.cost`; the measured saving is lower, because data loading, the
optimizer and kernel overheads do not shrink with ``k``.
"""

from __future__ import annotations

import copy
import math
import random
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

__all__ = ["measure_step_times", "replay_blocks", "replay_step_times", "wall_clock_savings"]


class _TrainerStep:
    """One trainer-like step on fixed random inputs, runnable and timeable at any target block.

    Teacher forward to block ``k`` (no grad), student forward (autocast to ``dtype`` when it is
    bf16/fp16) + ``leap_kernels.fused_feature_loss`` on patch tokens ``+ cls_weight *`` on CLS
    through one ``Linear(D_s -> D_t)`` head (:class:`leap.objective.DistillModule`, the trainer's
    own composition), backward, optionally the per-step CKA on the re-projected student, and an
    AdamW step. The head's initial weights and the inputs come from a fixed seed; the caller's
    random state is left as it was. Call :meth:`build` (after checking the other arguments)
    before :meth:`run` or :meth:`time`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        batch_size: int,
        device: str | torch.device,
        dtype: torch.dtype | None,
        cls_weight: float,
        normalize: bool,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        self.dtype = dtype or DTYPES[auto_precision(self.device)]
        if not isinstance(teacher, TruncatedTeacher):
            teacher = TruncatedTeacher(unwrap_vit(teacher).to(self.device), dtype=self.dtype)
        self.teacher = teacher.to(self.device)
        self.student = unwrap_vit(student)
        self.batch_size = int(batch_size)
        self.cls_weight, self.normalize = cls_weight, normalize

    def build(self) -> None:
        """Allocate the student copy, head, optimizer and inputs."""
        device, dtype, teacher = self.device, self.dtype, self.teacher
        self.use_amp = dtype in (torch.bfloat16, torch.float16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            s_model = copy.deepcopy(self.student)
            head = FeatureDistillationHead(int(s_model.embed_dim), teacher.embed_dim, normalize=self.normalize)
            h, w = pair(teacher.model.patch_embed.img_size)
            x = torch.randn(self.batch_size, 3, h, w)
        module = DistillModule(s_model, head, self.cls_weight, compute_dtype=dtype if self.use_amp else None)
        self.module = module.to(device).train()
        opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-6, **opt_kwargs)
        self.x = x.to(device)

    def run(self, k: int, include_cka: bool) -> None:
        """One step with the teacher truncated after block ``k``."""
        t_patch, t_cls = self.teacher(self.x, k)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.use_amp):
            loss, _, _, s_patch = self.module(self.x, t_patch, t_cls)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if include_cka:
            with torch.no_grad():
                linear_cka(self.module.head.project(s_patch), t_patch)
        self.opt.step()

    def time(self, k: int, include_cka: bool) -> float:
        """Seconds of one :meth:`run`: CUDA events on GPU, ``time.perf_counter`` on CPU."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            self.run(k, include_cka)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        self.run(k, include_cka)
        return time.perf_counter() - t0


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
        batch_size: images per step (random inputs at the teacher's image size, fixed seed).
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
    rig = _TrainerStep(teacher, student, batch_size, device, dtype, cls_weight, normalize)
    ks = sorted({int(k) for k in ks})
    for k in ks:
        rig.teacher._check_k(k)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    rig.build()

    # Warm up every k first, then time in interleaved rounds so slow drift (clocks, other
    # load) affects all blocks alike.
    for k in ks:
        for _ in range(warmup):
            rig.run(k, include_cka)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            samples[k].append(rig.time(k, include_cka))
    return {k: statistics.median(v) for k, v in samples.items()}


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


def _saving_interval(
    per_round: Mapping[int, Sequence[float]],
    blocks: Sequence[float],
    weights: Sequence[float],
    baseline_steps: int,
    resamples: int = 1000,
) -> tuple[float, float]:
    """95% bootstrap interval of the replay's saving: rounds drawn with replacement (a fixed seed, so a
    replay's numbers are reproducible from its samples), the saving recomputed from each draw's median
    ratios. The saving does not depend on the baseline's step time: ``1 - sum_steps ratio / baseline_steps``."""
    rounds = len(next(iter(per_round.values())))
    rng = random.Random(0)
    savings = []
    for _ in range(resamples):
        draw = [rng.randrange(rounds) for _ in range(rounds)]
        ratios = {k: statistics.median(v[i] for i in draw) for k, v in per_round.items()}
        savings.append(1.0 - math.fsum(w * _interp_time(b, ratios) for b, w in zip(blocks, weights)) / baseline_steps)
    savings.sort()
    return savings[int(0.025 * (resamples - 1))], savings[int(math.ceil(0.975 * (resamples - 1)))]


def replay_blocks(leap_blocks: Iterable[float]) -> list[int]:
    """The target blocks :func:`replay_step_times` times LEAP steps at: every integer block of
    ``leap_blocks``, and both neighbours of a fractional (epoch-mean) one; sorted, distinct."""
    return sorted({bound(float(b)) for b in leap_blocks for bound in (math.floor, math.ceil)})


def replay_step_times(
    teacher: nn.Module,
    student: nn.Module,
    leap_blocks: Sequence[float],
    baseline_steps: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    leap_steps_per_block: Sequence[float] | None = None,
    rounds: int = 10,
    warmup: int = 2,
    cls_weight: float = 0.05,
    normalize: bool = False,
) -> dict[str, Any]:
    """Replay a baseline run's and a LEAP run's training steps interleaved, and compare their times.

    Each round times one **baseline step** (teacher to its last block L, no CKA) and one
    **LEAP step** (teacher to ``k``, with the per-step CKA) at each distinct target block ``k``
    of the LEAP run; the order flips every round (baseline first, then LEAP's blocks ascending;
    next round the reverse), so slow drift and other jobs' load fall on both arms alike. A LEAP
    step's cost is the median over rounds of its time over the same round's baseline step, so
    load that comes and goes between rounds cancels. Every kind of step runs ``warmup`` untimed
    times first. The step is :func:`measure_step_times`'
    (student + head + fused loss, backward, AdamW) on random inputs from a fixed seed; data
    loading, the calibration scan and evaluation are not part of it.

    Args:
        teacher: as for :func:`measure_step_times` (a timm ViT is wrapped, cast and frozen in place).
        student: timm ViT; deep copies are trained, the original is left untouched.
        leap_blocks: the LEAP run's target block per step (ints), or per epoch (mean blocks, which
            may be fractional) with ``leap_steps_per_block``. A fractional block is timed at its two
            neighbouring blocks and interpolated linearly.
        baseline_steps: number of steps of the baseline run.
        batch_size: images per step, as in the runs.
        device, dtype: as for :func:`measure_step_times` (default dtype: bf16 on CUDA, fp32 on CPU).
        leap_steps_per_block: steps per entry of ``leap_blocks`` (default: 1 each, i.e. one entry
            per step).
        rounds: timed rounds (>= 1); each step time and ratio is the median over them.
        warmup: untimed steps per kind of step before the rounds.
        cls_weight, normalize: the runs' CLS loss weight and token-normalized MSE flag.

    Returns:
        dict with ``num_blocks`` (L), ``rounds``, ``warmup``, ``batch_size``, ``device``,
        ``leap_step_times_s`` (``{k: median seconds per LEAP step at k}``), ``leap_step_ratios``
        (``{k: median over rounds of a LEAP step at k over the round's baseline step}``),
        ``baseline_step_time_s`` (median seconds per baseline step), ``leap_steps`` and
        ``baseline_steps`` (step counts), ``leap_time_s`` (``baseline_step_time_s`` times the sum over
        the LEAP run's steps of the ratio at its block), ``baseline_time_s``
        (``baseline_steps * baseline_step_time_s``), ``saving = 1 - leap_time_s / baseline_time_s``,
        ``saving_interval`` (``(low, high)``: a 95% bootstrap interval of the saving over the rounds)
        and ``elapsed_s`` (wall time of the replay itself).

    Raises:
        ValueError: an argument out of range (the message names it), a block outside 1..L.
    """
    began = time.perf_counter()
    rig = _TrainerStep(teacher, student, batch_size, device, dtype, cls_weight, normalize)
    L = rig.teacher.num_blocks
    blocks = [float(b) for b in leap_blocks]
    if not blocks:
        raise ValueError("leap_blocks is empty: give the LEAP run's target block per step")
    if leap_steps_per_block is None:
        weights = [1.0] * len(blocks)
    else:
        weights = [float(w) for w in leap_steps_per_block]
        if len(weights) != len(blocks):
            raise ValueError(f"leap_steps_per_block has {len(weights)} entries for {len(blocks)} leap_blocks")
        if any(not math.isfinite(w) or w < 0 for w in weights) or math.fsum(weights) <= 0:
            raise ValueError(f"leap_steps_per_block must be >= 0 with a positive sum, got {weights}")
    if any(not math.isfinite(b) or not 1 <= b <= L for b in blocks):
        raise ValueError(f"leap_blocks must lie in 1..{L} (the teacher's blocks), got {sorted(set(blocks))}")
    if isinstance(baseline_steps, bool) or int(baseline_steps) != baseline_steps or baseline_steps < 1:
        raise ValueError(f"baseline_steps must be an integer >= 1, got {baseline_steps!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    ks = replay_blocks(blocks)
    rig.build()

    # (k, include_cka, arm): the baseline skips the CKA (as the trainer does without a curriculum).
    kinds = [(L, False, "baseline")] + [(k, True, "leap") for k in ks]
    for k, cka, _ in kinds:
        for _ in range(warmup):
            rig.run(k, cka)
    samples: dict[tuple[str, int], list[float]] = {(arm, k): [] for k, _, arm in kinds}
    for r in range(rounds):
        for k, cka, arm in kinds if r % 2 == 0 else reversed(kinds):
            samples[(arm, k)].append(rig.time(k, cka))

    base_samples = samples[("baseline", L)]
    leap_times = {k: statistics.median(samples[("leap", k)]) for k in ks}
    base_step = statistics.median(base_samples)
    # Each LEAP step against the baseline step of its own round: load that comes and goes between rounds
    # scales both and cancels in the ratio, where medians taken per arm could catch different load.
    per_round = {k: [a / b for a, b in zip(samples[("leap", k)], base_samples)] for k in ks}
    ratios = {k: statistics.median(v) for k, v in per_round.items()}
    leap_time = base_step * math.fsum(w * _interp_time(b, ratios) for b, w in zip(blocks, weights))
    interval = _saving_interval(per_round, blocks, weights, int(baseline_steps))
    base_time = int(baseline_steps) * base_step
    leap_steps = math.fsum(weights)
    return {
        "num_blocks": L,
        "rounds": rounds,
        "warmup": warmup,
        "batch_size": rig.batch_size,
        "device": str(rig.device),
        "leap_step_times_s": leap_times,
        "leap_step_ratios": ratios,
        "baseline_step_time_s": base_step,
        "leap_steps": int(leap_steps) if leap_steps.is_integer() else leap_steps,
        "baseline_steps": int(baseline_steps),
        "leap_time_s": leap_time,
        "baseline_time_s": base_time,
        "saving": 1.0 - leap_time / base_time,
        "saving_interval": interval,
        "elapsed_s": time.perf_counter() - began,
    }
