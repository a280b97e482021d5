"""The benchmark suite: ``pytest bench/`` times every op with pytest-benchmark.

    pytest bench/                                    # full sizes on a CUDA GPU, small sizes on CPU
    pytest bench/ --benchmark-json=out.json          # + the JSON (compare with bench/compare.py)
    pytest bench/ --bench-size=smoke                 # tiny shapes: checks the plumbing (any device)
    pytest bench/test_bench_teacher.py --teacher-ks=1,10,20,30,40

Per case (shape + dtype) the variants are: ours once per backend ``leap_kernels.backends(device)``
can run (``ours-triton``, ``ours-cuda``, ``ours-cpp``, ``ours-torch``; the Triton interpreter is not
benchmarked), the eager PyTorch reference (``eager``) and ``torch.compile`` of it (``compile``), plus
op-specific references (``gemm-floor``, ``sdpa-*``, ``timm``, ``stock-*``). Each test's group is its
case, so pytest-benchmark's table shows the variants of a case side by side.

One round = one call of the variant's closure (one forward+backward; one forward for inference
ops; one training step), timed by pytest-benchmark's pedantic mode through
:class:`harness.RoundTimer`: on CUDA it synchronizes before and after the call, so a round's host
time covers the GPU work, and CUDA events give the device time. ``extra_info`` of each benchmark
holds ``case``, ``variant``, ``median_ms`` (CUDA-event median on GPU, host median on CPU: what
bench/compare.py compares), ``peak_extra_mb`` (:func:`harness.peak_extra_mb`, one more call) and
op-specific figures (TFLOP/s). The JSON's ``machine_info.leap_bench`` names the device, its class
(the baseline file bench/baselines/<class>.json), the versions and the load average at the start;
``commit_info`` is pytest-benchmark's git info.

Options (``pytest bench/ --help``, group "leap benchmarks"): ``--bench-size``, ``--bench-device``,
``--bench-rounds``, ``--bench-warmup``, ``--bench-compile-backend``, ``--teacher-ks``, ``--step-ks``.
GPU-only cases (teacher attention, truncated teacher, LEAP step) are skipped on CPU except at
``--bench-size=smoke``, which rehearses them at tiny shapes.

Without pytest-benchmark (not installed, or ``-p no:benchmark``) the suite still runs and writes
``--benchmark-json`` in the same layout, timed by bench/benchmark_fallback.py.
"""

from __future__ import annotations

import os

import benchmark_fallback
import cases
import harness
import pytest
import torch
from suite import Runner, bench_device, bench_size, ours_backends

# Set in pytest_addoption: pytest-benchmark is not loaded (not installed, or -p no:benchmark) and the
# suite uses benchmark_fallback instead.
_FALLBACK = False


def pytest_addoption(parser, pluginmanager):
    global _FALLBACK
    _FALLBACK = not pluginmanager.has_plugin("benchmark")
    if _FALLBACK:
        fallback = parser.getgroup("benchmark (leap fallback: pytest-benchmark is not loaded)")
        fallback.addoption("--benchmark-json", default=None, help="write the results as JSON here")
        fallback.addoption("--benchmark-columns", default=None, help="accepted and ignored")
    group = parser.getgroup("leap benchmarks")
    group.addoption(
        "--bench-size",
        choices=("auto", *cases.SIZES),
        default="auto",
        help="full (paper sizes), small (CPU sizes), smoke (tiny); auto: full on CUDA, small on CPU",
    )
    group.addoption("--bench-device", default=None, help="device to benchmark (default: cuda if available, else cpu)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default per device)")
    group.addoption("--bench-warmup", type=int, default=None, help="untimed calls before timing (default per device)")
    group.addoption(
        "--bench-compile-backend",
        default="inductor",
        help="torch.compile backend of the compile variants (e.g. 'eager' for a quick rehearsal)",
    )
    group.addoption(
        "--teacher-ks",
        default=None,
        help="comma-separated teacher blocks k of the truncated-teacher benchmark (default: 40; smoke: 1,4)",
    )
    group.addoption(
        "--step-ks",
        default=None,
        help="comma-separated target blocks k of the LEAP-step benchmark (default: 10,20,40; smoke: 1,2,4)",
    )


def pytest_configure(config):
    # The load before the suite adds its own: how quiet the machine was (pytest-benchmark asks for
    # the machine info only when it writes the JSON, at the end).
    config._leap_bench_loadavg = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config._leap_fallback_benchmarks = []


def pytest_report_header(config):
    device = bench_device(config)
    return (
        f"leap benchmarks: device {harness.device_class(device)}, size {bench_size(config)}, "
        f"ours backends {','.join(ours_backends(device))}"
    )


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: unknown to pytest without it
def pytest_benchmark_update_machine_info(config, machine_info):
    device = bench_device(config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({harness.cpu_name()})"
    machine_info["leap_bench"] = {
        "device": name,
        "device_class": harness.device_class(device),
        "size": bench_size(config),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": getattr(config, "_leap_bench_loadavg", None),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "compile_backend": config.getoption("--bench-compile-backend"),
        **harness.versions(),
    }


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info):
    commit_info["leap_git_sha"] = harness.environment()["git_sha"]


def pytest_sessionfinish(session):
    config = session.config
    path = config.getoption("--benchmark-json", default=None) if _FALLBACK else None
    if path:
        machine_info, commit_info = {}, {}
        pytest_benchmark_update_machine_info(config, machine_info)
        pytest_benchmark_update_commit_info(config, commit_info)
        benchmark_fallback.write_json(path, config._leap_fallback_benchmarks, machine_info, commit_info)


def pytest_terminal_summary(terminalreporter, config):
    if _FALLBACK and config._leap_fallback_benchmarks:
        terminalreporter.section("benchmarks (pytest-benchmark not loaded: leap fallback timer)")
        for line in benchmark_fallback.summary_lines(config._leap_fallback_benchmarks):
            terminalreporter.write_line(line)
        path = config.getoption("--benchmark-json", default=None)
        if path:
            terminalreporter.write_line(f"Wrote benchmark data in: {path}")


@pytest.fixture
def run_bench(request):
    """``run_bench(case, variant, factory, kind="op"|"model", flops=None, memory=True, **extra_info)``."""
    if _FALLBACK:
        bench = benchmark_fallback.FallbackBenchmark(request.node.name, request.node.nodeid)
        request.config._leap_fallback_benchmarks.append(bench)
    else:
        bench = request.getfixturevalue("benchmark")
    return Runner(bench, request.config)


@pytest.fixture(autouse=True)
def _seed():
    # Fixed inputs: every run of the suite times the same numbers.
    torch.manual_seed(0)
    yield
