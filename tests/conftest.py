"""Test configuration.

Triton kernels run on CPU tensors through the Triton interpreter; it must be on
before any `@triton.jit` runs, i.e. before leap_kernels is imported.

Every test starts from a seed derived from its node id with ``zlib.crc32`` (stable across
processes and machines, unlike ``hash()``, which Python salts per process), so a failing
random case is replayed by running the same test again; the seed is printed with the
failure. ``LEAP_TEST_SEED=N`` overrides it (to explore other random inputs).

Markers (declared in pyproject.toml): ``slow`` (deselect with ``-m "not slow"``) and
``gpu`` (skipped unless the run selects them with ``-m gpu``; tools/gpu_check.sh does).
"""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def test_seed(nodeid: str) -> int:
    """The seed of the test ``nodeid``: ``LEAP_TEST_SEED`` if set, else ``crc32(nodeid)``."""
    env = os.environ.get("LEAP_TEST_SEED")
    return int(env) if env else zlib.crc32(nodeid.encode("utf-8"))


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(test_seed(request.node.nodeid))
    yield


def _gpu_selected(config) -> bool:
    return "gpu" in (config.getoption("markexpr", default="") or "").replace("not gpu", "")


def pytest_collection_modifyitems(config, items):
    if _gpu_selected(config):
        return
    skip = pytest.mark.skip(reason="GPU check: run with -m gpu on a CUDA machine (tools/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        seed = test_seed(item.nodeid)
        report.sections.append(
            (
                "random seed",
                f"torch seed {seed} (zlib.crc32 of the test id). Replay: pytest '{item.nodeid}' "
                f"(same seed), or LEAP_TEST_SEED=<n> pytest '{item.nodeid}' for other inputs.",
            )
        )


@pytest.fixture
def clean_backend_env(monkeypatch):
    monkeypatch.delenv("LEAP_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("LEAP_KERNELS_CHUNK_TOKENS", raising=False)
    return monkeypatch


@pytest.fixture
def one_thread():
    """Run the test with one torch CPU thread (tiny models; several processes on few cores)
    and restore the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
