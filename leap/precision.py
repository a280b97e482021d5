"""Numeric precision of a training run: the teacher's dtype, its autocast, TF32 matmuls.

``--precision fp16`` runs as the LEAP reference runs it (PyTorch Lightning ``16-mixed``): fp16
autocast around the whole step, a GradScaler, TF32 for the remaining fp32 matmuls, and the
teacher's weights kept in fp32 (so the teacher's matmuls run in fp16 under the step's autocast,
its norms and softmax in fp32). ``--teacher-dtype`` overrides the teacher's weight dtype.

``--teacher-precision fp8`` additionally runs the teacher's block linears (qkv, proj, fc1, fc2)
in FP8 e4m3 with per-row scales (:mod:`leap_kernels.ops.fp8_linear`); norms, attention and the residual stream keep
the teacher dtype, and the FP8 layers ignore the step's autocast. The real FP8 GEMM
(``torch._scaled_mm``) needs an NVIDIA GPU of compute capability 8.9+; elsewhere the same
numerics run emulated (slower than the teacher dtype) and the run says so in a warning.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "DTYPES",
    "TEACHER_PRECISIONS",
    "auto_precision",
    "resolve_precision",
    "amp_dtype",
    "resolve_teacher_dtype",
    "teacher_autocast",
    "configure_matmul_precision",
]

#: The dtype of each precision name (``--precision``, ``--teacher-dtype``, ``leap eval --precision``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--teacher-precision``: auto = the block linears compute in the teacher dtype; fp8 = e4m3
#: (:class:`leap_kernels.ops.fp8_linear.Fp8Linear`).
TEACHER_PRECISIONS = ("auto", "fp8")


def auto_precision(device: torch.device) -> str:
    """The ``auto`` precision on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_precision(pref: str, device: torch.device) -> str:
    """``pref`` with ``auto`` resolved by :func:`auto_precision` (other names unchanged)."""
    return auto_precision(device) if pref == "auto" else pref


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved ``precision`` (None for fp32: no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]


def resolve_teacher_dtype(pref: str, precision: str) -> torch.dtype:
    """Teacher weight dtype for ``--teacher-dtype pref`` under the resolved ``precision``.

    ``auto``: fp32 for ``fp32`` and ``fp16`` runs (the reference keeps the teacher in fp32 under
    fp16 autocast), bf16 for ``bf16`` runs (bf16's range is safe for a 40-block teacher and halves
    its memory and time).
    """
    if pref == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if pref not in DTYPES:
        raise ValueError(f"--teacher-dtype: expected auto, fp32, bf16 or fp16, got {pref!r}")
    return DTYPES[pref]


def teacher_autocast(device: torch.device, amp_dtype: torch.dtype | None, teacher_dtype: torch.dtype):
    """Context for the teacher's forward: the step's autocast when the teacher keeps fp32 weights
    in a mixed-precision run (the reference's fp16 teacher), else nothing (the teacher runs in its
    own dtype, or everything is fp32)."""
    if amp_dtype is None or teacher_dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def configure_matmul_precision(precision: str, device: torch.device) -> bool:
    """Allow TF32 for fp32 CUDA matmuls and convolutions in an fp16 run (the reference's setting).

    Process-wide (as in the reference); other precisions leave the user's setting untouched.
    Returns whether TF32 was switched on.
    """
    if precision != "fp16" or device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        # torch >= 2.9: mixing the new setting with the legacy allow_tf32 flags can make later
        # reads of the legacy flags raise, so only the new API is used here.
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # pragma: no cover - torch < 2.9
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True
