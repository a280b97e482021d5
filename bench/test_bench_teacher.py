"""Benchmarks of the truncated teacher forward (GPU): ViT-g/14 reg4, bf16, batch 128, 224 px, to block
k (``--teacher-ks``, default 40), with timm's blocks (eager and torch.compile) and with our attention
kernel per backend; and the DINOv3 ViT-7B/16 (bf16, batch 64, 224 px) to k = 10, 20, 40 with timm's
blocks, our kernel (RoPE fused) and our kernel with the blocks past k offloaded to pinned CPU memory,
each with the peak GPU memory of one forward (``peak_total_mb``, weights included). See bench/conftest.py."""

from __future__ import annotations

import cases
import harness
import pytest
import torch
from suite import bench_device, bench_size, gpu_only, ks_option, ours_backends

VARIANTS = ("timm", "timm-compile")


def pytest_generate_tests(metafunc):
    if "dinov3_k" in metafunc.fixturenames:
        device, size = bench_device(metafunc.config), bench_size(metafunc.config)
        ks = cases.DINOV3_SIZES["smoke" if size == "smoke" else "full"].teacher_ks
        ours = [f"ours-{b}" for b in ours_backends(device) if b != "cpp"]
        # Variant-major, the offloaded teacher last: it moves the shared model's blocks to CPU memory.
        params = [(k, v) for v in ("timm", *ours, "ours-offload") for k in ks]
        metafunc.parametrize("dinov3_k,variant", params, ids=[f"k{k}-{v}" for k, v in params])
        return
    if "k" not in metafunc.fixturenames:
        return
    device, size = bench_device(metafunc.config), bench_size(metafunc.config)
    ks = ks_option(metafunc.config, "--teacher-ks", cases.MODEL_SIZES[size].teacher_ks)
    variants = [*VARIANTS, *(f"ours-{b}" for b in ours_backends(device) if b != "cpp")]
    params = [(k, v) for k in ks for v in variants]
    metafunc.parametrize("k,variant", params, ids=[f"k{k}-{v}" for k, v in params])


def _teacher_and_images(spec, device: torch.device):
    """The spec's teacher (random weights) on ``device`` and a seeded batch of images ``(B, 3, S, S)``."""
    teacher = cases.build_teacher(spec.teacher, spec.img_size, device, spec.teacher_overrides)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(spec.batch, 3, spec.img_size, spec.img_size, generator=gen).to(device, teacher.dtype)
    return teacher, x


def _run_teacher(runner, spec, teacher, k: int, variant: str, factory) -> None:
    """Time one teacher forward to block ``k``."""
    name = f"teacher-{spec.teacher}-B{spec.batch}-k{k}"
    flops = cases.teacher_flops(teacher, spec.batch, k)
    runner(name, variant, factory, kind="model", flops=flops, k=k, batch=spec.batch, model=spec.teacher)


@pytest.fixture(scope="module")
def teacher_and_images(request):
    gpu_only(request.config)
    device, size = bench_device(request.config), bench_size(request.config)
    spec = cases.MODEL_SIZES[size]
    teacher, x = _teacher_and_images(spec, device)
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
    _run_teacher(runner, spec, teacher, k, variant, factory)


@pytest.fixture(scope="module")
def dinov3_teacher(request):
    gpu_only(request.config)
    device, size = bench_device(request.config), bench_size(request.config)
    spec = cases.DINOV3_SIZES["smoke" if size == "smoke" else "full"]
    teacher, x = _teacher_and_images(spec, device)
    state = {"spec": spec, "teacher": teacher, "x": x, "offloaded": None}
    yield state
    state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def test_dinov3_teacher_forward(run_bench, dinov3_teacher, dinov3_k, variant):
    """TruncatedTeacher(x (B, 3, H, W), k) of the DINOv3 ViT-7B/16 -> (patch (B, N, D), cls (B, D)), inference."""
    from leap.teacher import TruncatedTeacher

    spec, teacher, x, k = dinov3_teacher["spec"], dinov3_teacher["teacher"], dinov3_teacher["x"], dinov3_k
    runner = run_bench
    if variant == "ours-offload":
        if dinov3_teacher["offloaded"] is None:  # blocks to pinned CPU memory; each k brings its blocks back
            dinov3_teacher["offloaded"] = TruncatedTeacher(
                teacher.model, dtype=teacher.dtype, attention_kernel=True, offload=True, device=runner.device
            )
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
        offloaded = dinov3_teacher["offloaded"]

        def factory():
            return lambda: offloaded(x, k)
    else:
        if dinov3_teacher["offloaded"] is not None:
            pytest.skip("the model's blocks were offloaded by an earlier ours-offload case")
        factories = cases.teacher_variants(teacher, x, k, runner.compile_backend)
        factory = factories["timm"] if variant == "timm" else cases.forced(factories["ours"], variant[len("ours-") :])
    _run_teacher(runner, spec, teacher, k, variant, factory)
    runner.benchmark.extra_info["peak_total_mb"] = harness.peak_total_mb(factory(), runner.device)
