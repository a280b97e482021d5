"""Benchmarks of the truncated teacher forward (GPU): ViT-g/14 reg4, bf16, batch 128, 224 px, to block
k (``--teacher-ks``, default 40), with timm's blocks (eager and torch.compile) and with our attention
kernel per backend. See bench/conftest.py."""

from __future__ import annotations

import cases
import pytest
import torch
from suite import bench_device, bench_size, gpu_only, ks_option, ours_backends

VARIANTS = ("timm", "timm-compile")


def pytest_generate_tests(metafunc):
    if "k" not in metafunc.fixturenames:
        return
    device, size = bench_device(metafunc.config), bench_size(metafunc.config)
    ks = ks_option(metafunc.config, "--teacher-ks", cases.MODEL_SIZES[size].teacher_ks)
    variants = [*VARIANTS, *(f"ours-{b}" for b in ours_backends(device) if b != "cpp")]
    params = [(k, v) for k in ks for v in variants]
    metafunc.parametrize("k,variant", params, ids=[f"k{k}-{v}" for k, v in params])


@pytest.fixture(scope="module")
def teacher_and_images(request):
    gpu_only(request.config)
    device, size = bench_device(request.config), bench_size(request.config)
    spec = cases.MODEL_SIZES[size]
    teacher = cases.build_teacher(spec.teacher, spec.img_size, device, spec.teacher_overrides)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(spec.batch, 3, spec.img_size, spec.img_size, generator=gen).to(device, teacher.dtype)
    yield spec, teacher, x
    del teacher, x
    if device.type == "cuda":
        torch.cuda.empty_cache()


def test_teacher_forward(run_bench, teacher_and_images, k, variant):
    """TruncatedTeacher(x (B, 3, H, W), k) -> (patch (B, N, D), cls (B, D)), inference."""
    spec, teacher, x = teacher_and_images
    if k > teacher.num_blocks:
        pytest.skip(f"k={k} > the teacher's {teacher.num_blocks} blocks")
    runner = run_bench
    factories = cases.teacher_variants(teacher, x, k, runner.compile_backend)
    if variant.startswith("ours-"):
        factory = cases.forced(factories["ours"], variant[len("ours-") :])
    else:
        factory = factories[variant]
    name = f"teacher-{spec.teacher}-B{spec.batch}-k{k}"
    runner(
        name,
        variant,
        factory,
        kind="model",
        flops=cases.teacher_flops(teacher, spec.batch, k),
        k=k,
        batch=spec.batch,
        model=spec.teacher,
    )
