"""Optimizers and the learning-rate schedule of the LEAP recipe (spec section 4).

- :class:`LARS`: SGD with momentum whose per-tensor step is rescaled by the trust ratio
  ``eta * ||p|| / (||g|| + wd * ||p|| + eps)`` (You et al. 2017, as in lightly/LightlyTrain).
  Param groups with ``lars=False`` get plain momentum SGD (no trust ratio); the LEAP recipe
  also gives them no weight decay.
- :func:`param_groups`: splits parameters into "decay + LARS" and "no decay, no LARS"
  (biases, norms, cls/register tokens, position embeddings, LayerScale gammas).
- :func:`build_optimizer`: LARS or AdamW over those groups.
- :func:`peak_lr`: the ``--lr`` convention (LARS: base lr scaled by sqrt(global_batch/1536)).
- :class:`WarmupCosine`: linear warmup, then cosine decay to ``min_lr_ratio * peak``, per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "LARS",
    "NO_DECAY_NAME_PARTS",
    "is_no_decay",
    "param_groups",
    "build_optimizer",
    "peak_lr",
    "LARS_REFERENCE_BATCH",
    "WarmupCosine",
    "RESTART_STARTS",
]

#: Where a restarted cosine starts (:meth:`WarmupCosine.restart`): the peak, the warmup-cosine
#: envelope at the restart step, or the lr in force there.
RESTART_STARTS = ("peak", "envelope", "current")

#: The paper scales the base lr by sqrt(global_batch / 1536).
LARS_REFERENCE_BATCH = 1536

#: Parameters whose name contains one of these get no weight decay and no LARS adaptation
#: (in addition to every parameter with ndim <= 1: biases, norm weights, LayerScale).
NO_DECAY_NAME_PARTS = ("cls_token", "reg_token", "pos_embed", "gamma")


def peak_lr(optimizer: str, lr: float, global_batch: int) -> float:
    """Peak learning rate (reached at the end of warmup) for ``--lr`` at ``global_batch``.

    LARS: ``lr * sqrt(global_batch / 1536)`` (paper: 6 at batch 256 -> 2.449).
    AdamW: ``lr`` unchanged.
    """
    if optimizer == "lars":
        return lr * math.sqrt(global_batch / LARS_REFERENCE_BATCH)
    return lr


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay and LARS adaptation."""
    return param.ndim <= 1 or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: ``decay`` (weight decay + LARS) and ``no_decay`` (neither).

    Frozen parameters (``requires_grad=False``) are left out. Empty groups are dropped.
    Each group has a ``name`` and a ``lars`` flag (read by :class:`LARS`; ignored by AdamW).
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lars": True},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling on top of momentum SGD.

    For every parameter ``p`` with gradient ``g`` in a group with ``lars=True``::

        d = g + wd * p
        d = d * trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)   # if ||p|| > 0 and ||g|| > 0
        buf = momentum * buf + d        (buf = d on the first step)
        p  -= lr * buf

    Groups with ``lars=False`` skip the trust ratio (and apply their own ``weight_decay``,
    which :func:`param_groups` sets to 0). The ratio is computed on device: no host sync.

    Args:
        params: parameters or param groups (see :func:`param_groups`).
        lr: learning rate (the schedule overwrites it every step).
        momentum: momentum factor (paper: 0.9).
        weight_decay: L2 factor (paper: 1e-6).
        trust_coefficient: eta (paper: 0.001).
        eps: keeps the trust ratio finite.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, lars=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            wd, lr, momentum = group["weight_decay"], group["lr"], group["momentum"]
            use_lars = group["lars"]
            if use_lars:
                p_norms = [torch.linalg.vector_norm(p) for p in params]
                g_norms = [torch.linalg.vector_norm(p.grad) for p in params]
            for i, p in enumerate(params):
                g = p.grad
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if use_lars:
                    pn, gn = p_norms[i], g_norms[i]
                    ratio = group["trust_coefficient"] * pn / (gn + wd * pn + group["eps"])
                    # A zero-norm parameter or gradient keeps the plain step (ratio 1).
                    ratio = torch.where((pn > 0) & (gn > 0), ratio, torch.ones_like(ratio))
                    d.mul_(ratio.to(d.dtype))
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


def build_optimizer(
    name: str,
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """LARS (``"lars"``) or AdamW (``"adamw"``, betas (0.9, 0.999)) over :func:`param_groups`.

    ``lr`` is the peak lr (see :func:`peak_lr`); the schedule scales it per step.
    """
    groups = param_groups(named_params, weight_decay)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'lars' or 'adamw'")


class WarmupCosine:
    """Per-step schedule: linear warmup to each group's peak lr, then cosine to ``min_lr_ratio``.

    Factor for (0-based) step ``i``::

        i < W:  (i + 1) / W
        else :  r + (1 - r) * 0.5 * (1 + cos(pi * min(1, (i - W) / max(1, T - W))))

    with ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``. The peak of each
    group is stored as ``group["peak_lr"]``. Construction sets the lr of step 0; call
    :meth:`step` after every optimizer step (like torch schedulers).

    :meth:`restart` (``--snap-to-last``, as the LEAP reference does when it jumps to the last
    block, and ``--lr-reset``) replaces the rest of the schedule from step ``R`` on by a cosine
    without warmup from a start factor ``f`` down to ``r``::

        i >= R: r + (f - r) * 0.5 * (1 + cos(pi * min(1, (i - R) / max(1, T - R))))

    where ``f`` is 1 (``"peak"``), the warmup-cosine above at step ``R`` ignoring any earlier
    restart (``"envelope"``), or the factor in force at step ``R``, earlier restarts included
    (``"current"``). With ``f = 1`` this is the same formula, bit for bit, as a restart from the peak.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.001
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
        self.last_step = 0
        self.restart_step: int | None = None
        self.restart_from = 1.0  # start factor of the restarted cosine (1 = the peak)
        self._apply()

    def restart(self, step: int | None = None, *, start: str = "peak") -> None:
        """From 0-based step ``step`` (default: the next step) on, a cosine without warmup from the
        ``start`` factor: ``"peak"`` (1), ``"envelope"`` (the warmup-cosine's value at ``step``) or
        ``"current"`` (the schedule's value at ``step``, earlier restarts included)."""
        if start not in RESTART_STARTS:
            raise ValueError(f"restart: start must be one of {', '.join(RESTART_STARTS)}, got {start!r}")
        at = self.last_step if step is None else int(step)
        f = 1.0 if start == "peak" else (self.envelope(at) if start == "envelope" else self.factor(at))
        self.restart_step, self.restart_from = at, f
        self._apply()

    def factor(self, i: int) -> float:
        """Multiplier of the peak lr at 0-based step ``i``."""
        r = self.min_lr_ratio
        if self.restart_step is not None and i >= self.restart_step:
            progress = min(1.0, (i - self.restart_step) / max(1, self.total_steps - self.restart_step))
            return r + (self.restart_from - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.envelope(i)

    def envelope(self, i: int) -> float:
        """The warmup-cosine factor at 0-based step ``i``, ignoring restarts."""
        if i < self.warmup_steps:
            return (i + 1) / self.warmup_steps
        progress = min(1.0, (i - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * f

    def step(self) -> None:
        """Advance to the next step and set its lr."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "restart_step": self.restart_step,
            "restart_from": self.restart_from,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the position is restored: warmup/total/min ratio come from the current config,
        # so a resumed run may extend --epochs (the cosine then stretches from here on).
        self.last_step = int(state["last_step"])
        restart = state.get("restart_step")
        self.restart_step = None if restart is None else int(restart)
        self.restart_from = float(state.get("restart_from", 1.0))  # checkpoints before --lr-reset: the peak
        self._apply()
