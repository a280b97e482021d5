"""Correctness smoke of every op and backend at the headline shapes, against float64 (about 30 s on a GPU).

The first thing the GPU script checks after the build: before any number is timed, each op runs once
per backend at the shapes the benchmarks time, on fresh random inputs, and its loss and gradients are
compared with a float64 evaluation of the plain PyTorch reference (``leap_kernels.ops.naive``) by
``||out - ref|| / ||ref||``. A backend that cannot run an input is listed with its reason, not failed.

    python tools/gpu_smoke.py --out results/smoke.json            # the headline shapes (CUDA)
    python tools/gpu_smoke.py --size smoke                        # tiny shapes, any device (CPU rehearsal)

Shapes (``--size full``): fused loss, plain and token-normalized, M = 32768 tokens, 384 -> 1536, bias,
bf16, mean; ``token_normalized_mse`` at (32768, 1536) bf16; teacher attention at N = 261 (B 8, H 24,
d 64) and N = 1025 (B 2, H 24, d 64), bf16. Exit status 1 when any check misses its tolerance or
gives a non-finite value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import leap_kernels
from leap_kernels import fused_feature_loss_reference, teacher_attention_reference, token_normalized_mse_reference

BACKENDS = ("triton", "cuda", "cpp", "torch")
#: Relative-error limits per dtype: the loss value and the gradients (bf16 operands land at 1e-3..1e-2).
TOLERANCE = {
    torch.bfloat16: {"loss": 2e-2, "grad": 3e-2, "out": 2e-2},
    torch.float16: {"loss": 5e-3, "grad": 1e-2, "out": 5e-3},
    torch.float32: {"loss": 1e-4, "grad": 1e-3, "out": 1e-3},
}
SIZES = {
    "full": dict(m=32768, d_s=384, d_t=1536, attention=((8, 24, 261, 64), (2, 24, 1025, 64))),
    "smoke": dict(m=2 * 197, d_s=100, d_t=192, attention=((2, 2, 37, 64),)),
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _loss_check(op: str, backend: str, shapes: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m, d_s, d_t = shapes["m"], shapes["d_s"], shapes["d_t"]
    target = (torch.randn(m, d_t, device=device) * 2).to(dtype)
    if op == "token_normalized_mse":
        leaves = [torch.randn(m, d_t, device=device).to(dtype).requires_grad_()]

        def ours():
            return leap_kernels.token_normalized_mse(leaves[0], target)

        def reference(x):
            return token_normalized_mse_reference(x, target.double())
    else:
        normalize = op == "fused_feature_loss[token-normalized]"
        leaves = [
            torch.randn(m, d_s, device=device).to(dtype).requires_grad_(),
            (torch.randn(d_t, d_s, device=device) * d_s**-0.5).to(dtype).requires_grad_(),
            (torch.randn(d_t, device=device) * 0.1).to(dtype).requires_grad_(),
        ]

        def ours():
            return leap_kernels.fused_feature_loss(*leaves, target, normalize=normalize)

        def reference(s, w, b):
            return fused_feature_loss_reference(s, w, b, target.double(), normalize=normalize)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_loss = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    with leap_kernels.use_backend(backend):
        loss = ours()
        grads = torch.autograd.grad(loss, leaves)
    tol = TOLERANCE[dtype]
    errors = {"loss": rel_error(loss, ref_loss)}
    for name, g, r in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        errors[name] = rel_error(g, r)
    ok = errors["loss"] <= tol["loss"] and all(v <= tol["grad"] for k, v in errors.items() if k != "loss")
    return {"errors": errors, "ok": ok}


def _attention_check(shape: tuple, backend: str, dtype: torch.dtype, device: torch.device) -> dict:
    b, h, n, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=device).to(dtype)
    ref = teacher_attention_reference(qkv.double(), h)
    with torch.no_grad(), leap_kernels.use_backend(backend):
        out = leap_kernels.teacher_attention(qkv, h)
    err = rel_error(out, ref)
    return {"errors": {"out": err}, "ok": err <= TOLERANCE[dtype]["out"]}


def run_checks(size: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    shapes = SIZES[size]
    checks = [
        (op, f"M{shapes['m']}-{shapes['d_s']}x{shapes['d_t']}")
        for op in ("fused_feature_loss[mse]", "fused_feature_loss[token-normalized]")
    ]
    checks.append(("token_normalized_mse", f"M{shapes['m']}-D{shapes['d_t']}"))
    checks += [("teacher_attention", f"B{b}-H{h}-N{n}-d{d}") for b, h, n, d in shapes["attention"]]
    status = leap_kernels.backends(device)
    rows = []
    for op, shape in checks:
        for backend in BACKENDS:
            row = {"op": op, "shape": shape, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
            if not status[backend].usable and backend != "cuda":
                # cuda is never picked automatically but can be forced: try it, report what it says.
                row.update(ok=None, skipped="; ".join(status[backend].reasons))
                rows.append(row)
                continue
            torch.manual_seed(len(rows))
            t0 = time.perf_counter()
            try:
                if op == "teacher_attention":
                    attn = next(s for s in shapes["attention"] if f"B{s[0]}-H{s[1]}-N{s[2]}-d{s[3]}" == shape)
                    row.update(_attention_check(attn, backend, dtype, device))
                else:
                    row.update(_loss_check(op, backend, shapes, dtype, device))
            except Exception as exc:  # a backend that refuses an input says why
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                row.update(ok=None, skipped=message)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="full (CUDA default) or smoke (CPU default)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("full" if device.type == "cuda" else "smoke")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    rows = run_checks(size, device, dtype)
    failed = [r for r in rows if r.get("ok") is False]
    print("| op | shape | backend | result | max rel. error | s |\n|---|---|---|---|---|---|")
    for r in rows:
        if r.get("ok") is None:
            print(f"| {r['op']} | {r['shape']} | {r['backend']} | cannot run: {r['skipped'][:120]} | | |")
        else:
            worst = max(r["errors"].values())
            print(
                f"| {r['op']} | {r['shape']} | {r['backend']} | {'ok' if r['ok'] else 'MISS'} | {worst:.2e} "
                f"| {r['seconds']} |"
            )
    ran = sum(r.get("ok") is not None for r in rows)
    print(
        f"smoke: {ran - len(failed)} passed, {len(failed)} failed, {len(rows) - ran} cannot run "
        f"({time.perf_counter() - t0:.1f} s, {size}, {dtype}, {device})"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "size": size,
                    "device": str(device),
                    "rows": rows,
                    "tolerance": {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()},
                },
                f,
                indent=1,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
