"""Benchmarks of one LEAP training step (GPU): ViT-g/14 reg4 teacher to block k (``--step-ks``,
default 10, 20, 40), ViT-S/14 student, batch 128, bf16 -- ours (the trainer's step with our kernels)
against the same step with stock timm + PyTorch, eager and torch.compile (:class:`cases.LeapStep`).
bench/whole_run.py turns the JSON into the whole-run saving over the paper's trajectory."""

from __future__ import annotations

import cases
import pytest
import torch
from suite import bench_device, bench_size, gpu_only, ks_option


def pytest_generate_tests(metafunc):
    if "k" not in metafunc.fixturenames:
        return
    size = bench_size(metafunc.config)
    ks = ks_option(metafunc.config, "--step-ks", cases.MODEL_SIZES[size].step_ks)
    params = [(k, v) for k in ks for v in cases.LeapStep.VARIANTS]
    metafunc.parametrize("k,variant", params, ids=[f"k{k}-{v}" for k, v in params])


@pytest.fixture(scope="module")
def step_models(request):
    """The teacher, the student template and the variants' steps (built on first use, then reused
    for every k: the same weights and optimizer state, one compiled student per variant)."""
    gpu_only(request.config)
    device, size = bench_device(request.config), bench_size(request.config)
    spec = cases.MODEL_SIZES[size]
    teacher = cases.build_teacher(spec.teacher, spec.img_size, device, spec.teacher_overrides)
    student = cases.build_student(spec.student, spec.img_size, device, spec.student_overrides)
    steps: dict[str, cases.LeapStep] = {}
    compile_backend = request.config.getoption("--bench-compile-backend")

    def get(variant: str) -> cases.LeapStep:
        if variant not in steps:
            steps[variant] = cases.LeapStep(variant, teacher, student, spec.batch, device, compile_backend)
        return steps[variant]

    yield spec, teacher, get
    steps.clear()  # the steps hold the models; dropping them frees the GPU memory below
    if device.type == "cuda":
        torch.cuda.empty_cache()


def test_leap_step(run_bench, step_models, k, variant):
    """One step: teacher to block k, student forward + loss + backward, CKA, AdamW."""
    spec, teacher, get = step_models
    if k > teacher.num_blocks:
        pytest.skip(f"k={k} > the teacher's {teacher.num_blocks} blocks")
    run_bench(
        f"leap-step-k{k}",
        variant,
        lambda: get(variant).at(k),
        kind="model",
        k=k,
        batch=spec.batch,
        teacher=spec.teacher,
        student=spec.student,
    )
