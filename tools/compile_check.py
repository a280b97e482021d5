"""Compile every Triton kernel of leap_kernels for a GPU target (Hopper, sm_90), without a GPU,
with the specialization a real launch at the paper's shapes gets, and report its resources.

The CPU test suite runs the kernels through the Triton interpreter, which never compiles them.
Compiling a kernel with a hand-written signature is not enough either: a launch specializes
pointers on 16-byte alignment and integers on "divisible by 16" and "equal to 1" (a unit stride
becomes the constant 1), and without that the compiler emits scalar loads and a different register
allocation than the kernel that runs. So this script runs each op's own host code on ``meta``
tensors (shapes and strides, no data) at the paper's shapes, intercepts every kernel launch,
computes the launch's specialization with Triton's own binder for a CUDA sm_90 target, and
compiles that, once per autotune config a GPU could choose:

- fused feature loss: M = 32768 tokens (128 x 256), D_s = 384, D_t = 1536; plain and token-normalized;
  forward with gradients and the backward rescale (reduction mean/sum), the same on token slices
  ``x[:, 5:]`` of (128, 261, D) tensors (read in place: other strides), forward only and the
  recomputing backward (reduction none); bf16, fp16, fp32;
- token-normalized MSE: (32768, 1536) forward and backward; bf16, fp16, fp32;
- teacher attention: B = 128, N = 261, H = 24 x d = 64 and H = 12 x d = 128; bf16, fp16;
- teacher attention with rotary embedding (DINOv3): B = 128, N = 201 (196 patches + CLS + 4 storage
  tokens at 224 px, 5 unrotated), H = 6 x d = 64 (ViT-S/16) and H = 32 x d = 128 (ViT-7B/16); bf16, fp16.

Pointers count as 16-byte aligned (``meta`` tensors have address 0): the caching allocator returns
512-byte aligned blocks and every chunk offset at these shapes is a multiple of 16 bytes.

Per compiled kernel it prints registers per thread, spilled bytes (local memory per thread),
shared memory, CTAs per SM on an H100/H200 (65536 registers, 228 KB shared memory, 2048 threads,
32 CTAs) and which of wgmma (Hopper tensor cores), TMA (``cp.async.bulk.tensor``) and cp.async
appear in the PTX. It exits non-zero when a kernel fails to compile, a 16-bit GEMM or attention
kernel emits no wgmma, or a choosable config spills registers (``--allow-spills``: warn only),
except the configs listed in ``KNOWN_SPILLS`` (``--strict``: those too). An autotune config that needs
more shared memory than an SM has is reported as "skip": the autotuner drops it on a GPU.

    python tools/compile_check.py [--arch 90] [--allow-spills | --strict] [--dtypes bf16,fp16,fp32] [--ops ...]

Must run without TRITON_INTERPRET (it is removed here before the kernels are imported).
``tools/compile_check.sh`` runs it under the project's Triton and under Triton 3.6.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("LEAP_KERNELS_CHUNK_TOKENS", None)  # the default chunking, as in training

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import leap_kernels  # noqa: E402,F401  (registers the ops)
from leap_kernels import _backends  # noqa: E402

# Autotune configs known to spill registers at the paper's shapes: (kernel, dtype, config), reported
# as "known spill" instead of failing the check. Config strings are the ones this script prints.
# Remove entries as the kernels' configs are fixed or pruned; with the set empty, any spill fails.
# Measured with Triton 3.6.0 and 3.8.0 (sm_90, the shapes above); bytes are spilled bytes per thread.
KNOWN_SPILLS: set[tuple[str, str, str]] = {
    # fp32 (full-precision FMA dots; not the training dtype): every projection config reaches 255
    # registers and spills 8-32 B.
    ("_projection_loss_kernel", "fp32", "BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 warps=8 stages=3"),
    ("_projection_loss_kernel", "fp32", "BLOCK_M=128 BLOCK_N=64 BLOCK_K=64 GROUP_M=8 warps=4 stages=4"),
    ("_projection_loss_kernel", "fp32", "BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 warps=4 stages=4"),
    ("_grad_weight_kernel", "fp32", "BLOCK_M=128 BLOCK_N=64 BLOCK_K=64 warps=4 stages=4"),  # 8 B, Triton 3.8 only
}

# Kernels whose 16-bit dots must run on tensor cores (wgmma on sm_90).
TENSOR_CORE_KERNELS = ("_projection_loss_kernel", "_grad_weight_kernel", "_teacher_attention_fwd_kernel")

# H100 / H200 (sm_90) per-SM limits, for the occupancy column.
SM90_LIMITS = dict(
    registers=65536,
    shared_bytes=228 * 1024,
    threads=2048,
    ctas=32,
    reserved_shared_per_cta=1024,
    register_unit=256,
    max_shared_per_cta=227 * 1024,
)

PAPER = dict(M=128 * 256, D_S=384, D_T=1536, B=128, N=261, H=24)
#: DINOv3 at 224 px: 196 patches + CLS + 4 storage tokens, the first 5 not rotated; (heads, head dim) of
#: ViT-S/16 and ViT-7B/16.
DINOV3 = dict(B=128, N=201, PREFIX=5, SHAPES=((6, 64), (32, 128)))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("feature_loss", "token_mse", "attention")


# ----------------------------------------------------------------------------- capturing launches


@dataclasses.dataclass
class Launch:
    """One kernel launch as the host code issued it (for autotuned kernels: one per choosable config)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    autotuned: bool  # one of several configs the autotuner benchmarks and picks from


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record kernel launches instead of running them; route every op to its Triton backend.

    An autotuned launch is expanded into one launch per config its autotuner could choose
    (after its own ``early_config_prune``), as the autotuner would benchmark them on a GPU.
    """
    launches: list[Launch] = []
    state = {"autotuned": False}

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), state["autotuned"]))

    def autotuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        finally:
            self.nargs = None
        call_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        state["autotuned"] = True
        try:
            for config in configs:
                self.fn.run(
                    *args,
                    grid=kwargs.get("grid"),
                    warmup=kwargs.get("warmup", False),
                    **call_kwargs,
                    **config.all_kwargs(),
                )
        finally:
            state["autotuned"] = False

    saved = (JITFunction.run, Autotuner.run, _backends.select_backend)
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    _backends.select_backend = lambda op, tensors, **meta: "triton"
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, _backends.select_backend = saved


def op_impl(name: str) -> Callable:
    """The Python implementation of a ``leap_kernels::`` custom op (on ``meta`` tensors the op itself
    would run its fake implementation)."""
    from torch._library import custom_ops

    opdef = custom_ops.OPDEFS.get(f"leap_kernels::{name}")
    if opdef is None or not hasattr(opdef, "_init_fn"):
        raise RuntimeError(f"custom op leap_kernels::{name} not found (torch {torch.__version__})")
    return opdef._init_fn


def meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def workloads(dtypes: list[str], ops: set[str]) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(op, case label, function running the op's host code on meta tensors) at the paper's shapes."""
    m, d_s, d_t = PAPER["M"], PAPER["D_S"], PAPER["D_T"]
    fused, fused_bwd = op_impl("fused_feature_loss"), op_impl("fused_feature_loss_backward")
    rescale = op_impl("feature_loss_rescale")
    tmse, tmse_bwd = op_impl("token_normalized_mse"), op_impl("token_normalized_mse_backward")
    attention = op_impl("teacher_attention")
    attention_rope = op_impl("teacher_attention_rope")

    def loss_inputs(dt, prefix=0):
        """student (M, D_s), weight (D_t, D_s), bias (D_t,), target (M, D_t); with a prefix, the token
        slices x[:, prefix:] of (B, N + prefix, D) tensors that training passes (read in place)."""
        w, b = meta(d_t, d_s, dtype=dt), meta(d_t, dtype=dt)
        if not prefix:
            return meta(m, d_s, dtype=dt), w, b, meta(m, d_t, dtype=dt)
        batch, tokens = PAPER["B"], m // PAPER["B"]
        s = meta(batch, tokens + prefix, d_s, dtype=dt)[:, prefix:]
        t = meta(batch, tokens + prefix, d_t, dtype=dt)[:, prefix:]
        return s, w, b, t

    for name in dtypes:
        dt = DTYPES[name]
        if "feature_loss" in ops:
            for normalize in (False, True):
                loss = "token-mse" if normalize else "mse"

                def forward_grads(dt=dt, normalize=normalize, prefix=0):
                    s, w, b, t = loss_inputs(dt, prefix)
                    _, gs, gw, gb = fused(s, w, b, t, normalize, "mean", 1e-6, True, "triton")
                    grad_output = meta((), dtype=torch.float32)
                    # backward: one rescale launch for the three gradients
                    rescale(gs, gw, gb, grad_output, 1.0 / (m * d_t), w.dtype, b.dtype, [True, True, True])

                def forward_only(dt=dt, normalize=normalize):
                    s, w, b, t = loss_inputs(dt)
                    fused(s, w, b, t, normalize, "none", 1e-6, False, "triton")

                def backward_none(dt=dt, normalize=normalize):
                    s, w, b, t = loss_inputs(dt)
                    fused_bwd(meta(m, dtype=torch.float32), s, w, b, t, normalize, 1e-6, "triton")

                yield "feature_loss", f"{name} {loss} mean fwd+grads", forward_grads
                yield (
                    "feature_loss",
                    f"{name} {loss} mean fwd+grads x[:, 5:]",
                    lambda dt=dt, normalize=normalize: forward_grads(dt, normalize, prefix=5),
                )
                yield "feature_loss", f"{name} {loss} none fwd", forward_only
                yield "feature_loss", f"{name} {loss} none bwd", backward_none
        if "token_mse" in ops:

            def tmse_forward(dt=dt):
                tmse(meta(m, d_t, dtype=dt), meta(m, d_t, dtype=dt), "none", 1e-6)

            def tmse_backward(dt=dt):
                tmse_bwd(meta(m, dtype=torch.float32), meta(m, d_t, dtype=dt), meta(m, d_t, dtype=dt), 1e-6, True, True)

            yield "token_mse", f"{name} fwd", tmse_forward
            yield "token_mse", f"{name} bwd", tmse_backward
        if "attention" in ops and dt != torch.float32:  # fp32 runs on the torch backend
            for heads, head_dim in ((PAPER["H"], 64), (PAPER["H"] // 2, 128)):

                def attn(dt=dt, heads=heads, head_dim=head_dim):
                    qkv = meta(PAPER["B"], PAPER["N"], 3 * heads * head_dim, dtype=dt)
                    attention(qkv, heads, head_dim**-0.5)

                yield "attention", f"{name} B={PAPER['B']} N={PAPER['N']} H={heads} d={head_dim}", attn
            for heads, head_dim in DINOV3["SHAPES"]:

                def attn_rope(dt=dt, heads=heads, head_dim=head_dim):
                    b, n, prefix = DINOV3["B"], DINOV3["N"], DINOV3["PREFIX"]
                    qkv = meta(b, n, 3 * heads * head_dim, dtype=dt)
                    sin = meta(n - prefix, head_dim // 2, dtype=torch.float32)
                    attention_rope(qkv, heads, head_dim**-0.5, sin, meta(*sin.shape, dtype=torch.float32), prefix)

                case = f"{name} rope B={DINOV3['B']} N={DINOV3['N']} H={heads} d={head_dim}"
                yield "attention", case, attn_rope


def launched_kernels() -> dict[str, JITFunction]:
    """Top-level Triton kernels of ``leap_kernels.ops`` (JIT functions not called from another kernel)."""
    import importlib
    import pkgutil

    import leap_kernels.ops as ops_package

    found = {}
    for info in pkgutil.iter_modules(ops_package.__path__):
        module = importlib.import_module(f"{ops_package.__name__}.{info.name}")
        for value in vars(module).values():
            fn = value
            while hasattr(fn, "fn") and not isinstance(fn, JITFunction):  # autotuners, heuristics
                fn = fn.fn
            if isinstance(fn, JITFunction):
                found[fn.__name__] = fn
    sources = {name: fn.src for name, fn in found.items()}
    return {
        name: fn
        for name, fn in found.items()
        if not any(re.search(rf"\b{name}\s*\(", src) for other, src in sources.items() if other != name)
    }


# ----------------------------------------------------------------------------- specialization and compile


@dataclasses.dataclass
class Specialized:
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    def key(self):
        opts = {k: v for k, v in self.options.__dict__.items() if k != "extern_libs"}
        return (
            self.fn.__name__,
            repr(sorted(self.signature.items())),
            repr(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            repr(sorted(opts.items())),
        )

    def config(self) -> str:
        """Tile sizes and launch options, e.g. ``BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 warps=8 stages=3``."""
        names = self.fn.arg_names
        tiles = [
            f"{names[path[0]]}={value}"
            for path, value in self.constexprs.items()
            if names[path[0]].startswith(("BLOCK", "GROUP"))
        ]
        return " ".join(tiles + [f"warps={self.options.num_warps}", f"stages={self.options.num_stages}"])

    def specialization(self) -> str:
        """Which runtime arguments the launch specialized: ``=1`` (a constant) and ``/16`` (divisible by 16)."""
        names = self.fn.arg_names
        declared_constexpr = {p.name for p in self.fn.params if p.is_constexpr}
        ones = [
            names[path[0]]
            for path, value in self.constexprs.items()
            if names[path[0]] not in declared_constexpr and value == 1
        ]
        div16 = [
            names[path[0]]
            for path, value in self.attrs.items()
            if names[path[0]] not in declared_constexpr and ["tt.divisibility", 16] in [list(v) for v in value]
        ]
        return f"=1: {','.join(ones) or '-'}  /16: {','.join(div16) or '-'}"


def specialize(launch: Launch, target) -> Specialized:
    """What ``JITFunction.run`` computes before compiling, for ``target`` instead of the current device.

    Uses the JIT's own binder and ``_pack_args``: the attribute format differs between Triton
    versions (3.6 also lists constexpr arguments in ``attrs``; 3.8 only runtime ones), and this
    way each version builds its own.
    """
    fn = launch.fn
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialized(fn, signature, constexprs, attrs, options)


def _tool(name: str) -> str | None:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spill) bytes per thread of a cubin, from ``cuobjdump -res-usage``."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's nvidia backend ships one)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"unexpected cuobjdump output: {text[-500:]}")
    return {k.lower(): int(v) for k, v in fields.items()}


def ptx_features(ptx: str) -> dict:
    """Which Hopper data-movement / MMA instructions the PTX uses."""
    return {
        "wgmma": bool(re.search(r"\bwgmma\.", ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp.async": bool(re.search(r"\bcp\.async\.c[ag]\.", ptx)),
        "mma.sync": "mma.sync" in ptx,
    }


def ctas_per_sm(registers: int, shared_bytes: int, threads: int, limits: dict = SM90_LIMITS) -> int:
    """Resident CTAs per SM, as the CUDA occupancy calculator counts them (0: the CTA does not fit)."""
    warps = math.ceil(threads / 32)
    by_threads = limits["threads"] // threads
    regs_per_warp = math.ceil(max(registers, 1) * 32 / limits["register_unit"]) * limits["register_unit"]
    by_registers = (limits["registers"] // regs_per_warp) // warps
    if shared_bytes > limits["max_shared_per_cta"]:
        return 0
    by_shared = limits["shared_bytes"] // (shared_bytes + limits["reserved_shared_per_cta"])
    return max(0, min(limits["ctas"], by_threads, by_registers, by_shared))


@dataclasses.dataclass
class Result:
    op: str
    case: str  # "<dtype> <what>"
    kernel: str
    config: str
    specialization: str
    autotuned: bool
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    threads: int = 0
    ctas: int = 0
    features: dict = dataclasses.field(default_factory=dict)
    error: str = ""
    problems: list = dataclasses.field(default_factory=list)

    @property
    def dtype(self) -> str:
        return self.case.split()[0]

    @property
    def spill_key(self) -> tuple[str, str, str]:
        return (self.kernel, self.dtype, self.config)

    @property
    def choosable(self) -> bool:
        """False for an autotune config that cannot launch (too much shared memory): the autotuner skips it."""
        return self.error != "" or self.ctas > 0 or not self.autotuned


def compile_one(spec: Specialized, target) -> dict:
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    compiled = triton.compile(src, target=target, options=spec.options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(
        registers=usage["reg"],
        spill_bytes=usage.get("local", 0) + usage.get("stack", 0),
        shared_bytes=compiled.metadata.shared,
        threads=compiled.metadata.num_warps * 32,
        features=ptx_features(compiled.asm.get("ptx", "")),
    )


def check(result: Result, *, arch: int, known_spills: set) -> None:
    """Fills ``result.problems`` (failures) for a compiled kernel."""
    if result.error:
        result.problems.append("compile error")
        return
    if not result.choosable:
        return  # reported as "skip": Triton's autotuner drops configs that run out of resources
    if result.ctas == 0:
        result.problems.append("does not fit on an SM")
    if (
        arch >= 90
        and result.kernel in TENSOR_CORE_KERNELS
        and result.dtype in ("bf16", "fp16")
        and not result.features["wgmma"]
    ):
        result.problems.append("no wgmma")
    if result.spill_bytes > 0 and result.spill_key not in known_spills:
        result.problems.append(f"spills {result.spill_bytes} B")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def run(arch: int, dtypes: list[str], ops: set[str], known_spills: set, out=print) -> list[Result]:
    target = GPUTarget("cuda", arch, 32)
    results: list[Result] = []
    compiled_cache: dict = {}
    covered = set()
    for op, case, fn in workloads(dtypes, ops):
        try:
            with capture_launches() as launches:
                fn()
            specs = [(launch, specialize(launch, target)) for launch in launches]
        except Exception as exc:  # the op's host code changed under this script: say so, go on
            results.append(
                Result(
                    op,
                    case,
                    "-",
                    "-",
                    "-",
                    False,
                    error=f"host code: {_first_line(exc)}",
                    problems=["host code failed"],
                )
            )
            out(format_result(results[-1]))
            continue
        seen_in_case = set()
        for launch, spec in specs:
            key = spec.key()
            if key in seen_in_case:  # the same launch for another chunk
                continue
            seen_in_case.add(key)
            covered.add(spec.fn.__name__)
            result = Result(op, case, spec.fn.__name__, spec.config(), spec.specialization(), launch.autotuned)
            if key not in compiled_cache:
                try:
                    compiled_cache[key] = compile_one(spec, target)
                except Exception as exc:  # report every kernel, then fail
                    compiled_cache[key] = dict(error=_first_line(exc))
            for name, value in compiled_cache[key].items():
                setattr(result, name, value)
            if not result.error:
                result.ctas = ctas_per_sm(result.registers, result.shared_bytes, result.threads)
            check(result, arch=arch, known_spills=known_spills)
            results.append(result)
            out(format_result(result, known_spills))
    missing = sorted(set(launched_kernels()) - covered) if ops == set(OPS) else []
    for name in missing:
        results.append(
            Result("-", "-", name, "-", "-", False, error="not launched by any workload", problems=["not covered"])
        )
        out(f"FAIL {name}: no workload launches this kernel; add one to tools/compile_check.py")
    return results


def format_result(r: Result, known_spills: set = frozenset()) -> str:
    if r.error:
        return f"FAIL {r.kernel:30s} {r.case:30s} {r.config}: {r.error}"
    status = "FAIL" if r.problems else ("skip" if not r.choosable else ("warn" if r.spill_bytes > 0 else "ok  "))
    feats = " ".join(name for name in ("wgmma", "tma", "cp.async", "mma.sync") if r.features.get(name)) or "-"
    note = ""
    if not r.choosable:
        note = "  (needs more shared memory than an SM has: the autotuner skips this config)"
    elif r.spill_bytes > 0 and r.spill_key in known_spills:
        note = "  (known spill: KNOWN_SPILLS)"
    if r.problems:
        note += "  <- " + ", ".join(r.problems)
    return (
        f"{status} {r.kernel:30s} {r.case:30s} {r.config:52s} regs {r.registers:3d} spill {r.spill_bytes:5d} B "
        f"smem {r.shared_bytes:6d} B  CTAs/SM {r.ctas:2d}  [{feats}]  {r.specialization}{note}"
    )


def failures(results: list[Result], *, allow_spills: bool) -> list[Result]:
    """The results that fail the check (with ``allow_spills``, spills alone do not)."""
    return [r for r in results if r.problems and not (allow_spills and all(p.startswith("spills") for p in r.problems))]


def summarize_spills(results: list[Result], known_spills: set) -> str:
    """One line per spilling (kernel, dtype, config), its largest spill and its cases; stale KNOWN_SPILLS entries."""
    spills: dict = {}
    for r in results:
        if r.spill_bytes > 0 and r.choosable:
            worst, cases = spills.setdefault(r.spill_key, [0, []])
            spills[r.spill_key][0] = max(worst, r.spill_bytes)
            cases.append(" ".join(r.case.split()[1:]))
    lines = []
    for key, (worst, cases) in sorted(spills.items()):
        tag = "known" if key in known_spills else "NEW"
        lines.append(f"spill ({tag}): {key[0]} {key[1]} [{key[2]}]: up to {worst} B per thread; in: {'; '.join(cases)}")
    new = [key for key in sorted(spills) if key not in known_spills]
    if new:
        lines.append("to accept them for now, add to KNOWN_SPILLS in tools/compile_check.py:")
        lines += [f"    {key!r}," for key in new]
    checked = {r.spill_key for r in results}
    for key in sorted(known_spills):
        if key in checked and key not in spills:
            lines.append(f"note: KNOWN_SPILLS lists {key!r}, which no longer spills: remove it")
    return "\n".join(lines) if lines else "no register spills"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    parser.add_argument("--allow-spills", action="store_true", help="report register spills without failing")
    parser.add_argument("--strict", action="store_true", help="fail on the spills listed in KNOWN_SPILLS too")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated subset of bf16,fp16,fp32")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    ops = {o for o in args.ops.split(",") if o}
    bad = [d for d in dtypes if d not in DTYPES] + sorted(ops - set(OPS))
    if bad:
        parser.error(f"unknown dtype/op {bad}")
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}; shapes {PAPER}", flush=True)
    start = time.perf_counter()
    known = set() if args.strict else KNOWN_SPILLS
    results = run(args.arch, dtypes, ops, known, out=lambda line: print(line, flush=True))
    failed = failures(results, allow_spills=args.allow_spills)
    print(summarize_spills(results, known))
    configs = len({r.spill_key for r in results})
    elapsed = time.perf_counter() - start
    if failed:
        print(
            f"{len(failed)} problem(s) in {len(results)} kernel launches ({configs} kernel configs) for "
            f"sm_{args.arch} (Triton {triton.__version__}, {elapsed:.0f} s)"
        )
        return 1
    print(
        f"all kernels compiled for sm_{args.arch} (Triton {triton.__version__}): {len(results)} kernel launches, "
        f"{configs} kernel configs, {elapsed:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
