"""Backends and dispatch.

Each backend declares, for a given op and its input tensors, the reasons it
cannot run them (an empty list means it can). Automatic dispatch picks the first
backend in priority order that can; a forced backend (``LEAP_KERNELS_BACKEND`` or
:func:`use_backend`) that cannot run raises with its reasons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Iterator, Sequence

import torch

ENV_BACKEND = "LEAP_KERNELS_BACKEND"
AUTO = "auto"

# Ops whose Triton kernels hold a whole token row in registers (row normalization).
MAX_TRITON_ROW_WIDTH = 16384

_SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


class Backend:
    """A way to compute the ops. Subclasses list why they cannot run an input."""

    name: str = "?"

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor], **meta) -> list[str]:
        raise NotImplementedError


class TorchBackend(Backend):
    """Plain PyTorch: the readable reference and the CPU path. Runs everything."""

    name = "torch"

    def not_supported_reasons(self, op, tensors, **meta):
        return []


class TritonBackend(Backend):
    """Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def not_supported_reasons(self, op, tensors, **meta):
        reasons = []
        import_error = _triton_import_error()
        if import_error:
            reasons.append(import_error)
        device_types = {t.device.type for t in tensors}
        for device_type in sorted(device_types):
            if device_type == "cuda":
                if not torch.cuda.is_available():
                    reasons.append("CUDA tensors given but torch.cuda is not available")
            elif device_type == "cpu":
                if not triton_interpret_enabled():
                    reasons.append(
                        "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                        "before importing leap_kernels (slow; meant for tests)"
                    )
            else:
                reasons.append(f"device type {device_type!r} is not supported (cuda, or cpu with TRITON_INTERPRET=1)")
        # An op's kernels may take fewer dtypes than the default (meta "dtypes").
        supported = meta.get("dtypes") or _SUPPORTED_FLOAT_DTYPES
        dtypes = {t.dtype for t in tensors}
        unsupported = sorted(str(d) for d in dtypes if d not in supported)
        if unsupported:
            names = ", ".join(str(d).replace("torch.", "") for d in supported)
            reasons.append(f"dtype {', '.join(unsupported)} not supported by the {op} kernels ({names})")
        row_width = meta.get("row_width")
        if row_width is not None and row_width > MAX_TRITON_ROW_WIDTH:
            reasons.append(
                f"{op}: row width {row_width} exceeds the {MAX_TRITON_ROW_WIDTH} channels one Triton "
                "program holds in registers"
            )
        # Limits of one op's kernels (head dims, scales, ...), computed by the op itself.
        reasons.extend(meta.get("op_reasons") or ())
        return reasons


# Priority order for automatic dispatch: fastest first, the reference last.
_BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), TorchBackend())}

_override = threading.local()


def backend_names() -> list[str]:
    return list(_BACKENDS)


def _requested_backend() -> str:
    forced = getattr(_override, "name", None)
    if forced is not None:
        return forced
    value = os.environ.get(ENV_BACKEND, AUTO).strip().lower() or AUTO
    if value != AUTO and value not in _BACKENDS:
        raise ValueError(
            f"{ENV_BACKEND}: expected one of {[AUTO, *_BACKENDS]}, got {value!r}"
        )
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"torch"``, ``"triton"`` or ``"auto"``) inside a ``with`` block.

    Takes precedence over ``LEAP_KERNELS_BACKEND``; applies to the current thread.
    """
    name = name.strip().lower()
    if name != AUTO and name not in _BACKENDS:
        raise ValueError(f"use_backend: expected one of {[AUTO, *_BACKENDS]}, got {name!r}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def select_backend(op: str, tensors: Sequence[torch.Tensor], **meta) -> str:
    """Name of the backend that runs ``op`` on ``tensors`` now.

    Raises RuntimeError when a forced backend cannot run them (with the reasons),
    or when no backend can (listing every backend's reasons).
    """
    requested = _requested_backend()
    if requested != AUTO:
        reasons = _BACKENDS[requested].not_supported_reasons(op, tensors, **meta)
        if reasons:
            raise RuntimeError(
                f"{op}: backend {requested!r} was forced but cannot run these inputs: " + "; ".join(reasons)
            )
        return requested
    all_reasons = {}
    for name, backend in _BACKENDS.items():
        reasons = backend.not_supported_reasons(op, tensors, **meta)
        if not reasons:
            return name
        all_reasons[name] = reasons
    details = "; ".join(f"{name}: {', '.join(r)}" for name, r in all_reasons.items())
    raise RuntimeError(f"{op}: no backend can run these inputs ({details})")


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        if self.usable:
            return f"{self.name}: usable"
        return f"{self.name}: unusable ({'; '.join(self.reasons)})"


def backends(device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """Which backends can run here, and why the others cannot.

    ``device`` defaults to CUDA when available, else CPU. Example::

        >>> leap_kernels.backends()
        {'triton': BackendStatus(name='triton', usable=False, reasons=('CPU tensors need ...',)),
         'torch': BackendStatus(name='torch', usable=True, reasons=())}
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(0, dtype=torch.float32, device=device)
    out = {}
    for name, backend in _BACKENDS.items():
        reasons = tuple(backend.not_supported_reasons("backends()", [probe]))
        out[name] = BackendStatus(name, not reasons, reasons)
    return out
