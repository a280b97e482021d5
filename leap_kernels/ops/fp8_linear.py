"""FP8 (e4m3) linear layers for the frozen teacher (``--teacher-precision fp8`` of the ``leap`` trainer).

:class:`Fp8Linear` holds a linear layer's weight as ``float8_e4m3fn`` with one fp32 scale per
output channel and quantizes its input per token (one fp32 scale per row) on every call:

    x (M, K) -> x_q = e4m3(x / s_x),  s_x = amax(|x|, row) / 448            (M, 1)
    W (N, K) -> W_q = e4m3(W / s_w),  s_w = amax(|W|, output channel) / 448 (N, 1)
    y = bf16((x_q @ W_q^T) * s_x * s_w^T + bias)                            (M, N)

Two backends ("paths") compute ``y``; like the other ops' backends (:mod:`leap_kernels._backends`),
each declares what it cannot run (:meth:`Fp8Backend.not_supported_reasons` of an :class:`Fp8Call`),
and automatic dispatch (:func:`select_fp8_backend`) takes the first in :data:`DISPATCH_ORDER` that
can. Unlike them, a forced backend (``Fp8Linear.backend``) is run as asked, without the check:
``torch._scaled_mm`` then raises itself where it has no kernel (some torch builds have CPU ones).

* ``scaled_mm``: ``torch._scaled_mm`` with row-wise scales (``scale_a (M, 1)`` and
  ``scale_b (1, N)`` fp32, the weight as the column-major second operand, bf16 output: the only
  output dtype every row-wise kernel supports), i.e. the FP8 tensor cores of an NVIDIA GPU with
  compute capability 8.9 or newer. :func:`supported_reasons` (device) and :func:`shape_reasons`
  (dimensions divisible by 16) say why it cannot run elsewhere.
* ``emulated``: the same quantized operands, upcast to fp32 (every e4m3 product is exact in
  fp32), an fp32 matmul, the scales applied to the fp32 accumulator, the bias added and the
  result rounded to bf16. It matches ``scaled_mm`` up to the accumulation order and runs on any
  device (CPU, older GPUs, torch builds without FP8 kernels), at fp32 matmul speed.

The output is cast to the input's dtype, so the rest of the teacher (norms, attention, residual
stream) keeps running in the teacher dtype; only the block linears change.

Special values: a row (token or output channel) of zeros gets the scale ``2^-126`` and
quantizes to exact zeros (no 0/0). A NaN in a row makes its scale NaN, so the whole output row
(or column, for a weight row) is NaN, as a NaN would make it in the unquantized linear; a row
holding ``inf`` gets the scale ``inf`` and a NaN output row as well (never a silently finite one).
Values are clamped to +-448 before the cast, so nothing depends on how a torch version casts
out-of-range values (torch 2.14 saturates them on CPU, inf included).

:class:`Fp8Linear` is inference-only (the teacher is frozen): an input that requires grad while
grad mode is on is refused.

Why this module is long: the quantization math, two backends with their declarations, the layer, and
converting a teacher's blocks (ViT and DINOv3 Eva) belong together.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "E4M3_MAX",
    "BACKENDS",
    "DISPATCH_ORDER",
    "FP8_BACKENDS",
    "Fp8Backend",
    "Fp8Call",
    "Fp8Linear",
    "select_fp8_backend",
    "row_scales",
    "quantize_rows",
    "dequantize_rows",
    "fp8_linear_reference",
    "supported_reasons",
    "shape_reasons",
    "convert_teacher_linears",
    "fp8_linears",
    "describe_paths",
    "emulation_warning",
]

#: Largest finite ``float8_e4m3fn`` value.
E4M3_MAX = 448.0
#: Scale of an all-zero row: the smallest normal fp32 (any positive value would do; the row's
#: values quantize to exact zeros).
_MIN_SCALE = torch.finfo(torch.float32).tiny
#: Output dtype of the FP8 GEMM (``torch._scaled_mm`` row-wise supports bf16 on every GPU).
GEMM_OUT_DTYPE = torch.bfloat16


def _fp8_dtype() -> torch.dtype:
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:  # pragma: no cover - torch < 2.1
        raise RuntimeError(
            f"torch {torch.__version__} has no float8_e4m3fn dtype; --teacher-precision fp8 needs torch >= 2.1"
        )
    return dtype


def _check_float(x: object, name: str, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype == _fp8_dtype():
        raise ValueError(f"{fn}: {name} must be a float32/bfloat16/float16/float64 tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: {name} must have shape (..., K) with K >= 1, got shape {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------- quantization helpers


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3 scales ``amax(|x|) / 448`` of ``x (..., K)`` -> fp32 ``(..., 1)``.

    All-zero rows get ``2^-126`` (so they quantize to zeros); NaN rows a NaN scale, rows holding
    ``inf`` an ``inf`` scale (both make the row's output NaN, see the module docstring).
    """
    x = _check_float(x, "x", "row_scales")
    # The inf-norm is amax(|x|) in one reduction (no |x| temporary); it propagates NaN.
    amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=-1, keepdim=True).to(torch.float32)
    # clamp_min keeps NaN (torch.clamp propagates it) and lifts 0 (and fp32 underflow) to 2^-126.
    return (amax / E4M3_MAX).clamp_min(_MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x (..., K)`` to e4m3 with one scale per row.

    Returns:
        ``(q (..., K) float8_e4m3fn, scale (..., 1) float32)`` with ``x ~= q.float() * scale``;
        per element ``|x - q * scale| <= 2^-4 |x| + 2^-10 scale`` (round to nearest on 3
        mantissa bits; ``2^-10 scale`` is half the smallest subnormal step) up to fp32 rounding.
    """
    scale = row_scales(x)
    # x / scale promotes to fp32 in the division itself (no fp32 copy of x first); few passes
    # over the activations matter here, since the GEMM they feed is FP8-fast.
    q = (x.detach() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(_fp8_dtype())
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q (..., K) float8_e4m3fn`` times ``scale (..., 1)`` -> ``(..., K)`` in ``dtype``."""
    if not isinstance(q, torch.Tensor) or q.dtype != _fp8_dtype():
        raise ValueError(
            f"dequantize_rows: q must be a float8_e4m3fn tensor, got "
            f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}"
        )
    if not isinstance(scale, torch.Tensor) or scale.shape != (*q.shape[:-1], 1):
        raise ValueError(
            f"dequantize_rows: scale must have shape {(*q.shape[:-1], 1)} (one per row of q), got "
            f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}"
        )
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch reference of :class:`Fp8Linear` in float64 (no output rounding).

    ``x (..., K)``, ``weight (N, K)``, ``bias (N,)`` -> ``(..., N)`` float64: both operands
    quantized per row as :func:`quantize_rows` does, dequantized in float64 and multiplied.
    """
    xq, sx = quantize_rows(x)
    wq, sw = quantize_rows(weight)
    out = (xq.double() * sx.double()) @ (wq.double() * sw.double()).t()
    if bias is not None:
        out = out + bias.double()
    return out


# ---------------------------------------------------------------------- where the real path runs


@functools.cache
def _probe_scaled_mm(device: str) -> str | None:
    """Run one tiny row-wise ``torch._scaled_mm`` on ``device`` as :class:`Fp8Linear` calls it (bf16
    bias and output); the error text, or None if it ran and gave the right numbers."""
    try:
        f8 = _fp8_dtype()
        a = torch.ones(16, 16, device=device).to(f8)
        b = torch.ones(16, 16, device=device).to(f8).t()
        out = torch._scaled_mm(
            a,
            b,
            torch.ones(16, 1, device=device),
            torch.full((1, 16), 0.5, device=device),
            bias=torch.ones(16, device=device, dtype=GEMM_OUT_DTYPE),
            out_dtype=GEMM_OUT_DTYPE,
        )
        out = out[0] if isinstance(out, tuple) else out
        if not bool((out.float() == 9).all()):  # 16 * 1 * 0.5 + 1
            return f"torch._scaled_mm gave a wrong result in a self-check ({out.float().flatten()[:4].tolist()})"
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def supported_reasons(device: torch.device | str) -> list[str]:
    """Why the ``scaled_mm`` path cannot run on ``device`` (an empty list: it can).

    It needs a float8_e4m3fn dtype and ``torch._scaled_mm`` in this torch build, an NVIDIA GPU
    of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and row-wise scaling to work
    there (checked once per device with a tiny GEMM). ROCm builds are not covered (their FP8
    format on MI300 is e4m3fnuz).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return list(_supported_reasons(str(device)))


@functools.cache
def _supported_reasons(device_name: str) -> tuple[str, ...]:
    # Cached per device: Fp8Linear asks on every call and the answer cannot change in a process.
    device = torch.device(device_name)
    reasons = []
    if getattr(torch, "float8_e4m3fn", None) is None:  # pragma: no cover - torch < 2.1
        reasons.append(f"torch {torch.__version__} has no float8_e4m3fn dtype")
    if not hasattr(torch, "_scaled_mm"):  # pragma: no cover - torch < 2.1
        reasons.append(f"torch {torch.__version__} has no torch._scaled_mm")
    if device.type != "cuda":
        reasons.append(
            f"device {device} is not a CUDA GPU (FP8 tensor cores need an NVIDIA GPU with compute "
            "capability 8.9 or newer)"
        )
        return tuple(reasons)
    if getattr(torch.version, "hip", None):
        reasons.append("ROCm build: the FP8 path supports NVIDIA GPUs only")
        return tuple(reasons)
    if not torch.cuda.is_available():
        reasons.append("CUDA is not available in this torch build or machine")
        return tuple(reasons)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        reasons.append(
            f"{torch.cuda.get_device_name(index)} has compute capability {major}.{minor}; FP8 tensor "
            "cores need 8.9 or newer"
        )
    if not reasons:
        error = _probe_scaled_mm(f"cuda:{index}")
        if error is not None:
            reasons.append(
                f"torch._scaled_mm with row-wise scales failed on {torch.cuda.get_device_name(index)}: {error}"
            )
    return tuple(reasons)


def shape_reasons(in_features: int, out_features: int) -> list[str]:
    """Why ``torch._scaled_mm`` cannot take a ``(out_features, in_features)`` weight (it needs both
    dimensions divisible by 16); an empty list: it can."""
    bad = [f"{name} = {v}" for name, v in (("in_features", in_features), ("out_features", out_features)) if v % 16]
    return [f"torch._scaled_mm needs dimensions divisible by 16, got {', '.join(bad)}"] if bad else []


# ---------------------------------------------------------------------- backends and dispatch


@dataclasses.dataclass(frozen=True)
class Fp8Call:
    """What the backends' declarations check for one call: the device and the layer's shape."""

    device: torch.device
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True, eq=False)
class Fp8Operands:
    """One call's GEMM operands: the quantized input ``xq (M, K)`` with its scales ``sx (M, 1)``, and
    the layer's ``weight_fp8 (N, K)``, ``weight_scale (N, 1)`` and fp32 ``bias (N,)`` or None."""

    xq: torch.Tensor
    sx: torch.Tensor
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    use_fast_accum: bool = False

    def gemm_bias(self) -> torch.Tensor | None:
        # bf16 bias: the dtype every row-wise _scaled_mm kernel takes with a bf16 output.
        return None if self.bias is None else self.bias.to(GEMM_OUT_DTYPE)


class Fp8Backend:
    """A way to compute the FP8 GEMM: why it cannot run a call, and the GEMM itself
    (``(M, N)`` in :data:`GEMM_OUT_DTYPE`)."""

    name: str = "?"

    def not_supported_reasons(self, call: Fp8Call) -> list[str]:
        return []

    def linear(self, ops: Fp8Operands) -> torch.Tensor:
        raise NotImplementedError


class ScaledMmBackend(Fp8Backend):
    """``torch._scaled_mm`` with row-wise scales: the FP8 tensor cores (NVIDIA, compute capability >= 8.9)."""

    name = "scaled_mm"

    def not_supported_reasons(self, call: Fp8Call) -> list[str]:
        return supported_reasons(call.device) + shape_reasons(call.in_features, call.out_features)

    def linear(self, ops: Fp8Operands) -> torch.Tensor:
        # weight_fp8 (N, K) row-major -> .t() is the column-major (K, N) operand _scaled_mm wants.
        out = torch._scaled_mm(
            ops.xq,
            ops.weight_fp8.t(),
            ops.sx,
            ops.weight_scale.t(),
            bias=ops.gemm_bias(),
            out_dtype=GEMM_OUT_DTYPE,
            use_fast_accum=ops.use_fast_accum,
        )
        return out[0] if isinstance(out, tuple) else out  # torch < 2.4 also returned amax


class EmulatedBackend(Fp8Backend):
    """The same quantized operands upcast to fp32 and multiplied there: runs on any device."""

    name = "emulated"

    def linear(self, ops: Fp8Operands) -> torch.Tensor:
        # e4m3 x e4m3 products are exact in fp32 and accumulate in fp32, as on the tensor cores;
        # the scales then apply to the accumulator, as in _scaled_mm's epilogue.
        acc = ops.xq.to(torch.float32) @ ops.weight_fp8.to(torch.float32).t()
        out = acc * ops.sx * ops.weight_scale.t()
        bias = ops.gemm_bias()
        if bias is not None:
            out = out + bias.to(torch.float32)
        return out.to(GEMM_OUT_DTYPE)


#: Every backend, by name.
FP8_BACKENDS: dict[str, Fp8Backend] = {b.name: b for b in (ScaledMmBackend(), EmulatedBackend())}
#: Automatic dispatch tries them in this order (``emulated`` runs everything).
DISPATCH_ORDER = ("scaled_mm", "emulated")
#: ``Fp8Linear.backend`` values: auto = the first of :data:`DISPATCH_ORDER` that can run the call
#: (``scaled_mm`` where :func:`supported_reasons` is empty and the layer's shape allows it, else
#: ``emulated``), or a backend's name to force it.
BACKENDS = ("auto", *FP8_BACKENDS)


def select_fp8_backend(call: Fp8Call, requested: str = "auto") -> str:
    """Name of the backend that runs ``call``: ``requested`` itself when forced (run as asked, no
    check), else the first backend of :data:`DISPATCH_ORDER` without reasons."""
    if requested != "auto":
        if requested not in FP8_BACKENDS:
            raise ValueError(f"fp8 backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
        return requested
    all_reasons = {}
    for name in DISPATCH_ORDER:
        reasons = FP8_BACKENDS[name].not_supported_reasons(call)
        if not reasons:
            return name
        all_reasons[name] = reasons
    details = "; ".join(f"{name}: {', '.join(r)}" for name, r in all_reasons.items())
    raise RuntimeError(f"fp8_linear: no backend can run this call ({details})")  # pragma: no cover


# ---------------------------------------------------------------------- the module


class Fp8Linear(nn.Module):
    """Frozen linear layer with an e4m3 weight (per output channel scales) and e4m3 inputs
    (per token scales); see the module docstring for the math and the two paths.

    Build it from a trained layer with :meth:`from_linear`; the weight is quantized once there.

    Args:
        in_features, out_features: K and N.
        bias: keep a bias (fp32 buffer, added in the GEMM's epilogue as bf16).
        backend: ``"auto"`` (``scaled_mm`` where it can run, else ``emulated``), ``"scaled_mm"``
            (always ``torch._scaled_mm``; errors where it cannot run) or ``"emulated"``.
        use_fast_accum: ``torch._scaled_mm``'s fast accumulation (Hopper: faster, fewer
            accumulator bits); off by default. The emulated path ignores it.
        device: where the buffers are created.

    Shapes:
        ``forward(x (..., K))`` -> ``(..., N)`` in ``x.dtype`` (float32, bfloat16 or float16).

    Buffers: ``weight_fp8 (N, K) float8_e4m3fn``, ``weight_scale (N, 1) float32``, ``bias (N,)
    float32`` or None. ``Module.to(dtype)`` / ``.half()`` / ``.float()`` move them but never change
    their dtypes (a cast would round the scales and undo the quantization).
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        use_fast_accum: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Fp8Linear: {name} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.use_fast_accum = bool(use_fast_accum)
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, device=device).to(_fp8_dtype()))
        self.register_buffer("weight_scale", torch.full((out_features, 1), _MIN_SCALE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"Fp8Linear: backend must be one of {', '.join(BACKENDS)}, got {value!r}")
        self._backend = value

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, backend: str = "auto", use_fast_accum: bool = False) -> Fp8Linear:
        """An :class:`Fp8Linear` computing ``linear`` with its weight quantized per output channel
        (on the weight's device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Fp8Linear.from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError(
                "Fp8Linear.from_linear: the linear's weight is on the meta device (no values to "
                "quantize); load the weights first"
            )
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            backend=backend,
            use_fast_accum=use_fast_accum,
            device=weight.device,
        )
        q, scale = quantize_rows(weight)
        out.weight_fp8.copy_(q)
        out.weight_scale.copy_(scale)
        if linear.bias is not None and out.bias is not None:
            out.bias.copy_(linear.bias.detach().to(torch.float32))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Linear:
        # Take only the device from `fn`: Module.to(dtype) / .half() cast every floating buffer,
        # float8 included, and would round the fp32 scales.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(device=moved.device)
            self._buffers[name] = moved
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, ``(N, K)`` in ``dtype``."""
        return dequantize_rows(self.weight_fp8, self.weight_scale, dtype)

    def path(self, device: torch.device | str) -> str:
        """``"scaled_mm"`` or ``"emulated"``: the backend a call on ``device`` takes (:func:`select_fp8_backend`)."""
        return select_fp8_backend(Fp8Call(torch.device(device), self.in_features, self.out_features), self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Fp8Linear: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Fp8Linear: x must be float32, bfloat16 or float16, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "Fp8Linear is inference-only (a frozen teacher's layer): call it under "
                "torch.no_grad() or with an input that does not require grad"
            )
        if x.device != self.weight_fp8.device:
            raise ValueError(f"Fp8Linear: x is on {x.device} but the layer's weight is on {self.weight_fp8.device}")
        lead = x.shape[:-1]
        # The quantized GEMM sets its own dtypes: an enclosing autocast (the fp16 reference run)
        # would cast the emulated matmul's fp32 operands to fp16 and overflow its accumulator.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xq, sx = quantize_rows(x.reshape(-1, self.in_features))
            ops = Fp8Operands(xq, sx, self.weight_fp8, self.weight_scale, self.bias, self.use_fast_accum)
            out = FP8_BACKENDS[self.path(x.device)].linear(ops)
        return out.to(x.dtype).reshape(*lead, self.out_features)


# ---------------------------------------------------------------------- converting a teacher


def convert_teacher_linears(model: nn.Module, *, backend: str = "auto", use_fast_accum: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` inside ``model.blocks`` with :meth:`Fp8Linear.from_linear`, in place.

    For timm DINOv2 blocks these are ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (SwiGLU
    blocks: their gate/value projections as well; the DINOv3 7B and H+ blocks: ``mlp.fc1_g``,
    ``mlp.fc1_x``, ``mlp.fc2``). Patch embedding, norms, tokens and anything outside the blocks stay as
    they are. Layers already converted are left alone. A timm ``EvaAttention`` with q/v biases
    (DINOv3 ``_qkvb`` models) first gets them folded into its ``qkv`` layer's bias (timm then calls
    ``qkv(x)``, which the FP8 layer computes; it would otherwise read ``qkv.weight``).

    Args:
        model: a timm ``VisionTransformer`` (anything with ``blocks``) with its weights loaded.

    Returns:
        the qualified names of the converted layers (e.g. ``"blocks.0.attn.qkv"``).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, Iterable) or not isinstance(blocks, nn.Module):
        raise TypeError(
            f"convert_teacher_linears: expected a timm VisionTransformer with .blocks, got {type(model).__name__}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"convert_teacher_linears: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    converted = []
    for i, block in enumerate(blocks):
        _fold_qkv_biases(block)
        for name, mod in list(block.named_modules()):
            if type(mod) is not nn.Linear:
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, leaf, Fp8Linear.from_linear(mod, backend=backend, use_fast_accum=use_fast_accum))
            converted.append(f"blocks.{i}.{name}")
    return converted


def _fold_qkv_biases(block: nn.Module) -> None:
    """``q_bias``/``k_bias``/``v_bias`` of timm ``EvaAttention`` modules in ``block`` -> the bias of their
    ``qkv`` ``nn.Linear`` (same output: timm adds ``cat(q_bias, k_bias, v_bias)`` to ``qkv(x)``)."""
    for mod in block.modules():
        linear = getattr(mod, "qkv", None)
        q_bias = getattr(mod, "q_bias", None)
        if not isinstance(q_bias, torch.Tensor) or type(linear) is not nn.Linear or linear.bias is not None:
            continue
        with torch.no_grad():
            bias = torch.cat((q_bias, mod.k_bias, mod.v_bias)).detach().to(linear.weight.dtype)
            folded = nn.Linear(
                linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype
            )
            folded.weight.copy_(linear.weight)
            folded.bias.copy_(bias)
        folded.requires_grad_(linear.weight.requires_grad)
        mod.qkv = folded
        mod.q_bias = mod.k_bias = mod.v_bias = None


def fp8_linears(model: nn.Module) -> list[tuple[str, Fp8Linear]]:
    """``(name, layer)`` of every :class:`Fp8Linear` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear)]


def describe_paths(model: nn.Module, device: torch.device | str) -> tuple[dict[str, int], list[str]]:
    """How the FP8 layers of ``model`` run on ``device``.

    Returns:
        ``({"scaled_mm": n1, "emulated": n2}, reasons)`` where ``reasons`` says why layers are
        emulated (:func:`supported_reasons`, plus the shapes ``torch._scaled_mm`` cannot take).
    """
    counts = {"scaled_mm": 0, "emulated": 0}
    reasons = list(supported_reasons(device))
    shapes = set()
    for _, layer in fp8_linears(model):
        path = layer.path(device)
        counts[path] += 1
        if path == "emulated" and not reasons and layer.backend == "auto":
            shapes.update(shape_reasons(layer.in_features, layer.out_features))
    return counts, reasons + sorted(shapes)


def emulation_warning(model: nn.Module, device: torch.device | str) -> str | None:
    """The warning to print when some FP8 layers of ``model`` run the emulated path on ``device``
    (None when all run ``torch._scaled_mm``)."""
    counts, reasons = describe_paths(model, device)
    if not counts["emulated"]:
        return None
    return (
        f"FP8 teacher: {counts['emulated']} of {sum(counts.values())} linear layers run the emulated FP8 path "
        f"on {device} (same numerics as the FP8 tensor cores, fp32 matmul speed: slower than the teacher dtype): "
        + "; ".join(reasons)
    )
