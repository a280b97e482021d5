"""Position-embedding resampling follows the source model's own rule (issue: fidelity, defect 2).

A checkpoint stored at a 37x37 grid (518 px, patch 14) and loaded at 224 px (16x16) must give a
teacher whose final-norm tokens match what the *source implementation* computes at 224 px:

- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``: a small random-init model saved with
  ``save_pretrained`` and run by transformers itself at 224 px (its ``interpolate_pos_encoding``);
- official facebookresearch/dinov2: its ``DinoVisionTransformer.interpolate_pos_encoding`` is
  reproduced below from its documented behaviour (non-register hub models: bicubic, no antialias,
  scale factor ``(w0 + 0.1) / sqrt(N)``; register hub models: ``interpolate_antialias=True``,
  ``interpolate_offset=0.0``, i.e. an output size with antialias);
- timm: the source model built with ``dynamic_img_size=True`` and run at 224 px.

Each case also checks that the previous single rule (antialiased bicubic everywhere) would fail
the same comparison where the source differs, so the tolerance can catch a wrong rule.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_leap_models import randomize_, timm_to_official

from leap.models import build_model, load_teacher_weights, pos_embed_rule
from leap.teacher import TruncatedTeacher

IMG_SRC, IMG, PATCH = 518, 224, 14
WIDTH, DEPTH, HEADS = 32, 2, 2
TOL = 1e-4  # relative error, fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm (patch, cls) tokens of a timm model at full depth, through the LEAP teacher."""
    teacher = TruncatedTeacher(model, dtype=torch.float32, attention_kernel=False)
    return teacher(images(), teacher.num_blocks)


def timm_target(registers: bool):
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    return build_model(name, img_size=IMG, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS)


# ----------------------------------------------------------------- Hugging Face transformers


#: The interpolation rules of leap.models were read from this release's ``interpolate_pos_encoding``.
HF_RULES_FROM = (5, 24)


def _hf_model(registers: bool):
    transformers = pytest.importorskip("transformers", reason="transformers (test dependency) is not installed")
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < HF_RULES_FROM:
        pytest.skip(
            f"transformers {transformers.__version__} is older than "
            f"{'.'.join(map(str, HF_RULES_FROM))}, the release whose position-embedding rules leap.models follows"
        )
    kw = dict(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=IMG_SRC,
        patch_size=PATCH,
        layerscale_value=0.7,
    )
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # Position embeddings of unit scale, so the resampling rule matters to the features.
        pos = model.embeddings.position_embeddings
        pos.copy_(torch.randn(pos.shape, generator=g))
        for name, p in model.named_parameters():
            if "position_embeddings" not in name and p.dim() > 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("registers", [False, True], ids=["Dinov2Model", "Dinov2WithRegistersModel"])
def test_hf_checkpoint_matches_transformers_forward(tmp_path, registers):
    hf = _hf_model(registers)
    hf.save_pretrained(tmp_path)  # model.safetensors, the file users download
    path = tmp_path / "model.safetensors"
    n_prefix = 1 + (4 if registers else 0)
    with torch.no_grad():
        ref = hf(pixel_values=images()).last_hidden_state  # transformers' own interpolation at 224 px
    ref_patch, ref_cls = ref[:, n_prefix:], ref[:, 0]
    assert ref_patch.shape[1] == (IMG // PATCH) ** 2

    model = timm_target(registers)
    assert load_teacher_weights(model, path) == "hf_dinov2"
    patch, cls = tokens(model)
    assert rel_err(patch, ref_patch) < TOL and rel_err(cls, ref_cls) < TOL

    if not registers:  # Dinov2Model does not antialias: the old single rule is measurably off
        wrong = timm_target(registers)
        load_teacher_weights(wrong, path, pos_embed_interpolation="bicubic-antialias")
        assert rel_err(tokens(wrong)[0], ref_patch) > 100 * TOL


# ----------------------------------------------------------------- official facebookresearch/dinov2


def official_interpolate_pos_encoding(
    pos_embed: torch.Tensor, w: int, h: int, *, antialias: bool, offset: float
) -> torch.Tensor:
    """facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding`` for an image of
    ``w x h`` px, written from its documented behaviour: ``pos_embed (1, 1 + N, D)`` with one CLS
    slot; bicubic in fp32; with an offset the *scale factors* ``(w0 + offset) / sqrt(N)`` are
    passed (so the kernel's coordinate mapping uses them), without one the output size."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // PATCH, h // PATCH
    m = int(math.sqrt(n))
    assert m * m == n
    pos = pos_embed.float()
    kwargs = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)} if offset else {"size": (w0, h0)}
    patch = F.interpolate(
        pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert tuple(patch.shape[-2:]) == (w0, h0)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _official_source(registers: bool):
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    src = randomize_(build_model(name, img_size=IMG_SRC, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS), seed=5)
    with torch.no_grad():
        src.pos_embed.copy_(torch.randn(src.pos_embed.shape, generator=torch.Generator().manual_seed(6)))
    return src


def _official_reference(sd: dict[str, torch.Tensor], registers: bool) -> torch.nn.Module:
    """The official model at 224 px: same weights, position embedding from the official rule
    (hub defaults: registers -> antialias, no offset; no registers -> no antialias, offset 0.1)."""
    pos = official_interpolate_pos_encoding(
        sd["pos_embed"], IMG, IMG, antialias=registers, offset=0.0 if registers else 0.1
    )
    ref = timm_target(registers)
    state = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens", "pos_embed")}
    if registers:  # timm keeps no CLS slot for register models: fold it into cls_token
        state["reg_token"] = sd["register_tokens"]
        state["cls_token"] = sd["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    else:
        state["pos_embed"] = pos
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2_vits14", "dinov2_vits14_reg"])
def test_official_checkpoint_matches_official_interpolation(tmp_path, registers):
    sd = timm_to_official(_official_source(registers))
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    ref_patch, ref_cls = tokens(_official_reference(sd, registers))

    model = timm_target(registers)
    assert load_teacher_weights(model, path) == "official_dinov2"
    patch, cls = tokens(model)
    assert rel_err(patch, ref_patch) < TOL and rel_err(cls, ref_cls) < TOL

    if not registers:  # the 0.1 offset / no antialias rule differs from the old single rule
        wrong = timm_target(registers)
        load_teacher_weights(wrong, path, pos_embed_interpolation="bicubic-antialias")
        assert rel_err(tokens(wrong)[0], ref_patch) > 100 * TOL


# ----------------------------------------------------------------- timm


def test_timm_checkpoint_matches_timm_dynamic_resize(tmp_path):
    src = _official_source(registers=True)  # timm layout, registers, no_embed_class
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    dynamic = build_model(
        "vit_small_patch14_reg4_dinov2",
        img_size=IMG_SRC,
        depth=DEPTH,
        embed_dim=WIDTH,
        num_heads=HEADS,
        dynamic_img_size=True,
    )
    dynamic.load_state_dict(src.state_dict())
    with torch.no_grad():
        ref = dynamic.forward_features(images())  # timm resamples at run time with its own rule
    model = timm_target(registers=True)
    assert load_teacher_weights(model, path) == "timm"
    patch, cls = tokens(model)
    assert rel_err(patch, ref[:, model.num_prefix_tokens :]) < TOL and rel_err(cls, ref[:, 0]) < TOL


# ----------------------------------------------------------------- the rule table


def test_rule_per_source_and_override():
    assert pos_embed_rule("official_dinov2", has_registers=False) == "bicubic-offset"
    assert pos_embed_rule("official_dinov2", has_registers=True) == "bicubic-antialias"
    assert pos_embed_rule("hf_dinov2", has_registers=False) == "bicubic"
    assert pos_embed_rule("hf_dinov2", has_registers=True) == "bicubic-antialias"
    assert pos_embed_rule("timm", has_registers=False) == "bicubic-antialias"
    assert pos_embed_rule("official_dinov2", False, "bicubic") == "bicubic"
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        pos_embed_rule("timm", False, "nearest")
