"""Per-dtype tolerances, in one place.

Errors are relative Frobenius norms ``||out - ref|| / ||ref||`` against a float64
evaluation of the plain PyTorch reference on the same (already rounded) inputs.
"""

import pytest
import torch

from leap_kernels import _ext

# The backends the op tests run on CPU (Triton through the interpreter). The compiled one is
# skipped, with the reason, when leap_kernels._C is not built (make test always builds it).
BACKENDS = [
    "torch",
    "triton",
    pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available(), reason=f"cpp backend: {_ext.load_error()}")),
]

# dtype -> (loss, gradients)
RELATIVE_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().double()
    expected = expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = expected.norm().item()
    return (actual - expected).norm().item() / max(denom, 1e-30)


def assert_close_rel(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
