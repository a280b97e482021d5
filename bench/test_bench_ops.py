"""Benchmarks of the ops: fused feature loss (plain and token-normalized) and token_normalized_mse,
forward+backward, on every device; teacher attention (inference) on GPU. See bench/conftest.py."""

from __future__ import annotations

import cases
import harness
import pytest
import torch
from suite import bench_device, bench_size, gpu_only, ours_backends


def _loss_variants(device, op: str) -> list[str]:
    refs = ["eager", "compile"] + (["gemm-floor"] if op != "token-norm-only" else [])
    return refs + [f"ours-{b}" for b in ours_backends(device)]


def _attention_variants(device) -> list[str]:
    # On CUDA, each of SDPA's fast backends forced (cuDNN, flash, memory-efficient), as the anchors report.
    refs = ["eager", "compile", "sdpa-default"] + (
        ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient"] if device.type == "cuda" else []
    )
    return refs + [f"ours-{b}" for b in ours_backends(device) if b != "cpp"]  # no CPU attention kernel


def pytest_generate_tests(metafunc):
    if "loss_case" not in metafunc.fixturenames and "attention_case" not in metafunc.fixturenames:
        return
    device, size = bench_device(metafunc.config), bench_size(metafunc.config)
    if "loss_case" in metafunc.fixturenames:
        wanted = (
            ("token-norm-only",) if metafunc.function.__name__ == "test_token_normalized_mse" else ("mse", "token-mse")
        )
        params = [(c, v) for c in cases.LOSS_CASES[size] if c.op in wanted for v in _loss_variants(device, c.op)]
        metafunc.parametrize("loss_case,variant", params, ids=[f"{c.name}-{v}" for c, v in params])
    else:
        params = [(c, v) for c in cases.ATTENTION_CASES[size] for v in _attention_variants(device)]
        metafunc.parametrize("attention_case,variant", params, ids=[f"{c.name}-{v}" for c, v in params])


def _loss_factory(case: cases.LossCase, variant: str, device: torch.device, compile_backend: str):
    variants = cases.feature_loss_variants(case.op, case.m, case.d_s, case.d_t, case.dtype, device, compile_backend)
    if variant.startswith("ours-"):
        return cases.forced(variants["ours"], variant[len("ours-") :])
    return variants[variant]


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 cases stay fp32 on the GPU too (as the anchors' "no TF32" rows).
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _run_loss(runner, case: cases.LossCase, variant: str, **widths) -> None:
    """Time one loss case's variant; ``widths``: the case's sizes recorded between ``tokens`` and ``d_t``."""
    factory = _loss_factory(case, variant, runner.device, runner.compile_backend)
    runner(case.name, variant, factory, op=case.op, tokens=case.m, **widths, d_t=case.d_t, dtype=str(case.dtype))


def test_fused_loss(run_bench, loss_case, variant):
    """fused_feature_loss (student (M, D_s), W (D_t, D_s), b (D_t,), target (M, D_t)) forward + backward
    to student, W and b."""
    _run_loss(run_bench, loss_case, variant, d_s=loss_case.d_s)


def test_token_normalized_mse(run_bench, loss_case, variant):
    """token_normalized_mse (input, target (M, D)) forward + backward to input."""
    _run_loss(run_bench, loss_case, variant)


def test_teacher_attention(run_bench, attention_case, variant, request):
    """teacher_attention on a packed qkv (B, N, 3*H*d) -> (B, N, H*d), inference (bf16 on GPU); the
    ``dinov3-rope`` cases with DINOv3's rotary embedding (ours fused, SDPA after timm's rotation)."""
    gpu_only(request.config)
    runner = run_bench
    c = attention_case
    dtype = torch.bfloat16 if runner.device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(c.batch, c.n, 3 * c.heads * c.head_dim, generator=gen).to(runner.device, dtype)
    rope = tuple(t.to(runner.device) for t in cases.dinov3_rope(c.n, c.head_dim)) if c.rope else None
    factories = cases.attention_variants(qkv, c.heads, runner.compile_backend, rope=rope)
    name = "ours" if variant.startswith("ours-") else variant
    make = factories[name]

    def factory():
        fn, context = make()

        def run():
            with torch.no_grad(), context:
                return fn()

        return run

    if variant.startswith("ours-"):
        factory = cases.forced(factory, variant[len("ours-") :])
    flops = cases.attention_flops(c.batch, c.heads, c.n, c.head_dim)
    runner(c.name, variant, factory, flops=flops, batch=c.batch, heads=c.heads, tokens=c.n, head_dim=c.head_dim)
    if runner.device.type == "cuda":
        # The anchors' method (L2 flushed between runs), for comparison with their TFLOP/s.
        median, _, _ = harness.do_bench_ms(factory())
        runner.benchmark.extra_info.update(do_bench_median_ms=median, do_bench_tflops=flops / (median * 1e-3) / 1e12)
