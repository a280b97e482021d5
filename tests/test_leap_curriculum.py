"""Tests for leap/curriculum.py: linear CKA and the LEAP curriculum controller."""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from spawn import run_processes

from leap.cka import _use_gram_form, linear_cka, linear_cka_reference
from leap.curriculum import Curriculum

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _pair(n: int, d1: int, d2: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated features (so CKA is far from 0 and 1) with non-zero column means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g) + torch.randn(d1, generator=g) * 3
    w = torch.randn(d1, d2, generator=g) / math.sqrt(d1)
    y = 0.7 * (x @ w) + torch.randn(n, d2, generator=g) + 2.0
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------
# linear_cka
# --------------------------------------------------------------------------------------


def test_reference_hand_computed():
    # One feature each: CKA = squared Pearson correlation. xc = [-1, 0, 1], yc = [0, -1, 1]:
    # x^T y = 1, x^T x = 2, y^T y = 2 -> 1 / (2 * 2) = 0.25.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert linear_cka_reference(x, y).item() == pytest.approx(0.25, abs=1e-15)
    assert linear_cka(x, y).item() == pytest.approx(0.25, abs=1e-6)
    assert linear_cka(x, y, form="gram").item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("form", ["auto", "feature", "gram"])
@pytest.mark.parametrize("dims", [(100, 192), (192, 384), (384, 100)])
@pytest.mark.parametrize("n", [197, 261, 1000])
def test_cka_matches_float64_reference(n, dims, form):
    x, y = _pair(n, *dims, seed=n + dims[0])
    ref = linear_cka_reference(x, y).item()
    assert 0.05 < ref < 0.95  # a meaningful value, not a degenerate one
    got = linear_cka(x, y, form=form)
    assert got.shape == () and got.dtype == torch.float32 and got.device == x.device
    assert got.item() == pytest.approx(ref, abs=2e-6)


def test_auto_form_choice():
    assert _use_gram_form(197, 384, 384)  # N < D: Gram form is cheaper
    assert _use_gram_form(261, 1536, 384)
    assert not _use_gram_form(1000, 100, 192)
    assert not _use_gram_form(16384, 1536, 1536)  # the training case: feature form


def test_leading_dims_flattened_and_fp64_input():
    x, y = _pair(2 * 98, 100, 64, seed=3)
    flat = linear_cka(x, y)
    assert linear_cka(x.reshape(2, 98, 100), y.reshape(2, 98, 64)).item() == pytest.approx(flat.item(), abs=1e-6)
    out64 = linear_cka(x.double(), y.double())
    assert out64.dtype == torch.float32 and out64.shape == ()
    assert out64.item() == pytest.approx(linear_cka_reference(x, y).item(), abs=1e-7)


@pytest.mark.parametrize("form", ["feature", "gram"])
def test_cka_invariances(form):
    x, y = _pair(261, 64, 48, seed=7)
    base = linear_cka(x, y, form=form).item()
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x @ q, y, form=form).item() == pytest.approx(base, abs=1e-5)  # orthogonal
    assert linear_cka(3.7 * x, 0.02 * y, form=form).item() == pytest.approx(base, abs=1e-5)  # isotropic scale
    assert linear_cka(x + 5.0, y - 1.0, form=form).item() == pytest.approx(base, abs=1e-5)  # translation
    assert linear_cka(y, x, form=form).item() == pytest.approx(base, abs=1e-6)  # symmetric
    assert linear_cka(x, x, form=form).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("form", ["feature", "gram"])
def test_zero_denominator_gives_zero(form):
    const = torch.full((50, 8), 3.0)  # centers to exactly zero
    y = torch.randn(50, 6)
    assert linear_cka(const, y, form=form).item() == 0.0
    assert linear_cka(y, torch.zeros(50, 4), form=form).item() == 0.0
    assert linear_cka(torch.randn(1, 8), torch.randn(1, 6), form=form).item() == 0.0  # N = 1
    # Tiny but valid features still give the real value; only a denominator < eps is 0,
    # and the eps test is on the original scale (as in the reference).
    x, y = _pair(50, 8, 6, seed=2)
    for s in (1e-3, 1e-7):
        assert linear_cka(s * x, s * y, form=form).item() == pytest.approx(
            linear_cka_reference(s * x, s * y).item(), abs=1e-5
        )
    assert linear_cka_reference(1e-7 * x, 1e-7 * y).item() == 0.0  # that case is below eps


@pytest.mark.parametrize("form", ["feature", "gram"])
def test_nan_and_inf_propagate(form):
    x, y = _pair(64, 16, 12, seed=5)
    xn = x.clone()
    xn[3, 5] = float("nan")
    assert math.isnan(linear_cka(xn, y, form=form).item())
    assert math.isnan(linear_cka(y, xn, form=form).item())
    yi = y.clone()
    yi[0, 0] = float("inf")
    assert math.isnan(linear_cka(x, yi, form=form).item())
    assert math.isnan(linear_cka_reference(xn, y).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_cpu(dtype):
    x, y = _pair(197, 96, 64, seed=11)
    xl, yl = x.to(dtype), y.to(dtype)
    ref = linear_cka_reference(xl, yl).item()
    for form in ("feature", "gram"):
        got = linear_cka(xl, yl, form=form)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(ref, abs=1e-2)


def test_inputs_untouched_mixed_dtypes_and_differentiable():
    x, y = _pair(197, 48, 32, seed=13)
    x0, y0 = x.clone(), y.clone()
    ref = linear_cka_reference(x, y).item()
    assert linear_cka(x, y).item() == pytest.approx(ref, abs=1e-6)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # bf16 with fp32: falls back to fp32 matmuls.
    mixed = linear_cka(x.bfloat16(), y)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(linear_cka_reference(x.bfloat16(), y).item(), abs=1e-5)
    # Not needed by the curriculum (it feeds detached features), but must not break.
    xg = x.clone().requires_grad_(True)
    linear_cka(xg, y).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_cka_argument_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"y has 9 rows"):
        linear_cka(x, torch.randn(9, 4))
    with pytest.raises(ValueError, match=r"x must have shape"):
        linear_cka(torch.randn(10), x)
    with pytest.raises(ValueError, match=r"y must have shape"):
        linear_cka(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"x must be a floating-point"):
        linear_cka(torch.ones(10, 4, dtype=torch.int64), x)
    with pytest.raises(ValueError, match=r"y must be a floating-point"):
        linear_cka(x, torch.ones(10, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x is empty"):
        linear_cka(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"form"):
        linear_cka(x, x, form="sample")
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        linear_cka([[1.0]], x)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("form", ["feature", "gram"])
def test_cuda_matches_reference_without_sync(dtype, form):
    x, y = _pair(1000, 384, 192, seed=4, device="cuda")
    xl, yl = x.to(dtype), y.to(dtype)
    ref = linear_cka_reference(xl, yl).item()
    linear_cka(xl, yl, form=form)  # warm-up (cuBLAS handle creation etc.)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = linear_cka(xl, yl, form=form)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == ()
    tol = 1e-2 if dtype != torch.float32 else 2e-3  # fp32 runs in TF32 by default
    assert got.item() == pytest.approx(ref, abs=tol)
    if dtype == torch.float32:
        exact = linear_cka(xl, yl, form=form, allow_tf32=False)
        assert exact.item() == pytest.approx(ref, abs=1e-5)


@needs_cuda
def test_cuda_observe_single_host_read():
    cur = Curriculum(6, tau=0.8, start_block=1)
    cur.calibrate()
    value = torch.tensor(0.9, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cur.observe(value, step=0, epoch=0) == [(1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) <= 1


@needs_cuda
def test_cuda_tf32_setting_restored():
    m = torch.backends.cuda.matmul
    before = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    x, y = _pair(64, 32, 32, device="cuda")
    linear_cka(x, y)
    after = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    assert after == before


# --------------------------------------------------------------------------------------
# Curriculum controller
# --------------------------------------------------------------------------------------


def _drive(cur: Curriculum, events, step: int = 0, epoch: int = 0):
    """Run scripted events: a float is one observe(); "end" is epoch_end().

    Returns (block after each event, returned level-up lists, next step, next epoch).
    """
    blocks, returned = [], []
    for ev in events:
        if ev == "end":
            returned.append(cur.epoch_end(epoch=epoch))
            epoch += 1
        else:
            returned.append(cur.observe(ev, step=step, epoch=epoch))
            step += 1
        blocks.append(cur.block)
    return blocks, returned, step, epoch


# L=6, tau=0.8, alpha=1, M=2 (start at block 1).
SCRIPT = [
    0.5,  # step 0, epoch 0: ema 0.5 -> stay 1
    0.9,  # step 1: 1 -> 2 (cka)
    0.95,  # step 2: 2 -> 3 (cka): consecutive level-ups
    0.3,  # step 3: stay
    "end",  # end of epoch 0: epochs_on_block 1
    0.79,  # step 4, epoch 1: just below tau
    "end",  # end of epoch 1: epochs_on_block 2 >= M -> 3 -> 4 (timeout)
    0.8,  # step 5, epoch 2: ema == tau -> 4 -> 5 (cka, >=)
    "end",  # end of epoch 2: epochs_on_block 1
    0.1,  # step 6, epoch 3
    0.85,  # step 7: 5 -> 6 (cka)
    0.99,  # step 8: already at the last block: stays
    "end",
    "end",
    "end",  # no timeout past the last block
]
SCRIPT_BLOCKS = [1, 2, 3, 3, 3, 3, 4, 5, 5, 5, 6, 6, 6, 6, 6]
SCRIPT_HISTORY = [
    (1, 0, 1, 2, "cka"),
    (2, 0, 2, 3, "cka"),
    (4, 1, 3, 4, "timeout"),  # epoch_end labels the entry with the last observed step
    (5, 2, 4, 5, "cka"),
    (7, 3, 5, 6, "cka"),
]


def _script_curriculum() -> Curriculum:
    cur = Curriculum(6, tau=0.8, alpha=1.0, max_epochs_per_block=2, start_block=1)
    assert cur.calibrate() == 1
    return cur


def test_scripted_sequence_against_hand_written_blocks():
    cur = _script_curriculum()
    blocks, returned, _, _ = _drive(cur, SCRIPT)
    assert blocks == SCRIPT_BLOCKS
    assert cur.level_ups == SCRIPT_HISTORY
    assert returned[1] == [(1, 2)] and returned[2] == [(2, 3)] and returned[6] == [(3, 4)]
    assert returned[0] == [] and returned[11] == []
    assert cur.at_last_block and cur.epochs_on_block == 3
    assert cur.steps_observed == 9 and cur.last_cka == pytest.approx(0.99)


def test_ema_reset_after_level_up():
    cur = Curriculum(6, tau=0.8, start_block=1)
    cur.calibrate()
    cur.observe(0.5, step=0, epoch=0)
    assert cur.ema == 0.5
    cur.observe(0.9, step=1, epoch=0)
    assert (cur.block, cur.ema, cur.epochs_on_block) == (2, 0.0, 0)


def test_alpha_smoothing_sequence():
    # alpha = 0.5, tau = 0.75, no timeout. Values are binary fractions so the EMA is exact.
    cur = Curriculum(4, tau=0.75, alpha=0.5, max_epochs_per_block=None, start_block=1)
    cur.calibrate()
    events = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, "end", "end", "end"]
    # ema:   0.5 0.75->0  0.5 0.25 0.625 0.8125->0
    blocks, _, _, _ = _drive(cur, events)
    assert blocks == [1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert cur.level_ups == [(1, 0, 1, 2, "cka"), (5, 0, 2, 3, "cka")]
    # Same values without smoothing level up on the first observation already.
    raw = Curriculum(4, tau=0.75, alpha=1.0, start_block=1)
    raw.calibrate()
    assert raw.observe(1.0, step=0, epoch=0) == [(1, 2)]


def test_calibration_argmax():
    scores = torch.tensor([0.1, 0.3, float("nan"), 0.7, 0.7, 0.2])  # NaN never wins, ties -> first
    cur = Curriculum(6)
    assert cur.calibrate(scores) == 4
    assert cur.block == 4 and cur.calibrated
    assert cur.calibration_scores[3] == pytest.approx(0.7)
    assert Curriculum(6, start_block=2).calibrate(None) == 2  # start_block overrides
    assert Curriculum(6, start_block=2).calibrate(scores) == 2
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        Curriculum(6).calibrate(torch.rand(5))
    with pytest.raises(TypeError, match="scores"):
        Curriculum(6).calibrate(None)


def test_snap_to_last():
    cur = Curriculum(10, tau=0.5, snap_to_last=4, start_block=2)
    assert cur.calibrate() == 2
    blocks, returned, _, _ = _drive(cur, [0.9, 0.9, 0.9])
    assert blocks == [3, 10, 10]
    assert returned == [[(2, 3)], [(3, 4), (4, 10)], []]
    assert cur.level_ups == [(0, 0, 2, 3, "cka"), (1, 0, 3, 4, "cka"), (1, 0, 4, 10, "snap")]
    # Calibrating at or past S snaps immediately.
    cur2 = Curriculum(10, snap_to_last=4, start_block=5)
    assert cur2.calibrate() == 10
    assert cur2.level_ups == [(0, 0, 5, 10, "snap")]


def test_baseline_never_moves():
    cur = Curriculum(5, tau=0.5, max_epochs_per_block=1, enabled=False)
    assert cur.block == 5
    assert cur.calibrate(torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1])) == 5
    blocks, returned, _, _ = _drive(cur, [1.0, 1.0, "end", 1.0, "end", "end"])
    assert blocks == [5, 5, 5, 5, 5, 5]
    assert all(r == [] for r in returned) and cur.level_ups == []
    assert cur.ema == 1.0  # still tracked for logging
    assert "baseline" in repr(cur)


def test_observe_tensor_inputs_and_nonfinite():
    cur = Curriculum(6, tau=0.8, alpha=0.5, start_block=1)
    cur.calibrate()
    cur.observe(torch.tensor([0.5]), step=0, epoch=0)
    assert cur.ema == 0.25
    cur.observe(torch.tensor(float("nan")), step=1, epoch=0)  # skipped, EMA not poisoned
    assert cur.ema == 0.25 and cur.nonfinite_observations == 1 and math.isnan(cur.last_cka)
    cur.observe(torch.tensor(1.0, dtype=torch.bfloat16), step=2, epoch=0)
    assert cur.ema == 0.625
    with pytest.raises(ValueError, match="single value"):
        cur.observe(torch.tensor([0.5, 0.6]), step=3, epoch=0)


def test_state_dict_round_trip_mid_run():
    full = _script_curriculum()
    full_blocks, _, _, _ = _drive(full, SCRIPT)

    split = 10  # after "0.1" at step 6: ema = 0.1, epochs_on_block = 1 (non-trivial state)
    first = _script_curriculum()
    blocks_a, _, step, epoch = _drive(first, SCRIPT[:split])
    state = first.state_dict()
    assert (state["ema"], state["epochs_on_block"], state["block"]) == (0.1, 1, 5)

    # Plain Python types: survives JSON and torch.load(weights_only=True).
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = Curriculum(6, tau=0.8, alpha=1.0, max_epochs_per_block=2, start_block=1)
    resumed.load_state_dict(state)
    blocks_b, _, _, _ = _drive(resumed, SCRIPT[split:], step=step, epoch=epoch)
    assert blocks_a + blocks_b == full_blocks == SCRIPT_BLOCKS
    assert resumed.state_dict() == full.state_dict()
    assert resumed.level_ups == SCRIPT_HISTORY


def test_load_state_dict_errors():
    state = _script_curriculum().state_dict()
    with pytest.raises(ValueError, match=r"num_blocks=6 .* num_blocks=12"):
        Curriculum(12).load_state_dict(state)
    with pytest.raises(ValueError, match="disabled"):
        Curriculum(6, enabled=False).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        Curriculum(6).load_state_dict({"num_blocks": 6})
    with pytest.warns(UserWarning, match="config differs"):
        Curriculum(6, tau=0.9, max_epochs_per_block=2, start_block=1).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Curriculum(6, tau=0.8, max_epochs_per_block=2, start_block=1).load_state_dict(state)


def test_constructor_validation_and_repr():
    for kwargs in (
        dict(num_blocks=0),
        dict(num_blocks=6, alpha=0.0),
        dict(num_blocks=6, alpha=1.5),
        dict(num_blocks=6, start_block=7),
        dict(num_blocks=6, snap_to_last=0),
        dict(num_blocks=6, max_epochs_per_block=0),
        dict(num_blocks=6, tau=float("nan")),
    ):
        with pytest.raises(ValueError):
            Curriculum(**kwargs)
    r = repr(Curriculum(40, start_block=3))
    assert r.startswith("Curriculum(block=3/40") and len(r) < 100


# --------------------------------------------------------------------------------------
# DDP: two gloo ranks feed different values, decisions must follow the mean.
# --------------------------------------------------------------------------------------

# Binary fractions, so the float32 mean is exact and nothing sits on tau = 0.8.
DDP_SCORES = ([0.1, 0.9, 0.2, 0.0, 0.0, 0.0], [0.1, 0.0, 0.6, 0.0, 0.0, 0.0])  # mean argmax: block 2
DDP_EVENTS = (
    [1.0, 0.5, 1.0, "end", 0.25, "end", 1.0, 0.5],  # rank 0 alone would level up at once
    [0.5, 1.0, 0.75, "end", 0.5, "end", 0.75, 1.0],
)
# Means:  0.75, 0.75, 0.875 (2->3), end, 0.375, end (timeout 3->4), 0.875 (4->5), 0.75
DDP_EXPECTED = [2, 2, 2, 3, 3, 3, 4, 5, 5]  # first entry: after calibrate


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cur = Curriculum(6, tau=0.8, alpha=1.0, max_epochs_per_block=2)
        blocks = [cur.calibrate(torch.tensor(DDP_SCORES[rank]))]
        step = epoch = 0
        for ev in DDP_EVENTS[rank]:
            if ev == "end":
                cur.epoch_end(epoch=epoch)
                epoch += 1
            else:
                # Rank 0 feeds tensors, rank 1 Python floats: both paths must all-reduce.
                cur.observe(torch.tensor(ev) if rank == 0 else ev, step=step, epoch=epoch)
                step += 1
            blocks.append(cur.block)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"blocks": blocks, "level_ups": cur.level_ups}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_take_identical_decisions(tmp_path):
    world = 2
    run_processes(_ddp_worker, (world, str(tmp_path / "store"), str(tmp_path)), world, timeout_s=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert results[0] == results[1]
    assert results[0]["blocks"] == DDP_EXPECTED

    # The same sequence from a single controller fed the per-step means.
    single = Curriculum(6, tau=0.8, alpha=1.0, max_epochs_per_block=2)
    mean_scores = (torch.tensor(DDP_SCORES[0]) + torch.tensor(DDP_SCORES[1])) / 2
    blocks = [single.calibrate(mean_scores)]
    means = [ev if ev == "end" else (ev + DDP_EVENTS[1][i]) / 2 for i, ev in enumerate(DDP_EVENTS[0])]
    blocks += _drive(single, means)[0]
    assert blocks == DDP_EXPECTED
    assert [list(e) for e in single.level_ups] == results[0]["level_ups"]
