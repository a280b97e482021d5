"""tools/compile_check.py: the Triton kernels compiled for Hopper (sm_90) without a GPU, with the
specialization a real launch gets.

The rest of the suite runs the kernels through the Triton interpreter, which never compiles them.
compile_check runs in subprocesses here: it needs TRITON_INTERPRET off before Triton is imported,
and this process has it on. The fast tests check its pieces (the captured launches and their
specialization, the occupancy arithmetic, the PTX scan, the pass/fail rules) with one small
compile; the slow one compiles every kernel in every autotune config (bf16) and must pass.
``tools/compile_check.sh`` runs the same check under Triton 3.6 as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
needs_ptxas = pytest.mark.skipif(
    not (os.path.exists(PTXAS) or shutil.which("ptxas")), reason="no ptxas in this Triton install"
)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAP_KERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TOOLS, env.get("PYTHONPATH", "")])
    return env


PROBE = textwrap.dedent("""
    import json
    import compile_check as cc
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    facts = {"launches": {}}
    for op, case, fn in cc.workloads(["bf16", "fp32"], set(cc.OPS)):
        with cc.capture_launches() as launches:
            fn()
        facts["launches"][case] = [
            {"kernel": l.fn.__name__, "autotuned": l.autotuned, "config": s.config(), "spec": s.specialization(),
             "signature": {k: v for k, v in s.signature.items()}}
            for l, s in ((l, cc.specialize(l, target)) for l in launches)]
    # One real compile (the smallest kernel) through the same path as the full check.
    with cc.capture_launches() as launches:
        next(fn for op, case, fn in cc.workloads(["bf16"], {"feature_loss"}) if "mean" in case)()
    rescale = next(l for l in launches if l.fn.__name__ == "_rescale_kernel")
    facts["rescale"] = cc.compile_one(cc.specialize(rescale, target), target)

    # The pass/fail rules on made-up results.
    def result(**kw):
        base = dict(op="feature_loss", case="bf16 mse mean fwd+grads", kernel="_projection_loss_kernel",
                    config="BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 warps=8 stages=3", specialization="",
                    autotuned=True, registers=174, spill_bytes=0, shared_bytes=98304, threads=256, ctas=1,
                    features={"wgmma": True, "tma": False, "cp.async": True, "mma.sync": False})
        base.update(kw)
        r = cc.Result(**base)
        cc.check(r, arch=90, known_spills=known)
        return r

    known = {("_projection_loss_kernel", "bf16", "BLOCK_M=9 warps=8 stages=3")}
    verdicts = {
        "clean": result(),
        "spill": result(spill_bytes=64),
        "known_spill": result(spill_bytes=64, config="BLOCK_M=9 warps=8 stages=3"),
        "known_spill_other_dtype": result(spill_bytes=64, config="BLOCK_M=9 warps=8 stages=3",
                                          case="fp16 mse mean fwd+grads"),
        "no_wgmma": result(features={"wgmma": False}),
        "fp32_no_wgmma": result(features={"wgmma": False}, case="fp32 mse mean fwd+grads"),
        "compile_error": result(error="CompilationError: boom"),
        "too_much_smem_autotuned": result(shared_bytes=320 * 1024, ctas=0, spill_bytes=600),
        "too_much_smem_fixed": result(shared_bytes=320 * 1024, ctas=0, autotuned=False),
    }
    facts["problems"] = {k: r.problems for k, r in verdicts.items()}
    facts["fails"] = {k: bool(cc.failures([r], allow_spills=False)) for k, r in verdicts.items()}
    facts["fails_allow_spills"] = {k: bool(cc.failures([r], allow_spills=True)) for k, r in verdicts.items()}
    facts["summary"] = cc.summarize_spills(list(verdicts.values()), known)
    facts["ctas"] = {
        "gemm": cc.ctas_per_sm(174, 98304, 256), "small": cc.ctas_per_sm(32, 0, 128),
        "regs": cc.ctas_per_sm(255, 0, 512), "smem": cc.ctas_per_sm(64, 233 * 1024, 128),
        "two_by_smem": cc.ctas_per_sm(96, 100 * 1024, 128)}
    facts["ptx"] = {
        "hopper": cc.ptx_features("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16 ..."
                                  " cp.async.bulk.tensor.2d.shared::cluster.global"),
        "ampere": cc.ptx_features("cp.async.cg.shared.global [%r1], [%rd2], 16; mma.sync.aligned.m16n8k16"),
        "scalar": cc.ptx_features("ld.global.b16 %rs1, [%rd1]; fma.rn.f32")}
    facts["covered"] = sorted(cc.launched_kernels())

    # Host code that no longer matches this script fails the check instead of crashing it.
    def broken_workloads(dtypes, ops):
        def broken():
            raise TypeError("fused_feature_loss() takes 9 positional arguments")
        yield "feature_loss", "bf16 broken", broken
    cc.workloads = broken_workloads
    broken = cc.run(90, ["bf16"], {"feature_loss"}, set(), out=lambda line: None)
    facts["broken_host_code"] = [r.error for r in cc.failures(broken, allow_spills=True)]
    print("FACTS " + json.dumps(facts))
""")


@pytest.fixture(scope="module")
def facts():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FACTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS ") :])


def _launches(facts, case, kernel):
    return [l for l in facts["launches"][case] if l["kernel"] == kernel]


def test_launches_are_specialized_like_a_real_launch(facts):
    # Unit strides become the constant 1, 16-aligned pointers and multiple-of-16 ints get divisibility 16.
    proj = _launches(facts, "bf16 mse mean fwd+grads", "_projection_loss_kernel")
    assert proj, facts["launches"]["bf16 mse mean fwd+grads"]
    spec = proj[0]["spec"]
    assert spec.startswith("=1: stride_sk,stride_wk,stride_tn "), spec
    # K (D_s = 384) is a constexpr trip count, so it is no longer a specialized runtime integer.
    assert "/16: S,W,BIAS,T,OUT,ROW_SCALE,PARTIAL_LOSS,M,N,stride_sm,stride_wn,stride_tm,stride_om" in spec, spec
    assert proj[0]["signature"]["K"] == "constexpr", proj[0]["signature"]
    assert proj[0]["signature"]["stride_sk"] == "constexpr" and proj[0]["signature"]["S"] == "*bf16"
    attn = _launches(facts, "bf16 B=128 N=261 H=24 d=64", "_teacher_attention_fwd_kernel")
    assert attn[0]["spec"].startswith("=1: stride_qkv_c "), attn[0]["spec"]
    assert ",N," not in attn[0]["spec"] and ",H," not in attn[0]["spec"]  # N = 261, H = 24: not multiples of 16
    rows = _launches(facts, "bf16 fwd", "_token_norm_mse_rows_kernel")
    assert rows and rows[0]["spec"].startswith("=1: stride_xd,stride_td "), rows


def test_every_choosable_autotune_config_is_compiled(facts):
    proj = _launches(facts, "bf16 mse mean fwd+grads", "_projection_loss_kernel")
    assert all(l["autotuned"] for l in proj)
    configs = {l["config"] for l in proj}  # each chunk of the 32768 tokens launches every config
    assert len(configs) >= 2 and len(proj) % len(configs) == 0, [l["config"] for l in proj]
    # The attention autotuner prunes 128x128 tiles for d = 128 itself: fewer configs than for d = 64.
    d64 = {l["config"] for l in _launches(facts, "bf16 B=128 N=261 H=24 d=64", "_teacher_attention_fwd_kernel")}
    d128 = {l["config"] for l in _launches(facts, "bf16 B=128 N=261 H=12 d=128", "_teacher_attention_fwd_kernel")}
    assert d128 and d128 < d64, (d64, d128)
    # fp32 runs no attention kernel (torch backend), and each op's kernels are all reached.
    assert not any("d=" in case for case in facts["launches"] if case.startswith("fp32"))
    launched = {l["kernel"] for ls in facts["launches"].values() for l in ls}
    assert launched == set(facts["covered"]), (launched, facts["covered"])


@needs_ptxas
def test_one_kernel_compiles_with_resources(facts):
    info = facts["rescale"]
    assert 0 < info["registers"] <= 255 and info["spill_bytes"] == 0 and info["threads"] == 128
    assert not info["features"]["wgmma"]


def test_pass_fail_rules(facts):
    fails, allow = facts["fails"], facts["fails_allow_spills"]
    assert not fails["clean"] and facts["problems"]["clean"] == []
    assert fails["spill"] and facts["problems"]["spill"] == ["spills 64 B"] and not allow["spill"]
    assert not fails["known_spill"] and fails["known_spill_other_dtype"]
    assert fails["no_wgmma"] and allow["no_wgmma"] and not fails["fp32_no_wgmma"]
    assert fails["compile_error"] and allow["compile_error"]
    # An autotune config that needs more shared memory than an SM has is skipped by the autotuner
    # (not choosable); a fixed launch that does not fit is an error.
    assert not fails["too_much_smem_autotuned"] and fails["too_much_smem_fixed"]
    assert facts["broken_host_code"] == ["host code: TypeError: fused_feature_loss() takes 9 positional arguments"]
    summary = facts["summary"]
    assert "spill (NEW): _projection_loss_kernel bf16 [BLOCK_M=128" in summary
    assert "spill (known): _projection_loss_kernel bf16 [BLOCK_M=9 warps=8 stages=3]" in summary
    assert "('_projection_loss_kernel', 'fp16', 'BLOCK_M=9 warps=8 stages=3')," in summary  # paste-ready


def test_occupancy_and_ptx_scan(facts):
    # 174 regs x 256 threads: 22 x 256-register units per warp, 11 warps' worth -> 1 CTA of 8 warps.
    assert facts["ctas"] == {"gemm": 1, "small": 16, "regs": 0, "smem": 0, "two_by_smem": 2}
    assert facts["ptx"]["hopper"] == {"wgmma": True, "tma": True, "cp.async": False, "mma.sync": False}
    assert facts["ptx"]["ampere"] == {"wgmma": False, "tma": False, "cp.async": True, "mma.sync": True}
    assert not any(facts["ptx"]["scalar"].values())


@pytest.mark.slow
@needs_ptxas
def test_every_kernel_config_compiles_for_sm90_without_new_spills():
    """The whole check for bf16 (what training runs) under this process's Triton (cached by Triton
    after the first run: seconds; the first run compiles ~40 kernels, minutes)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "compile_check.py"), "--dtypes", "bf16"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"all kernels compiled for sm_90 (Triton {triton.__version__})" in out
    # A real launch of the 16-bit GEMMs and attention: tensor cores and asynchronous copies.
    for kernel in ("_projection_loss_kernel", "_grad_weight_kernel", "_teacher_attention_fwd_kernel"):
        lines = [line for line in out.splitlines() if f" {kernel} " in line and line[:4] in ("ok  ", "warn")]
        assert lines and all("wgmma" in line and "cp.async" in line for line in lines), (kernel, lines)
