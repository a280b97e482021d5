"""Helpers of the benchmark suite (bench/conftest.py, bench/test_bench_*.py): the device and size a
run benchmarks, which backends of ours it times, and :class:`Runner`, which times one variant."""

from __future__ import annotations

import statistics

import harness
import pytest
import torch

import leap_kernels

# Rounds and warm-up calls per kind of benchmark and device type, unless --bench-rounds / --bench-warmup.
ROUNDS = {"cuda": {"op": 50, "model": 10}, "cpu": {"op": 10, "model": 3}}
WARMUP = {"cuda": {"op": 10, "model": 3}, "cpu": {"op": 2, "model": 1}}
SMOKE_ROUNDS, SMOKE_WARMUP = 3, 1

FORCED_FAILURE = "was forced but cannot run these inputs"


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device={name}: CUDA is not available here")
    return device


def bench_size(config) -> str:
    size = config.getoption("--bench-size")
    if size == "auto":
        return "full" if bench_device(config).type == "cuda" else "small"
    return size


def ks_option(config, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = config.getoption(name)
    if not value:
        return default
    try:
        ks = tuple(int(k) for k in value.split(",") if k.strip())
    except ValueError:
        raise pytest.UsageError(f"{name}: expected comma-separated integers, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise pytest.UsageError(f"{name}: expected positive block numbers, got {value!r}")
    return ks


def ours_backends(device: torch.device) -> list[str]:
    """Backends whose kernels can run on ``device`` here: usable ones, plus ones automatic dispatch
    skips only because they were never verified on the hardware (forcing runs them, and timing
    them is how they get measured). The Triton interpreter on CPU is a test tool, not a backend to time."""
    names = []
    for name, status in leap_kernels.backends(device).items():
        if device.type == "cpu" and name == "triton":
            continue
        if status.usable or all("not yet verified" in reason for reason in status.reasons):
            names.append(name)
    return names


def gpu_only(config) -> None:
    """Skips the calling test on CPU unless the size is smoke (a rehearsal of GPU-only cases)."""
    if bench_device(config).type != "cuda" and bench_size(config) != "smoke":
        pytest.skip("GPU-only benchmark (full sizes); --bench-size=smoke rehearses it on CPU")


class Runner:
    """Times one variant's closure in a pytest-benchmark test and records the extra figures."""

    def __init__(self, benchmark, config):
        self.benchmark = benchmark
        self.device = bench_device(config)
        self.size = bench_size(config)
        self.rounds_option = config.getoption("--bench-rounds")
        self.warmup_option = config.getoption("--bench-warmup")
        self.compile_backend = config.getoption("--bench-compile-backend")

    def counts(self, kind: str) -> tuple[int, int]:
        if self.size == "smoke":
            rounds, warmup = SMOKE_ROUNDS, SMOKE_WARMUP
        else:
            key = "cuda" if self.device.type == "cuda" else "cpu"
            rounds, warmup = ROUNDS[key][kind], WARMUP[key][kind]
        rounds = self.rounds_option if self.rounds_option is not None else rounds
        warmup = self.warmup_option if self.warmup_option is not None else warmup
        if rounds < 1 or warmup < 0:
            raise pytest.UsageError(f"--bench-rounds must be >= 1 and --bench-warmup >= 0, got {rounds}, {warmup}")
        return rounds, warmup

    def __call__(
        self,
        case: str,
        variant: str,
        factory,
        *,
        kind: str = "op",
        flops: float | None = None,
        memory: bool = True,
        **extra,
    ) -> None:
        """Build ``factory()``, warm up, time ``rounds`` rounds, fill ``benchmark.extra_info``.

        A forced backend that cannot run the case skips the test (with its reasons); any other
        error fails it."""
        rounds, warmup = self.counts(kind)
        bench = self.benchmark
        bench.group = case
        bench.extra_info.update(case=case, variant=variant, size=self.size, device=str(self.device), **extra)
        try:
            fn = factory()
            for _ in range(warmup):
                fn()
        except RuntimeError as exc:
            if FORCED_FAILURE in str(exc):
                pytest.skip(f"{variant}: {str(exc).splitlines()[0][:300]}")
            raise
        timer = harness.RoundTimer(fn, self.device)
        bench.pedantic(timer, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(bench, "stats", None)
        if timer.device_ms:
            median_ms = statistics.median(timer.device_ms)
        elif stats is not None:
            median_ms = stats.stats.median * 1e3
        else:  # --benchmark-disable: one untimed call
            median_ms = None
        bench.extra_info["median_ms"] = median_ms
        bench.extra_info["timer"] = "cuda-events" if timer.device_ms else "host"
        if flops is not None and median_ms:
            bench.extra_info["tflops"] = flops / (median_ms * 1e-3) / 1e12
        if memory:
            bench.extra_info["peak_extra_mb"] = harness.peak_extra_mb(fn, self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
