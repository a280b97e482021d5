"""Bad input raises a clear error naming the argument, the expected and the actual value."""

import pytest
import torch

from leap_kernels import fused_feature_loss, token_normalized_mse


def good(m=(2, 5), d_s=8, d_t=12):
    return (
        torch.randn(*m, d_s, requires_grad=True),
        torch.randn(d_t, d_s, requires_grad=True),
        torch.randn(d_t, requires_grad=True),
        torch.randn(*m, d_t),
    )


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (
            lambda a: a.update(target=torch.randn(2, 6, 12)),
            ValueError,
            r"target: expected shape \(2, 5, 12\).*got \(2, 6, 12\)",
        ),
        (
            lambda a: a.update(weight=torch.randn(12, 9)),
            ValueError,
            r"weight: expected shape \(D_t, D_s\) with D_s = 8.*got \(12, 9\)",
        ),
        (lambda a: a.update(weight=torch.randn(12)), ValueError, r"weight: expected at least 2 dim"),
        (lambda a: a.update(bias=torch.randn(13)), ValueError, r"bias: expected shape \(12,\).*got \(13,\)"),
        (
            lambda a: a.update(student=torch.randint(0, 3, (2, 5, 8))),
            TypeError,
            r"student: expected a floating dtype.*torch.int64",
        ),
        (
            lambda a: a.update(target=torch.randint(0, 3, (2, 5, 12))),
            TypeError,
            r"target: expected a floating dtype.*int64",
        ),
        (
            lambda a: a.update(student=torch.randn(0, 8), target=torch.randn(0, 12)),
            ValueError,
            r"student: got zero tokens",
        ),
        (
            lambda a: a.update(reduction="avg"),
            ValueError,
            r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'",
        ),
        (lambda a: a.update(eps=-1.0), ValueError, r"eps: expected a finite float > 0, got -1.0"),
        (lambda a: a.update(eps=float("inf")), ValueError, r"eps: expected a finite float > 0, got inf"),
        (lambda a: a.update(eps=0.0), ValueError, r"eps: expected a finite float > 0, got 0.0"),
        (lambda a: a.update(normalize="no"), TypeError, r"normalize: expected a bool, got str 'no'"),
        (
            lambda a: a.update(target=torch.randn(2, 5, 12, requires_grad=True)),
            ValueError,
            r"target:.*requires grad.*detach",
        ),
        (lambda a: a.update(student=[1.0]), TypeError, r"student: expected a torch.Tensor, got list"),
        (
            lambda a: a.update(bias=torch.randn(12, device="meta")),
            ValueError,
            r"bias: expected a tensor on cpu.*got meta",
        ),
    ],
    ids=[
        "target-shape",
        "weight-shape",
        "weight-dim",
        "bias-shape",
        "int-student",
        "int-target",
        "zero-tokens",
        "reduction",
        "eps",
        "eps-inf",
        "eps-zero",
        "normalize-str",
        "target-grad",
        "not-tensor",
        "device",
    ],
)
def test_fused_feature_loss_errors(mutate, exc, pattern):
    s, w, b, t = good()
    args = dict(student=s, weight=w, bias=b, target=t, reduction="mean", eps=1e-6, normalize=False)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        fused_feature_loss(
            args["student"],
            args["weight"],
            args["bias"],
            args["target"],
            reduction=args["reduction"],
            eps=args["eps"],
            normalize=args["normalize"],
        )


def test_target_requiring_grad_is_fine_under_no_grad():
    s, w, b, t = good()
    with torch.no_grad():
        fused_feature_loss(s, w, b, t.requires_grad_())


def test_token_normalized_mse_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"target: expected the shape of input \(3, 8\), got \(3, 9\)"):
        token_normalized_mse(x, torch.randn(3, 9))
    with pytest.raises(TypeError, match=r"input: expected a floating dtype"):
        token_normalized_mse(torch.ones(3, 8, dtype=torch.int32), x)
    with pytest.raises(ValueError, match=r"input: got zero tokens"):
        token_normalized_mse(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match=r"reduction"):
        token_normalized_mse(x, x, reduction="max")
    with pytest.raises(ValueError, match=r"eps: expected a finite float > 0, got inf"):
        token_normalized_mse(x, x, eps=float("inf"))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(student_dim=0, teacher_dim=16), ValueError, r"student_dim: expected a positive int, got 0"),
        (dict(student_dim=8, teacher_dim=-1), ValueError, r"teacher_dim: expected a positive int, got -1"),
        (dict(student_dim=8.0, teacher_dim=16), ValueError, r"student_dim: expected a positive int, got 8.0"),
        (dict(student_dim=8, teacher_dim=16, normalize="no"), TypeError, r"normalize: expected a bool, got str"),
        (dict(student_dim=8, teacher_dim=16, eps=float("inf")), ValueError, r"eps: expected a finite float > 0"),
        (dict(student_dim=8, teacher_dim=16, reduction="avg"), ValueError, r"reduction: expected one of"),
    ],
    ids=["zero-dim", "negative-dim", "float-dim", "normalize-str", "eps-inf", "reduction"],
)
def test_head_validates_its_config_at_construction(kwargs, exc, pattern):
    # Errors come from __init__, before any forward.
    from leap_kernels import FeatureDistillationHead

    with pytest.raises(exc, match=pattern):
        FeatureDistillationHead(**kwargs)


def test_token_mse_module_validates_at_construction():
    from leap_kernels import TokenNormalizedMSELoss

    with pytest.raises(ValueError, match=r"reduction: expected one of"):
        TokenNormalizedMSELoss(reduction="avg")
    with pytest.raises(ValueError, match=r"eps: expected a finite float > 0"):
        TokenNormalizedMSELoss(eps=0.0)
