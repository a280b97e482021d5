"""Input validation shared by the ops: every error names the argument, what was
expected and what was given."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_tensor(name: str, value: object, *, min_dim: int = 1) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16 or float64), got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dim(s), got shape {_shape(value)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}"
            )


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def check_eps(eps: object) -> None:
    # eps = inf would make every normalized token 0 (loss 0); eps <= 0 divides by zero on constant tokens.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")


def check_normalize(normalize: object) -> None:
    # A string such as "no" would otherwise count as True.
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__} {normalize!r}")


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_constant_target(target: torch.Tensor, op: str) -> None:
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"target: {op} treats the target as a constant (teacher features) and returns no gradient "
            "for it, but it requires grad; pass target.detach()"
        )


def check_tokens(name: str, t: torch.Tensor) -> None:
    if t.shape[:-1].numel() == 0:
        raise ValueError(f"{name}: got zero tokens (shape {_shape(t)}); need at least one token")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: got zero channels (shape {_shape(t)}); need at least one")


def check_feature_loss_inputs(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    reduction: object,
    eps: object,
) -> None:
    check_tensor("student", student)
    check_tensor("weight", weight, min_dim=2)
    if bias is not None:
        check_tensor("bias", bias)
    check_tensor("target", target)
    check_reduction(reduction)
    check_eps(eps)
    check_same_device(student=student, weight=weight, bias=bias, target=target)
    d_student = student.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_student:
        raise ValueError(
            f"weight: expected shape (D_t, D_s) with D_s = {d_student} (student's last dim), "
            f"nn.Linear layout, got {_shape(weight)}"
        )
    d_teacher = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_teacher):
        raise ValueError(f"bias: expected shape ({d_teacher},) (D_t, from weight), got {_shape(bias)}")
    expected_target = (*student.shape[:-1], d_teacher)
    if tuple(target.shape) != expected_target:
        raise ValueError(
            f"target: expected shape {expected_target} (student's leading dims {tuple(student.shape[:-1])} "
            f"+ D_t = {d_teacher}), got {_shape(target)}"
        )
    check_tokens("student", student)
    if d_teacher == 0:
        raise ValueError(f"weight: got D_t = 0 (shape {_shape(weight)}); need at least one output channel")
    check_constant_target(target, "fused_feature_loss")


def check_token_mse_inputs(input: torch.Tensor, target: torch.Tensor, reduction: object, eps: object) -> None:
    check_tensor("input", input)
    check_tensor("target", target)
    check_reduction(reduction)
    check_eps(eps)
    check_same_device(input=input, target=target)
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"target: expected the shape of input {_shape(input)}, got {_shape(target)}")
    check_tokens("input", input)
