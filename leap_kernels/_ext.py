"""The compiled extension ``leap_kernels._C``, loaded once, never fatally.

A missing (pure-Python install), stale (built from older sources) or foreign (built against
another torch: ABI mismatch) extension is not an import error of leap_kernels: the ``cpp`` and
``cuda`` backends report the reason in :func:`leap_kernels.backends` and the other backends work.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Must equal ``kExtensionVersion`` in csrc/leap_kernels.h (bumped with the op schemas).
EXPECTED_VERSION = 1
REBUILD = "rebuild it: pip install --no-build-isolation -e . (or make test)"

_module = None
_error: str | None = None


def _load() -> None:
    global _module, _error
    try:
        from . import _C as module  # type: ignore[attr-defined]  # registers the C++ ops with the dispatcher
    except Exception as exc:  # ImportError (not built), OSError / undefined symbol (ABI mismatch)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        _error = f"leap_kernels._C is not importable ({type(exc).__name__}: {first_line}); {REBUILD}"
        return
    version = getattr(module, "EXTENSION_VERSION", None)
    built_for = getattr(module, "TORCH_VERSION", "unknown")
    if version != EXPECTED_VERSION:
        _error = (
            f"leap_kernels._C is stale (extension version {version}, the Python code expects "
            f"{EXPECTED_VERSION}); {REBUILD}"
        )
    elif built_for != torch.__version__:
        _error = (
            f"leap_kernels._C was built against torch {built_for} but torch {torch.__version__} is "
            f"running (ABI mismatch); {REBUILD}"
        )
    else:
        _module = module
        _register_fakes()


def load_error() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _error


def available() -> bool:
    return _module is not None


def with_cuda() -> bool:
    """The extension was compiled with its CUDA kernels."""
    return _module is not None and bool(getattr(_module, "WITH_CUDA", 0))


def _register_fakes() -> None:
    """Shapes of the C++ ops' outputs for torch.compile / FakeTensor (the kernels live in C++)."""

    @torch.library.register_fake("leap_kernels::rows_loss_grad")
    def _(
        x: Tensor,
        t: Tensor,
        normalize: bool,
        eps: float,
        row_scale: Tensor | None,
        want_loss: bool,
        want_grad_x: bool,
        want_grad_t: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        m, d = x.shape
        loss = x.new_empty((m if want_loss else 0,), dtype=torch.float32)
        grad_x = x.new_empty((m, d) if want_grad_x else (0,))
        grad_t = t.new_empty((m, d) if want_grad_t else (0,))
        return loss, grad_x, grad_t

    @torch.library.register_fake("leap_kernels::feature_loss_chunks")
    def _(
        student: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        normalize: bool,
        eps: float,
        want_grads: bool,
        row_scale: Tensor | None,
        chunk_tokens: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m, k = student.shape
        n = weight.shape[0]
        row_loss = student.new_empty((m,), dtype=torch.float32)
        if not want_grads:
            return row_loss, student.new_empty((0,)), row_loss.new_empty((0,)), row_loss.new_empty((0,))
        return (
            row_loss,
            student.new_empty((m, k)),
            row_loss.new_empty((n, k)),
            row_loss.new_empty((n if bias is not None else 0,)),
        )

    @torch.library.register_fake("leap_kernels::teacher_attention_fwd")
    def _(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
        batch, n, c = qkv.shape
        return qkv.new_empty((batch, n, c // 3))


_load()
