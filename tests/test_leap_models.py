"""Tests for leap.models: model building, grids, the projection head and checkpoint loading.

The checkpoint tests build tiny random DINOv2-layout timm models, write their weights in the
official DINOv2, HF transformers Dinov2 and timm layouts (converters below are the inverse maps
of leap.models' loader), load them into a fresh model and compare outputs.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import GluMlp, SwiGLU
from torch import nn

from leap import models as lm
from leap.errors import CheckpointError
from leap.models import build_model, check_compatible, convert_state_dict, load_teacher_weights, patch_grid

# name -> (timm name, overrides) of the tiny test variants
VARIANTS = {
    # plain DINOv2 layout: LayerScale, CLS slot in pos_embed
    "small": ("vit_small_patch14_dinov2", dict(depth=2, embed_dim=32, num_heads=2)),
    # registers + no_embed_class
    "small_reg": ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=32, num_heads=2)),
    # the giant's layout: registers + packed SwiGLU (hidden 2*128 for width 48)
    "giant_reg": ("vit_giant_patch14_reg4_dinov2", dict(depth=2, embed_dim=48, num_heads=3)),
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (incl. LayerScale, norms, tokens) so blocks matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * noise.abs())
            elif re.search(r"norm\d?\.weight$", name):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def tiny(variant: str, img: int = 28, seed: int = 0, **extra) -> nn.Module:
    name, kw = VARIANTS[variant]
    return randomize_(build_model(name, img_size=img, **{**kw, **extra}), seed)


def is_swiglu(model: nn.Module) -> bool:
    return isinstance(model.blocks[0].mlp, GluMlp)


def images(img: int = 28, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------- inverse converters


def _cls_slot_layout(sd: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """timm (cls_token, pos_embed) -> official/HF (cls_token, pos_embed with one CLS slot)."""
    if model.no_embed_class:
        # timm folded official pos[:, 0] into cls_token; split it again with an arbitrary slot.
        slot = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(7))
        return sd["cls_token"] - slot, torch.cat([slot, sd["pos_embed"]], dim=1)
    return sd["cls_token"], sd["pos_embed"]


def timm_to_official(model: nn.Module, chunks: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv2-layout model's weights in facebookresearch/dinov2 key layout."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    cls, pos = _cls_slot_layout(sd, model)
    out["cls_token"], out["pos_embed"] = cls, pos
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    if "reg_token" in sd:
        out["register_tokens"] = sd["reg_token"]
    depth = len(model.blocks)
    per_chunk = -(-depth // chunks) if chunks else 0
    for k, v in sd.items():
        if k in ("cls_token", "pos_embed", "reg_token"):
            continue
        if is_swiglu(model):
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if chunks:
            k = re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // per_chunk}.{m.group(1)}.", k)
        out[k] = v
    return out


def timm_to_hf(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A timm DINOv2-layout model's weights in transformers Dinov2(WithRegisters)Model layout."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    D = model.embed_dim
    out = {}
    cls, pos = _cls_slot_layout(sd, model)
    out["embeddings.cls_token"] = cls
    out["embeddings.mask_token"] = torch.zeros(1, D)
    out["embeddings.position_embeddings"] = pos
    if "reg_token" in sd:
        out["embeddings.register_tokens"] = sd["reg_token"]
    out["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
    out["embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
    fc_in, fc_out = ("weights_in", "weights_out") if is_swiglu(model) else ("fc1", "fc2")
    for i in range(len(model.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            out[f"{h}norm1.{t}"] = sd[f"{b}norm1.{t}"]
            out[f"{h}norm2.{t}"] = sd[f"{b}norm2.{t}"]
            q, k, v = sd[f"{b}attn.qkv.{t}"].chunk(3, dim=0)
            out[f"{h}attention.attention.query.{t}"] = q
            out[f"{h}attention.attention.key.{t}"] = k
            out[f"{h}attention.attention.value.{t}"] = v
            out[f"{h}attention.output.dense.{t}"] = sd[f"{b}attn.proj.{t}"]
            out[f"{h}mlp.{fc_in}.{t}"] = sd[f"{b}mlp.fc1.{t}"]
            out[f"{h}mlp.{fc_out}.{t}"] = sd[f"{b}mlp.fc2.{t}"]
        out[f"{h}layer_scale1.lambda1"] = sd[f"{b}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = sd[f"{b}ls2.gamma"]
    out["layernorm.weight"], out["layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    return {prefix + k: v for k, v in out.items()}


def write(path, sd: dict) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def assert_same_features(a: nn.Module, b: nn.Module, img: int = 28):
    x = images(img)
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- building


def test_vit_tiny_dims():
    m = build_model("vit_tiny_patch14_dinov2")
    assert m.embed_dim == 192 and len(m.blocks) == 12
    assert m.blocks[0].attn.num_heads == 3
    assert tuple(m.patch_embed.patch_size) == (14, 14)
    assert patch_grid(m) == (16, 16)
    assert m.num_prefix_tokens == 1 and m.reg_token is None
    # The reference ViT-T is a plain timm VisionTransformer: no LayerScale anywhere.
    assert not any(".ls1." in k or ".ls2." in k for k in m.state_dict())
    assert all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in m.blocks)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=14, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True, num_classes=0
    )
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters()) == 5_501_376
    assert m.state_dict().keys() == ref.state_dict().keys()
    reg = build_model("vit_tiny_patch14_reg4_dinov2")
    assert not any(".ls1." in k or ".ls2." in k for k in reg.state_dict())
    assert m.blocks[0].mlp.fc1.out_features == 4 * 192
    assert isinstance(m.head, nn.Identity) and m.num_classes == 0
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 192)


def test_build_model_overrides_and_resolution():
    m = build_model("vit_giant_patch14_reg4_dinov2", img_size=56, depth=2, embed_dim=48, num_heads=3)
    assert patch_grid(m) == (4, 4) and len(m.blocks) == 2 and m.num_prefix_tokens == 5
    assert m.no_embed_class and m.pos_embed.shape == (1, 16, 48)
    with torch.no_grad():
        assert m.forward_features(images(56)).shape == (2, 5 + 16, 48)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="vit_smal_patch14_dinov2") as e:
        build_model("vit_smal_patch14_dinov2")
    assert "vit_small_patch14_dinov2" in str(e.value)
    with pytest.raises(ValueError, match="unknown"):
        build_model("resnet50")  # a timm model, but not a ViT


def test_none_override_is_refused_not_dropped():
    # timm drops None arguments: init_values=None would silently keep LayerScale.
    with pytest.raises(ValueError, match="init_values=None would be ignored.*vit_tiny_patch14_dinov2"):
        build_model(
            "vit_small_patch14_dinov2", img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2, init_values=None
        )
    plain = build_model("vit_tiny_patch14_dinov2", img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2)
    assert isinstance(plain.blocks[0].ls1, nn.Identity)


def test_bad_img_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model("vit_small_patch14_dinov2", img_size=30, depth=1, embed_dim=32, num_heads=2)


def test_pretrained_failure_is_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(lm.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="load_teacher_weights"):
        build_model("vit_small_patch14_dinov2", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("vit_tiny_patch14_dinov2", pretrained=True)


def test_grid_mismatch_message():
    t = build_model("vit_small_patch14_dinov2", img_size=224, depth=1, embed_dim=32, num_heads=2)
    s = build_model("vit_small_patch14_dinov2", img_size=224, depth=1, embed_dim=32, num_heads=2, patch_size=16)
    with pytest.raises(ValueError) as e:
        check_compatible(t, s)
    assert str(e.value) == (
        "teacher patch grid 16x16 (img 224, patch 14) != student patch grid 14x14 (img 224, patch 16)"
    )
    s2 = build_model("vit_tiny_patch14_dinov2", img_size=224, depth=1)
    assert check_compatible(t, s2) == (16, 16)


# ----------------------------------------------------------------- SwiGLU layout


def test_giant_swiglu_param_layout():
    """timm's giant packs the SwiGLU input projection in mlp.fc1 (2*4096 rows), gate first."""
    with torch.device("meta"):
        m = timm.create_model("vit_giant_patch14_reg4_dinov2", num_classes=0, img_size=224, depth=1)
    mlp = m.blocks[0].mlp
    assert isinstance(mlp, GluMlp) and mlp.gate_last is False
    assert mlp.fc1.weight.shape == (8192, 1536) and mlp.fc2.weight.shape == (1536, 4096)
    assert m.reg_token.shape == (1, 4, 1536) and m.pos_embed.shape == (1, 256, 1536)


def test_loaded_swiglu_matches_official_semantics():
    """After loading official w12/w3, timm's MLP == official SwiGLUFFN: w3(silu(x1) * x2)."""
    src = tiny("giant_reg")
    sd = timm_to_official(src)
    name, kw = VARIANTS["giant_reg"]
    dst = build_model(name, img_size=28, **kw)
    assert load_teacher_weights(dst, sd) == "official_dinov2"
    x = torch.randn(3, 7, 48)
    w12, b12 = sd["blocks.1.mlp.w12.weight"], sd["blocks.1.mlp.w12.bias"]
    w3, b3 = sd["blocks.1.mlp.w3.weight"], sd["blocks.1.mlp.w3.bias"]
    x1, x2 = F.linear(x, w12, b12).chunk(2, dim=-1)
    ref = F.linear(F.silu(x1) * x2, w3, b3)
    with torch.no_grad():
        torch.testing.assert_close(dst.blocks[1].mlp(x), ref, rtol=1e-5, atol=1e-5)


def test_official_swiglu_into_split_swiglu_model():
    """A model using timm's unpacked SwiGLU (fc1_g / fc1_x) gets w12 split as gate / value."""
    src = tiny("giant_reg")
    name, kw = VARIANTS["giant_reg"]
    dst = build_model(name, img_size=28, **kw, mlp_layer=SwiGLU, act_layer=nn.SiLU, mlp_ratio=128 / 48)
    assert dst.blocks[0].mlp.fc1_g.weight.shape == (128, 48)
    load_teacher_weights(dst, timm_to_official(src))
    assert_same_features(src, dst)


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt, ext", [("official_dinov2", ".pth"), ("hf_dinov2", ".safetensors"), ("timm", ".pth")])
def test_roundtrip_all_layouts(tmp_path, variant, fmt, ext):
    src = tiny(variant, seed=3)
    if fmt == "official_dinov2":
        sd = timm_to_official(src, chunks=2 if variant == "giant_reg" else 0)
    elif fmt == "hf_dinov2":
        prefix = "dinov2." if variant == "small" else ""
        sd = timm_to_hf(src, prefix=prefix)
        if prefix:  # a Dinov2ForImageClassification checkpoint also holds a classifier
            sd["classifier.weight"] = torch.zeros(10, 64)
            sd["classifier.bias"] = torch.zeros(10)
    else:
        sd = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}
    path = write(tmp_path / f"ckpt{ext}", sd)
    dst = tiny(variant, seed=99)  # different random weights before loading
    assert load_teacher_weights(dst, path) == fmt
    assert_same_features(src, dst)


def test_timm_state_dict_safetensors_and_state_dict_wrapper(tmp_path):
    src = tiny("small_reg", seed=4)
    dst = tiny("small_reg", seed=5)
    assert load_teacher_weights(dst, write(tmp_path / "m.safetensors", src.state_dict())) == "timm"
    assert_same_features(src, dst)
    dst = tiny("small_reg", seed=5)
    load_teacher_weights(dst, write(tmp_path / "m.bin", {"state_dict": src.state_dict()}))
    assert_same_features(src, dst)


def _expected_pos(src: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased) resample of the patch part of src.pos_embed, prefix slots kept."""
    n_prefix = 0 if src.no_embed_class else src.num_prefix_tokens
    pos = src.pos_embed.detach()
    prefix, patches = pos[:, :n_prefix], pos[:, n_prefix:]
    g = int(patches.shape[1] ** 0.5)
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


@pytest.mark.parametrize(
    "variant, fmt",
    [("small", "official_dinov2"), ("giant_reg", "official_dinov2"), ("small_reg", "hf_dinov2"), ("giant_reg", "timm")],
)
def test_pos_embed_at_other_grid_is_resampled(tmp_path, variant, fmt):
    """Checkpoint stored at a 4x4 grid (like 37x37 at 518 px) loaded at a 2x2 grid, with the rule
    forced to antialiased bicubic (the per-source rules: tests/test_leap_fidelity_pos_embed.py)."""
    src = tiny(variant, img=56, seed=6)
    to_layout = {"official_dinov2": timm_to_official, "hf_dinov2": timm_to_hf, "timm": lambda m: m.state_dict()}[fmt]
    path = write(tmp_path / "big.pth", to_layout(src))
    dst = tiny(variant, img=28, seed=7)
    assert load_teacher_weights(dst, path, pos_embed_interpolation="bicubic-antialias") == fmt

    ref = tiny(variant, img=28, seed=8)
    ref_sd = dict(src.state_dict(), pos_embed=_expected_pos(src, (2, 2)))
    ref.load_state_dict(ref_sd)
    torch.testing.assert_close(dst.pos_embed, ref.pos_embed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dst.cls_token, src.cls_token, rtol=1e-5, atol=1e-6)
    assert_same_features(ref, dst)


# ----------------------------------------------------------------- errors


def test_truncated_state_dict_lists_missing_and_unexpected(tmp_path):
    src = tiny("giant_reg")
    sd = timm_to_official(src)
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        del sd[k]
    sd["blocks.0.mystery.weight"] = torch.zeros(3)
    path = write(tmp_path / "trunc.pth", sd)
    dst = tiny("giant_reg", seed=1)
    with pytest.raises(CheckpointError) as e:
        load_teacher_weights(dst, path)
    msg = str(e.value)
    assert "official_dinov2" in msg
    assert "missing" in msg and "blocks.1.attn.qkv.weight" in msg
    assert "1 unexpected key(s): blocks.0.mystery.weight" in msg
    n_missing = sum(1 for k in dst.state_dict() if k.startswith("blocks.1."))
    assert f"{n_missing} missing key(s)" in msg

    with pytest.warns(UserWarning, match="missing"):
        assert load_teacher_weights(dst, path, strict=False) == "official_dinov2"
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_wrong_model_size_reports_shapes():
    src = tiny("small")  # width 32
    dst = tiny("giant_reg")  # width 48, registers
    with pytest.raises(CheckpointError, match="shape-mismatched"):
        load_teacher_weights(dst, timm_to_hf(src))


def test_corrupt_or_missing_file(tmp_path):
    path = write(tmp_path / "ok.pth", tiny("small").state_dict())
    data = open(path, "rb").read()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        load_teacher_weights(tiny("small"), bad)
    with pytest.raises(FileNotFoundError):
        load_teacher_weights(tiny("small"), tmp_path / "nope.safetensors")


def test_convert_state_dict_detects_formats():
    src = tiny("small_reg")
    for sd, fmt in [
        (timm_to_official(src), "official_dinov2"),
        (timm_to_hf(src, prefix="dinov2_with_registers."), "hf_dinov2"),
        (src.state_dict(), "timm"),
    ]:
        out, got = convert_state_dict(sd, src)
        assert got == fmt
        assert set(out) == set(src.state_dict())
