"""Benchmark: teacher attention (inference) from a packed QKV, and the whole truncated teacher.

Kernel mode (default), per shape, measured in one run on one device:
  ours                       leap_kernels.teacher_attention(qkv, H) (automatic backend: Triton on CUDA bf16)
  sdpa-cudnn|flash|efficient  what timm does: permute views of the packed qkv -> SDPA with that backend
                             forced (torch.nn.attention.sdpa_kernel) -> transpose/reshape to (B, N, H*d)
  sdpa-default               the same with SDPA's own backend choice (timm's fused_attn path)
  sdpa-*-prepermuted         SDPA alone on contiguous (B, H, N, d) q, k, v made beforehand: the pure
                             kernel, without the layout cost
  xformers                   xformers.ops.memory_efficient_attention on (B, N, H, d) views (if importable)
TFLOP/s = 4*B*H*N^2*d / time. Times: ``triton.testing.do_bench`` median (with its default L2 flush
between runs; the ANCHORS.md method). Each variant's output is also compared with an fp32 SDPA
of the same inputs (``rel_err``).

Teacher mode (``--teacher``): one forward of ``TruncatedTeacher`` (timm ``vit_giant_patch14_reg4_dinov2``,
random init, bf16, batch 128, 224 px -> 261 tokens) to block k = 10, 20, 40, with timm's attention
(``timm``: SDPA default; ``timm-cudnn``: SDPA forced to cuDNN) and with the attention kernel (``ours``).

    python bench/bench_attention.py                 # kernel shapes (CUDA GPU)
    python bench/bench_attention.py --teacher       # truncated-teacher forward (CUDA GPU)
    python bench/bench_attention.py --smoke         # tiny sizes, any device (a harness check)

Writes bench/results/attention-<device>.csv (teacher mode: attention-teacher-<device>.csv; or --out)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import leap_kernels  # noqa: E402
from leap_kernels.ops.naive import teacher_attention_reference  # noqa: E402
from leap_kernels.ops.teacher_attention import split_qkv, teacher_attention_torch  # noqa: E402

# (name, B, H, N, d)
FULL_CASES = [
    ("ViT-g/14 reg4 @224: B=128 H=24 N=261 d=64", 128, 24, 261, 64),
    ("ViT-S/14 @224: B=128 H=6 N=257 d=64", 128, 6, 257, 64),
    ("ViT-g/14 @448: B=32 H=24 N=1025 d=64", 32, 24, 1025, 64),
]
SMOKE_CASES = [("smoke: B=2 H=2 N=37 d=64", 2, 2, 37, 64)]
TEACHER_MODEL = "vit_giant_patch14_reg4_dinov2"
TEACHER_KS = (10, 20, 40)

ALL_VARIANTS = ("ours", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-default",
                "sdpa-cudnn-prepermuted", "sdpa-flash-prepermuted", "sdpa-efficient-prepermuted", "xformers",
                "eager")
TEACHER_VARIANTS = ("timm", "timm-cudnn", "ours")


@dataclasses.dataclass
class Row:
    case: str
    variant: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float
    rel_err: Optional[float] = None
    error: str = ""


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def _sdpa_context(name: Optional[str]):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backends()[name]])


def time_fn(fn: Callable[[], object], device: torch.device, iters: int, warmup: int,
            rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: do_bench on CUDA (L2 flushed between runs), host clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    times, _ = harness.measure(fn, iters=iters, warmup=warmup, device=device)
    return statistics.median(times), harness._quantile(times, 0.2), harness._quantile(times, 0.8)


# ----------------------------------------------------------------------------- kernel mode


def kernel_variants(qkv: torch.Tensor, heads: int) -> dict[str, Callable[[], tuple[Callable[[], torch.Tensor], object]]]:
    """name -> factory returning ``(fn, context)``: ``fn()`` computes the ``(B, N, H*d)`` output and is
    timed inside ``context`` (an SDPA backend selection, entered once around the timing)."""
    batch, n, c = qkv.shape
    d = c // (3 * heads)
    scale = d ** -0.5

    def packed(backend):
        return lambda: (lambda: teacher_attention_torch(qkv, heads, scale), _sdpa_context(backend))

    def prepermuted(backend):
        def make():
            q, k, v = (t.contiguous() for t in split_qkv(qkv, heads))
            return (lambda: F.scaled_dot_product_attention(q, k, v)), _sdpa_context(backend)
        return make

    def xformers_variant():
        import xformers.ops as xops  # ImportError -> reported as this variant's error

        q, k, v = qkv.view(batch, n, 3, heads, d).unbind(2)  # (B, N, H, d) views
        return (lambda: xops.memory_efficient_attention(q, k, v).reshape(batch, n, heads * d)), contextlib.nullcontext()

    variants = {
        "ours": lambda: ((lambda: leap_kernels.teacher_attention(qkv, heads)), contextlib.nullcontext()),
        "eager": lambda: ((lambda: teacher_attention_reference(qkv, heads)), contextlib.nullcontext()),
        "sdpa-default": packed(None),
        "xformers": xformers_variant,
    }
    for backend in ("cudnn", "flash", "efficient"):
        variants[f"sdpa-{backend}"] = packed(backend)
        variants[f"sdpa-{backend}-prepermuted"] = prepermuted(backend)
    return variants


def attention_flops(batch: int, heads: int, n: int, d: int) -> float:
    return 4.0 * batch * heads * n * n * d


def run_kernel_cases(cases, wanted, device, dtype, iters, warmup) -> list[Row]:
    rows = []
    for name, batch, heads, n, d in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(batch, n, 3 * heads * d, generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            # fp32 SDPA of the same (rounded) inputs: each variant's relative error
            with _sdpa_context("efficient" if device.type == "cuda" else None):
                reference = teacher_attention_torch(qkv.float(), heads, d ** -0.5)
        flops = attention_flops(batch, heads, n, d)
        factories = kernel_variants(qkv, heads)
        for variant in (v for v in ALL_VARIANTS if v in wanted):
            factory = factories[variant]
            try:
                fn, context = factory()
                with torch.no_grad(), context:
                    out = fn()
                    err = ((out.float() - reference).norm() / reference.norm()).item()
                    median, p20, p80 = time_fn(fn, device, iters, warmup)
                rows.append(Row(name, variant, median, p20, p80, flops / (median * 1e-3) / 1e12, err))
            except Exception as exc:  # report and go on: one broken variant must not hide the others
                rows.append(Row(name, variant, math.nan, math.nan, math.nan, math.nan, None,
                                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del qkv, reference
    return rows


# ----------------------------------------------------------------------------- teacher mode


def teacher_flops(teacher, batch: int, k: int) -> float:
    """GEMM + attention FLOPs of ``teacher(x, k)``: patch embed, k blocks (every nn.Linear), final norm ignored."""
    from torch import nn

    m = teacher.model
    tokens = m.patch_embed.num_patches + teacher.num_prefix_tokens
    proj = m.patch_embed.proj
    flops = 2.0 * m.patch_embed.num_patches * proj.weight.numel()
    for block in list(m.blocks)[:k]:
        for layer in block.modules():
            if isinstance(layer, nn.Linear):
                flops += 2.0 * tokens * layer.weight.numel()
        flops += 4.0 * tokens * tokens * block.attn.num_heads * block.attn.head_dim
    return batch * flops


def build_teacher(model_name: str, img_size: int, device: torch.device, overrides: dict):
    from leap.models import build_model
    from leap.teacher import TruncatedTeacher

    with torch.device(device):  # random init directly on the device (fast for the 1.1B-param giant)
        model = build_model(model_name, img_size=img_size, **overrides)
    return TruncatedTeacher(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def run_teacher_cases(model_name, img_size, batch, ks, overrides, wanted, device, iters, warmup) -> list[Row]:
    teacher = build_teacher(model_name, img_size, device, overrides)
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=teacher.dtype)
    rows = []
    with torch.no_grad():
        references = {}
        for k in ks:
            teacher.attention_kernel = False
            references[k] = teacher(x, k)[0].float()
        for k in ks:
            name = f"{model_name} B={batch} k={k}"
            flops = teacher_flops(teacher, batch, k)
            for variant in TEACHER_VARIANTS:
                if variant not in wanted:
                    continue
                teacher.attention_kernel = variant == "ours"
                context = _sdpa_context("cudnn" if variant == "timm-cudnn" else None)
                try:
                    with context:
                        out = teacher(x, k)[0].float()
                        ref = references[k]
                        err = ((out - ref).norm() / ref.norm()).item()
                        median, p20, p80 = time_fn(lambda: teacher(x, k), device, iters, warmup, rep_ms=1500)
                    rows.append(Row(name, variant, median, p20, p80, flops / (median * 1e-3) / 1e12, err))
                except Exception as exc:
                    rows.append(Row(name, variant, math.nan, math.nan, math.nan, math.nan, None,
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    speedup = _speedups(rows, baseline)
    fields = ["date", "device", "torch", "triton", "git_sha", "case", "variant", "median_ms", "p20_ms", "p80_ms",
              "tflops", "rel_err", f"speedup_vs_{baseline}", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({
                **env,
                "case": r.case, "variant": r.variant,
                "median_ms": f"{r.median_ms:.4f}", "p20_ms": f"{r.p20_ms:.4f}", "p80_ms": f"{r.p80_ms:.4f}",
                "tflops": f"{r.tflops:.4g}", "rel_err": "" if r.rel_err is None else f"{r.rel_err:.2e}",
                f"speedup_vs_{baseline}": speedup[(r.case, r.variant)], "error": r.error,
            })


def markdown_table(rows: list[Row], env: dict, baseline: str) -> str:
    speedup = _speedups(rows, baseline)
    lines = [
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git_sha']}",
        "",
        f"| case | variant | median ms | TFLOP/s | rel err vs fp32 | vs {baseline} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.median_ms != r.median_ms:
            lines.append(f"| {r.case} | {r.variant} | failed: {r.error} | | | |")
            continue
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        ratio = speedup[(r.case, r.variant)]
        lines.append(f"| {r.case} | {r.variant} | {r.median_ms:.3f} | {r.tflops:.3g} | {err} | "
                     f"{ratio + 'x' if ratio else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness on any device")
    parser.add_argument("--teacher", action="store_true", help="time the truncated-teacher forward instead")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--iters", type=int, default=None, help="CPU only: timed runs (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="CPU only: untimed runs first (default 2)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset (kernel mode default: all but eager on CUDA, eager,ours on "
                             f"CPU; teacher mode: {','.join(TEACHER_VARIANTS)} on CUDA, timm,ours on CPU)")
    parser.add_argument("--batch", type=int, default=128, help="teacher mode: batch size")
    parser.add_argument("--ks", default=",".join(map(str, TEACHER_KS)), help="teacher mode: blocks to run")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/attention[-teacher]-<device>.csv)")
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
            rows = run_teacher_cases("vit_small_patch14_dinov2", 56, 2, (1, 2),
                                     dict(depth=2, embed_dim=128, num_heads=2), wanted, device, iters, warmup)
        else:
            ks = tuple(int(k) for k in args.ks.split(","))
            rows = run_teacher_cases(TEACHER_MODEL, 224, args.batch, ks, {}, wanted, device, iters, warmup)
        baseline, stem = "timm", "attention-teacher"
    else:
        default = "eager,ours" if device.type != "cuda" else ",".join(v for v in ALL_VARIANTS if v != "eager")
        wanted = set((args.variants or default).split(","))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = run_kernel_cases(SMOKE_CASES if args.smoke else FULL_CASES, wanted, device, dtype, iters, warmup)
        baseline = "sdpa-cudnn" if device.type == "cuda" else "eager"
        stem = "attention"
    out = args.out or os.path.join(harness.RESULTS_DIR, f"{stem}-{harness.device_slug(env['device'])}"
                                   f"{'-smoke' if args.smoke else ''}.csv")
    write_csv(out, rows, env, baseline)
    print(markdown_table(rows, env, baseline))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
