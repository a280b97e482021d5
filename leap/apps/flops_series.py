"""A run's cumulative teacher cost against the full-depth baseline (the FLOPs of ``leap report``).

Teacher FLOPs come from, in order: the epoch records' ``teacher_flops`` / ``baseline_teacher_flops``;
a :class:`leap.cost.CostModel` built (on the meta device) from the model names in the run's config
(or given ones); else the logged teacher block counts normalized by the teacher depth L (units of
"full teacher passes"). The one-off calibration scan is reported apart (:func:`calibration_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..runlog import RunLog
from ..runlog import number as _num

__all__ = ["FlopsSeries", "calibration_blocks", "cost_model_for", "flops_series", "teacher_flops_at_step"]


@dataclass
class FlopsSeries:
    """Cumulative teacher cost vs. baseline along ``x`` (steps or epochs)."""

    x: list[float]
    x_label: str
    teacher: list[float]
    baseline: list[float]
    units: str  # "FLOPs" or "full teacher passes"
    source: str  # where the numbers come from
    total: list[float] | None = None  # whole step C(k), if a cost model is known
    baseline_total: list[float] | None = None

    @property
    def saved_fraction(self) -> float | None:
        if not self.baseline or not self.baseline[-1]:
            return None
        return 1.0 - self.teacher[-1] / self.baseline[-1]

    @property
    def total_saved_fraction(self) -> float | None:
        if not self.total or not self.baseline_total or not self.baseline_total[-1]:
            return None
        return 1.0 - self.total[-1] / self.baseline_total[-1]


def _cumsum(values: Sequence[float]) -> list[float]:
    out, acc = [], 0.0
    for v in values:
        acc += v
        out.append(acc)
    return out


def cost_model_for(run: RunLog, teacher: str | None, student: str | None, img_size: int | None):
    """A CostModel from CLI names or the run config; (model, None) or (None, reason)."""
    cfg = run.config
    teacher = teacher or cfg.get("teacher")
    student = student or cfg.get("student")
    if not teacher or not student:
        return None, "the run config does not name the teacher and student"
    try:
        from ..cost import CostModel

        t_ov = cfg.get("teacher_overrides") if teacher == cfg.get("teacher") else None
        s_ov = cfg.get("student_overrides") if student == cfg.get("student") else None
        return CostModel(
            teacher,
            student,
            img_size=int(img_size or cfg.get("img_size") or 224),
            teacher_overrides=t_ov or None,
            student_overrides=s_ov or None,
            concat_teacher_last=bool(cfg.get("concat_teacher_last")),
        ), None
    except Exception as e:  # noqa: BLE001 - reported in the Markdown, falls back to block counts
        return None, f"could not build a cost model for {teacher} / {student}: {type(e).__name__}: {e}"


def _units(run: RunLog) -> tuple[list[float], list[float], list[float], str]:
    """Per-unit ``(x, teacher blocks run, teacher forwards)``: per step if step records exist,
    else per epoch. The calibration scan is not included (:func:`calibration_blocks`)."""
    xs, blocks, n = [], [], []
    rows = [
        r
        for r in run.steps
        if _num(r.get("step")) is not None
        and (_num(r.get("teacher_blocks_run")) is not None or _num(r.get("block")) is not None)
    ]
    if rows:
        for r in rows:
            s = _num(r["step"])
            b = _num(r.get("teacher_blocks_run"))
            b = _num(r.get("block")) if b is None else b
            xs.append(s)
            blocks.append(b)
            n.append(1.0)
        return xs, blocks, n, "step"
    for i, r in enumerate(run.epochs):
        steps = _num(r.get("steps")) or 1.0
        b = _num(r.get("teacher_blocks_run_total"))
        if b is None:
            mb = _num(r.get("mean_block"))
            mb = _num(r.get("block")) if mb is None else mb
            if mb is None:
                continue
            b = mb * steps
        ep = _num(r.get("epoch"))
        xs.append(ep if ep is not None else float(i))
        blocks.append(b)
        n.append(steps)
    return xs, blocks, n, "epoch"


def calibration_blocks(run: RunLog) -> float:
    """Teacher blocks run by the calibration scan (reported apart from the savings)."""
    return sum(_num(c.get("teacher_blocks_run")) or 0.0 for c in run.calibrations)


def flops_series(run: RunLog, cost_model=None, cost_note: str | None = None) -> FlopsSeries | None:
    """Cumulative teacher FLOPs (or full-teacher passes) vs. the full-depth baseline."""
    ep = run.epochs
    if ep and all(
        _num(r.get("teacher_flops")) is not None and _num(r.get("baseline_teacher_flops")) is not None for r in ep
    ):
        xs = [(_num(r.get("epoch")) if _num(r.get("epoch")) is not None else float(i)) for i, r in enumerate(ep)]
        total = base_total = None
        if all(_num(r.get("step_flops")) is not None and _num(r.get("baseline_step_flops")) is not None for r in ep):
            total = _cumsum([r["step_flops"] for r in ep])
            base_total = _cumsum([r["baseline_step_flops"] for r in ep])
        return FlopsSeries(
            xs,
            "epoch",
            _cumsum([r["teacher_flops"] for r in ep]),
            _cumsum([r["baseline_teacher_flops"] for r in ep]),
            "FLOPs",
            "per-epoch teacher_flops logged by the trainer",
            total,
            base_total,
        )

    xs, blocks, n, x_label = _units(run)
    if not xs:
        return None
    scan = ""
    L = run.num_blocks
    if cost_model is not None:
        L = cost_model.num_blocks
        images = run.images_per_step or 1
        per_img = "" if run.images_per_step else " per image"
        runs = [cost_model.run_flops(ni, bi) for bi, ni in zip(blocks, n)]
        teacher = [images * r["teacher"] for r in runs]
        base = [images * r["baseline_teacher"] for r in runs]
        total = [images * r["step"] for r in runs]
        base_total = [images * r["baseline_step"] for r in runs]
        return FlopsSeries(
            xs,
            x_label,
            _cumsum(teacher),
            _cumsum(base),
            "FLOPs" + per_img,
            f"logged teacher block counts{scan} x CostModel({cost_model.teacher_cost.depth}-block teacher)",
            _cumsum(total),
            _cumsum(base_total),
        )
    if not L:
        return None
    note = f" ({cost_note})" if cost_note else ""
    return FlopsSeries(
        xs,
        x_label,
        _cumsum([b / L for b in blocks]),
        _cumsum(n),
        "full teacher passes",
        f"logged teacher block counts{scan} / L = {L}{note}",
    )


def teacher_flops_at_step(run: RunLog, step: float) -> float | None:
    """Teacher FLOPs spent by the end of ``step``: the ``cumulative_teacher_flops`` of the epoch record logged at
    that step (an epoch end, where ``--save-every-epochs`` keeps its checkpoints), else ``None``."""
    for r in run.epochs:
        if _num(r.get("step")) == step and _num(r.get("cumulative_teacher_flops")) is not None:
            return _num(r.get("cumulative_teacher_flops"))
    return None
