"""The process-group life cycle of a training run and its one all-reduce helper.

``leap distill`` under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment) runs one process per GPU: NCCL on CUDA, gloo on CPU. :class:`ProcessGroup`
joins an existing default group or creates one from the environment, and destroys it on
:meth:`ProcessGroup.close` only if it created it. Without ``WORLD_SIZE > 1`` it is a
single-process no-op. :func:`all_reduce_mean` / :func:`all_reduce_sum` reduce a tensor
over the ranks (a fresh tensor; a single process returns a copy of its input).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["ProcessGroup", "distributed", "all_reduce_mean", "all_reduce_sum", "reduce_step_values", "resolve_device"]


def distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class ProcessGroup:
    """This process's place in the run: ``rank``, ``world_size``, ``local_rank``.

    Args:
        device_pref: the ``--device`` option; a CPU preference selects gloo even when CUDA
            is available.
    """

    def __init__(self, device_pref: str = "auto"):
        self.rank, self.world_size, self.local_rank, self.owns_group = 0, 1, 0, False
        if distributed():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            return
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        self.rank = int(os.environ["RANK"])
        self.world_size = world
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        use_cuda = torch.cuda.is_available() and not device_pref.startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        """Destroy the default process group if this object created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _all_reduce(t: torch.Tensor, op, group: Any) -> torch.Tensor:
    # NCCL only takes CUDA tensors: a CPU value goes to the current device first.
    t = t.detach().to(torch.float32).clone()
    if not distributed():
        return t
    if str(dist.get_backend(group)) == "nccl" and not t.is_cuda:
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum of ``t`` (as fp32) over the ranks of ``group`` (default: world); ``t`` is not modified."""
    return _all_reduce(t, dist.ReduceOp.SUM if distributed() else None, group)


def all_reduce_mean(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean of ``t`` (as fp32) over the ranks of ``group``; SUM + divide rather than
    ``ReduceOp.AVG``, which gloo does not support."""
    if not distributed():
        return _all_reduce(t, None, group)
    return _all_reduce(t, dist.ReduceOp.SUM, group) / dist.get_world_size(group)


def reduce_step_values(
    means: list[torch.Tensor], per_rank: list[torch.Tensor] | None = None
) -> tuple[list[float], list[list[float]]]:
    """One all-reduce and one host read for a step's statistics.

    Args:
        means: scalars (0-d or one-element tensors, one device) to average over the ranks.
        per_rank: scalars whose value on *every* rank is wanted (e.g. the local CKA and target
            block under ``--curriculum-sync per-rank``, or the CKA spread in ``mean`` mode).

    Returns:
        ``(mean values, [[value of rank 0, rank 1, ...] for each per_rank scalar])``. The means
        are ``SUM / world`` exactly as :func:`all_reduce_mean` computes them; the per-rank values
        are exact (each rank fills its own slot of a zero vector, the rest add zeros).
    """
    per_rank = list(per_rank or [])
    world = dist.get_world_size() if distributed() else 1
    rank = dist.get_rank() if distributed() else 0
    parts = [torch.stack([m.detach().float().reshape(()) for m in means])]
    if per_rank:
        vals = torch.stack([v.detach().float().reshape(()) for v in per_rank])
        slots = torch.zeros(len(per_rank), world, dtype=torch.float32, device=vals.device)
        slots[:, rank] = vals
        parts.append(slots.reshape(-1))
    t = torch.cat(parts)
    n = len(means)
    if distributed():
        t = _all_reduce(t, dist.ReduceOp.SUM, None)
        t = torch.cat([t[:n] / world, t[n:]])  # fp32 division, as all_reduce_mean
    host = t.tolist()  # the one host read
    ranks = [host[n + i * world : n + (i + 1) * world] for i in range(len(per_rank))]
    return host[:n], ranks


def resolve_device(pref: str | None, group: ProcessGroup | None = None) -> torch.device:
    """The ``--device`` option (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``) as a device: ``auto`` is
    CUDA where available, else the CPU. Under DDP (``group`` enabled) each rank takes the GPU of
    its LOCAL_RANK. Every command's ``--device`` goes through here.

    Raises:
        ConfigError: an invalid device name, or CUDA asked for where there is none.
    """
    enabled = group is not None and group.enabled
    if pref in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", group.local_rank if enabled else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as e:
        raise ConfigError(f"--device: invalid device {pref!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {pref}: CUDA is not available on this machine; use --device cpu")
        if enabled:  # one GPU per rank, chosen by LOCAL_RANK
            device = torch.device("cuda", group.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
