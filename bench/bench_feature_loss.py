"""Benchmark: fused feature loss (projection + MSE / token-normalized MSE), fwd+bwd.

Variants, measured in one run on one device:
  eager      the plain PyTorch reference (leap_kernels.ops.naive), autograd backward
  compile    torch.compile of the same reference
  ours       leap_kernels.fused_feature_loss (automatic backend)
  gemm-floor the three GEMMs of forward+backward alone, nothing else (a lower bound)

    python bench/bench_feature_loss.py            # full sizes (CUDA GPU)
    python bench/bench_feature_loss.py --smoke    # tiny sizes, any device (a harness check)

Writes bench/results/feature_loss-<device>.csv (or --out) and prints a Markdown table.
The same variants, timed by pytest-benchmark with JSON output and per-device baselines:
``pytest bench/`` (bench/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402
import harness  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (name, op, tokens M, D_s, D_t, dtype). The paper's per-GPU step: M = 128 * 256, 384 -> 1536.
FULL_CASES = [
    ("mse bf16 M=32768 384->1536", "mse", 128 * 256, 384, 1536, "bf16"),
    ("mse fp32 M=32768 384->1536 (no TF32)", "mse", 128 * 256, 384, 1536, "fp32"),
    ("mse bf16 M=32768 192->1536", "mse", 128 * 256, 192, 1536, "bf16"),
    ("token-mse bf16 M=32768 384->1536", "token-mse", 128 * 256, 384, 1536, "bf16"),
    ("token-norm-only bf16 M=32768 D=1536", "token-norm-only", 128 * 256, 0, 1536, "bf16"),
]
SMOKE_CASES = [
    ("mse fp32 M=514 64->256", "mse", 2 * 257, 64, 256, "fp32"),
    ("token-mse fp32 M=514 64->256", "token-mse", 2 * 257, 64, 256, "fp32"),
    ("token-norm-only fp32 M=514 D=256", "token-norm-only", 2 * 257, 0, 256, "fp32"),
]


# The variants (eager, compile, ours, gemm-floor) are built in bench/cases.py, shared with the
# pytest-benchmark suite; timing and memory come from bench/harness.py.
make_case = cases.feature_loss_variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness on any device")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per variant (default 50 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10 GPU, 2 CPU)")
    parser.add_argument("--variants", default="eager,compile,ours,gemm-floor", help="comma-separated subset")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the 'compile' variant")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/feature_loss-<device>.csv)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.smoke and device.type != "cuda":
        parser.error("full sizes need a CUDA GPU; use --smoke for a tiny run on CPU")
    gpu = device.type == "cuda"
    iters = args.iters or (50 if gpu else 5)
    warmup = args.warmup or (10 if gpu else 2)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    # The anchors' fp32 row is "no TF32": keep cuBLAS and Triton in full fp32.
    torch.backends.cuda.matmul.allow_tf32 = False

    env = harness.environment()
    rows = []
    for name, op, m, d_s, d_t, dtype_name in SMOKE_CASES if args.smoke else FULL_CASES:
        variants = make_case(op, m, d_s, d_t, DTYPES[dtype_name], device, args.compile_backend)
        variants = {k: v for k, v in variants.items() if k in wanted}
        rows += harness.run_variants(name, variants, iters=iters, warmup=warmup, device=device)
    out = args.out or os.path.join(
        harness.RESULTS_DIR, f"feature_loss-{harness.device_slug(env['device'])}{'-smoke' if args.smoke else ''}.csv"
    )
    return harness.finish(out, rows, env)


if __name__ == "__main__":
    sys.exit(main())
