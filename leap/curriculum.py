"""LEAP's adaptive curriculum: the controller of the teacher target block (spec section 3).

:class:`Curriculum` owns the target block ``k``, the smoothed score ``ema`` and
``epochs_on_block``, and decides when to level up from the CKA values it is given
(:func:`leap.cka.linear_cka`).

Typical trainer use::

    cur = Curriculum(num_blocks=40, tau=0.85, max_epochs_per_block=5)
    cur.calibrate(scores)                     # first step: CKA of every teacher block
    for epoch in range(epochs):
        for step, batch in ...:
            ...                               # train against teacher block cur.block
            if step % cka_every == 0:         # cadence is the trainer's job, not ours
                cur.observe(linear_cka(s_proj.detach(), t_k), step=step, epoch=epoch)
        cur.epoch_end(epoch=epoch)

The trainer calls :meth:`Curriculum.step_end` after every step instead: it also counts the steps
on the block, for the step form of the timeout (``max_steps_per_block``: a fractional
``--max-epochs-per-block``, :func:`block_timeout`).

DDP: every rank must call :meth:`Curriculum.calibrate`, :meth:`Curriculum.observe` (and
:meth:`Curriculum.epoch_end`) at the same points, because ``calibrate``/``observe``
all-reduce their inputs when a process group is initialised. All ranks then see the same
mean value and take the same decision, so the target block never diverges between ranks.
``sync="per-rank"`` reproduces the reference code instead: no all-reduce, each rank calibrates,
measures and levels up on its own batch, so the ranks may target different blocks.
Checkpointing the state (``state_dict``) from rank 0 only is the trainer's job.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .distributed import all_reduce_mean, distributed
from .level_up import LR_RESETS, LevelUpEffects

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["Curriculum", "LevelUp", "LevelUpEffects", "LR_RESETS", "RankSync", "block_timeout"]


def block_timeout(max_epochs_per_block: float | None, steps_per_epoch: int) -> tuple[int | None, int | None]:
    """The curriculum timeout ``--max-epochs-per-block M`` as ``(whole epochs, steps)`` for :class:`Curriculum`:
    a whole ``M`` keeps the reference's epoch-end count, ``(M, None)``; a fractional ``M`` counts the
    steps on the block, ``(None, max(1, round(M * steps_per_epoch)))``; ``M = 0``: ``(None, None)``, none."""
    m = float(max_epochs_per_block or 0)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"max_epochs_per_block must be a finite number >= 0, got {max_epochs_per_block!r}")
    if m == 0:
        return None, None
    if m.is_integer():
        return int(m), None
    return None, max(1, round(m * steps_per_epoch))


class LevelUp(NamedTuple):
    """One move of the curriculum target: ``from_block -> to_block`` at ``step`` (1-based)
    in ``epoch`` (0-based); ``reason`` is ``"cka"``, ``"timeout"`` or ``"snap"``.

    The one shape of a level-up everywhere (controller history, step results, log records,
    summary). A named tuple: it compares equal to, and is saved in checkpoints as, the plain
    ``(step, epoch, from_block, to_block, reason)`` it was before it had names.
    """

    step: int
    epoch: int
    from_block: int
    to_block: int
    reason: str

    def record(self, cka: float | None = None) -> dict[str, Any]:
        """The ``level_up`` log record (``cka`` only for a level-up by CKA)."""
        rec: dict[str, Any] = {
            "type": "level_up",
            "step": self.step,
            "epoch": self.epoch,
            "from_block": self.from_block,
            "to_block": self.to_block,
            "reason": self.reason,
        }
        if cka is not None and self.reason == "cka":
            rec["cka"] = cka
        return rec


class Curriculum:
    """Adaptive target-block controller of LEAP (spec section 3).

    State: ``block`` (current teacher target k, 1-indexed, 1..num_blocks), ``ema``
    (smoothed CKA), ``epochs_on_block``, ``steps_on_block``. Level-up rule, checked once after
    every :meth:`observe` and once at every :meth:`epoch_end` (after ``epochs_on_block += 1``)::

        if k < L and (ema >= tau or epochs_on_block >= M or steps_on_block >= N):
            k += 1; ema = 0; epochs_on_block = 0; steps_on_block = 0

    ``steps_on_block`` counts the calls of :meth:`step_end` (one per training step); on a step
    without a score, :meth:`step_end` checks the ``N`` clause alone.

    One check per call means at most one regular level-up per call, but consecutive
    steps can each level up.

    Args:
        num_blocks: L, number of teacher blocks (the last target).
        tau: CKA threshold (paper: 0.85 on ImageNet-100, 0.80 on ImageNet-1K).
            A value above 1 effectively disables the CKA trigger.
        alpha: EMA weight of the new CKA value, in (0, 1] (paper: 1, no smoothing).
        max_epochs_per_block: M, the timeout in whole epochs, counted at epoch ends (a block
            reached mid-epoch gets its first count at that epoch's end, as in the reference);
            ``None`` disables it.
        max_steps_per_block: N, the timeout in training steps on the block (:meth:`step_end`);
            ``None`` (default) disables it.
        start_block: if given, :meth:`calibrate` uses it instead of the argmax; with
            ``enabled=False``, the block the target stays at (the fixed-block ablation).
        snap_to_last: S (optional). Once k reaches a block >= S (by a level-up or at
            calibration) it jumps straight to the last block, recorded as an extra
            "snap" level-up. Use it to skip a slow tail of timeout-driven level-ups.
        enabled: ``False``: the target never moves: it is the last block (the baseline), or
            ``start_block`` when given (``--curriculum fixed``); CKA is still tracked in ``ema``.
        sync: ``"mean"`` (default): scores are averaged over the ranks under DDP;
            ``"per-rank"``: never reduced (the reference's behaviour).
        process_group: group used for the all-reduces under DDP (default: world).

    ``observe`` is meant to be called after training steps; how often (every step or
    every N steps, "cka_every") is the trainer's choice, not the controller's. Note the
    EMA then averages over observations, not steps.

    History: ``level_ups`` is a list of :class:`LevelUp` ``(step, epoch, from_block, to_block,
    reason)`` with reason in ``{"cka", "timeout", "snap"}``.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        tau: float = 0.85,
        alpha: float = 1.0,
        max_epochs_per_block: int | None = 5,
        max_steps_per_block: int | None = None,
        start_block: int | None = None,
        snap_to_last: int | None = None,
        enabled: bool = True,
        process_group: Any = None,
        sync: str = "mean",
    ) -> None:
        if sync not in ("mean", "per-rank"):
            raise ValueError(f"sync must be 'mean' or 'per-rank', got {sync!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not math.isfinite(float(tau)):
            raise ValueError(f"tau must be finite, got {tau!r}")
        if not (0.0 < float(alpha) <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        for name, v in (("max_epochs_per_block", max_epochs_per_block), ("max_steps_per_block", max_steps_per_block)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        for name, v in (("start_block", start_block), ("snap_to_last", snap_to_last)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= num_blocks):
                raise ValueError(f"{name} must be None or an int in [1, {num_blocks}], got {v!r}")

        self.num_blocks = num_blocks
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.max_epochs_per_block = max_epochs_per_block
        self.max_steps_per_block = max_steps_per_block
        self.start_block = start_block
        self.snap_to_last = snap_to_last
        self.enabled = bool(enabled)
        self.process_group = process_group
        self.sync = sync

        # Before calibrate(): the configured start (or block 1); the baseline is always L.
        self.block: int = start_block or (1 if self.enabled else num_blocks)
        self.ema: float = 0.0
        self.epochs_on_block: int = 0
        self.steps_on_block: int = 0
        self.level_ups: list[LevelUp] = []
        self.calibrated: bool = False
        self.calibration_scores: list[float] | None = None
        self.steps_observed: int = 0
        self.nonfinite_observations: int = 0
        self.last_cka: float | None = None
        self.last_step: int = 0

    # ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TrainConfig, num_blocks: int, steps_per_epoch: int) -> Curriculum:
        """The controller of a run (``--curriculum fixed`` pins ``--start-block``); timeout: :func:`block_timeout`."""
        epochs, steps = block_timeout(cfg.max_epochs_per_block, steps_per_epoch)
        return cls(
            num_blocks,
            tau=cfg.resolved_threshold,
            alpha=cfg.alpha,
            max_epochs_per_block=epochs,
            max_steps_per_block=steps,
            start_block=cfg.start_block,
            snap_to_last=cfg.snap_to_last,
            enabled=cfg.curriculum == "cka",
            sync=cfg.curriculum_sync,
        )

    @property
    def at_last_block(self) -> bool:
        return self.block >= self.num_blocks

    @property
    def pinned_block(self) -> int:
        """The block a disabled controller stays at: ``start_block`` (fixed) or the last (baseline)."""
        return self.start_block or self.num_blocks

    def calibrate(self, scores: torch.Tensor | None = None, *, step: int = 0, epoch: int = 0) -> int:
        """Pick the starting block and reset ``ema``/``epochs_on_block``.

        Args:
            scores: (num_blocks,) CKA of every teacher block against the (random)
                projected student, index i = block i+1. Under DDP it is averaged over
                ranks first so every rank picks the same block. NaN scores never win.
                May be None when ``start_block`` is set or the controller is disabled.
            step, epoch: only used to label a "snap" entry in ``level_ups``.

        Returns the 1-indexed start block: ``start_block`` if given (no host read, no
        collective), else argmax + 1 (a single host read of the reduced vector). A disabled
        controller returns its :attr:`pinned_block` (``num_blocks`` for the baseline).
        """
        self.ema = 0.0
        self.epochs_on_block = 0
        self.steps_on_block = 0
        self.calibrated = True
        if not self.enabled:
            self.block = self.pinned_block
            return self.block
        if self.start_block is not None:
            start = self.start_block
        else:
            if not isinstance(scores, torch.Tensor):
                raise TypeError("calibrate: scores must be a tensor of shape (num_blocks,) when start_block is None")
            if scores.dim() != 1 or scores.shape[0] != self.num_blocks:
                raise ValueError(f"calibrate: scores must have shape ({self.num_blocks},), got {tuple(scores.shape)}")
            s = scores.detach().to(torch.float32)
            if self._reduce():
                s = all_reduce_mean(s, self.process_group)
            values = s.tolist()  # the one host read
            self.calibration_scores = values
            # argmax in Python on the already-fetched list; NaN never wins, ties -> first.
            start = 1 + max(range(len(values)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i])
        self.block = start
        self._maybe_snap(step=step, epoch=epoch)
        return self.block

    def observe(
        self, cka: torch.Tensor | float, *, step: int, epoch: int, already_reduced: bool = False
    ) -> list[tuple[int, int]]:
        """Feed one CKA measurement (after a training step) and maybe level up.

        Args:
            cka: scalar tensor (any shape with one element, any device) or float.
                Under DDP it is all-reduced (mean over ranks) before use; the call is a
                collective then, so all ranks must make it.
            step, epoch: global step / epoch, recorded in ``level_ups``.
            already_reduced: ``cka`` is already the rank mean (every rank passes the same
                value), e.g. read back with the trainer's own per-step statistics: no
                collective, and no host read for a float.

        Updates ``ema = alpha*cka + (1-alpha)*ema`` (a non-finite value is counted in
        ``nonfinite_observations`` and skipped, so one bad batch cannot poison the EMA;
        with alpha=1 this takes the same decisions as using it), then runs one level-up
        check. At most one host read per call.

        Returns the level-ups performed as ``(from_block, to_block)`` pairs: empty, one,
        or two when a level-up is followed by a snap to the last block.
        """
        value = float(cka) if already_reduced else self._reduced_float(cka)
        self.steps_observed += 1
        self.last_cka = value
        self.last_step = int(step)
        if math.isfinite(value):
            self.ema = self.alpha * value + (1.0 - self.alpha) * self.ema
        else:
            self.nonfinite_observations += 1
        return self._maybe_level_up(step=int(step), epoch=int(epoch))

    def step_end(self, *, step: int, epoch: int, score: float | None = None) -> list[tuple[int, int]]:
        """After every training step: count it on the current block, then :meth:`observe` ``score``
        (the step's score as the controller sees it, already rank-reduced: no collective) if the step
        measured one, else check the ``max_steps_per_block`` timeout alone. Returns the level-ups
        as :meth:`observe` does."""
        self.steps_on_block += 1
        if score is not None:
            return self.observe(score, step=step, epoch=epoch, already_reduced=True)
        if self.max_steps_per_block is None:
            return []
        return self._maybe_level_up(step=int(step), epoch=int(epoch), by_score=False)

    def epoch_end(self, *, epoch: int, step: int | None = None) -> list[tuple[int, int]]:
        """Count a finished epoch on the current block, then run one level-up check.

        ``epoch`` is the epoch that just ended; ``step`` (default: the last observed step)
        only labels the history entry. Returns ``(from_block, to_block)`` pairs as
        :meth:`observe` does. No host read, no collective.
        """
        self.epochs_on_block += 1
        return self._maybe_level_up(step=self.last_step if step is None else int(step), epoch=int(epoch))

    # ----------------------------------------------------------------------------------
    def _reduced_float(self, cka: torch.Tensor | float) -> float:
        """The (rank-mean) CKA as a Python float with exactly one host read (zero for a
        float outside DDP)."""
        if isinstance(cka, torch.Tensor):
            if cka.numel() != 1:
                raise ValueError(f"observe: cka must hold a single value, got shape {tuple(cka.shape)}")
            t = cka.detach().reshape(())
        else:
            if not self._reduce():
                return float(cka)
            t = torch.tensor(float(cka), dtype=torch.float32)
        if self._reduce():
            t = all_reduce_mean(t, self.process_group)
        return float(t.item())

    def _reduce(self) -> bool:
        return distributed() and self.sync == "mean"

    def _maybe_level_up(self, *, step: int, epoch: int, by_score: bool = True) -> list[tuple[int, int]]:
        if not self.enabled or self.at_last_block:
            return []
        if by_score and self.ema >= self.tau:
            reason = "cka"
        elif by_score and self.max_epochs_per_block is not None and self.epochs_on_block >= self.max_epochs_per_block:
            reason = "timeout"
        elif self.max_steps_per_block is not None and self.steps_on_block >= self.max_steps_per_block:
            reason = "timeout"
        else:
            return []
        old = self.block
        self.block = old + 1
        self.ema = 0.0
        self.epochs_on_block = 0
        self.steps_on_block = 0
        self.level_ups.append(LevelUp(step, epoch, old, self.block, reason))
        return [(old, self.block)] + self._maybe_snap(step=step, epoch=epoch)

    def _maybe_snap(self, *, step: int, epoch: int) -> list[tuple[int, int]]:
        """Jump to the last block once k >= snap_to_last (no-op if unset / already there)."""
        if self.snap_to_last is None or self.block < self.snap_to_last or self.at_last_block:
            return []
        old = self.block
        self.block = self.num_blocks
        self.ema = 0.0
        self.epochs_on_block = 0
        self.steps_on_block = 0
        self.level_ups.append(LevelUp(step, epoch, old, self.block, "snap"))
        return [(old, self.block)]

    # ----------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        config = {
            "tau": self.tau,
            "alpha": self.alpha,
            "max_epochs_per_block": self.max_epochs_per_block,
            "start_block": self.start_block,
            "snap_to_last": self.snap_to_last,
            "enabled": self.enabled,
            "sync": self.sync,
        }
        if self.max_steps_per_block is not None:  # only when set: older checkpoints compare equal
            config["max_steps_per_block"] = self.max_steps_per_block
        return config

    def state_dict(self) -> dict[str, Any]:
        """Controller state as plain Python types (JSON / ``torch.load(weights_only=True)`` safe)."""
        return {
            "version": 1,
            "num_blocks": self.num_blocks,
            "block": self.block,
            "ema": self.ema,
            "epochs_on_block": self.epochs_on_block,
            "steps_on_block": self.steps_on_block,
            "level_ups": [list(e) for e in self.level_ups],
            "calibrated": self.calibrated,
            "calibration_scores": None if self.calibration_scores is None else list(self.calibration_scores),
            "steps_observed": self.steps_observed,
            "nonfinite_observations": self.nonfinite_observations,
            "last_cka": self.last_cka,
            "last_step": self.last_step,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        The hyperparameters of *this* object (tau, alpha, M, ...) are kept, so a resumed
        run may change them; a difference from the saved ones only warns. A different
        ``num_blocks`` (another teacher) is an error.
        """
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects a dict, got {type(state).__name__}")
        missing = [k for k in ("num_blocks", "block", "ema", "epochs_on_block", "level_ups") if k not in state]
        if missing:
            raise ValueError(f"Curriculum.load_state_dict: state is missing keys {missing}")
        if int(state["num_blocks"]) != self.num_blocks:
            raise ValueError(
                f"Curriculum.load_state_dict: checkpoint was saved with num_blocks={state['num_blocks']} "
                f"but this Curriculum has num_blocks={self.num_blocks} (different teacher depth?)"
            )
        block = int(state["block"])
        if not 1 <= block <= self.num_blocks:
            raise ValueError(f"Curriculum.load_state_dict: block={block} outside [1, {self.num_blocks}]")
        if not self.enabled and block != self.pinned_block:
            raise ValueError(
                f"Curriculum.load_state_dict: this Curriculum is disabled (always block "
                f"{self.pinned_block}) but the checkpoint is at block {block}"
            )
        saved_cfg = state.get("config")
        if isinstance(saved_cfg, dict) and saved_cfg != self._config():
            diff = {k: (saved_cfg.get(k), v) for k, v in self._config().items() if saved_cfg.get(k) != v}
            warnings.warn(
                f"Curriculum.load_state_dict: config differs from checkpoint (saved, current): {diff}", stacklevel=2
            )

        self.block = block
        self.ema = float(state["ema"])
        self.epochs_on_block = int(state["epochs_on_block"])
        self.steps_on_block = int(state.get("steps_on_block", 0))  # absent before the step timeout existed
        self.level_ups = [LevelUp(int(s), int(e), int(a), int(b), str(r)) for s, e, a, b, r in state["level_ups"]]
        self.calibrated = bool(state.get("calibrated", True))
        scores = state.get("calibration_scores")
        self.calibration_scores = None if scores is None else [float(v) for v in scores]
        self.steps_observed = int(state.get("steps_observed", 0))
        self.nonfinite_observations = int(state.get("nonfinite_observations", 0))
        last = state.get("last_cka")
        self.last_cka = None if last is None else float(last)
        self.last_step = int(state.get("last_step", 0))

    def __repr__(self) -> str:
        mode = "" if self.enabled else (", baseline" if self.pinned_block == self.num_blocks else ", fixed")
        return (
            f"Curriculum(block={self.block}/{self.num_blocks}, ema={self.ema:.4f}, "
            f"epochs_on_block={self.epochs_on_block}, tau={self.tau}{mode})"
        )


class RankSync:
    """Which per-rank values a DDP step gathers (with :func:`leap.distributed.reduce_step_values`)
    and what the controller sees, for ``--curriculum-sync mean|per-rank``.

    - ``mean``: the controller observes the rank-mean score; each measuring step also logs every
      rank's score (``cka_per_rank``) and their spread (``cka_spread`` = max - min), so the effect
      of the averaging can be measured.
    - ``per-rank``: the controller observes this rank's own score; every step logs every rank's
      target block (``blocks_per_rank``) and, on measuring steps, score (``cka_per_rank``).

    A single process gathers nothing and logs nothing extra.
    """

    def __init__(self, sync: str, rank: int, world_size: int):
        if sync not in ("mean", "per-rank"):
            raise ValueError(f"sync must be 'mean' or 'per-rank', got {sync!r}")
        self.sync, self.rank, self.world_size = sync, int(rank), int(world_size)

    def inputs(self, score: torch.Tensor | None, block: int, device: torch.device) -> list[torch.Tensor]:
        """The local scalars to gather this step (empty in a single process)."""
        if self.world_size <= 1:
            return []
        values = [] if score is None else [score]
        if self.sync == "per-rank":
            values.append(torch.tensor(float(block), device=device))
        return values

    def outputs(self, mean_score: float | None, gathered: list[list[float]]) -> tuple[float | None, dict[str, Any]]:
        """``(score for the controller, extra fields of the step record)`` from the gathered values."""
        extra: dict[str, Any] = {}
        score = mean_score
        if not gathered:
            return score, extra
        i = 0
        if mean_score is not None:
            per = gathered[0]
            i = 1
            extra["cka_per_rank"] = per
            if self.sync == "per-rank":
                score = per[self.rank]
            else:
                finite = [v for v in per if math.isfinite(v)]
                extra["cka_spread"] = max(finite) - min(finite) if finite else None
        if self.sync == "per-rank":
            extra["blocks_per_rank"] = [int(b) for b in gathered[i]]
        return score, extra
