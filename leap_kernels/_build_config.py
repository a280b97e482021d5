"""How the C++ CPU kernels of ``leap_kernels._C`` are compiled: their sources and flags.

One definition for both builds: ``setup.py`` (ahead of time, loads this file by path so that it
does not import torch through the package) and :mod:`leap_kernels._ext` (just in time, on first
use of a package installed without the extension). Standard library only.
"""

from __future__ import annotations

import glob
import os
import platform

__all__ = ["cpu_simd_flags", "cpu_sources", "find_csrc", "torch_version_define", "SHIPPED_CSRC"]

#: Where a wheel carries the C++ sources (copied there by setup.py's build_py).
SHIPPED_CSRC = "_csrc"


def cpu_simd_flags() -> list[str]:
    """AVX2 for the CPU row kernel when the build machine has it (x86-64 Linux): the extension is
    built where it runs (like -march=native, but only up to AVX2, which every x86 GPU host has).
    LEAP_KERNELS_CPU_AVX2=0 turns it off (a build meant for older CPUs)."""
    if os.environ.get("LEAP_KERNELS_CPU_AVX2", "").strip() == "0":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DLEAP_KERNELS_CPU_AVX2"]
    return []


def torch_version_define(torch_version: str) -> str:
    """The macro csrc/ops.cpp stringifies into ``_C.TORCH_VERSION`` (unquoted: the ninja command line
    goes through a shell)."""
    return f"-DLEAP_KERNELS_TORCH_VERSION_TOKENS={torch_version}"


def cpu_sources(csrc: str) -> list[str]:
    """The C++ sources of the CPU kernels under ``csrc`` (the CUDA ones live in csrc/cuda)."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def find_csrc() -> str | None:
    """The C++ sources next to this package: ``<repo>/csrc`` in a source checkout (editable
    install), ``leap_kernels/_csrc`` in an installed wheel; None when neither holds them."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, SHIPPED_CSRC), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")) and cpu_sources(candidate):
            return candidate
    return None
