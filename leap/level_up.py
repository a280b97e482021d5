"""What a level-up of the curriculum does besides moving the target block: the lr restarts of
``--snap-to-last`` and ``--lr-reset`` and the head reset of ``--reset-head-on-level-up``
(:class:`LevelUpEffects`; the controller itself is :class:`leap.curriculum.Curriculum`, which
re-exports this class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["LR_RESETS", "LevelUpEffects"]


#: ``--lr-reset`` values: no restart, or where a level-up's restarted cosine starts.
LR_RESETS = ("none", "peak", "envelope", "current")


class LevelUpEffects:
    """What a change of the target block does besides the target (the paper's ablation variants).

    - ``restart_on_snap`` (``--snap-to-last``): a "snap" to the last block restarts the lr
      schedule as a cosine from the peak without warmup over the remaining steps
      (:meth:`leap.optim.WarmupCosine.restart`), as the reference does;
    - ``lr_reset`` (``--lr-reset``, the reference's ``--curriculum-lr-reset`` family): ``"none"``
      (default) or where every level-up (a snap included) restarts the schedule as a cosine over the
      remaining steps: ``"peak"``, ``"envelope"`` (the warmup-cosine's value at that step) or
      ``"current"`` (the lr in force, earlier restarts included); see
      :meth:`leap.optim.WarmupCosine.restart`. Level-ups during the warmup restart nothing (the
      warmup is never cut short: the three would start from a warmup lr);
    - ``reset_head`` (``--reset-head-on-level-up``): after any level-up, every projection head is
      re-initialised (from a generator seeded by ``seed`` and the step, identical on every rank)
      and its optimizer state (momentum, Adam moments) cleared.

    Call :meth:`apply` with the controller's ``level_ups`` entries added by the last call.
    """

    def __init__(
        self,
        *,
        module: Any,
        optimizer: Any,
        scheduler: Any,
        reset_head: bool,
        restart_on_snap: bool,
        seed: int = 0,
        lr_reset: str = "none",
    ):
        if lr_reset not in LR_RESETS:
            raise ValueError(f"lr_reset must be one of {', '.join(LR_RESETS)}, got {lr_reset!r}")
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.reset_head = bool(reset_head)
        self.restart_on_snap = bool(restart_on_snap)
        self.seed = int(seed)
        self.lr_reset = lr_reset

    @classmethod
    def from_config(cls, cfg: TrainConfig, module: Any, optimizer: Any, scheduler: Any) -> LevelUpEffects:
        """The effects a run's options ask for (``--snap-to-last``, ``--lr-reset``, ``--reset-head-on-level-up``)."""
        return cls(
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            reset_head=cfg.reset_head_on_level_up,
            restart_on_snap=cfg.snap_to_last is not None,
            seed=cfg.seed,
            lr_reset=cfg.lr_reset,
        )

    def _restart(self, level_ups: list[Any]) -> str | None:
        """Where this call's level-ups restart the lr schedule from (None: no restart)."""
        if self.lr_reset != "none":
            return self.lr_reset if self.scheduler.last_step >= self.scheduler.warmup_steps else None
        return "peak" if self.restart_on_snap and any(u.reason == "snap" for u in level_ups) else None

    def apply(self, level_ups: list[Any]) -> list[dict[str, Any]]:
        """Apply the effects of ``level_ups`` (after the optimizer and scheduler steps of their
        step); returns log records of what was done."""
        records: list[dict[str, Any]] = []
        if not level_ups:
            return records
        last = level_ups[-1]
        step, epoch = last.step, last.epoch
        start = self._restart(level_ups)
        if start is not None:
            self.scheduler.restart(start=start)
            restart = {"from_step": self.scheduler.restart_step, "start": start, "lr": self.scheduler.get_last_lr()[0]}
            records.append({"type": "lr_restart", "step": step, "epoch": epoch, **restart})
        if self.reset_head:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + 1) % 2**63)
            params = self.module.reset_heads(gen)
            for p in params:
                self.optimizer.state.pop(p, None)
            records.append({"type": "head_reset", "step": step, "epoch": epoch, "block": last.to_block})
        return records
