"""The compiled extension leap_kernels._C: its C++ ops (opcheck, the row kernel on strided and
mixed-dtype rows), and leap_kernels without it (missing, stale, built for another torch)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import assert_close_rel

from leap_kernels import _ext

OPS = torch.ops.leap_kernels
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"leap_kernels._C: {_ext.load_error()}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built_when_required():
    # make test sets LEAP_KERNELS_REQUIRE_EXT=1: there a missing _C fails instead of skipping.
    if os.environ.get("LEAP_KERNELS_REQUIRE_EXT") != "1":
        pytest.skip("LEAP_KERNELS_REQUIRE_EXT is not set")
    assert _ext.available(), _ext.load_error()


def _run_without_real_extension(fake_module_source: str | None) -> str:
    """Imports leap_kernels in a fresh interpreter where ``leap_kernels._C`` is hidden (None) or
    replaced by a module made from ``fake_module_source``; returns its stdout."""
    hook = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys, types
        FAKE = {fake_module_source!r}

        class Hide(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name != "leap_kernels._C":
                    return None
                if FAKE is None:
                    raise ImportError("hidden by the test")
                return importlib.util.spec_from_loader(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                exec(FAKE, module.__dict__)

        sys.meta_path.insert(0, Hide())
    """)
    body = textwrap.dedent("""
        import torch, leap_kernels
        from leap_kernels.ops.naive import fused_feature_loss_reference
        status = leap_kernels.backends("cpu")
        print("CPP", status["cpp"].usable, "|".join(status["cpp"].reasons))
        print("CUDA", status["cuda"].usable, "|".join(status["cuda"].reasons))
        s = torch.randn(9, 8, requires_grad=True); w = torch.randn(12, 8); b = torch.randn(12); t = torch.randn(9, 12)
        for normalize in (False, True):
            loss = leap_kernels.fused_feature_loss(s, w, b, t, normalize=normalize)
            loss.backward()
            ref = fused_feature_loss_reference(s, w, b, t, normalize=normalize)
            assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
        print("TOKEN", float(leap_kernels.token_normalized_mse(s, s * 2 + 1)))
        with leap_kernels.use_backend("cpp"):
            try:
                leap_kernels.fused_feature_loss(s, w, b, t)
            except RuntimeError as exc:
                print("FORCED", str(exc).splitlines()[0])
    """)
    # LEAP_KERNELS_JIT=0: a hidden extension is not compiled from the sources instead (tests/test_pip_install.py).
    env = {**os.environ, "TRITON_INTERPRET": "0", "LEAP_KERNELS_JIT": "0"}
    env.pop("LEAP_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", hook + body], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_works_without_the_extension():
    out = _run_without_real_extension(None)
    assert "CPP False leap_kernels._C is not importable (ImportError: hidden by the test)" in out, out
    assert "CUDA False leap_kernels._C is not importable" in out, out
    assert "TOKEN" in out  # the ops ran (automatic dispatch: torch)
    assert "FORCED fused_feature_loss: backend 'cpp' was forced but cannot run" in out, out


def test_stale_extension_is_refused():
    out = _run_without_real_extension(
        "EXTENSION_VERSION = 0\nWITH_CUDA = 0\nimport torch\nTORCH_VERSION = torch.__version__"
    )
    assert "CPP False leap_kernels._C is stale (extension version 0" in out, out
    assert "rebuild it" in out


def test_extension_built_for_another_torch_is_refused():
    out = _run_without_real_extension(
        f"EXTENSION_VERSION = {_ext.EXPECTED_VERSION}\nWITH_CUDA = 0\nTORCH_VERSION = '2.0.0'"
    )
    assert "CPP False leap_kernels._C was built against torch 2.0.0" in out and "ABI mismatch" in out, out


# ----------------------------------------------------------------------------- the C++ ops


@needs_ext
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, True), (True, True, False)])
def test_opcheck_rows_loss_grad(normalize, wants):
    x, t = torch.randn(11, 40), torch.randn(11, 40).bfloat16()
    torch.library.opcheck(OPS.rows_loss_grad.default, (x, t, normalize, 1e-6, torch.rand(11), *wants))
    torch.library.opcheck(OPS.rows_loss_grad.default, (x[:, ::2], t[:, ::2].float(), normalize, 1e-5, None, *wants))


@needs_ext
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("want_grads", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_feature_loss_chunks(normalize, want_grads, bias):
    s, w, t = torch.randn(13, 16), torch.randn(24, 16), torch.randn(13, 24)
    b = torch.randn(24) if bias else None
    torch.library.opcheck(OPS.feature_loss_chunks.default, (s, w, b, t, normalize, 1e-6, want_grads, None, 5))
    torch.library.opcheck(
        OPS.feature_loss_chunks.default, (s.bfloat16(), w, b, t.half(), normalize, 1e-6, want_grads, torch.rand(13), 64)
    )


def _rows_reference(x, t, normalize, eps, row_scale):
    x64, t64 = (a.detach().double().requires_grad_() for a in (x, t))
    if normalize:
        x_n = torch.nn.functional.layer_norm(x64, x64.shape[-1:], eps=eps)
        t_n = torch.nn.functional.layer_norm(t64, t64.shape[-1:], eps=eps)
        e = x_n - t_n
    else:
        e = x64 - t64
    loss = e.square().sum(-1)
    gx, gt = torch.autograd.grad((loss * row_scale.double()).sum(), (x64, t64))
    return loss, gx, gt


@needs_ext
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("d", [1, 7, 16, 100, 1536])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
    ids=["fp32", "bf16-fp32", "fp16-bf16"],
)
def test_rows_kernel_widths_dtypes_and_strides(normalize, d, dtypes):
    # Widths around the vector length (tails), mixed dtypes, strided rows and channels.
    m = 37
    x = (3 * torch.randn(2 * m, d + 3) + 1)[::2, 1 : d + 1].to(dtypes[0])  # row stride 2*(d+3), offset
    t = torch.randn(d, m).T.to(dtypes[1])  # channel stride m
    row_scale = torch.rand(m)
    loss, gx, gt = OPS.rows_loss_grad(x, t, normalize, 1e-6, row_scale, True, True, True)
    ref_loss, ref_gx, ref_gt = _rows_reference(x, t, normalize, 1e-6, row_scale)
    assert loss.dtype == torch.float32 and gx.dtype == x.dtype and gt.dtype == t.dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    grad_tol = max(tol[dtypes[0]], tol[dtypes[1]]) * 2
    if normalize and d == 1:  # LN of one channel is 0: loss and gradients are exactly 0
        assert loss.abs().max() == 0 and gx.abs().max() == 0
        return
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(gx, ref_gx, grad_tol, "grad x")
    assert_close_rel(gt, ref_gt, grad_tol, "grad t")


@needs_ext
def test_rows_kernel_nan_stays_in_its_row():
    x, t = torch.randn(6, 100), torch.randn(6, 100)
    x[2, 99] = float("nan")  # in the vector tail
    for normalize in (False, True):
        loss, gx, _ = OPS.rows_loss_grad(x, t, normalize, 1e-6, None, True, True, False)
        assert loss.isnan().tolist() == [False, False, True, False, False, False]
        assert gx[2].isnan().any() and torch.isfinite(gx[[0, 1, 3, 4, 5]]).all()


@needs_ext
def test_chunk_loop_bias_gradient_is_deterministic():
    # The bias gradient is reduced in a fixed order (per-thread blocks, summed in order).
    s, w, b, t = torch.randn(3000, 64), torch.randn(256, 64) / 8, torch.randn(256), torch.randn(3000, 256)
    runs = [OPS.feature_loss_chunks(s, w, b, t, True, 1e-6, True, None, 1024) for _ in range(3)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@needs_ext
def test_bench_cpu_smoke(tmp_path, capsys, monkeypatch):
    # The CPU benchmark runs end to end at tiny sizes (timings are not asserted), with peak memory.
    import csv

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import bench_cpu

    out = tmp_path / "cpu.csv"
    assert (
        bench_cpu.main(
            [
                "--smoke",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--variants",
                "eager,cpp",
                "--compile-backend",
                "eager",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {"eager", "cpp"}
    assert all(r["error"] == "" and float(r["median_ms"]) > 0 and float(r["peak_extra_mb"]) > 0 for r in rows), rows
    assert "peak / eager's" in capsys.readouterr().out
