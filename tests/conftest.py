"""Test configuration.

Triton kernels run on CPU tensors through the Triton interpreter; it must be on
before any `@triton.jit` runs, i.e. before leap_kernels is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield


@pytest.fixture
def clean_backend_env(monkeypatch):
    monkeypatch.delenv("LEAP_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("LEAP_KERNELS_CHUNK_TOKENS", raising=False)
    return monkeypatch
