"""Checks of option values that reach beyond one field's type and range: model-shape overrides (a
recipe that would build no model, or an absurd one) and the kernels' environment switches. Used by
:meth:`leap.config.TrainConfig.validate`, ``leap train-teacher`` and the evaluation's untrusted
checkpoint recipes, so that each refuses the same values with the same message.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import ConfigError

__all__ = ["KERNEL_BACKENDS", "check_kernel_environment", "check_model_overrides"]

#: Integer model arguments and their sane range (a recipe beyond them would build a model of absurd size).
_INT_MODEL_ARGS = {"depth": (1, 1000), "embed_dim": (1, 65536), "num_heads": (1, 4096), "reg_tokens": (0, 1024)}
#: ``LEAP_KERNELS_BACKEND`` values (``leap_kernels.backend_names()`` plus auto; a test keeps them equal).
KERNEL_BACKENDS = ("auto", "cuda", "triton", "cpp", "torch")


def check_model_overrides(overrides: dict[str, Any], where: str) -> None:
    """Refuse recipe shapes that build no model or an absurd one (``depth``, ``embed_dim``, ``num_heads``,
    ``reg_tokens``, ``patch_size``, ``mlp_ratio``): :class:`ConfigError` ``where: KEY must be ..., got V``."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def refuse(key: str, expected: str, value: Any) -> ConfigError:
        hint = " (a string: write the number without quotes)" if isinstance(value, str) else ""
        return ConfigError(f"{where}: {key} must be {expected}, got {value!r}{hint}")

    for key, (lo, hi) in _INT_MODEL_ARGS.items():
        if key in overrides and not (is_int(overrides[key]) and lo <= overrides[key] <= hi):
            raise refuse(key, f"an integer in [{lo}, {hi}]", overrides[key])
    if "patch_size" in overrides:
        v = overrides["patch_size"]
        parts = list(v) if isinstance(v, (list, tuple)) else [v]
        if not (len(parts) in (1, 2) and all(is_int(p) and 1 <= p <= 4096 for p in parts)):
            raise refuse("patch_size", "an integer in [1, 4096] (or a pair of them)", v)
    if "mlp_ratio" in overrides:
        v = overrides["mlp_ratio"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 64):
            raise refuse("mlp_ratio", "a number in (0, 64]", v)
    dim, heads = overrides.get("embed_dim"), overrides.get("num_heads")
    if is_int(dim) and is_int(heads) and dim % heads:
        raise ConfigError(f"{where}: embed_dim {dim} must be divisible by num_heads {heads}")


def check_kernel_environment() -> None:
    """Refuse (:class:`ConfigError`) a ``LEAP_KERNELS_BACKEND`` or ``LEAP_KERNELS_CHUNK_TOKENS`` the kernels
    would reject at the first step, so a run fails before it creates its run directory."""
    backend = os.environ.get("LEAP_KERNELS_BACKEND", "").strip().lower()
    if backend and backend not in KERNEL_BACKENDS:
        raise ConfigError(
            f"environment variable LEAP_KERNELS_BACKEND={os.environ['LEAP_KERNELS_BACKEND']!r}: expected one of "
            f"{', '.join(KERNEL_BACKENDS)}; unset it for the automatic choice"
        )
    chunk = os.environ.get("LEAP_KERNELS_CHUNK_TOKENS", "")
    if chunk.strip():
        try:
            ok = int(chunk) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"environment variable LEAP_KERNELS_CHUNK_TOKENS={chunk!r}: expected a positive integer (tokens per "
                "chunk of the fused loss); unset it for the default"
            )
