"""Reading a run's step statistics back to the host once per read interval, not once per step.

A training step leaves its statistics (loss, patch and CLS losses, gradient norm, curriculum score)
on the device, in a :class:`PendingStep`. :class:`StepReadback` reads every pending step with one
host transfer when the trainer reaches a read point (:mod:`leap.run.loop`): every ``--log-every``
steps, a step that measures the curriculum score (the controller decides on it before the next
step), a checkpoint, an epoch end, the last step, a stop signal. Between read points a step makes
no host sync, so the GPU never waits for the host.

What is checked at a read point: a non-finite loss (or gradient norm outside fp16 loss scaling) of
any pending step stops the run there, naming the first such step. Its update was applied in memory
only if a later step was already queued; nothing after the last good read point is ever saved,
because every checkpoint is a read point.

Under DDP every step is a read point (one all-reduce of the step's values and one host read, as
:func:`leap.distributed.reduce_step_values` documents): the ranks' logged loss, NaN stop and
curriculum stay in lockstep through that collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import reduce_step_values
from .stats import StepResult

__all__ = ["PendingStep", "StepReadback", "step_values"]

#: The slots of a step's value vector.
LOSS, PATCH_LOSS, CLS_LOSS, GRAD_NORM, SCORE = range(5)


def step_values(
    loss: torch.Tensor,
    patch_loss: torch.Tensor,
    cls_loss: torch.Tensor,
    grad_norm: torch.Tensor | None,
    score: torch.Tensor | None,
) -> torch.Tensor:
    """The ``(5,)`` fp32 device vector of one step (NaN in the slot of a value the step did not compute)."""
    missing = loss.detach().new_full((), math.nan, dtype=torch.float32)
    parts = [loss, patch_loss, cls_loss, grad_norm, score]
    return torch.stack([missing if v is None else v.detach().reshape(()).to(torch.float32) for v in parts])


@dataclass
class PendingStep:
    """One step run and not yet published: its host facts in ``result`` (the values after the read)."""

    result: StepResult
    values: torch.Tensor | None  # (5,) on the device until read, then None
    has_grad_norm: bool
    has_score: bool
    per_rank: list[torch.Tensor] = field(default_factory=list)  # DDP: what RankSync gathers
    gathered: list[list[float]] = field(default_factory=list)  # DDP: the gathered values, after the read
    extra: dict[str, Any] = field(default_factory=dict)  # per-rank fields of the step record
    effect_records: list[dict[str, Any]] = field(default_factory=list)  # lr restarts / head resets
    applied: bool = False  # its optimizer update was applied
    step_in_epoch: int = 0
    dt: float = 0.0  # seconds from the previous step's end to this step's end (host clock)
    cpu_dt: float = 0.0  # this process's CPU time over the same span

    @property
    def read(self) -> bool:
        return self.values is None

    def nonfinite(self, loss_scaling: bool) -> str | None:
        """What was not finite (after the read), or None. With fp16 loss scaling an infinite gradient
        norm is the scaler's business (it skips that step), not a failure."""
        r = self.result
        if not math.isfinite(r.loss):
            return f"loss is {r.loss}"
        if r.grad_norm is not None and not math.isfinite(r.grad_norm) and not loss_scaling:
            return f"gradient norm is {r.grad_norm}"
        return None


class StepReadback:
    """The run's pending steps and their host reads."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.pending: list[PendingStep] = []
        self.reads = 0  # host reads made (tests, benchmarks)

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)

    @property
    def last(self) -> PendingStep:
        return self.pending[-1]

    def read(self, loss_scaling: bool) -> PendingStep | None:
        """One host read (one all-reduce first under DDP) of every pending step not read yet; fills their
        results. Returns the first pending step whose values are not finite, or None."""
        unread = [p for p in self.pending if not p.read]
        if unread:
            self.reads += 1
            if self.distributed:
                if len(unread) != 1:
                    raise RuntimeError("under DDP every step is read back before the next one")
                p = unread[0]
                assert p.values is not None
                values, p.gathered = reduce_step_values(list(p.values.unbind()), p.per_rank)
                rows = [values]
            else:
                rows = torch.stack([p.values for p in unread if p.values is not None]).tolist()  # the one host read
            for p, row in zip(unread, rows):
                r = p.result
                r.loss, r.patch_loss, r.cls_loss = row[LOSS], row[PATCH_LOSS], row[CLS_LOSS]
                r.grad_norm = row[GRAD_NORM] if p.has_grad_norm else None
                r.cka = row[SCORE] if p.has_score else None
                p.values = None
        return next((p for p in self.pending if p.nonfinite(loss_scaling)), None)

    def take(self, before: PendingStep | None = None) -> list[PendingStep]:
        """Remove and return the pending steps (those before ``before`` only, when given)."""
        cut = len(self.pending) if before is None else self.pending.index(before)
        taken, self.pending = self.pending[:cut], self.pending[cut:]
        return taken
