"""A short tour of the ops: ``python -m leap_kernels.demo``.

Distills random "teacher" tokens into random "student" tokens through a projection
head for a few steps, with the paper's MSE and the token-normalized MSE, and prints
the loss, gradient norms and the backend that ran.
"""

from __future__ import annotations

import argparse

import torch

import leap_kernels
from leap_kernels._backends import select_backend
from leap_kernels.ops.naive import fused_feature_loss_reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8 * 257, help="tokens per step (batch x sequence)")
    parser.add_argument("--student-dim", type=int, default=384)
    parser.add_argument("--teacher-dim", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    print("backends:")
    for status in leap_kernels.backends(device).values():
        print(f"  {status}")
    student_features = torch.randn(args.tokens, args.student_dim, device=device, dtype=dtype)
    mixing = torch.randn(args.student_dim, args.teacher_dim, device=device) / args.student_dim**0.5
    teacher_features = (student_features.float() @ mixing + 3.0).to(dtype)  # a learnable target
    print(f"backend used: {select_backend('fused_feature_loss', [student_features])} on {device}, {dtype}")
    print(f"tokens {args.tokens}, projection {args.student_dim} -> {args.teacher_dim}")

    for normalize in (False, True):
        name = "token-normalized MSE" if normalize else "MSE (paper)"
        head = leap_kernels.FeatureDistillationHead(args.student_dim, args.teacher_dim, normalize=normalize).to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=3e-2)
        print(f"\n{name}")
        for step in range(args.steps):
            student = student_features.clone().requires_grad_()
            loss = head(student, teacher_features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            assert student.grad is not None and head.weight.grad is not None
            assert head.bias is not None and head.bias.grad is not None
            print(
                f"  step {step}: loss {loss.item():.4f}  |grad student| {student.grad.float().norm():.3e}  "
                f"|grad W| {head.weight.grad.norm():.3e}  |grad b| {head.bias.grad.norm():.3e}"
            )
        with torch.no_grad():
            assert head.bias is not None
            ref = fused_feature_loss_reference(
                student_features.double(),
                head.weight.double(),
                head.bias.double(),
                teacher_features.double(),
                normalize=normalize,
            )
            ours = head(student_features, teacher_features)
        print(f"  check vs float64 reference: {ours.item():.6f} vs {ref.item():.6f}")


if __name__ == "__main__":
    main()
