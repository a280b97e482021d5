"""Benchmark: the CPU path (the ``cpp`` backend of leap_kernels._C) against eager PyTorch and
torch.compile (inductor CPU), fp32, forward+backward, at the sizes of the CPU targets:

  mse        fused_feature_loss, plain MSE,        M = 8192 tokens (32 x 256), 384 -> 1536
  token-mse  fused_feature_loss, token-normalized, M = 8192, 384 -> 1536
  token-norm-only  token_normalized_mse alone,     M = 8192, D = 1536

Variants: eager (the plain PyTorch reference, autograd), compile (torch.compile of it, inductor),
cpp (leap_kernels forced to the cpp backend), torch-backend (leap_kernels' own chunked PyTorch
loop), gemm-floor (the three GEMMs alone). The variants of a case run interleaved (one run of
each per round; medians), and the peak extra memory comes from the profiler's CPU allocator
events (see bench/harness.py).

    python bench/bench_cpu.py                      # full sizes, writes bench/results/cpu-<N>core-<cpu>.csv
    python bench/bench_cpu.py --smoke              # tiny sizes (a harness check)

The variants come from bench/cases.py and the timing and memory functions from bench/harness.py,
as for the pytest-benchmark suite (``pytest bench/``); this script adds the interleaving, which
pytest-benchmark (one test after the other) cannot do.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402
import harness  # noqa: E402

FULL_CASES = [
    ("mse fp32 M=8192 384->1536", "mse", 32 * 256, 384, 1536),
    ("token-mse fp32 M=8192 384->1536", "token-mse", 32 * 256, 384, 1536),
    ("token-norm-only fp32 M=8192 D=1536", "token-norm-only", 32 * 256, 0, 1536),
]
SMOKE_CASES = [
    ("mse fp32 M=514 64->256", "mse", 2 * 257, 64, 256),
    ("token-norm-only fp32 M=514 D=256", "token-norm-only", 2 * 257, 0, 256),
]


forced = cases.forced
cpu_name = harness.cpu_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--iters", type=int, default=15, help="timed rounds (each variant once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="eager,compile,cpp,torch-backend,gemm-floor")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    env = harness.environment()
    env["device"] = f"cpu {torch.get_num_threads()} threads ({cpu_name()})"
    rows = []
    for name, op, m, d_s, d_t in (SMOKE_CASES if args.smoke else FULL_CASES):
        base = cases.feature_loss_variants(op, m, d_s, d_t, torch.float32, device, args.compile_backend)
        variants = {"eager": base["eager"], "compile": base["compile"], "cpp": forced(base["ours"], "cpp"),
                    "torch-backend": forced(base["ours"], "torch")}
        if "gemm-floor" in base:
            variants["gemm-floor"] = base["gemm-floor"]
        variants = {k: v for k, v in variants.items() if k in wanted}
        rows += harness.run_variants(name, variants, iters=args.iters, warmup=args.warmup, device=device,
                                     interleave=True)
    out = args.out or os.path.join(harness.RESULTS_DIR, f"cpu-{torch.get_num_threads()}core-"
                                   f"{harness.device_slug(cpu_name())}{'-smoke' if args.smoke else ''}.csv")
    return harness.finish(out, rows, env)


if __name__ == "__main__":
    sys.exit(main())
