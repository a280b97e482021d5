"""Benchmark: teacher attention (inference) from a packed QKV, and the whole truncated teacher.

Kernel mode (default), per shape, measured in one run on one device:
  ours                       leap_kernels.teacher_attention(qkv, H) (automatic backend: Triton on CUDA bf16)
  sdpa-cudnn|flash|efficient  what timm does: permute views of the packed qkv -> SDPA with that backend
                             forced (torch.nn.attention.sdpa_kernel) -> transpose/reshape to (B, N, H*d)
  sdpa-default               the same with SDPA's own backend choice (timm's fused_attn path)
  sdpa-*-prepermuted         SDPA alone on contiguous (B, H, N, d) q, k, v made beforehand: the pure
                             kernel, without the layout cost
  xformers                   xformers.ops.memory_efficient_attention on (B, N, H, d) views (if importable)
  eager, compile             the plain PyTorch reference (matmul, softmax, matmul) and torch.compile of it
                             (on request with --variants; eager is the CPU default)
TFLOP/s = 4*B*H*N^2*d / time. Times: ``triton.testing.do_bench`` median (with its default L2 flush
between runs; the ANCHORS.md method). Each variant's output is also compared with an fp32 SDPA
of the same inputs (``rel_err``).

DINOv3 kernel mode (``--dinov3``): attention with DINOv3's rotary embedding (CLS + 4 storage tokens not
rotated) at N = 201 and 1029, H = 6 / 16 / 32, d = 64 / 64 / 128, B = 64: ``ours`` rotates q and k inside
the kernel; the ``sdpa-*`` variants are timm's ``EvaAttention`` path (rotate q and k with
``apply_rot_embed_cat``, concatenate the prefix back, SDPA).

Teacher mode (``--teacher``): one forward of ``TruncatedTeacher`` (timm ``vit_giant_patch14_reg4_dinov2``,
random init, bf16, batch 128, 224 px -> 261 tokens; ``--model vit_7b_patch16_dinov3``: the DINOv3 ViT-7B/16,
batch 64, 224 px -> 201 tokens) to block k = 10, 20, 40, with timm's attention (``timm``: SDPA default;
``timm-cudnn``: SDPA forced to cuDNN) and with the attention kernel (``ours``). ``--memory`` adds the peak
GPU memory of each forward (weights included; ``peak_mb``) and the variant ``ours-offload``: the same
teacher with ``offload=True``, so that only the blocks up to k are on the GPU (run last: it moves the
model's blocks to pinned CPU memory).

    python bench/bench_attention.py                 # kernel shapes (CUDA GPU)
    python bench/bench_attention.py --dinov3        # DINOv3 rotary attention shapes (CUDA GPU)
    python bench/bench_attention.py --teacher       # truncated-teacher forward (CUDA GPU)
    python bench/bench_attention.py --teacher --model vit_7b_patch16_dinov3 --batch 64 --memory
    python bench/bench_attention.py --smoke [...]   # tiny sizes, any device (a harness check)

Writes bench/results/attention[-dinov3|-teacher]-<device>.csv (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402
import harness  # noqa: E402

from leap_kernels.ops.teacher_attention import teacher_attention_torch  # noqa: E402

# (name, B, H, N, d)
FULL_CASES = [
    ("ViT-g/14 reg4 @224: B=128 H=24 N=261 d=64", 128, 24, 261, 64),
    ("ViT-S/14 @224: B=128 H=6 N=257 d=64", 128, 6, 257, 64),
    ("ViT-g/14 @448: B=32 H=24 N=1025 d=64", 32, 24, 1025, 64),
]
SMOKE_CASES = [("smoke: B=2 H=2 N=37 d=64", 2, 2, 37, 64)]
# (name, B, H, N, d, rope): DINOv3 with its rotary embedding (bench/cases.py)
DINOV3_CASES = [(c.name, c.batch, c.heads, c.n, c.head_dim, True) for c in cases.ATTENTION_CASES["full"] if c.rope]
DINOV3_SMOKE_CASES = [
    (c.name, c.batch, c.heads, c.n, c.head_dim, True) for c in cases.ATTENTION_CASES["smoke"] if c.rope
]
TEACHER_MODEL = "vit_giant_patch14_reg4_dinov2"
TEACHER_KS = (10, 20, 40)
# Smoke stand-ins of the teacher models (tiny, random): (timm name, img size, batch, overrides, ks).
SMOKE_TEACHERS = {
    TEACHER_MODEL: ("vit_small_patch14_dinov2", 56, 2, dict(depth=2, embed_dim=128, num_heads=2), (1, 2)),
    "vit_7b_patch16_dinov3": (
        "vit_7b_patch16_dinov3",
        cases.DINOV3_SIZES["smoke"].img_size,
        2,
        cases.DINOV3_SIZES["smoke"].teacher_overrides,
        cases.DINOV3_SIZES["smoke"].teacher_ks,
    ),
}

ALL_VARIANTS = (
    "ours",
    "sdpa-cudnn",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-default",
    "sdpa-cudnn-prepermuted",
    "sdpa-flash-prepermuted",
    "sdpa-efficient-prepermuted",
    "xformers",
    "eager",
    "compile",
)
TEACHER_VARIANTS = ("timm", "timm-cudnn", "ours", "ours-offload")


@dataclasses.dataclass
class Row:
    case: str
    variant: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float
    rel_err: float | None = None
    error: str = ""
    peak_mb: float | None = None


def time_fn(
    fn: Callable[[], object], device: torch.device, iters: int, warmup: int, rep_ms: int = 100
) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: do_bench on CUDA (L2 flushed between runs), host clock on CPU."""
    if device.type == "cuda":
        return harness.do_bench_ms(fn, rep_ms=rep_ms)
    times, _ = harness.measure(fn, iters=iters, warmup=warmup, device=device)
    return statistics.median(times), harness._quantile(times, 0.2), harness._quantile(times, 0.8)


# ----------------------------------------------------------------------------- kernel mode


# Built in bench/cases.py (shared with the pytest-benchmark suite).
kernel_variants = cases.attention_variants
attention_flops = cases.attention_flops
teacher_flops = cases.teacher_flops
build_teacher = cases.build_teacher
_sdpa_context = cases.sdpa_context


def run_kernel_cases(case_list, wanted, device, dtype, iters, warmup) -> list[Row]:
    """``case_list``: ``(name, B, H, N, d)`` tuples, or ``(name, B, H, N, d, rope)`` (DINOv3's rotary embedding)."""
    rows = []
    for name, batch, heads, n, d, *flag in case_list:
        gen = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(batch, n, 3 * heads * d, generator=gen).to(device=device, dtype=dtype)
        rope = tuple(t.to(device) for t in cases.dinov3_rope(n, d)) if flag and flag[0] else None
        prefix = cases.DINOV3_PREFIX if rope is not None else 0
        with torch.no_grad():
            # fp32 SDPA of the same (rounded) inputs: each variant's relative error
            with _sdpa_context("efficient" if device.type == "cuda" else None):
                reference = teacher_attention_torch(qkv.float(), heads, d**-0.5, rope, prefix)
        flops = attention_flops(batch, heads, n, d)
        factories = kernel_variants(qkv, heads, rope=rope)
        for variant in (v for v in ALL_VARIANTS if v in wanted and v in factories):
            factory = factories[variant]
            try:
                fn, context = factory()
                with torch.no_grad(), context:
                    out = fn()
                    err = ((out.float() - reference).norm() / reference.norm()).item()
                    median, p20, p80 = time_fn(fn, device, iters, warmup)
                rows.append(Row(name, variant, median, p20, p80, flops / (median * 1e-3) / 1e12, err))
            except Exception as exc:  # report and go on: one broken variant must not hide the others
                rows.append(_failed(name, variant, exc))
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del qkv, reference
    return rows


# ----------------------------------------------------------------------------- teacher mode


def _failed(name: str, variant: str, exc: Exception) -> Row:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return Row(name, variant, math.nan, math.nan, math.nan, math.nan, None, f"{type(exc).__name__}: {first}")


def run_teacher_cases(model_name, img_size, batch, ks, overrides, wanted, device, iters, warmup, memory=False):
    """Rows of the truncated-teacher forward per k and variant; ``ours-offload`` (run last) needs ``memory``."""
    from leap.teacher import TruncatedTeacher

    teacher = build_teacher(model_name, img_size, device, overrides)
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=teacher.dtype)
    rows = []

    def timed(name, variant, fn, k, ref):
        out = fn()[0].float()
        err = ((out - ref).norm() / ref.norm()).item()
        median, p20, p80 = time_fn(fn, device, iters, warmup, rep_ms=1500)
        flops = teacher_flops(teacher, batch, k)
        peak = harness.peak_total_mb(fn, device) if memory else None
        return Row(name, variant, median, p20, p80, flops / (median * 1e-3) / 1e12, err, peak_mb=peak)

    with torch.no_grad():
        references = {}
        for k in ks:
            teacher.attention_kernel = False
            references[k] = teacher(x, k)[0].float()
        for k in ks:
            name = f"{model_name} B={batch} k={k}"
            for variant in TEACHER_VARIANTS:
                if variant not in wanted or variant == "ours-offload":
                    continue
                teacher.attention_kernel = variant == "ours"
                context = _sdpa_context("cudnn" if variant == "timm-cudnn" else None)
                try:
                    with context:
                        rows.append(timed(name, variant, lambda k=k: teacher(x, k), k, references[k]))
                except Exception as exc:
                    rows.append(_failed(name, variant, exc))
        if memory and "ours-offload" in wanted:
            # Last: the blocks move to (pinned) CPU memory; k grows, so each forward reaches new blocks.
            offloaded = TruncatedTeacher(
                teacher.model, dtype=teacher.dtype, attention_kernel=True, offload=True, device=device
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for k in sorted(ks):
                name = f"{model_name} B={batch} k={k}"
                try:
                    offloaded(x, k)  # the level-up: blocks up to k become resident
                    rows.append(timed(name, "ours-offload", lambda k=k: offloaded(x, k), k, references[k]))
                except Exception as exc:
                    rows.append(_failed(name, "ours-offload", exc))
    teacher.attention_kernel = None
    return rows


# ----------------------------------------------------------------------------- output


def _speedups(rows: list[Row], baseline: str) -> dict[tuple[str, str], str]:
    base = {r.case: r.median_ms for r in rows if r.variant == baseline}
    out = {}
    for r in rows:
        b = base.get(r.case)
        ok = b is not None and b == b and r.median_ms == r.median_ms and r.median_ms > 0
        out[(r.case, r.variant)] = f"{b / r.median_ms:.3f}" if ok else ""
    return out


def write_csv(path: str, rows: list[Row], env: dict, baseline: str) -> None:
    speedup = _speedups(rows, baseline)
    fields = [*harness.CSV_FIELDS, "tflops", "rel_err", f"speedup_vs_{baseline}", "peak_mb", "error"]
    harness.write_csv_rows(
        path,
        fields,
        (
            {
                **env,
                "case": r.case,
                "variant": r.variant,
                **harness.csv_times(r.median_ms, r.p20_ms, r.p80_ms),
                "tflops": f"{r.tflops:.4g}",
                "rel_err": "" if r.rel_err is None else f"{r.rel_err:.2e}",
                f"speedup_vs_{baseline}": speedup[(r.case, r.variant)],
                "peak_mb": "" if r.peak_mb is None else f"{r.peak_mb:.0f}",
                "error": r.error,
            }
            for r in rows
        ),
    )


def markdown_table(rows: list[Row], env: dict, baseline: str) -> str:
    speedup = _speedups(rows, baseline)
    lines = [
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git_sha']}",
        "",
        f"| case | variant | median ms | TFLOP/s | rel err vs fp32 | vs {baseline} | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.median_ms != r.median_ms:
            lines.append(f"| {r.case} | {r.variant} | failed: {r.error} | | | | |")
            continue
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        ratio = speedup[(r.case, r.variant)]
        peak = "" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        speed = ratio + "x" if ratio else ""
        lines.append(f"| {r.case} | {r.variant} | {r.median_ms:.3f} | {r.tflops:.3g} | {err} | {speed} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness on any device")
    parser.add_argument("--teacher", action="store_true", help="time the truncated-teacher forward instead")
    parser.add_argument("--dinov3", action="store_true", help="kernel mode: the DINOv3 rotary-embedding shapes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--iters", type=int, default=None, help="CPU only: timed runs (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="CPU only: untimed runs first (default 2)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset (kernel mode default: all but eager on CUDA, eager,ours on "
        f"CPU; teacher mode: {','.join(TEACHER_VARIANTS)} on CUDA, timm,ours on CPU)",
    )
    parser.add_argument(
        "--model", default=TEACHER_MODEL, choices=sorted(SMOKE_TEACHERS), help="teacher mode: the teacher model"
    )
    parser.add_argument("--batch", type=int, default=None, help="teacher mode: batch size (default 128; ViT-7B 64)")
    parser.add_argument("--ks", default=",".join(map(str, TEACHER_KS)), help="teacher mode: blocks to run")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="teacher mode: record the peak GPU memory of each forward and time the offloaded teacher too",
    )
    parser.add_argument(
        "--out", default=None, help="CSV path (default bench/results/attention[-dinov3|-teacher]-<device>.csv)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.smoke and device.type != "cuda":
        parser.error("full sizes need a CUDA GPU; use --smoke for a tiny run on CPU")
    iters = args.iters or 5
    warmup = args.warmup or 2
    env = harness.environment()

    if args.teacher:
        default = ",".join(TEACHER_VARIANTS) if device.type == "cuda" else "timm,ours"
        wanted = set((args.variants or default).split(","))
        if args.smoke:
            name, size, batch, overrides, ks = SMOKE_TEACHERS[args.model]
            rows = run_teacher_cases(name, size, batch, ks, overrides, wanted, device, iters, warmup, args.memory)
        else:
            ks = tuple(int(k) for k in args.ks.split(","))
            batch = args.batch or (cases.DINOV3_SIZES["full"].batch if args.model != TEACHER_MODEL else 128)
            rows = run_teacher_cases(args.model, 224, batch, ks, {}, wanted, device, iters, warmup, args.memory)
        baseline, stem = "timm", "attention-teacher" + ("-dinov3" if args.model != TEACHER_MODEL else "")
    else:
        default = (
            "eager,ours"
            if device.type != "cuda"
            else ",".join(v for v in ALL_VARIANTS if v not in ("eager", "compile"))
        )
        wanted = set((args.variants or default).split(","))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if args.dinov3:
            case_list = DINOV3_SMOKE_CASES if args.smoke else DINOV3_CASES
        else:
            case_list = SMOKE_CASES if args.smoke else FULL_CASES
        rows = run_kernel_cases(case_list, wanted, device, dtype, iters, warmup)
        baseline = "sdpa-cudnn" if device.type == "cuda" else "eager"
        stem = "attention-dinov3" if args.dinov3 else "attention"
    out = args.out or os.path.join(
        harness.RESULTS_DIR, f"{stem}-{harness.device_slug(env['device'])}{'-smoke' if args.smoke else ''}.csv"
    )
    write_csv(out, rows, env, baseline)
    print(markdown_table(rows, env, baseline))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
