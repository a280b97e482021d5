"""The Triton kernels compile for Hopper (sm_90) on this machine, without a GPU.

The rest of the suite runs the kernels through the Triton interpreter, which never
compiles them; this catches errors of the compiled path and checks that the 16-bit
GEMMs emit tensor-core (wgmma) instructions.
"""

import os
import shutil
import subprocess
import sys

import pytest

import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not (os.path.exists(PTXAS) or shutil.which("ptxas")), reason="no ptxas in this Triton install")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all kernels compiled for sm_90" in proc.stdout
