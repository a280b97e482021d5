"""Compile every Triton kernel of leap_kernels for a GPU target, without a GPU.

Catches errors of the compiled (non-interpreted) path that the CPU test suite, which runs
the kernels through the Triton interpreter, cannot see, and reports per kernel the shared
memory it needs and whether tensor-core MMA instructions (wgmma on sm_90) were emitted.

    python bench/compile_check.py [--arch 90]

Must run without TRITON_INTERPRET (it is removed here before the kernels are imported).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from leap_kernels.ops import feature_loss, teacher_attention, token_norm_mse  # noqa: E402


def _jit_function(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):  # unwrap autotuners
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, types: dict, constexprs: dict, *, arch: int, num_warps: int, num_stages: int = 3) -> dict:
    fn = _jit_function(kernel)
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    return {"kernel": fn.__name__, "shared_bytes": compiled.metadata.shared, "mma": mma}


def cases(arch: int):
    """(kernel, types, constexprs, num_warps, what must hold) for the configurations that matter."""
    for dt in ("bf16", "fp16", "fp32"):
        ptr = f"*{dt}"
        mma = "none" if dt == "fp32" else ("wgmma" if arch >= 90 else "mma")  # fp32 "ieee" dots run on FMA units
        precision = "ieee" if dt == "fp32" else "tf32"
        for mode in (1, 0):
            types = dict(S=ptr, W=ptr, BIAS="*fp32", T=ptr, OUT=ptr if mode == 1 else "*fp32", ROW_SCALE="*fp32",
                         PARTIAL_LOSS="*fp32", M="i32", N="i32", K="i32", stride_sm="i32", stride_sk="i32",
                         stride_wn="i32", stride_wk="i32", stride_tm="i32", stride_tn="i32", stride_om="i32")
            consts = dict(MODE=mode, HAS_BIAS=True, WRITE_GRAD=mode == 1, HAS_ROW_SCALE=False, UPCAST=False,
                          INPUT_PRECISION=precision, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
            yield feature_loss._projection_loss_kernel, types, consts, 8, mma
        types = dict(G=ptr, S=ptr, GRAD_W="*fp32", GRAD_B="*fp32", M="i32", N="i32", K="i32", stride_gm="i32",
                     stride_gn="i32", stride_sm="i32", stride_sk="i32", stride_wn="i32")
        consts = dict(HAS_BIAS_GRAD=True, UPCAST=False, INPUT_PRECISION=precision, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
        yield feature_loss._grad_weight_kernel, types, consts, 4, mma
        types = dict(X="*fp32", T=ptr, ROW_SCALE="*fp32", LOSS="*fp32", GX=ptr, GT=ptr, M="i32", D="i32",
                     stride_xm="i32", stride_xd="i32", stride_tm="i32", stride_td="i32", stride_gxm="i32",
                     stride_gtm="i32", eps="fp32")
        consts = dict(HAS_ROW_SCALE=True, WRITE_LOSS=True, WRITE_GX=True, WRITE_GT=True, BLOCK_M=2, BLOCK_D=2048)
        yield token_norm_mse._token_norm_mse_rows_kernel, types, consts, 8, "none"
        types = dict(X=ptr, FACTOR="*fp32", OUT=ptr, n="i32")
        yield feature_loss._scale_cast_kernel, types, dict(BLOCK=4096), 4, "none"
    for dt in ("bf16", "fp16"):
        for head_dim, block_m, block_n, warps in ((64, 128, 64, 8), (64, 64, 64, 4), (128, 128, 64, 8)):
            types = dict(QKV=f"*{dt}", OUT=f"*{dt}", N="i32", H="i32", stride_qkv_b="i32", stride_qkv_n="i32",
                         stride_qkv_c="i32", stride_out_b="i32", stride_out_n="i32", qk_scale="fp32")
            consts = dict(HEAD_DIM=head_dim, UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n)
            yield (teacher_attention._teacher_attention_fwd_kernel, types, consts, warps,
                   "wgmma" if arch >= 90 else "mma")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    args = parser.parse_args(argv)
    failures = 0
    for kernel, types, consts, warps, expected_mma in cases(args.arch):
        what = ", ".join(f"{k}={v}" for k, v in consts.items() if k.isupper() and not k.startswith("HAS"))
        dtype = next(v for k, v in types.items() if v.startswith("*") and v != "*fp32") if any(
            v.startswith("*") and v != "*fp32" for v in types.values()) else "*fp32"
        try:
            info = compile_kernel(kernel, types, consts, arch=args.arch, num_warps=warps)
            ok = info["mma"] == expected_mma
            status = "ok  " if ok else "MMA?"
            print(f"{status} {info['kernel']:32s} {dtype[1:]:5s} shared {info['shared_bytes']:6d} B  "
                  f"mma {info['mma']:5s} (expected {expected_mma})  {what}", flush=True)
            failures += not ok
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {_jit_function(kernel).__name__} {dtype[1:]} {what}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{'all kernels compiled' if not failures else f'{failures} problem(s)'} for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
