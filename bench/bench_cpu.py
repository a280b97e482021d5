"""Benchmark: the CPU path (the ``cpp`` backend of leap_kernels._C) against eager PyTorch and
torch.compile (inductor CPU), forward+backward, fp32 and bf16, at the sizes of the CPU targets:

  mse        fused_feature_loss, plain MSE,        M = 8192 tokens (32 x 256), 384 -> 1536
  token-mse  fused_feature_loss, token-normalized, M = 8192, 384 -> 1536
  token-norm-only  token_normalized_mse alone,     M = 8192, D = 1536

Variants: eager (the plain PyTorch reference, autograd), compile (torch.compile of it, inductor),
cpp (leap_kernels forced to the cpp backend), torch-backend (leap_kernels' own chunked PyTorch
loop), gemm-floor (the three GEMMs alone; fused cases), memory-floor (a ``torch.clone`` of as many
bytes as the op must move, counted once per read or write: fused, student + target read, student
gradient written; token-norm-only, input + target read and the input gradient written, once each: the
cpp backend writes the gradient in the forward's pass, which a unit upstream gradient then gets; the
clone reads and writes its bytes once each, so its time is that traffic at the machine's copy
bandwidth, fresh output pages included like the ops' outputs).
The variants of a case run interleaved (one run of each per round; medians), and the peak extra
memory comes from the profiler's CPU allocator events (see bench/harness.py). The CSV adds, per
row, its time over compile's, eager's and the case's floor (gemm-floor for the fused loss,
memory-floor for token-norm-only), and the table after the main one prints them for ours.

    python bench/bench_cpu.py                      # full sizes, writes bench/results/cpu-<N>core-<cpu>.csv
    python bench/bench_cpu.py --dtypes fp32        # one dtype
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
    ("mse {dt} M=8192 384->1536", "mse", 32 * 256, 384, 1536),
    ("token-mse {dt} M=8192 384->1536", "token-mse", 32 * 256, 384, 1536),
    ("token-norm-only {dt} M=8192 D=1536", "token-norm-only", 32 * 256, 0, 1536),
]
SMOKE_CASES = [
    ("mse {dt} M=514 64->256", "mse", 2 * 257, 64, 256),
    ("token-norm-only {dt} M=514 D=256", "token-norm-only", 2 * 257, 0, 256),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moved_bytes(op: str, m: int, d_s: int, d_t: int, dtype: torch.dtype) -> int:
    """Bytes one forward+backward must move at least (each read or write once)."""
    e = torch.empty((), dtype=dtype).element_size()
    if op == "token-norm-only":
        return 3 * m * d_t * e  # read x, t, write grad x (in one pass: gradients in the forward)
    return (2 * m * d_s + m * d_t) * e  # read student and target, write the student gradient


def memory_floor(nbytes: int, dtype: torch.dtype):
    """Factory: a clone of nbytes / 2 bytes (it reads and writes them: nbytes of traffic)."""

    def build():
        e = torch.empty((), dtype=dtype).element_size()
        src = torch.randn(max(1, nbytes // (2 * e))).to(dtype)
        return lambda: src.clone()

    return build


def ratio_table(rows, floors) -> str:
    """ours (cpp) / compile, / eager, / floor per case."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r.median_ms
    lines = [
        "| case | cpp ms | compile ms | eager ms | floor ms (kind) | cpp / compile | cpp / eager | cpp / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, v in by_case.items():
        ours = v.get("cpp", float("nan"))
        kind = floors.get(case, "")
        fl = v.get(kind, float("nan"))

        def f(x):
            return f"{x:.2f}" if x == x else "-"

        def q(a, b):
            return f"{a / b:.3f}" if a == a and b == b and b > 0 else "-"

        lines.append(
            f"| {case} | {f(ours)} | {f(v.get('compile', float('nan')))} | {f(v.get('eager', float('nan')))} "
            f"| {f(fl)} ({kind}) | {q(ours, v.get('compile', float('nan')))} "
            f"| {q(ours, v.get('eager', float('nan')))} | {q(ours, fl)} |"
        )
    return "\n".join(lines)


def write_ratios(path: str, rows, floors) -> None:
    """Adds ratio_vs_compile / ratio_vs_eager / ratio_vs_floor (this row's time over theirs) to the CSV."""
    import csv

    with open(path) as f:
        table = list(csv.DictReader(f))
    by_case = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r.median_ms
    fields = list(table[0].keys()) if table else []
    extra = ["floor_variant", "ratio_vs_compile", "ratio_vs_eager", "ratio_vs_floor"]
    fields = [f for f in fields if f != "error"] + extra + ["error"]
    for row in table:
        v = by_case.get(row["case"], {})
        mine = float(row["median_ms"])
        row["floor_variant"] = floors.get(row["case"], "")
        for col, base in (
            ("ratio_vs_compile", v.get("compile")),
            ("ratio_vs_eager", v.get("eager")),
            ("ratio_vs_floor", v.get(floors.get(row["case"], ""), None)),
        ):
            ok = base is not None and base == base and base > 0 and mine == mine
            row[col] = f"{mine / base:.3f}" if ok else ""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


forced = cases.forced
cpu_name = harness.cpu_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--iters", type=int, default=15, help="timed rounds (each variant once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="eager,compile,cpp,torch-backend,gemm-floor,memory-floor")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    env = harness.environment()
    env["device"] = f"cpu {torch.get_num_threads()} threads ({cpu_name()})"
    rows, floors = [], {}
    for dt_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dtype = DTYPES[dt_name]
        for template, op, m, d_s, d_t in SMOKE_CASES if args.smoke else FULL_CASES:
            name = template.format(dt=dt_name)
            base = cases.feature_loss_variants(op, m, d_s, d_t, dtype, device, args.compile_backend)
            variants = {
                "eager": base["eager"],
                "compile": base["compile"],
                "cpp": forced(base["ours"], "cpp"),
                "torch-backend": forced(base["ours"], "torch"),
            }
            if "gemm-floor" in base:
                variants["gemm-floor"] = base["gemm-floor"]
            variants["memory-floor"] = memory_floor(moved_bytes(op, m, d_s, d_t, dtype), dtype)
            floors[name] = "memory-floor" if op == "token-norm-only" else "gemm-floor"
            variants = {k: v for k, v in variants.items() if k in wanted}
            rows += harness.run_variants(
                name, variants, iters=args.iters, warmup=args.warmup, device=device, interleave=True
            )
    out = args.out or os.path.join(
        harness.RESULTS_DIR,
        f"cpu-{torch.get_num_threads()}core-{harness.device_slug(cpu_name())}{'-smoke' if args.smoke else ''}.csv",
    )
    code = harness.finish(out, rows, env)
    write_ratios(out, rows, floors)
    print()
    print(ratio_table(rows, floors))
    return code


if __name__ == "__main__":
    sys.exit(main())
