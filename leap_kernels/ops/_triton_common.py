"""Small helpers shared by the Triton kernels: host-side settings and one device function
(:func:`_row_offsets`, the token-row addressing of strided ``(B, N, D)`` inputs)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from .._backends import triton_interpret_enabled

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

# Read once: Triton decides at `@triton.jit` time whether a kernel is interpreted.
INTERPRETED = triton_interpret_enabled()


def _squeeze_interpreter_index() -> bool:
    """Triton < 3.7's interpreter: let a kernel's runtime integers bound a ``range`` loop.

    The interpreter hands every runtime integer to a kernel as a 1-element array and converts it for
    ``range`` with ``int(array)``, which NumPy >= 2.4 refuses for arrays of ndim > 0 (``only
    0-dimensional arrays can be converted to Python scalars``). Triton 3.8 squeezes the array first;
    this does the same for older interpreters, so the kernels keep runtime loop bounds (constexpr
    bounds would change their GPU code). Returns whether the interpreter was patched.
    """
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - depends on the install
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_leap_kernels_squeezed", False):
        return False

    def patch_tensor_squeezed(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezed._leap_kernels_squeezed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_tensor_squeezed
    return True


if HAS_TRITON and INTERPRETED:
    _squeeze_interpreter_index()


#: ``full``: the autotuner tries every config of a kernel; ``table`` (default): on a GPU listed in
#: :data:`AUTOTUNE_TABLE`, only that card's shortlist (every GPU machine starts with a cold cache, and
#: each config tried is one more compile on the first call).
ENV_AUTOTUNE = "LEAP_KERNELS_AUTOTUNE"
#: Per compute capability and kernel, the configs worth trying: ``{"sm_90": {"<kernel>": ["BLOCK_M=128
#: BLOCK_N=128 ... warps=8 stages=3", ...]}}`` (keys as :func:`config_key` writes them).
AUTOTUNE_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autotune_table.json")


def config_key(config: Any) -> str:
    """A Triton config as the table names it: its block sizes, then ``warps=`` and ``stages=``."""
    blocks = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()) if k.startswith("BLOCK_"))
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


@functools.cache
def _autotune_table() -> dict[str, dict[str, list[str]]]:
    with open(AUTOTUNE_TABLE, encoding="utf-8") as f:
        table: dict[str, dict[str, list[str]]] = json.load(f)
    return table


def autotune_shortlist(kernel: str, configs: list[Any], device: torch.device) -> list[Any]:
    """The configs of ``kernel`` to try on ``device``: the card's committed shortlist unless
    ``LEAP_KERNELS_AUTOTUNE=full`` (or the card, or the kernel, has none). Never empty."""
    mode = os.environ.get(ENV_AUTOTUNE, "table").strip().lower()
    if mode not in ("table", "full"):
        raise ValueError(f"{ENV_AUTOTUNE}: expected 'table' or 'full', got {mode!r}")
    if mode == "full" or device.type != "cuda":
        return configs
    major, minor = torch.cuda.get_device_capability(device)
    wanted = set(_autotune_table().get(f"sm_{major}{minor}", {}).get(kernel, ()))
    kept = [c for c in configs if config_key(c) in wanted]
    return kept or configs


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: float32 follows torch's TF32 switch, like cuBLAS would.

    16-bit operands ignore it; they get Triton's default, the setting every backend accepts
    for them. The interpreter computes in full precision ("ieee").
    """
    if INTERPRETED:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter computes 16-bit `tl.dot` wrongly; upcast its operands to fp32 there."""
    return INTERPRETED and dtype in (torch.bfloat16, torch.float16)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 accumulation, or fp64 when a float64 input asks for a reference-grade result."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def m_bucket(rows: int, cap: int = 1 << 16) -> int:
    """Problem-size bucket of a token count for autotune keys: the next power of two, capped.

    Autotuned kernels take it as an (unused) argument named in their key, so a config is chosen
    once per bucket and cached, not once per distinct chunk size (nor once for the first size seen).
    """
    return min(next_power_of_2(max(1, rows)), cap)


if HAS_TRITON:

    @triton.jit
    def _row_offsets(rows, TOKENS, stride_b, stride_n):  # type: ignore[no-untyped-def]
        """Element offsets of token rows ``rows`` in a ``(B, TOKENS, D)`` view: row m sits at
        ``(m // TOKENS) * stride_b + (m % TOKENS) * stride_n``. Lets the kernels read slices such as
        ``x[:, prefix:]`` in place; a 2-D ``(M, D)`` tensor is the case ``TOKENS = M``."""
        batch = rows // TOKENS
        token = rows - batch * TOKENS
        return batch.to(tl.int64) * stride_b + token.to(tl.int64) * stride_n
