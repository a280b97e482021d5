"""Tests for leap.teacher.TruncatedTeacher on tiny random timm ViTs."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from leap.models import build_model, patch_grid
from leap.teacher import TruncatedTeacher

DEPTH = 4


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.5 + 0.5 * noise.abs() if name.endswith("gamma") else 0.2 * noise)
    return model


def make_teacher(registers_swiglu: bool = True, dtype=None) -> TruncatedTeacher:
    if registers_swiglu:  # the giant's layout: 4 registers, packed SwiGLU, LayerScale
        m = build_model("vit_giant_patch14_reg4_dinov2", img_size=28, depth=DEPTH, embed_dim=48, num_heads=3)
    else:
        m = build_model("vit_small_patch14_dinov2", img_size=28, depth=DEPTH, embed_dim=32, num_heads=2)
    return TruncatedTeacher(randomize_(m), dtype=dtype)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def manual_target(t: TruncatedTeacher, x: torch.Tensor, k: int):
    """Reference: timm's forward_features steps with the block loop cut after block k."""
    m = t.model
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[:k]:
            h = blk(h)
        h = m.norm(h)
    return h[:, m.num_prefix_tokens :], h[:, 0]


@pytest.fixture(scope="module", params=[True, False], ids=["reg4_swiglu", "plain"])
def teacher(request) -> TruncatedTeacher:
    return make_teacher(request.param)


def test_properties(teacher):
    assert teacher.num_blocks == DEPTH
    assert teacher.patch_grid == (2, 2) == patch_grid(teacher)
    reg = teacher.model.reg_token is not None
    assert teacher.num_prefix_tokens == (5 if reg else 1)
    assert teacher.embed_dim == (48 if reg else 32)
    assert teacher.dtype == torch.float32


def test_full_depth_equals_forward_features(teacher):
    x = images()
    patch, cls = teacher(x, teacher.num_blocks)
    with torch.no_grad():
        ref = teacher.model.forward_features(x)
    P, D = teacher.num_prefix_tokens, teacher.embed_dim
    assert patch.shape == (2, 4, D) and cls.shape == (2, D)
    torch.testing.assert_close(patch, ref[:, P:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cls, ref[:, 0], rtol=1e-6, atol=1e-6)


def test_truncated_forward_matches_manual_loop(teacher):
    x = images()
    outs = []
    for k in range(1, teacher.num_blocks + 1):
        patch, cls = teacher(x, k)
        ref_patch, ref_cls = manual_target(teacher, x, k)
        torch.testing.assert_close(patch, ref_patch, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cls, ref_cls, rtol=1e-6, atol=1e-6)
        outs.append(patch)
    assert not torch.allclose(outs[0], outs[-1])  # blocks really change the target


def test_scan_matches_per_block_forward(teacher):
    x = images()
    seen = []

    def score_fn(k, patch, cls):
        seen.append((k, tuple(patch.shape), tuple(cls.shape)))
        return patch.float().pow(2).mean() + k * cls.float().mean()

    scores = teacher.scan(x, score_fn)
    assert scores.shape == (teacher.num_blocks,) and scores.dtype == torch.float32
    D = teacher.embed_dim
    assert seen == [(k, (2, 4, D), (2, D)) for k in range(1, teacher.num_blocks + 1)]
    for k in range(1, teacher.num_blocks + 1):
        patch, cls = teacher(x, k)
        expected = patch.pow(2).mean() + k * cls.mean()
        torch.testing.assert_close(scores[k - 1], expected, rtol=1e-5, atol=1e-6)


def test_scan_releases_previous_blocks(teacher):
    refs = []

    def score_fn(k, patch, cls):
        if refs:  # the previous block's normed outputs must already be freed
            assert refs[-1]() is None, f"block {k - 1} output still alive at block {k}"
        refs.append(weakref.ref(patch))
        return torch.tensor(float(k))

    scores = teacher.scan(images(), score_fn)
    torch.testing.assert_close(scores, torch.arange(1.0, teacher.num_blocks + 1))


def test_scan_rejects_non_scalar_scores(teacher):
    with pytest.raises(ValueError, match="scalar"):
        teacher.scan(images(), lambda k, p, c: p.mean(dim=1))


@pytest.mark.parametrize("k", [0, DEPTH + 1, -1, 2.5])
def test_k_out_of_range(teacher, k):
    with pytest.raises(ValueError, match=rf"k={k!r}.*1 <= k <= {DEPTH}"):
        teacher(images(), k)


def test_frozen_eval_and_no_graph(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training and all(not m.training for m in teacher.model.modules())
    x = images().requires_grad_(True)
    patch, cls = teacher(x, 2)
    assert not patch.requires_grad and patch.grad_fn is None and cls.grad_fn is None
    scores = teacher.scan(x, lambda k, p, c: p.sum())
    assert scores.grad_fn is None


def test_block_forward_hook_is_the_only_block_call():
    class Counting(TruncatedTeacher):
        calls = 0

        def block_forward(self, block, x):
            type(self).calls += 1
            return super().block_forward(block, x)

    base = make_teacher()
    t = Counting(base.model)
    t(images(), 3)
    assert Counting.calls == 3
    t.scan(images(), lambda k, p, c: p.mean())
    assert Counting.calls == 3 + DEPTH


def test_dtype_cast():
    t = make_teacher(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in t.parameters())
    patch, cls = t(images(), 2)  # fp32 input is cast
    assert patch.dtype == torch.bfloat16 and cls.dtype == torch.bfloat16
    ref_patch, _ = manual_target(t, images().bfloat16(), 2)
    torch.testing.assert_close(patch, ref_patch)


def test_requires_cls_token():
    m = build_model(
        "vit_small_patch14_dinov2",
        img_size=28,
        depth=1,
        embed_dim=32,
        num_heads=2,
        class_token=False,
        global_pool="avg",
    )
    with pytest.raises(ValueError, match="CLS"):
        TruncatedTeacher(m)


def test_collect_matches_per_block_forward(teacher):
    """collect (the one-to-one baseline's targets): one pass, each entry = forward(x, k)."""
    x = images()
    blocks = [1, 1, teacher.num_blocks]
    calls = []
    original = teacher.block_forward
    teacher.block_forward = lambda block, h: (calls.append(1), original(block, h))[1]
    try:
        patch, cls = teacher.collect(x, blocks)
    finally:
        del teacher.block_forward  # the fixture is shared by the module's tests
    assert len(calls) == teacher.num_blocks  # one pass, no block run twice
    assert patch.shape == (3, 2, *teacher.forward(x, 1)[0].shape[1:]) and cls.shape[:2] == (3, 2)
    for p, k in enumerate(blocks):
        ref_patch, ref_cls = teacher(x, k)
        torch.testing.assert_close(patch[p], ref_patch, rtol=0, atol=0)
        torch.testing.assert_close(cls[p], ref_cls, rtol=0, atol=0)
    with pytest.raises(ValueError, match="increasing"):
        teacher.collect(x, [2, 1])
    with pytest.raises(ValueError, match="out of range"):
        teacher.collect(x, [teacher.num_blocks + 1])
