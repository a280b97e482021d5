"""fp16 inputs whose projection leaves fp16's range (|P| > 65504) while the fp32 accumulator, and the float64
reference, stay finite: every backend of the token-normalized fused loss gives the reference's finite loss
and gradients (before, the Triton path stored P in fp16 and returned NaN while torch and cpp returned the
loss)."""

import pytest
import torch
from tolerances import BACKENDS, assert_close_rel

from leap_kernels import fused_feature_loss, use_backend
from leap_kernels.ops.naive import fused_feature_loss_reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_projection_beyond_fp16_range_matches_the_reference(backend):
    m, k, n = 64, 32, 100
    student = (torch.randn(m, k) * 60).half()
    weight = (torch.randn(n, k) * 80).half()  # |P| reaches ~1e5 in fp32; fp16 tops out at 65504
    bias = torch.randn(n).half()
    target = torch.randn(m, n).half()
    projection = student.float() @ weight.float().T
    assert projection.abs().max() > 65504 and torch.isfinite(projection).all()  # the case under test

    s = student.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with use_backend(backend):
        loss = fused_feature_loss(s, w, bias, target, normalize=True)
        loss.backward()
    s64 = student.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = fused_feature_loss_reference(s64, w64, bias.double(), target.double(), normalize=True)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(w.grad).all()
    assert_close_rel(loss.double(), ref.detach(), 2e-2)
    assert_close_rel(s.grad.double(), s64.grad, 5e-2)
    assert_close_rel(w.grad.double(), w64.grad, 5e-2)
