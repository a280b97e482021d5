"""Build script: metadata lives in pyproject.toml; this file declares the compiled extension
``leap_kernels._C`` (C++ CPU kernels, plus CUDA kernels when a CUDA toolkit is there).

Switches (environment variables):
    LEAP_KERNELS_BUILD_CUDA  unset: compile csrc/cuda/*.cu when a CUDA toolkit is found and a GPU
                             is visible; 1: compile them whenever a toolkit is found (CI, build
                             machines without a GPU; no toolkit is then an error); 0: never.
    TORCH_CUDA_ARCH_LIST     GPU architectures, e.g. "8.0;9.0" (default: the visible GPU's, else
                             "8.0;9.0").
    MAX_JOBS                 parallel compile jobs (ninja).
    CUDA_HOME                the toolkit (default: nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*).

Without an importable torch at build time (``pip install .`` with build isolation) no extension is
built; the wheel carries the C++ CPU sources (``leap_kernels/_csrc``) and ``leap_kernels`` compiles
them on first use (``leap_kernels._ext``; ``LEAP_KERNELS_JIT=0`` turns that off). Every wheel carries
them, so a prebuilt extension that cannot load falls back the same way.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """leap_kernels/_build_config.py by path: importing it through the package would import torch."""
    spec = importlib.util.spec_from_file_location(
        "_leap_build_config", os.path.join(HERE, "leap_kernels", "_build_config.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


class BuildPyWithSources(build_py):
    """Also copies the C++ CPU sources into the package (``leap_kernels/_csrc``), so that an install
    without the compiled extension can compile them on first use (:mod:`leap_kernels._ext`)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "leap_kernels", build_config.SHIPPED_CSRC)
        csrc = os.path.join(HERE, "csrc")
        for source in build_config.cpu_sources(csrc) + glob.glob(os.path.join(csrc, "*.h")):
            dest = os.path.join(target, os.path.relpath(source, csrc))
            self.mkpath(os.path.dirname(dest))
            self.copy_file(source, dest)


ENV_BUILD_CUDA = "LEAP_KERNELS_BUILD_CUDA"
DEFAULT_ARCHS = "8.0;9.0"


def log(message: str) -> None:
    print(f"leap-kernels setup: {message}", file=sys.stderr, flush=True)


def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.exists(os.path.join(path, "bin", "nvcc"))
        and os.path.exists(os.path.join(path, "include", "cuda_runtime.h"))
    )


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit of the nvcc on PATH, else /usr/local/cuda(-*). A
    directory counts only with bin/nvcc and include/cuda_runtime.h (an nvcc wrapper script in
    /usr/local/bin does not make /usr/local a toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: the toolkit path it execs
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for word in head.decode(errors="ignore").split():
                    if word.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return path
    return None


def want_cuda(torch) -> tuple[bool, str]:
    """(compile the CUDA sources?, why) from LEAP_KERNELS_BUILD_CUDA, the toolkit and the GPU."""
    switch = os.environ.get(ENV_BUILD_CUDA, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False, f"{ENV_BUILD_CUDA}=0"
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return False, "no csrc/cuda/*.cu sources"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
        if switch in ("1", "true", "yes", "on"):
            raise RuntimeError(f"{ENV_BUILD_CUDA}=1 but {reason}")
        return False, reason
    cuda_home = find_cuda_home()
    if cuda_home is None:
        reason = "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset, no /usr/local/cuda*)"
        if switch in ("1", "true", "yes", "on"):
            raise RuntimeError(f"{ENV_BUILD_CUDA}=1 but {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    if switch in ("1", "true", "yes", "on"):
        return True, f"{ENV_BUILD_CUDA}=1, toolkit {cuda_home}"
    if torch.cuda.is_available():
        return True, f"a GPU is visible, toolkit {cuda_home}"
    return False, f"no GPU visible (set {ENV_BUILD_CUDA}=1 to compile the CUDA kernels anyway)"


#: Per-library wheels of older CUDA majors (nvidia/<library>/include); cu13 has one nvidia/cu13.
CUDA_LIBRARY_WHEELS = ("cuda_runtime", "cublas", "cusparse", "cusolver", "curand", "cufft")


def wheel_cuda_include_dirs(torch) -> list[str]:
    """Headers of the CUDA wheels torch depends on (nvidia/cu13/include, ...): torch's own headers
    include some of them (e.g. the cuBLAS/cuSPARSE ones of a cu13 build), which an older system
    toolkit may lack or have in another version. Found through the ``nvidia`` package's own path
    (wherever pip put it), with torch's site-packages as a fallback."""
    import importlib.util

    major = (torch.version.cuda or "").split(".")[0]
    if not major:
        return []
    roots = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    roots.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), "nvidia"))
    dirs: list[str] = []
    for root in roots:
        for d in [
            os.path.join(root, f"cu{major}", "include"),
            *(os.path.join(root, lib, "include") for lib in CUDA_LIBRARY_WHEELS),
        ]:
            d = os.path.realpath(d)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def toolkit_include_dirs(cuda_home: str) -> list[str]:
    """The toolkit's own include dirs: include/ and targets/<arch>-linux/include (where the
    network-installer layouts keep the library headers)."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "sbsa", "aarch64": "sbsa"}.get(machine, machine)
    dirs = [
        os.path.join(cuda_home, "include"),
        *sorted(glob.glob(os.path.join(cuda_home, "targets", f"{arch}*", "include"))),
    ]
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isdir(d)))


#: Headers torch's CUDA headers include (ATen/cuda/CUDAContext.h); without them the build fails late.
REQUIRED_CUDA_HEADERS = ("cuda_runtime.h", "cublas_v2.h", "cusparse.h")


def missing_cuda_headers(include_dirs: list[str]) -> list[str]:
    return [h for h in REQUIRED_CUDA_HEADERS if not any(os.path.exists(os.path.join(d, h)) for d in include_dirs)]


def extensions():
    try:
        import torch
    except Exception as exc:  # build isolation: torch is not installed in the build environment
        log(
            f"torch is not importable at build time ({type(exc).__name__}: {exc}); building a package without "
            "a prebuilt leap_kernels._C: its C++ CPU kernels compile on first use (once per torch version, "
            "cached; LEAP_KERNELS_JIT=0 turns that off), the CUDA kernels are not built. With torch installed, "
            "'pip install --no-build-isolation .' builds them all ahead of time."
        )
        return [], {"build_py": BuildPyWithSources}
    cuda, why = want_cuda(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = build_config.cpu_sources("csrc")
    define = [build_config.torch_version_define(torch.__version__)]
    # The C++ standard is the one torch.utils.cpp_extension picks for this torch.
    cxx = ["-O3", *build_config.cpu_simd_flags(), *define]
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        cuda_sources = sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        include_dirs = [os.path.join(HERE, "csrc"), *wheel_cuda_include_dirs(torch)]
        toolkit_dirs = toolkit_include_dirs(os.environ["CUDA_HOME"])
        include_dirs += [d for d in toolkit_dirs[1:] if d not in include_dirs]  # include/ is nvcc's own
        missing = missing_cuda_headers(include_dirs[1:] + toolkit_dirs)
        if missing:
            # An explicit request fails here, with the places searched; otherwise the build falls
            # back to the CPU kernels and says so (backends() then names the reason too).
            where = ", ".join(include_dirs[1:] + toolkit_dirs) or "none"
            reason = (
                f"the CUDA headers {', '.join(missing)} were found in none of: {where} "
                "(install the CUDA wheels torch names, e.g. nvidia-cusparse, or a full toolkit)"
            )
            if os.environ.get(ENV_BUILD_CUDA, "").strip().lower() in ("1", "true", "yes", "on"):
                raise RuntimeError(f"{ENV_BUILD_CUDA}=1 but {reason}")
            log(f"NOT building the CUDA kernels: {reason}")
            cuda = False
    if cuda:
        log(
            f"building leap_kernels._C with CUDA kernels ({why}); archs {os.environ['TORCH_CUDA_ARCH_LIST']}; "
            f"extra include dirs {include_dirs[1:]}"
        )
        ext = CUDAExtension(
            "leap_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("LEAP_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", *define]},
        )
    else:
        log(f"building leap_kernels._C with the C++ CPU kernels only ({why})")
        ext = CppExtension(
            "leap_kernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args={"cxx": cxx}
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
