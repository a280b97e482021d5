"""Kernel launches, host syncs and copies of the fused feature loss on the Triton path, counted
without a GPU.

The fused loss is bound by launch overhead as much as by its GEMMs at the paper's shape (bf16,
M = 32768 = 128 x 256 tokens, 384 -> 1536, bias, reduction "mean"). Here its forward+backward
runs on ``meta`` tensors (shapes and strides, no data, nothing computed) through autograd, with

- Triton launches intercepted (the kernel's ``run``; an autotuned kernel counts once per launch,
  not once per config it benchmarks) and recorded instead of run;
- ATen ops recorded by a TorchDispatchMode, which also runs the Python implementation of every
  ``leap_kernels::`` custom op on the meta tensors (on meta, the op itself would run its fake) and
  decomposes composite ops (``to``, ``reshape``, ``contiguous``) to see whether they copy.

Before this flow (4 chunks of 8192, three ``scale_cast`` launches, per-chunk partials): 36 launches
plain (11 Triton, 4 cuBLAS, 21 ATen; 38 on a token slice, which was copied), 28 token-normalized.
Now: 8 plain (5 Triton, 2 cuBLAS, 1 ATen), 10 token-normalized. (Autograd's ``ones_like`` for a
scalar loss's ``backward()`` adds one to both; here the caller makes ``grad_output``.) Under the
interpreter the projection has one config (BLOCK_N = 128), so the loss partials have 12 slots
instead of the 24 of a GPU: 1.5 MiB less than the GPU's peak.

Counted as one launch each: every ATen op that writes memory on a GPU (elementwise ops, fills
including ``zeros``/``ones_like``, copies and dtype casts, reductions), split into cuBLAS (the
``mm`` family) and other ATen kernels. Not counted, since no kernel runs for them: views (ops
whose schema returns an alias of an input, plus ``_unsafe_view``), allocations (``empty*``,
``new_empty*``) and metadata queries (``sym_size`` and the like, ``lift_fresh``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref

import pytest
import torch
from tolerances import RELATIVE_TOLERANCE, assert_close_rel
from torch.utils._python_dispatch import TorchDispatchMode

import leap_kernels
from leap_kernels import _backends
from leap_kernels.ops import feature_loss as fl
from leap_kernels.ops.naive import fused_feature_loss_reference

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:  # the class of @triton.jit kernels under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - depends on the Triton version
    InterpretedFunction = None

aten = torch.ops.aten
PAPER = dict(B=128, N=256, D_S=384, D_T=1536)
MAX_PLAIN_LAUNCHES = 14
MAX_TOKEN_NORM_LAUNCHES = 16

NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.empty_like.default,
    aten._unsafe_view.default,
    aten.lift_fresh.default,
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.sym_storage_offset.default,
    aten.is_same_size.default,
    aten.set_.source_Storage_storage_offset,  # the Triton interpreter's argument wrapping (CPU runs only)
}
CUBLAS = {
    aten.mm.default,
    aten.mm.out,
    aten.addmm.default,
    aten.addmm.out,
    aten.bmm.default,
    aten.bmm.out,
    aten.baddbmm.default,
    aten.addmm_.default,
}
# Ops that wait for the device (a value read back to the host, or an output shape that depends on data).
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.nonzero.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.masked_select.default,
    aten.unique_dim.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _custom_op_impl(func):
    from torch._library import custom_ops

    return custom_ops.OPDEFS[func._schema.name]._init_fn


@dataclasses.dataclass
class Launches:
    triton: list = dataclasses.field(default_factory=list)
    cublas: list = dataclasses.field(default_factory=list)
    aten: list = dataclasses.field(default_factory=list)
    custom_ops: list = dataclasses.field(default_factory=list)
    allocations: list = dataclasses.field(default_factory=list)  # (op, shape, dtype) of each allocation
    syncs: list = dataclasses.field(default_factory=list)
    ops: list = dataclasses.field(default_factory=list)  # (op, storage addresses of its tensor arguments)
    live: int = 0  # bytes allocated under the recorder and not yet freed
    peak: int = 0

    def release(self, nbytes: int) -> None:
        self.live -= nbytes

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.cublas) + len(self.aten)

    def summary(self) -> str:
        return (
            f"{self.total} launches: {len(self.triton)} Triton {self.triton}, {len(self.cublas)} cuBLAS "
            f"{self.cublas}, {len(self.aten)} ATen {self.aten}"
        )


class Recorder(TorchDispatchMode):
    """Records ATen ops as described in the module docstring; runs ``leap_kernels::`` ops' Python code."""

    def __init__(self, launches: Launches, *, run_custom_ops: bool = True):
        super().__init__()
        self.launches = launches
        self.run_custom_ops = run_custom_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "leap_kernels" and self.run_custom_ops:
            self.launches.custom_ops.append(func._schema.name.split("::")[-1])
            with self:  # the op's own ATen ops and launches are counted too
                return _custom_op_impl(func)(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # e.g. `to`, `reshape`, `contiguous`: count what they run (a copy, or nothing)
                return func.decompose(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        # Storage addresses only: holding the arguments would keep every buffer alive.
        self.launches.ops.append((func, [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]))
        if func in SYNC_OPS:
            self.launches.syncs.append(name)
        out = func(*args, **kwargs)
        self._track_memory(func, out)
        if func in NO_KERNEL or _is_view(func) or func.namespace != "aten":
            if "empty" in name:
                self.launches.allocations.append((name, tuple(out.shape), out.dtype))
        elif func in CUBLAS:
            self.launches.cublas.append(name)
        else:
            self.launches.aten.append(name)
        return out

    def _track_memory(self, func, out):
        """Live bytes of the tensors this mode saw allocated: a fresh output (a return without alias
        annotation: not a view, not in-place, not ``out=``) counts until its storage is freed (views keep
        their base alive)."""
        fresh = [r.alias_info is None for r in func._schema.returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for is_fresh, t in zip(fresh, outs):
            if is_fresh and isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                self.launches.live += nbytes
                self.launches.peak = max(self.launches.peak, self.launches.live)
                weakref.finalize(t, self.launches.release, nbytes)


@contextlib.contextmanager
def triton_launches_recorded(launches: Launches, *, run: bool):
    """Record every Triton launch by kernel name; ``run=False`` skips running it (meta tensors).

    An autotuned launch goes through ``Autotuner.run`` and then the kernel's own ``run`` (once per
    config while it benchmarks): only the outermost call counts.
    """
    classes = [Autotuner, JITFunction] + ([InterpretedFunction] if InterpretedFunction is not None else [])
    saved = {cls: cls.run for cls in classes}
    depth = [0]

    def recording(cls):
        original = saved[cls]

        def run_(self, *args, **kwargs):
            if depth[0] == 0:
                launches.triton.append(self.fn.__name__ if cls is Autotuner else self.__name__)
            if not run:
                return None
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return run_

    for cls in classes:
        cls.run = recording(cls)
    try:
        yield launches
    finally:
        for cls, original in saved.items():
            cls.run = original


@contextlib.contextmanager
def triton_backend_on_meta():
    """Route the ops to the Triton backend although the tensors are on ``meta`` (as tools/compile_check.py does)."""
    saved = _backends.select_backend
    _backends.select_backend = lambda op, tensors, **meta: "triton"
    try:
        yield
    finally:
        _backends.select_backend = saved


def paper_inputs(dtype=torch.bfloat16, device="meta", *, lead=(PAPER["B"], PAPER["N"]), prefix=0):
    b, n = lead
    d_s, d_t = PAPER["D_S"], PAPER["D_T"]
    student = torch.empty(b, n + prefix, d_s, dtype=dtype, device=device)[:, prefix:].requires_grad_()
    weight = torch.empty(d_t, d_s, dtype=dtype, device=device, requires_grad=True)
    bias = torch.empty(d_t, dtype=dtype, device=device, requires_grad=True)
    target = torch.empty(b, n + prefix, d_t, dtype=dtype, device=device)[:, prefix:]
    return student, weight, bias, target


def count_fwd_bwd(normalize: bool, *, dtype=torch.bfloat16, reduction="mean", prefix=0) -> Launches:
    """Launches of one forward+backward at the paper's shape on meta tensors (grad_output made outside)."""
    # With a prefix, student is the view x[:, prefix:] of a leaf and the gradient is taken with respect
    # to the view: the leaf's slice backward belongs to the caller's graph, not to the loss.
    student, weight, bias, target = paper_inputs(dtype, prefix=prefix)
    launches = Launches()
    with triton_backend_on_meta(), triton_launches_recorded(launches, run=False):
        with Recorder(launches):
            loss = leap_kernels.fused_feature_loss(
                student, weight, bias, target, normalize=normalize, reduction=reduction
            )
        grad_out = torch.ones(loss.shape, dtype=loss.dtype, device="meta")
        with Recorder(launches):
            torch.autograd.grad(loss, (student, weight, bias), grad_out)
    return launches


def test_recorder_counts_what_it_says():
    # A known sequence: 1 fill, 1 elementwise, views and allocations (none), 1 cuBLAS, 1 reduction.
    launches = Launches()
    with Recorder(launches):
        x = torch.zeros(4, 6, device="meta")
        y = (x + 1).view(6, 4).t()
        z = torch.empty(3, device="meta")
        w = y @ x.T.contiguous()
        w.sum()
        del z
    assert launches.cublas == ["mm"], launches.summary()
    assert launches.aten == ["zeros", "add", "clone", "sum"], launches.summary()
    assert ("empty", (3,), torch.float32) in launches.allocations


def test_triton_launches_are_counted_once_per_launch():
    launches = Launches()
    with triton_backend_on_meta(), triton_launches_recorded(launches, run=False):
        s, w, b, t = paper_inputs(lead=(1, 8192))
        with Recorder(launches):
            _ = torch.ops.leap_kernels.fused_feature_loss(
                s.detach()[0], w.detach(), b.detach(), t[0], False, "none", 1e-6, False, "triton"
            )
    # Forward only, one chunk: the projection (autotuned: once, not once per config) and the loss sum.
    assert launches.triton == ["_projection_loss_kernel"], launches.summary()
    assert launches.aten == ["sum"] and not launches.cublas, launches.summary()


@pytest.mark.parametrize("prefix", [0, 5], ids=["contiguous", "sliced"])
def test_plain_launch_count_at_paper_shape(prefix):
    launches = count_fwd_bwd(normalize=False, prefix=prefix)
    print(launches.summary())
    assert launches.total <= MAX_PLAIN_LAUNCHES, launches.summary()
    # Two chunks of 16384 tokens, three launches each, the loss sum, one backward launch.
    assert sorted(launches.triton) == sorted(
        ["_projection_loss_kernel", "_grad_weight_kernel"] * 2 + ["_rescale_kernel"]
    ), launches.summary()
    assert launches.cublas == ["mm", "mm"] and launches.aten == ["sum"], launches.summary()
    assert not launches.syncs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_token_normalized_launch_count_at_paper_shape(dtype):
    launches = count_fwd_bwd(normalize=True, dtype=dtype)
    print(launches.summary())
    assert launches.total <= MAX_TOKEN_NORM_LAUNCHES, launches.summary()
    assert launches.triton.count("_token_norm_mse_rows_kernel") == 2, launches.summary()
    assert len(launches.cublas) == 2 and launches.aten == ["sum"], launches.summary()


def test_backward_materializes_no_zero_gradients():
    launches = count_fwd_bwd(normalize=False)
    # Autograd would fill zeros for the kept-gradient outputs unless set_materialize_grads(False).
    assert not any(op in ("zeros", "zeros_like", "fill", "zero") for op in launches.aten), launches.summary()


def test_one_g_buffer_and_one_partials_buffer():
    launches = count_fwd_bwd(normalize=False)
    n = PAPER["D_T"]
    m = PAPER["B"] * PAPER["N"]
    chunk = min(m, fl.DEFAULT_TRITON_CHUNK_TOKENS)
    shapes = [shape for _, shape, _ in launches.allocations]
    assert shapes.count((chunk, n)) == 1, shapes  # the G buffer, reused by both chunks
    assert shapes.count((math.ceil(n / fl.PARTIAL_BLOCK_N), m)) == 1, shapes
    splits = fl.weight_grad_splits(m, torch.device("meta"))
    assert splits > 1 and shapes.count((splits, n, PAPER["D_S"])) == 1, shapes


@pytest.mark.parametrize("normalize,target_mib", [(False, 130), (True, 150)], ids=["mse", "token-mse"])
def test_peak_extra_memory_at_paper_shape_is_within_target(normalize, target_mib):
    """The peak of the bytes allocated during forward+backward above what existed before (what
    bench/harness.peak_extra_mb measures on a GPU), from the recorded allocations and frees; the
    analytic peak is in feature_loss.py next to DEFAULT_TRITON_CHUNK_TOKENS."""
    launches = count_fwd_bwd(normalize=normalize)
    peak_mib = launches.peak / 2**20
    print(f"peak extra memory ({'token-mse' if normalize else 'mse'}): {peak_mib:.1f} MiB")
    assert peak_mib <= target_mib, peak_mib
    # The forward holds G, the kept gradients and the workspace at once: the peak is at least that.
    assert peak_mib >= 90, peak_mib


def test_partial_slots_check_fails_for_a_narrower_config():
    cfg = [triton.Config({"BLOCK_N": 128}), triton.Config({"BLOCK_N": 96})]
    with pytest.raises(RuntimeError, match="BLOCK_N \\[96\\] is not a multiple of PARTIAL_BLOCK_N = 64"):
        fl.check_partial_slots(cfg, 64)
    fl.check_partial_slots([triton.Config({"BLOCK_N": 128}), triton.Config({"BLOCK_N": 64})], 64)


# ----------------------------------------------------------------------------- host syncs, copies (CPU, interpreter)


def _small_inputs(dtype=torch.float32, *, prefix=0):
    b, n, d_s, d_t = 2, 37, 48, 100
    full = torch.randn(b, n + prefix, d_s, dtype=dtype, requires_grad=True)
    weight = (torch.randn(d_t, d_s) / math.sqrt(d_s)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(d_t)).to(dtype).requires_grad_()
    target_full = torch.randn(b, n + prefix, d_t, dtype=dtype)
    return full, weight, bias, target_full


@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_and_fixed_allocations(normalize, reduction):
    """CUDA-graph capturable: nothing reads a device value back, and a second call allocates exactly
    what the first did (the GPU capture itself: tests/test_gpu.py)."""
    full, weight, bias, target = _small_inputs()
    allocations = []
    for _ in range(2):
        launches = Launches()
        with leap_kernels.use_backend("triton"), triton_launches_recorded(launches, run=True):
            with Recorder(launches, run_custom_ops=False):
                loss = leap_kernels.fused_feature_loss(
                    full, weight, bias, target, normalize=normalize, reduction=reduction
                )
                torch.autograd.grad(loss, (full, weight, bias), torch.ones_like(loss))
        assert not launches.syncs, launches.syncs
        assert launches.triton, "the Triton kernels did not run"
        allocations.append(launches.allocations)
    assert allocations[0] == allocations[1]


def test_a_sync_would_be_caught():
    launches = Launches()
    with Recorder(launches):
        torch.ones(3).sum().item()
    assert launches.syncs == ["_local_scalar_dense"]


@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_sliced_tokens_are_read_in_place(normalize):
    """``x[:, prefix:]`` (what the trainer passes) reaches the Triton kernels without a copy."""
    prefix = 5
    full, weight, bias, target_full = _small_inputs(prefix=prefix)
    student, target = full[:, prefix:], target_full[:, prefix:]
    assert not student.is_contiguous() and not target.is_contiguous()
    launches = Launches()
    with leap_kernels.use_backend("triton"), triton_launches_recorded(launches, run=True):
        with Recorder(launches, run_custom_ops=False):
            loss = leap_kernels.fused_feature_loss(student, weight, bias, target, normalize=normalize)
            grads = torch.autograd.grad(loss, (full, weight, bias))
    storages = {full.untyped_storage().data_ptr(), target_full.untyped_storage().data_ptr()}
    copies = [
        str(func)
        for func, addresses in launches.ops
        if func.overloadpacket.__name__ in ("clone", "_to_copy", "copy_", "contiguous", "_unsafe_view")
        and storages & set(addresses)
    ]
    assert not copies, copies
    ref_leaves = [x.detach().double().requires_grad_() for x in (full, weight, bias)]
    ref = fused_feature_loss_reference(
        ref_leaves[0][:, prefix:], ref_leaves[1], ref_leaves[2], target.double(), normalize=normalize
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    loss_tol, grad_tol = RELATIVE_TOLERANCE[torch.float32]
    assert_close_rel(loss, ref, loss_tol, "loss")
    for name, g, r in zip(("student", "weight", "bias"), grads, ref_grads):
        assert_close_rel(g, r, grad_tol, f"grad {name}")
