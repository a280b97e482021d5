"""Backends and dispatch.

Each backend declares, per op, what its kernels accept (:class:`OpSupport`: devices, dtypes,
row width, head dims, ...) next to the backend itself, and from that lists the reasons it
cannot run a given call (an empty list means it can). The ops only describe the call (tensors,
row width, head dim, scale) and never test for a backend's limits, so adding a backend means
adding its declaration and its implementations, not editing every op's checks.

Automatic dispatch tries the backends in the order of :func:`dispatch_order` for the device and
takes the first that can run the call; a backend whose kernels were never verified on the
hardware is skipped (it can still be forced). A forced backend (``LEAP_KERNELS_BACKEND`` or
:func:`use_backend`) that cannot run the call raises with its reasons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import _ext

ENV_BACKEND = "LEAP_KERNELS_BACKEND"
AUTO = "auto"

# Ops whose Triton kernels hold a whole token row in registers (row normalization).
MAX_TRITON_ROW_WIDTH = 16384

FLOAT_16_32 = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)

#: Head dims of the Triton attention kernel (one ``tl.dot`` over the whole head dim).
TRITON_HEAD_DIMS = (16, 32, 64, 128)
#: Head dims of the CUDA attention kernel (with and without rotary embedding).
CUDA_HEAD_DIMS = (64, 128)
#: Head dims of the Triton attention kernel with rotary embedding: ``Q K^T`` is two dots over the
#: channel halves, and a 16-bit tensor-core dot needs a k extent of at least 16 (d = 16 gives 8).
TRITON_ROPE_HEAD_DIMS = (32, 64, 128)

NOT_VERIFIED = "not yet verified on a GPU (force it with {env}={name})"


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


def _ext_has_op(name: str) -> bool:
    """The loaded ``leap_kernels._C`` registered ``leap_kernels::<name>``."""
    return _ext.available() and hasattr(torch.ops.leap_kernels, name)


def _sample_span(t: torch.Tensor) -> int:
    """Elements spanned by one sample (dims 1..) of ``t``: the kernels index inside it with int32."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


@dataclasses.dataclass(frozen=True)
class OpSupport:
    """What one backend's kernels of one op accept.

    ``verified=False`` marks kernels that were compiled but never checked on the hardware:
    automatic dispatch does not choose them; forcing the backend does run them. ``ext_op`` names
    the compiled op of ``leap_kernels._C`` the kernels are (an extension built from older sources
    may lack it: the backend then says so instead of failing at the call).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_16_32
    max_row_width: int | None = None
    head_dims: tuple[int, ...] | None = None
    positive_scale: bool = False
    max_sample_span: int | None = None
    verified: bool = True
    ext_op: str | None = None


class Backend:
    """A way to compute the ops: a declaration per op, and why it cannot run here at all."""

    name: str = "?"
    ops: dict[str, OpSupport] = {}

    def availability_reasons(self) -> list[str]:
        """Why this backend cannot run anything in this process (not installed, not built...)."""
        return []

    def device_reasons(self, device_type: str) -> list[str]:
        """Why it cannot run tensors of this device type now (beyond the per-op device list)."""
        return []

    def not_supported_reasons(
        self,
        op: str,
        tensors: Sequence[torch.Tensor],
        *,
        auto: bool = False,
        row_width: int | None = None,
        head_dim: int | None = None,
        scale: float | None = None,
        **_meta: Any,
    ) -> list[str]:
        reasons = self.availability_reasons()
        support = self.ops.get(op)
        if support is None:
            reasons.append(f"the {self.name} backend has no {op} kernel")
            return reasons
        if support.ext_op is not None and not reasons and not _ext_has_op(support.ext_op):
            reasons.append(
                f"{op}: leap_kernels._C has no {support.ext_op} kernel (built from older sources); {_ext.REBUILD}"
            )
        for device_type in sorted({t.device.type for t in tensors}):
            if device_type not in support.devices:
                reasons.append(
                    f"{op}: {device_type} tensors given; the {self.name} kernels run on "
                    f"{' or '.join(support.devices)} tensors"
                )
            else:
                reasons.extend(self.device_reasons(device_type))
        unsupported = sorted(str(d) for d in {t.dtype for t in tensors} if d not in support.dtypes)
        if unsupported:
            names = ", ".join(str(d).replace("torch.", "") for d in support.dtypes)
            reasons.append(f"dtype {', '.join(unsupported)} not supported by the {self.name} {op} kernels ({names})")
        if support.max_row_width is not None and row_width is not None and row_width > support.max_row_width:
            reasons.append(
                f"{op}: row width {row_width} exceeds the {support.max_row_width} channels one "
                f"{self.name} program holds in registers"
            )
        if support.head_dims is not None and head_dim is not None and head_dim not in support.head_dims:
            reasons.append(
                f"{op}: head dim {head_dim} not supported by the {self.name} kernel "
                f"(supported head dims: {', '.join(map(str, support.head_dims))})"
            )
        if support.positive_scale and scale is not None and not scale > 0:
            reasons.append(f"{op}: the {self.name} kernel needs scale > 0, got {scale}")
        if support.max_sample_span is not None:
            for t in tensors:
                if t.dim() >= 2 and _sample_span(t) >= support.max_sample_span:
                    reasons.append(
                        f"{op}: one sample spans {_sample_span(t)} elements; the {self.name} kernel "
                        "indexes within a sample with 32-bit offsets"
                    )
        if auto and not support.verified:
            reasons.append(f"{op}: the {self.name} kernels are " + NOT_VERIFIED.format(env=ENV_BACKEND, name=self.name))
        return reasons

    def status_reasons(self, device_type: str) -> list[str]:
        """Reasons shown by :func:`backends`: availability, device, and unverified kernels."""
        reasons = self.availability_reasons()
        ops_here = {op: s for op, s in self.ops.items() if device_type in s.devices}
        if not ops_here:
            reasons.append(f"no kernels for {device_type} tensors")
            return reasons
        reasons.extend(self.device_reasons(device_type))
        unverified = sorted(op for op, s in ops_here.items() if not s.verified)
        if unverified and len(unverified) == len(ops_here):
            reasons.append("kernels " + NOT_VERIFIED.format(env=ENV_BACKEND, name=self.name))
        return reasons


class TorchBackend(Backend):
    """Plain PyTorch: the readable reference and the fallback. Runs everything."""

    name = "torch"

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor], **meta: Any) -> list[str]:
        return []

    def status_reasons(self, device_type: str) -> list[str]:
        return []


class TritonBackend(Backend):
    """Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    ops = {
        "fused_feature_loss": OpSupport(("cuda", "cpu"), max_row_width=MAX_TRITON_ROW_WIDTH),
        "token_normalized_mse": OpSupport(("cuda", "cpu"), max_row_width=MAX_TRITON_ROW_WIDTH),
        "feature_loss_rescale": OpSupport(("cuda", "cpu")),
        "teacher_attention": OpSupport(
            ("cuda", "cpu"), dtypes=HALF_DTYPES, head_dims=TRITON_HEAD_DIMS, positive_scale=True, max_sample_span=2**31
        ),
        "teacher_attention_rope": OpSupport(
            ("cuda", "cpu"),
            dtypes=HALF_DTYPES,
            head_dims=TRITON_ROPE_HEAD_DIMS,
            positive_scale=True,
            max_sample_span=2**31,
        ),
    }

    def availability_reasons(self) -> list[str]:
        error = _triton_import_error()
        return [error] if error else []

    def device_reasons(self, device_type: str) -> list[str]:
        if device_type == "cuda" and not torch.cuda.is_available():
            return ["CUDA tensors given but torch.cuda is not available"]
        if device_type == "cpu" and not triton_interpret_enabled():
            return [
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                "leap_kernels (slow; meant for tests)"
            ]
        return []


class CppBackend(Backend):
    """The compiled C++ CPU kernels of ``leap_kernels._C`` (ATen GEMMs, at::vec row kernels; no
    attention kernel: attention on CPU tensors is the torch backend's)."""

    name = "cpp"
    ops = {
        "fused_feature_loss": OpSupport(("cpu",)),
        "token_normalized_mse": OpSupport(("cpu",)),
        "feature_loss_rescale": OpSupport(("cpu",)),  # ATen ops: the fused loss's backward rescale
    }

    def availability_reasons(self) -> list[str]:
        error = _ext.load_error()
        return [error] if error else []


class CudaBackend(Backend):
    """The compiled CUDA kernels of ``leap_kernels._C`` (cuBLAS GEMMs through ATen + row kernels;
    an ``mma.sync`` attention). None has run on a GPU yet: automatic dispatch skips them."""

    name = "cuda"
    ops = {
        "fused_feature_loss": OpSupport(("cuda",), verified=False),
        "token_normalized_mse": OpSupport(("cuda",), verified=False),
        "feature_loss_rescale": OpSupport(("cuda",), verified=False),
        "teacher_attention": OpSupport(
            ("cuda",), dtypes=HALF_DTYPES, head_dims=CUDA_HEAD_DIMS, positive_scale=True, verified=False
        ),
        "teacher_attention_rope": OpSupport(
            ("cuda",),
            dtypes=HALF_DTYPES,
            head_dims=CUDA_HEAD_DIMS,
            positive_scale=True,
            verified=False,
            ext_op="teacher_attention_rope_fwd",
        ),
    }

    def availability_reasons(self) -> list[str]:
        error = _ext.load_error()
        if error:
            return [error]
        if not _ext.with_cuda():
            return [
                "leap_kernels._C was built without CUDA kernels (no GPU or toolkit at build time; rebuild "
                "with LEAP_KERNELS_BUILD_CUDA=1)"
            ]
        return []

    def device_reasons(self, device_type: str) -> list[str]:
        if device_type == "cuda" and not torch.cuda.is_available():
            return ["CUDA tensors given but torch.cuda is not available"]
        return []


_BACKENDS: dict[str, Backend] = {b.name: b for b in (CudaBackend(), TritonBackend(), CppBackend(), TorchBackend())}

#: Automatic order per device type, unless :data:`MEASURED_ORDER` has one for the device class.
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "cpp", "torch"), "cpu": ("cpp", "torch")}
#: Device class (a substring of ``torch.cuda.get_device_name()``) -> backend order, fastest first, as
#: the committed results under bench/results/ show. Empty until the cuda backend is measured on a GPU.
MEASURED_ORDER: dict[str, tuple[str, ...]] = {}

# Process-wide, not thread-local: on CUDA, autograd runs backward ops on its own device threads, and a
# backend forced around ``loss.backward()`` must reach them too.
_override_lock = threading.Lock()
_override_stack: list[str] = []


def backend_names() -> tuple[str, ...]:
    """Names of every backend (``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"``)."""
    return tuple(_BACKENDS)


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    # A constant of the process: torch.compile takes the value instead of tracing the CUDA query.
    return torch.cuda.get_device_name(index)


def dispatch_order(device: torch.device | str) -> tuple[str, ...]:
    """Backends automatic dispatch tries for tensors on ``device``, in order."""
    device = torch.device(device)
    if MEASURED_ORDER and device.type == "cuda" and torch.cuda.is_available():
        name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
        for device_class, order in MEASURED_ORDER.items():
            if device_class in name:
                return order
    return DEFAULT_ORDER.get(device.type, ("torch",))


def _requested_backend() -> str:
    if torch.compiler.is_compiling():
        # torch.compile traces the callers' backend choice (the ops take it as an argument): it reads
        # the stack here, without the lock it cannot trace, and guards on it (a new override recompiles).
        if _override_stack:
            return _override_stack[-1]
    else:
        with _override_lock:
            if _override_stack:
                return _override_stack[-1]
    value = os.environ.get(ENV_BACKEND, AUTO).strip().lower() or AUTO
    if value != AUTO and value not in _BACKENDS:
        raise ValueError(f"{ENV_BACKEND}: expected one of {[AUTO, *_BACKENDS]}, got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"`` or ``"auto"``) in a ``with`` block.

    Takes precedence over ``LEAP_KERNELS_BACKEND``. Applies to the whole process while the block is
    open (autograd's backward threads included), so call ``backward()`` inside it as well.
    """
    name = name.strip().lower()
    if name != AUTO and name not in _BACKENDS:
        raise ValueError(f"use_backend: expected one of {[AUTO, *_BACKENDS]}, got {name!r}")
    with _override_lock:
        _override_stack.append(name)
    try:
        yield
    finally:
        with _override_lock:
            # Remove this block's entry (blocks on several threads may close out of order).
            index = len(_override_stack) - 1 - _override_stack[::-1].index(name)
            del _override_stack[index]


def select_backend(op: str, tensors: Sequence[torch.Tensor], **meta: Any) -> str:
    """Name of the backend that runs ``op`` on ``tensors`` now.

    ``meta`` describes the call for the backends' declarations: ``row_width``, ``head_dim``, ``scale``.
    Raises RuntimeError when a forced backend cannot run it (with the reasons), or when no backend
    can (listing every backend's reasons).
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
    for name in dispatch_order(tensors[0].device):
        reasons = _BACKENDS[name].not_supported_reasons(op, tensors, auto=True, **meta)
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
    """Every backend (cuda, triton, cpp, torch), whether automatic dispatch may use it for tensors
    on ``device``, and why not.

    ``device`` defaults to CUDA when available, else CPU. Example (CPU, no interpreter)::

        >>> leap_kernels.backends()
        {'cuda': BackendStatus(name='cuda', usable=False, reasons=('no kernels for cpu tensors',)),
         'triton': BackendStatus(name='triton', usable=False, reasons=('CPU tensors need ...',)),
         'cpp': BackendStatus(name='cpp', usable=True, reasons=()),
         'torch': BackendStatus(name='torch', usable=True, reasons=())}
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    out = {}
    for name, backend in _BACKENDS.items():
        reasons = tuple(backend.status_reasons(device_type))
        out[name] = BackendStatus(name, not reasons, reasons)
    return out
