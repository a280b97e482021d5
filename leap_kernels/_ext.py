"""The compiled extension ``leap_kernels._C``, loaded once, never fatally.

A stale (built from older sources) extension is not an import error of leap_kernels: the ``cpp``
and ``cuda`` backends report the reason in :func:`leap_kernels.backends` and the other backends work.

An extension that cannot be imported -- not built (``pip install .`` with build isolation builds
none) or built against another torch (ABI mismatch) -- is compiled from the C++ CPU sources on first
use (:func:`_compile_cpu_extension`, torch's JIT ``cpp_extension.load`` with ninja), once per torch
version and source version, into ``$LEAP_KERNELS_CACHE_DIR`` (default ``~/.cache/leap_kernels``),
saying so in one line. ``LEAP_KERNELS_JIT=0`` turns that off. A failed compile is one warning that
names the reason; the ``torch`` (and ``triton``) backends then run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import warnings
from types import ModuleType

import torch
from torch import Tensor

from . import _build_config

#: Must equal ``kExtensionVersion`` in csrc/leap_kernels.h (bumped with the op schemas).
EXPECTED_VERSION = 2
REBUILD = "rebuild it: pip install --no-build-isolation -e . (or make test)"

_module = None
_error: str | None = None


ENV_JIT = "LEAP_KERNELS_JIT"
ENV_CACHE_DIR = "LEAP_KERNELS_CACHE_DIR"


def jit_cache_dir() -> str:
    """``$LEAP_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/leap_kernels`` (``~/.cache/leap_kernels``)."""
    if os.environ.get(ENV_CACHE_DIR):
        return os.environ[ENV_CACHE_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "leap_kernels")


def _compile_cpu_extension(import_error: str) -> ModuleType | None:
    """Compile and load the C++ CPU kernels (the extension could not be imported: ``import_error``).

    Returns the module, or None with :data:`_error` set (JIT off, no sources, or a failed build).
    """
    global _error
    if os.environ.get(ENV_JIT, "").strip().lower() in ("0", "false", "no", "off"):
        _error = f"{import_error}; {ENV_JIT}=0: not compiled on first use; {REBUILD}"
        return None
    csrc = _build_config.find_csrc()
    if csrc is None:
        _error = f"{import_error}; the C++ sources are not shipped with this install, so they cannot be compiled"
        return None
    sources = _build_config.cpu_sources(csrc)
    flags = ["-O3", *_build_config.cpu_simd_flags(), _build_config.torch_version_define(torch.__version__)]
    digest = hashlib.sha256()
    for path in sorted(sources + [os.path.join(csrc, "leap_kernels.h")]):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(flags + [torch.__version__, sys.version]).encode())
    build_dir = os.path.join(jit_cache_dir(), f"cpu-{digest.hexdigest()[:16]}")
    built = os.path.join(build_dir, "_C.so")
    if os.path.exists(built):  # the directory is keyed by the sources, flags and torch: load it as is
        try:
            spec = importlib.util.spec_from_file_location("_C", built)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            pass
    else:
        print(
            f"leap_kernels: compiling the C++ CPU kernels (once for this torch and these sources, about a minute) "
            f"into {build_dir}; {ENV_JIT}=0 turns this off",
            file=sys.stderr,
            flush=True,
        )
    try:
        # Its import logs a CUDA_HOME guess on machines without CUDA: noise for a CPU-only build.
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            cpp_logger.setLevel(level)

        os.makedirs(build_dir, exist_ok=True)
        # The name is the module's own (csrc/ops.cpp defines PyInit__C).
        return cpp_extension.load(
            name="_C",
            sources=sources,
            extra_cflags=flags,
            extra_include_paths=[csrc],
            build_directory=build_dir,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a compile error: all fall back
        first_line = (str(exc).strip().splitlines() or [""])[-1][:300]
        _error = f"{import_error}; compiling the C++ sources failed ({type(exc).__name__}: {first_line})"
        warnings.warn(f"leap_kernels: {_error}. The torch backend runs instead.", RuntimeWarning, stacklevel=3)
        return None


def _load() -> None:
    global _module, _error
    try:
        from . import _C as module  # type: ignore[attr-defined]  # registers the C++ ops with the dispatcher
    except Exception as exc:  # ImportError (not built), OSError / undefined symbol (ABI mismatch)
        # Nothing was registered (the library did not load): compiling a fresh copy is safe.
        first_line = (str(exc).splitlines() or [""])[0][:300]
        compiled = _compile_cpu_extension(f"leap_kernels._C is not importable ({type(exc).__name__}: {first_line})")
        if compiled is None:
            _error = _error if _error else f"leap_kernels._C is not importable; {REBUILD}"
            return
        module = compiled
    version = getattr(module, "EXTENSION_VERSION", None)
    built_for = getattr(module, "TORCH_VERSION", "unknown")
    if version != EXPECTED_VERSION:
        _error = (
            f"leap_kernels._C is stale (extension version {version}, the Python code expects "
            f"{EXPECTED_VERSION}); {REBUILD}"
        )
    elif built_for != torch.__version__:
        _error = (
            f"leap_kernels._C was built against torch {built_for} but torch {torch.__version__} is "
            f"running (ABI mismatch); {REBUILD}"
        )
    else:
        _module = module
        _register_fakes()


def load_error() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _error


def available() -> bool:
    return _module is not None


def with_cuda() -> bool:
    """The extension was compiled with its CUDA kernels."""
    return _module is not None and bool(getattr(_module, "WITH_CUDA", 0))


def _register_fakes() -> None:
    """Shapes of the C++ ops' outputs for torch.compile / FakeTensor (the kernels live in C++)."""

    @torch.library.register_fake("leap_kernels::rows_loss_grad")
    def _(
        x: Tensor,
        t: Tensor,
        normalize: bool,
        eps: float,
        row_scale: Tensor | None,
        want_loss: bool,
        want_grad_x: bool,
        want_grad_t: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        m, d = x.shape
        loss = x.new_empty((m if want_loss else 0,), dtype=torch.float32)
        grad_x = x.new_empty((m, d) if want_grad_x else (0,))
        grad_t = t.new_empty((m, d) if want_grad_t else (0,))
        return loss, grad_x, grad_t

    @torch.library.register_fake("leap_kernels::feature_loss_chunks")
    def _(
        student: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        normalize: bool,
        eps: float,
        want_grads: bool,
        row_scale: Tensor | None,
        chunk_tokens: int,
        cpu_16bit_gemm: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m, k = student.shape
        n = weight.shape[0]
        row_loss = student.new_empty((m,), dtype=torch.float32)
        if not want_grads:
            return row_loss, student.new_empty((0,)), row_loss.new_empty((0,)), row_loss.new_empty((0,))
        return (
            row_loss,
            student.new_empty((m, k)),
            row_loss.new_empty((n, k)),
            row_loss.new_empty((n if bias is not None else 0,)),
        )

    @torch.library.register_fake("leap_kernels::teacher_attention_fwd")
    def _(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
        batch, n, c = qkv.shape
        return qkv.new_empty((batch, n, c // 3))


_load()
