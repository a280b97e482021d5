"""DINOv3 teachers and students (timm ``Eva``): model names, the family adapter, the truncated teacher
against timm's own ``forward_intermediates`` (timm's attention and the attention kernel with fused
RoPE), block offload, the FP8 teacher's SwiGLU and q/v biases, the three checkpoint layouts (random
weights written with each layout's key names), the cost model, evaluation cuts, the one-to-one
baseline, and ``leap distill`` runs from the CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch
from tolerances import RELATIVE_TOLERANCE, assert_close_rel, relative_error
from torch import nn

from leap import vit
from leap.errors import CheckpointError, ModelError
from leap.models import DINOV3_MODELS, build_model, check_compatible, load_teacher_weights
from leap.teacher import BlockOffload, TruncatedTeacher, kernel_block_supported
from leap_kernels import use_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny DINOv3-shaped models: (timm name, img size, overrides). Widths 64-128, head dims 32/64/128,
# depths 2-3, grids 3x3 to 9x9 (odd), the plain MLP, timm's SwiGLU (7B, H+) and q/v biases (_qkvb).
TINY = {
    "small-5x5-d32": ("vit_small_patch16_dinov3", 80, dict(depth=3, embed_dim=96, num_heads=3)),
    "base-qkvb-7x7-d64": ("vit_base_patch16_dinov3_qkvb", 112, dict(depth=2, embed_dim=128, num_heads=2)),
    "7b-swiglu-3x3-d128": (
        "vit_7b_patch16_dinov3",
        48,
        dict(depth=2, embed_dim=128, num_heads=1, mlp_ratio=2, swiglu_align_to=8),
    ),
    "hplus-swiglu-9x9-d32": ("vit_huge_plus_patch16_dinov3", 144, dict(depth=2, embed_dim=64, num_heads=2)),
}


def randomize_(model: nn.Module) -> nn.Module:
    """Make every weight matter: LayerScale near 1 (timm's init is 1e-5), random q/v biases and norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif leaf in ("q_bias", "v_bias") or leaf == "bias":
                p.normal_(0, 0.1)
            elif ".norm" in name or name.startswith("norm"):
                p.normal_(1.0, 0.1)
    return model


def tiny(key: str, img_size: int | None = None) -> nn.Module:
    name, size, kw = TINY[key]
    return randomize_(build_model(name, img_size=img_size or size, **kw)).eval()


def timm_targets(model, x, k):
    """timm's own block-k target: ``forward_intermediates(x, indices=[k-1], norm=True)``, (patch, cls)."""
    with torch.no_grad():
        ((patch, prefix),) = model.forward_intermediates(
            x, indices=[k - 1], norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    return patch, prefix[:, 0]


# ----------------------------------------------------------------------------- models


def test_every_dinov3_name_builds():
    # On the meta device: even the 7B costs nothing. CLS + 4 storage tokens, patch 16, rotary embedding.
    assert {"vit_small_patch16_dinov3", "vit_7b_patch16_dinov3", "vit_large_patch16_dinov3_qkvb"} <= set(DINOV3_MODELS)
    for name in DINOV3_MODELS:
        with torch.device("meta"):
            m = build_model(name)
        fam = vit.family_of(m)
        assert fam is vit.EVA and fam.has_rope(m), name
        assert (
            fam.num_prefix_tokens(m) == 5
            and fam.patch_grid(m) == (14, 14)
            and tuple(m.patch_embed.patch_size) == (16, 16)
        )
    assert isinstance(build_model("vit_small_patch14_dinov2", img_size=28, depth=1), nn.Module)


def test_build_errors_are_the_same():
    with pytest.raises(
        ModelError, match=r"unknown ViT model name 'vit_small_patch16_dinov4'.*vit_small_patch16_dinov3"
    ):
        build_model("vit_small_patch16_dinov4")
    with pytest.raises(ModelError, match=r"override depth=None would be ignored"):
        build_model("vit_small_patch16_dinov3", depth=None)
    with pytest.raises(ModelError, match=r"'vit_small_patch16_dinov3' with arguments"):
        build_model("vit_small_patch16_dinov3", not_an_argument=3)
    with pytest.raises(ModelError, match=r"img_size 40 is not divisible by the patch size 16"):
        build_model("vit_small_patch16_dinov3", img_size=40, depth=1)


def test_check_compatible_across_families():
    teacher = tiny("small-5x5-d32")
    plain = build_model("vit_tiny_patch16_224", img_size=80, depth=1)
    assert check_compatible(teacher, plain) == (5, 5)
    with pytest.raises(ModelError, match=r"teacher patch grid 5x5 \(img 80, patch 16\) != student patch grid"):
        check_compatible(teacher, build_model("vit_small_patch14_dinov2", img_size=84, depth=1))


def test_family_adapter():
    eva, plain = tiny("small-5x5-d32"), build_model("vit_small_patch14_dinov2", img_size=28, depth=2)
    assert vit.family_of(eva) is vit.EVA and vit.family_of(plain) is vit.VIT
    x = torch.randn(1, 3, 80, 80)
    tokens, rope = vit.EVA.embed_with_pos(eva, x)
    assert tokens.shape == (1, 30, 96) and rope.shape == (25, 2 * 32)
    assert vit.EVA.block_kwargs(eva, 0, rope)["rope"] is rope and vit.VIT.block_kwargs(plain, 0, None) == {}
    with pytest.raises(TypeError, match=r"rotary position embedding: use embed_with_pos"):
        vit.embed(eva, x)
    with torch.no_grad():
        outs = list(vit.EVA.block_outputs(eva, x))
        assert len(outs) == 3 and torch.equal(outs[1], vit.EVA.run_blocks(eva, x, 2))
    with pytest.raises(TypeError, match=r"TruncatedTeacher needs a timm VisionTransformer or Eva"):
        TruncatedTeacher(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- the truncated teacher


@pytest.mark.parametrize("key", list(TINY))
@pytest.mark.parametrize("kernel", [False, True], ids=["timm-attention", "kernel"])
def test_truncated_teacher_is_timms_forward_intermediates(key, kernel, one_thread):
    model = tiny(key)
    size = TINY[key][1]
    teacher = TruncatedTeacher(model, dtype=torch.float32, attention_kernel=kernel)
    for shape in ((2, 3, size, size), (1, 3, size, size + 32)):  # the model's grid, and a wider odd one
        x = torch.randn(*shape)
        for k in range(1, teacher.num_blocks + 1):
            patch, cls = teacher(x, k)
            ref_patch, ref_cls = timm_targets(model, x, k)
            assert patch.shape == ref_patch.shape
            assert relative_error(patch, ref_patch) <= 1e-4, (key, shape, k)
            assert relative_error(cls, ref_cls) <= 1e-4, (key, shape, k)


def test_kernel_path_is_taken_for_dinov3_blocks(monkeypatch):
    model = tiny("base-qkvb-7x7-d64")
    teacher = TruncatedTeacher(model, dtype=torch.float32, attention_kernel=True)
    calls = []
    original = vit.eva_attention_with_kernel
    monkeypatch.setattr(vit, "eva_attention_with_kernel", lambda *a: (calls.append(1), original(*a))[1])
    teacher(torch.randn(1, 3, 112, 112), 2)
    assert len(calls) == 2
    rope = vit.EVA.embed_with_pos(model, torch.randn(1, 3, 112, 112))[1]
    assert all(kernel_block_supported(b, rope) for b in model.blocks)


def test_kernel_path_falls_back_where_it_does_not_fit():
    model = tiny("small-5x5-d32")
    block = model.blocks[0]
    x = torch.randn(1, 30, 96)
    rope = vit.EVA.embed_with_pos(model, torch.randn(1, 3, 80, 80))[1]
    assert kernel_block_supported(block, rope)
    assert not kernel_block_supported(block, rope.unsqueeze(0))  # per-image tables (patch dropout)
    assert not kernel_block_supported(block, torch.randn(25, 2 * 48))  # another head dim
    interleaved = copy.deepcopy(block)
    interleaved.attn.rotate_half = False
    assert not kernel_block_supported(interleaved, rope)
    normed = copy.deepcopy(block)
    normed.attn.q_norm = nn.LayerNorm(32)
    assert not kernel_block_supported(normed, rope)
    teacher = TruncatedTeacher(model, dtype=torch.float32, attention_kernel=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher.block_forward(normed, x, rope=rope), normed(x, rope=rope))


def test_kernel_path_bf16_triton_as_accurate_as_timm():
    model = tiny("base-qkvb-7x7-d64")
    truth = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float64, attention_kernel=False)
    teacher = TruncatedTeacher(model, dtype=torch.bfloat16, attention_kernel=True)
    x = torch.randn(2, 3, 112, 112)
    with use_backend("triton"):
        patch, cls = teacher(x, 2)
    teacher.attention_kernel = False
    timm_patch, timm_cls = teacher(x, 2)
    ref_patch, ref_cls = truth(x.double(), 2)
    for ours, theirs, ref, what in ((patch, timm_patch, ref_patch, "patch"), (cls, timm_cls, ref_cls, "cls")):
        assert_close_rel(ours, theirs, 2e-2, f"kernel vs timm, {what}")
        assert relative_error(ours, ref) <= 1.5 * relative_error(theirs, ref) + 1e-3, what


def test_collect_and_scan_match_forward():
    teacher = TruncatedTeacher(tiny("small-5x5-d32"), dtype=torch.float32)
    x = torch.randn(2, 3, 80, 80)
    patches, clss = teacher.collect(x, [1, 3, 3])
    for i, k in enumerate([1, 3, 3]):
        patch, cls = teacher(x, k)
        torch.testing.assert_close(patches[i], patch)
        torch.testing.assert_close(clss[i], cls)
    scores = teacher.scan(x, lambda k, patch, cls: patch.double().square().mean())
    expected = [teacher(x, k)[0].double().square().mean() for k in (1, 2, 3)]
    torch.testing.assert_close(scores, torch.stack(expected).float())


# ----------------------------------------------------------------------------- offload


def test_offload_gives_the_same_targets_and_tracks_residency():
    model = tiny("small-5x5-d32")
    plain = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float32)
    teacher = TruncatedTeacher(model, dtype=torch.float32, offload=True, device="cpu")
    x = torch.randn(2, 3, 80, 80)
    assert teacher.offload.resident == 0
    teacher.scan(x, lambda k, p, c: p.sum())  # the calibration scan streams blocks: nothing stays
    assert teacher.offload.resident == 0
    for k in (1, 2, 1, 3):
        for ours, ref in zip(teacher(x, k), plain(x, k)):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert teacher.offload.resident == 3
    with pytest.raises(TypeError, match="offload: expected True or False"):
        TruncatedTeacher(tiny("small-5x5-d32"), offload="yes")


def test_offload_placement():
    # Where the tensors live, checked with "meta" as the compute device (no GPU needed): blocks past the
    # deepest target stay in CPU memory; the embedding, tokens and final norm move at once.
    model = tiny("7b-swiglu-3x3-d128")
    store = BlockOffload(model, model.blocks, torch.device("meta"))

    def devices(block):
        return {t.device.type for t in (*block.parameters(), *block.buffers())}

    assert model.cls_token.device.type == "meta" and model.norm.weight.device.type == "meta"
    assert model.patch_embed.proj.weight.device.type == "meta"
    assert [devices(b) for b in model.blocks] == [{"cpu"}, {"cpu"}]
    with store.streamed(1):
        assert devices(model.blocks[1]) == {"meta"}
    assert devices(model.blocks[1]) == {"cpu"}
    store.make_resident(1)
    assert [devices(b) for b in model.blocks] == [{"meta"}, {"cpu"}] and store.resident == 1
    assert store.device_bytes() == sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())


# ----------------------------------------------------------------------------- FP8 teacher


def test_fp8_teacher_covers_swiglu_and_folds_qv_biases():
    from leap_kernels.ops.fp8_linear import _fold_qkv_biases, convert_teacher_linears

    model = tiny("7b-swiglu-3x3-d128")
    names = convert_teacher_linears(copy.deepcopy(model))
    assert {re.sub(r"^blocks\.\d+\.", "", n) for n in names} == {
        "attn.qkv",
        "attn.proj",
        "mlp.fc1_g",
        "mlp.fc1_x",
        "mlp.fc2",
    }
    # q/v biases folded into qkv: the same block output (what makes timm's path call qkv(x)).
    qkvb = tiny("base-qkvb-7x7-d64")
    folded = copy.deepcopy(qkvb)
    for block in folded.blocks:
        _fold_qkv_biases(block)
    assert folded.blocks[0].attn.q_bias is None and folded.blocks[0].attn.qkv.bias is not None
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(folded.forward_features(x), qkvb.forward_features(x), rtol=1e-5, atol=1e-5)
    fp32 = TruncatedTeacher(copy.deepcopy(qkvb), dtype=torch.float32)
    for kernel in (False, True):
        fp8 = TruncatedTeacher(copy.deepcopy(qkvb), dtype=torch.float32, precision="fp8", attention_kernel=kernel)
        assert relative_error(fp8(x, 2)[0], fp32(x, 2)[0]) < 0.1


# ----------------------------------------------------------------------------- checkpoints


def to_official_dinov3(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm Eva's weights in the facebookresearch/dinov3 layout (the key names timm's
    ``eva.checkpoint_filter_fn`` reads): storage tokens, a masked qkv bias whose k third holds NaN,
    ``ls1/ls2.gamma``, SwiGLU ``w1/w2/w3``, the rotary periods (bf16, as released) and the 7B's extras."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    dim = model.embed_dim
    swiglu = {".mlp.fc1_g.": ".mlp.w1.", ".mlp.fc1_x.": ".mlp.w2.", ".mlp.fc2.": ".mlp.w3."}
    gated = any(".mlp.fc1_g." in k for k in sd)  # the official Mlp keeps fc1/fc2
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+)\.attn\.q_bias$", k)
        if m:
            k_part = torch.full_like(v, float("nan"))  # masked in the release: its values are never used
            out[f"{m.group(1)}.attn.qkv.bias"] = torch.cat([v, k_part, sd[f"{m.group(1)}.attn.v_bias"]])
            out[f"{m.group(1)}.attn.qkv.bias_mask"] = torch.cat(
                [torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)]
            )
            continue
        if k.endswith(".attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
        for ours, theirs in swiglu.items() if gated else ():
            k = k.replace(ours, theirs)
        out[k] = v
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    out["local_cls_norm.weight"], out["local_cls_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return out


def to_hf_dinov3(model: nn.Module, hub: bool = False) -> dict[str, torch.Tensor]:
    """A timm Eva's weights under transformers' ``DINOv3ViTModel`` key names (``layer.N.`` as on the hub,
    else ``model.layer.N.`` as transformers >= 5 holds them)."""
    sd = model.state_dict()
    layer = "layer" if hub else "model.layer"
    gated = any(".mlp.fc1_g." in k for k in sd)
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.register_tokens": sd["reg_token"],
        "embeddings.mask_token": torch.zeros_like(sd["cls_token"]),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}", f"{layer}.{i}"
        q, k, v = sd[f"{b}.attn.qkv.weight"].chunk(3)
        out.update(
            {f"{p}.attention.q_proj.weight": q, f"{p}.attention.k_proj.weight": k, f"{p}.attention.v_proj.weight": v}
        )
        if f"{b}.attn.q_bias" in sd:
            out[f"{p}.attention.q_proj.bias"] = sd[f"{b}.attn.q_bias"]
            out[f"{p}.attention.v_proj.bias"] = sd[f"{b}.attn.v_bias"]
        mlp = (
            {"fc1_g": "gate_proj", "fc1_x": "up_proj", "fc2": "down_proj"}
            if gated
            else {"fc1": "up_proj", "fc2": "down_proj"}
        )
        renames = {
            "norm1": "norm1",
            "norm2": "norm2",
            "attn.proj": "attention.o_proj",
            **{f"mlp.{a}": f"mlp.{c}" for a, c in mlp.items()},
        }
        for ours, theirs in renames.items():
            for leaf in ("weight", "bias"):
                out[f"{p}.{theirs}.{leaf}"] = sd[f"{b}.{ours}.{leaf}"]
        out[f"{p}.layer_scale1.lambda1"] = sd[f"{b}.gamma_1"]
        out[f"{p}.layer_scale2.lambda1"] = sd[f"{b}.gamma_2"]
    return out


def _same_forward(a: nn.Module, b: nn.Module, size: int):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_rel(a.forward_features(x), b.forward_features(x).double(), 1e-6, "loaded model")


@pytest.mark.parametrize("key", ["small-5x5-d32", "base-qkvb-7x7-d64", "7b-swiglu-3x3-d128"])
def test_official_dinov3_layout(key, tmp_path):
    import timm.models.eva as eva

    source = tiny(key)
    official = to_official_dinov3(source)
    assert {"storage_tokens", "mask_token", "rope_embed.periods", "blocks.0.ls1.gamma"} <= set(official)
    path = tmp_path / "dinov3.pth"
    torch.save({"teacher": official}, path)  # wrapped, as training checkpoints are
    name, size, kw = TINY[key]
    target = build_model(name, img_size=size, **kw).eval()
    assert load_teacher_weights(target, path) == "official_dinov3"
    _same_forward(target, source, size)
    # timm's own converter of the official layout gives the same state dict.
    theirs = eva.checkpoint_filter_fn(official, build_model(name, img_size=size, **kw))
    ours = target.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def test_official_zero_biases_into_a_model_without_them():
    # The released distilled S/B/L models carry an all-zero qkv bias; the non-_qkvb timm models have no
    # q/v bias: dropped. A nonzero one would change the model: reported as unexpected.
    source = tiny("small-5x5-d32")
    official = to_official_dinov3(source)
    for i in range(3):
        official[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * 96)
        official[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * 96)
    target = build_model("vit_small_patch16_dinov3", img_size=80, depth=3, embed_dim=96, num_heads=3).eval()
    load_teacher_weights(target, official)
    _same_forward(target, source, 80)
    official["blocks.1.attn.qkv.bias"][:96] = 0.5
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\): blocks.1.attn.q_bias, blocks.1.attn.v_bias"):
        load_teacher_weights(target, official)


@pytest.mark.parametrize("key", ["base-qkvb-7x7-d64", "7b-swiglu-3x3-d128"])
@pytest.mark.parametrize("hub", [False, True], ids=["transformers", "hub-file"])
def test_hf_dinov3_layout(key, hub, tmp_path):
    from safetensors.torch import save_file

    source = tiny(key)
    name, size, kw = TINY[key]
    sd = to_hf_dinov3(source, hub=hub)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target = build_model(name, img_size=size, **kw).eval()
    assert load_teacher_weights(target, path) == "hf_dinov3"
    _same_forward(target, source, size)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_dinov3_model_state_dict_loads_and_matches_its_forward(gated):
    # transformers' own DINOv3ViTModel (random weights): its state dict, key names and all, loads into
    # the timm model, and both compute the same features (rotary embedding included).
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    dim, heads, depth, size = 64, 2, 2, 80
    config = transformers.DINOv3ViTConfig(
        hidden_size=dim,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=128 if gated else 4 * dim,
        num_register_tokens=4,
        image_size=size,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias=not gated,
        value_bias=not gated,
    )
    hf = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    name = "vit_7b_patch16_dinov3" if gated else "vit_base_patch16_dinov3_qkvb"
    extra = dict(mlp_ratio=2, swiglu_align_to=8) if gated else {}
    model = build_model(name, img_size=size, depth=depth, embed_dim=dim, num_heads=heads, **extra).eval()
    assert load_teacher_weights(model, hf.state_dict()) == "hf_dinov3"
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_rel(
            model.forward_features(x), hf(pixel_values=x).last_hidden_state.double(), 1e-5, "vs transformers"
        )
    # A nonzero k bias (which the rotary embedding would make matter) has no place in timm's Eva.
    bad = dict(hf.state_dict())
    bad["model.layer.0.attention.k_proj.bias"] = torch.ones(dim)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): model.layer.0.attention.k_proj.bias"):
        load_teacher_weights(model, bad)


def test_timm_layout_and_key_report():
    source = tiny("base-qkvb-7x7-d64")
    target = build_model("vit_base_patch16_dinov3_qkvb", img_size=112, depth=2, embed_dim=128, num_heads=2).eval()
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    assert load_teacher_weights(target, {"model": sd}) == "timm"
    _same_forward(target, source, 112)
    broken = dict(source.state_dict())
    del broken["blocks.1.gamma_2"]
    broken["blocks.1.extra"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"format: timm.*\n.*1 missing key\(s\): blocks.1.gamma_2\n.*1 unexpected key\(s\): blocks.1.extra",
    ):
        load_teacher_weights(target, broken)
    with pytest.warns(UserWarning, match="non-strictly"):
        load_teacher_weights(target, broken, strict=False)


# ----------------------------------------------------------------------------- evaluation, one-to-one


def test_evaluation_cut_at_block_k():
    from leap.evaluation.features import TokenFeatures

    model = tiny("small-5x5-d32")
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        for k in (1, 2):
            cls, mean_patch = TokenFeatures(model, block=k)(x)
            ref_patch, ref_cls = timm_targets(model, x, k)
            torch.testing.assert_close(cls, ref_cls)
            torch.testing.assert_close(mean_patch, ref_patch.mean(1))
        cls, _ = TokenFeatures(model)(x)
        torch.testing.assert_close(cls, model.forward_features(x)[:, 0])


def test_one_to_one_student_blocks():
    from leap.objective import OneToOneDistillModule
    from leap_kernels import FeatureDistillationHead

    student = tiny("small-5x5-d32")
    module = OneToOneDistillModule(student, FeatureDistillationHead(96, 64), 0.05, teacher_blocks=6)
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        feats = module.block_features(x)
        for k, y in enumerate(feats, 1):
            ref_patch, ref_cls = timm_targets(student, x, k)
            torch.testing.assert_close(y[:, 5:], ref_patch)
            torch.testing.assert_close(y[:, 0], ref_cls)
    assert module.teacher_blocks == [2, 4, 6]


# ----------------------------------------------------------------------------- cost model


def test_cost_counts_rope_swiglu_and_storage_tokens():
    from test_leap_cost import counted_flops

    from leap import cost as C

    for key in ("small-5x5-d32", "7b-swiglu-3x3-d128"):
        model = tiny(key)
        c = C.vit_cost(model)
        n_patch = c.num_patches
        assert c.rope and c.num_prefix_tokens == 5 and c.tokens == 5 + n_patch
        rope = c.block_breakdown["rope"]
        assert rope == 4 * n_patch * model.embed_dim  # q and k, 2 MACs per rotated element
        # FlopCounterMode counts the matrix products, not the elementwise rotation.
        assert counted_flops(model) == 2 * (c.forward_macs() - c.depth * rope), key
    swiglu = C.vit_cost(tiny("7b-swiglu-3x3-d128"))
    assert swiglu.mlp_kind == "glu" and swiglu.mlp_hidden == 256
    with torch.device("meta"):
        big = C.vit_cost(build_model("vit_7b_patch16_dinov3"))
    assert (big.tokens, big.depth, big.mlp_kind, big.mlp_hidden) == (201, 40, "glu", 8192)
    assert C.vit_cost(build_model("vit_small_patch14_dinov2", img_size=28, depth=1)).block_breakdown["rope"] == 0


PAPER_TRAJECTORY = os.path.join(ROOT, "bench", "paper_trajectory.json")


def test_paper_trajectory_file_is_the_papers_shape():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import whole_run

    with open(PAPER_TRAJECTORY) as f:
        assert json.load(f) == whole_run.paper_trajectory()


def test_docs_quote_the_7b_costs_and_savings(capsys):
    """docs/dinov3.md quotes what `leap flops` prints for ViT-7B -> ViT-S/16 on the paper's trajectory."""
    from leap.cli.flops import main as flops

    assert (
        flops(
            [
                "--teacher",
                "vit_7b_patch16_dinov3",
                "--student",
                "vit_small_patch16_dinov3",
                "--trajectory",
                PAPER_TRAJECTORY,
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    text = " ".join(open(os.path.join(ROOT, "docs", "dinov3.md")).read().split())
    quoted = {
        "teacher block": res["costs_macs"]["teacher_block_macs"] / 1e9,
        "full ViT-7B": res["costs_macs"]["teacher_full_macs"] / 1e9,
    }
    for label, value in quoted.items():
        m = re.search(re.escape(label) + r" ([\d.]+) GMACs", text)
        assert m, f"docs/dinov3.md quotes no '{label} ... GMACs'"
        assert float(m.group(1)) == round(value, len(m.group(1).partition(".")[2])), label
    for label, key in (("teacher-only saving", "teacher_only_saving"), ("total saving", "total_saving")):
        m = re.search(re.escape(label) + r" ([\d.]+)%", text)
        assert m, f"docs/dinov3.md quotes no '{label} ...%'"
        assert float(m.group(1)) == round(100 * res["savings"][key], 2), label
    assert math.isclose(res["savings"]["mean_block"], 29.35)


# ----------------------------------------------------------------------------- leap distill


def _distill(tmp_path, capsys, student, student_overrides, *extra):
    from leap.cli import main

    out = tmp_path / "run"
    argv = [
        "distill",
        "--teacher",
        "vit_small_patch16_dinov3",
        "--teacher-overrides",
        '{"depth": 3, "embed_dim": 64, "num_heads": 2}',
        "--student",
        student,
        "--student-overrides",
        student_overrides,
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        "--data-source",
        "synthetic",
        "--synthetic-size",
        "8",
        "--max-steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in log if r["type"] == "step"], json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize(
    "student,overrides,extra",
    [
        # the CKA calibration scan picks the start block (streamed through the teacher once)
        ("vit_small_patch16_dinov3", '{"depth": 2, "embed_dim": 32, "num_heads": 1}', ("--tau", "0")),
        ("vit_tiny_patch16_224", '{"depth": 2, "embed_dim": 32, "num_heads": 1}', ("--start-block", "1", "--tau", "0")),
    ],
    ids=["dinov3-student", "vit16-student"],
)
def test_distill_from_the_cli(student, overrides, extra, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")
    steps, summary = _distill(tmp_path, capsys, student, overrides, *extra, "--teacher-offload")
    assert len(steps) == 2 and summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) and 1 <= r["block"] <= 3 for r in steps)
    if "--start-block" in extra:
        assert [r["block"] for r in steps] == [1, 2]


def test_distill_one_to_one_with_a_dinov3_student(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")
    steps, summary = _distill(
        tmp_path,
        capsys,
        "vit_small_patch16_dinov3",
        '{"depth": 2, "embed_dim": 32, "num_heads": 1}',
        "--curriculum",
        "one-to-one",
    )
    assert summary["steps"] == 2 and all(math.isfinite(r["loss"]) for r in steps)


# ----------------------------------------------------------------------------- GPU checks (tools/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dinov3_teacher_kernel_and_offload():
    # bf16 on the GPU: the kernel path (Triton with fused RoPE) against timm, and the offloaded teacher
    # giving the same targets with only the reached blocks on the device.
    model = tiny("base-qkvb-7x7-d64")
    reference = TruncatedTeacher(copy.deepcopy(model).cuda(), dtype=torch.bfloat16, attention_kernel=False)
    kernel = TruncatedTeacher(copy.deepcopy(model).cuda(), dtype=torch.bfloat16, attention_kernel=True)
    offloaded = TruncatedTeacher(copy.deepcopy(model), dtype=torch.bfloat16, offload=True, device="cuda")
    x = torch.randn(8, 3, 112, 112, device="cuda")
    assert_close_rel(kernel(x, 2)[0], reference(x, 2)[0].double(), RELATIVE_TOLERANCE[torch.bfloat16][1], "kernel")
    assert {p.device.type for p in offloaded.model.blocks[1].parameters()} == {"cpu"}
    assert all(p.is_pinned() for p in offloaded.model.blocks[1].parameters())
    torch.testing.assert_close(offloaded(x, 1)[0], reference(x, 1)[0])
    assert offloaded.offload.resident == 1 and {p.device.type for p in offloaded.model.blocks[1].parameters()} == {
        "cpu"
    }
