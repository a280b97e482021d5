"""Model construction and teacher-checkpoint loading for LEAP.

Everything here works on timm ``VisionTransformer`` models in the DINOv2 layout
(patch 14, LayerScale, optional register tokens, optional packed SwiGLU FFN).

Public API
----------
- :func:`build_model` -- build a timm ViT (plus ``vit_tiny_patch14_dinov2``, which timm lacks).
- :func:`patch_grid`, :func:`check_compatible` -- patch-grid bookkeeping for teacher/student.
- :func:`load_teacher_weights` -- load a local checkpoint in the official DINOv2, Hugging Face
  ``transformers`` Dinov2 or timm layout into a timm model.
- :func:`convert_state_dict` -- the conversion step of :func:`load_teacher_weights`, without I/O.

Layout notes (checked against timm 1.0.29-1.0.31)
-------------------------------------------------
- timm's ``vit_giant_patch14_*dinov2`` uses ``mlp_layer=SwiGLUPacked`` = ``GluMlp(act=SiLU,
  gate_last=False)``: ``mlp.fc1`` is the packed ``(2*H, D)`` input projection and computes
  ``x1, x2 = fc1(x).chunk(2); silu(x1) * x2``, ``mlp.fc2`` is ``(D, H)``. That is exactly the
  official ``SwiGLUFFN`` (``w12``/``w3``) and the HF ``Dinov2SwiGLUFFN`` (``weights_in``/
  ``weights_out``), so those tensors copy over unchanged (H = 4096 for the giant).
  A model built with timm's unpacked ``SwiGLU`` (``fc1_g``/``fc1_x``) is also supported:
  ``fc1_g`` is the first (SiLU-gated) half, ``fc1_x`` the second.
- Official/HF checkpoints keep one position slot for CLS (``pos_embed`` is ``(1, 1+N, D)``)
  and give registers no position embedding. timm's register models use
  ``no_embed_class=True`` (``pos_embed`` covers only the patches), so the CLS slot is folded
  into ``cls_token`` -- the same conversion timm's own ``checkpoint_filter_fn`` does.

Why this module is long: three checkpoint layouts (official DINOv2, Hugging Face, timm) with
their key maps, position-embedding and register conversions, each with error messages that
name the offending keys.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoint import check_finite_weights, read_torch_file
from .errors import CheckpointError, InputNotFoundError, ModelError
from .vit import patch_grid, unwrap

__all__ = [
    "build_model",
    "patch_grid",
    "check_compatible",
    "load_teacher_weights",
    "convert_state_dict",
    "available_models",
    "pos_embed_rule",
    "resample_patch_pos_embed",
    "POS_EMBED_RULES",
]

log = logging.getLogger("leap.models")

# Models timm does not register, defined as (timm base model, overrides).
_EXTRA_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # ViT-T/14 as the LEAP reference code builds it: a plain timm VisionTransformer(patch 14,
    # width 192, depth 12, 3 heads, mlp_ratio 4, qkv_bias) with NO LayerScale (5.50M parameters
    # at 224 px). Built from timm's plain ViT-T rather than the DINOv2 ViT-S (which would bring
    # LayerScale; timm drops an ``init_values=None`` override, so it cannot be switched off there).
    "vit_tiny_patch14_dinov2": ("vit_tiny_patch16_224", dict(patch_size=14)),
    "vit_tiny_patch14_reg4_dinov2": ("vit_tiny_patch16_224", dict(patch_size=14, reg_tokens=4, no_embed_class=True)),
}

FORMAT_OFFICIAL = "official_dinov2"
FORMAT_HF = "hf_dinov2"
FORMAT_TIMM = "timm"


# --------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`: timm's ViT list plus the extra LEAP models."""
    return sorted(set(timm.list_models(module="vision_transformer")) | set(_EXTRA_MODELS))


def build_model(name: str, img_size: int = 224, pretrained: bool = False, **overrides: Any) -> VisionTransformer:
    """Build a timm ViT without a classifier head, running at ``img_size``.

    Args:
        name: a timm ViT name (e.g. ``vit_giant_patch14_reg4_dinov2``,
            ``vit_small_patch14_dinov2``, optionally with a ``.tag``) or one of the
            extra names (``vit_tiny_patch14_dinov2``: width 192, depth 12, 3 heads,
            patch 14, no LayerScale -- the LEAP reference ViT-T).
        img_size: square training resolution; must be divisible by the patch size.
        pretrained: download timm's pretrained weights (needs network or a warm HF cache).
            Prefer :func:`load_teacher_weights` with a local file.
        **overrides: passed to ``timm.create_model`` (``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size``, ``mlp_ratio``, ...), e.g. for tiny test models.

    Returns:
        ``VisionTransformer`` with ``num_classes=0``; ``model(x)`` for ``x`` of shape
        ``(B, 3, img_size, img_size)`` returns pooled features ``(B, embed_dim)``.

    Raises:
        ModelError: unknown name (close names are suggested), bad ``img_size``, or an override of None
            (timm would drop it silently).
        RuntimeError: ``pretrained=True`` and the weights could not be fetched.
    """
    dropped = sorted(k for k, v in overrides.items() if v is None)
    if dropped:
        # timm.create_model silently drops None arguments, so the model would keep its default.
        raise ModelError(
            f"{name!r}: override {dropped[0]}=None would be ignored (timm drops None arguments and keeps the "
            f"model's default); give a value instead"
            + (
                " (no LayerScale: use vit_tiny_patch14_dinov2, a plain timm ViT, with depth/embed_dim/num_heads "
                "overrides)"
                if dropped[0] == "init_values"
                else ""
            )
        )
    base_name, _, tag = name.partition(".")
    kwargs: dict[str, Any] = {}
    if base_name in _EXTRA_MODELS:
        if pretrained:
            raise ModelError(f"no pretrained weights exist for {name!r} (it is not a timm model)")
        if tag:
            raise ModelError(f"{base_name!r} takes no pretrained tag (got {name!r})")
        timm_name, kwargs = _EXTRA_MODELS[base_name]
    else:
        known = available_models()
        if base_name not in known:
            close = difflib.get_close_matches(base_name, known, n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown ViT model name {name!r}{hint}")
        timm_name = name
    kwargs = {**kwargs, **overrides, "num_classes": 0, "img_size": img_size}

    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    # TypeError: an argument timm does not know (a typo in --student-overrides); AssertionError: a shape
    # timm refuses, e.g. embed_dim not divisible by num_heads.
    except (TypeError, AssertionError) as e:
        if pretrained:
            raise
        raise ModelError(f"{name!r} with arguments {overrides}: {e}") from None
    except Exception as e:  # noqa: BLE001 - re-raised with context
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained timm weights for {name!r} ({type(e).__name__}: {e}). "
            "Without network access, build with pretrained=False and load a local file with "
            "leap.models.load_teacher_weights(model, path)."
        ) from e

    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{name!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    patch = tuple(model.patch_embed.patch_size)
    img = tuple(model.patch_embed.img_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise ModelError(f"img_size {img_size} is not divisible by the patch size {patch[0]} of {name!r}")
    return model


# --------------------------------------------------------------------------------------
# Patch grids
# --------------------------------------------------------------------------------------


def _describe_grid(model: nn.Module) -> str:
    pe = unwrap(model).patch_embed
    gh, gw = patch_grid(model)
    ih, iw = (int(s) for s in pe.img_size)
    ph, pw = (int(s) for s in pe.patch_size)
    img = f"{ih}" if ih == iw else f"{ih}x{iw}"
    patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
    return f"patch grid {gh}x{gw} (img {img}, patch {patch})"


def check_compatible(teacher: nn.Module, student: nn.Module) -> tuple[int, int]:
    """Check that teacher and student see the same patch grid; return it.

    Raises:
        ModelError: e.g. "teacher patch grid 16x16 (img 224, patch 14) != student patch
            grid 14x14 (img 224, patch 16)".
    """
    tg, sg = patch_grid(teacher), patch_grid(student)
    if tg != sg:
        raise ModelError(f"teacher {_describe_grid(teacher)} != student {_describe_grid(student)}")
    return tg


# --------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------

_CONTAINER_KEYS = ("state_dict", "model", "teacher", "module", "model_state_dict")

# Keys that locate the parameter root inside a possibly prefixed state dict, best first.
_ANCHORS = (
    "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.weight",
    "embeddings.cls_token",
    "cls_token",
    "encoder.layer.0.norm1.weight",
    "blocks.0.norm1.weight",
    "blocks.0.0.norm1.weight",
    "layernorm.weight",
    "norm.weight",
)


def _read_file(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return read_torch_file(path, "teacher checkpoint")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"teacher checkpoint not found: {path}")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
        raise CheckpointError(
            f"could not read teacher checkpoint {path}: not a valid .safetensors file ({type(e).__name__}: {e})"
        ) from None


def _unwrap_container(obj: Any) -> dict[str, torch.Tensor]:
    """Find the flat ``{name: tensor}`` dict inside common checkpoint wrappers."""
    for _ in range(5):
        if not isinstance(obj, Mapping):
            break
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"no state dict found in checkpoint (top-level type {type(obj).__name__}); expected a dict "
        f"of tensors, possibly wrapped in one of {list(_CONTAINER_KEYS)}"
    )


def _strip_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove a wrapper prefix (``module.``, ``dinov2.``, ``backbone.`` ...) found via anchor keys.

    Keys outside the prefix (e.g. an HF ``classifier.*`` head) are dropped.
    """
    for anchor in _ANCHORS:
        prefixes = {
            k[: len(k) - len(anchor)]
            for k in sd
            if k.endswith(anchor) and (len(k) == len(anchor) or k[len(k) - len(anchor) - 1] == ".")
        }
        if not prefixes:
            continue
        if "" in prefixes:
            return sd, ""
        if len(prefixes) > 1:
            teacher = sorted(p for p in prefixes if "teacher" in p)
            if len(teacher) != 1:
                raise CheckpointError(f"ambiguous checkpoint: parameters under several prefixes {sorted(prefixes)}")
            prefix = teacher[0]
        else:
            prefix = prefixes.pop()
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, ""


def _detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in keys):
        return FORMAT_HF
    if (
        "mask_token" in sd
        or "register_tokens" in sd
        or any(re.match(r"blocks\.\d+\.\d+\.", k) or re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k) for k in keys)
    ):
        return FORMAT_OFFICIAL
    return FORMAT_TIMM


def _official_to_timm_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official DINOv2 keys to timm names (pos-embed layout handled separately)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if k == "register_tokens":
            k = "reg_token"
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # chunked blocks (block_chunks > 0)
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        out[k] = v
    return out


_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc1|weights_in)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:fc2|weights_out)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _hf_to_timm_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF transformers Dinov2 keys to timm names; q/k/v are concatenated into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            continue
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (k, v)
            continue
        new = k
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p][1] for p in ("query", "key", "value")], 0)
        else:  # incomplete: keep the originals so they show up as unexpected keys
            out.update({name: t for name, t in parts.values()})
    return out


def _prefix_pos_slots(model: VisionTransformer) -> int:
    """Number of leading pos-embed slots that belong to prefix tokens in a timm model."""
    return 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)


def _cls_slot_to_model_layout(sd: dict[str, torch.Tensor], model: VisionTransformer) -> None:
    """Convert an official/HF pos embed ``(1, 1+N, D)`` (CLS slot, none for registers) in place."""
    pos = sd.get("pos_embed")
    if pos is None or model.pos_embed is None or getattr(model, "cls_token", None) is None:
        return
    if getattr(model, "no_embed_class", False):
        # timm register models: pos covers patches only; fold the CLS slot into cls_token.
        if "cls_token" in sd:
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    elif model.num_prefix_tokens > 1:
        # timm model with registers inside pos_embed: registers get a zero position (exact).
        n_reg = int(model.num_prefix_tokens) - 1
        zeros = pos.new_zeros(pos.shape[0], n_reg, pos.shape[2])
        sd["pos_embed"] = torch.cat([pos[:, :1], zeros, pos[:, 1:]], dim=1)


#: Position-embedding resampling rules (``pos_embed_interpolation``); ``"auto"`` picks one per source.
POS_EMBED_RULES = ("auto", "bicubic", "bicubic-antialias", "bicubic-offset")


def pos_embed_rule(fmt: str, has_registers: bool, override: str = "auto") -> str:
    """The resampling rule the source model itself applies at a new resolution.

    Each source interpolates its stored grid differently, and a teacher must see the position
    embedding its source model would compute at our resolution (a wrong rule changes the
    features by several percent):

    - official DINOv2 without registers (``dinov2_vit*14``): ``"bicubic-offset"`` -- bicubic, no
      antialias, scale factor ``(n + 0.1) / M`` (the ``interpolate_offset=0.1`` kludge of
      facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``; the hub
      builders keep the defaults ``interpolate_antialias=False, interpolate_offset=0.1``);
    - official DINOv2 with registers (``dinov2_vit*14_reg``): ``"bicubic-antialias"`` -- the hub
      builders pass ``interpolate_antialias=True, interpolate_offset=0.0`` (output size given);
    - Hugging Face ``Dinov2Model``: ``"bicubic"`` (output size, no antialias);
      ``Dinov2WithRegistersModel``: ``"bicubic-antialias"`` (both read in transformers 5.24
      ``interpolate_pos_encoding``);
    - timm: ``"bicubic-antialias"`` (``timm.layers.resample_abs_pos_embed`` defaults, used by
      timm's ``checkpoint_filter_fn`` and dynamic image sizes).

    Args:
        fmt: detected checkpoint format (``FORMAT_*``).
        has_registers: the checkpoint holds register tokens.
        override: one of :data:`POS_EMBED_RULES`; anything but ``"auto"`` is returned as is.
    """
    if override not in POS_EMBED_RULES:
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_RULES}, got {override!r}")
    if override != "auto":
        return override
    if fmt == FORMAT_OFFICIAL:
        return "bicubic-antialias" if has_registers else "bicubic-offset"
    if fmt == FORMAT_HF:
        return "bicubic-antialias" if has_registers else "bicubic"
    return "bicubic-antialias"


def resample_patch_pos_embed(patch_pos: torch.Tensor, new_grid: tuple[int, int], rule: str) -> torch.Tensor:
    """Resample a square patch position embedding ``(1, M*M, D)`` to ``(1, gh*gw, D)`` with ``rule``.

    Computed in fp32 (as every source does) and returned in the input dtype.
    """
    n, d = patch_pos.shape[1], patch_pos.shape[2]
    m = int(round(n**0.5))
    gh, gw = int(new_grid[0]), int(new_grid[1])
    grid = patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    if rule == "bicubic-offset":
        # Scale factors, not an output size: the kernel then uses (n + 0.1) / M for the
        # coordinate mapping, which is what makes this rule differ from "bicubic".
        out = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False)
    elif rule in ("bicubic", "bicubic-antialias"):
        out = F.interpolate(
            grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=rule == "bicubic-antialias"
        )
    else:
        raise ValueError(f"unknown position-embedding rule {rule!r} (expected one of {POS_EMBED_RULES[1:]})")
    if tuple(out.shape[-2:]) != (gh, gw):
        raise CheckpointError(
            f"position-embedding rule {rule!r} gave a {tuple(out.shape[-2:])} grid, expected {(gh, gw)}"
        )
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(patch_pos.dtype)


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: VisionTransformer, rule: str) -> bool:
    """Resample ``sd['pos_embed']`` (prefix slots kept) to the model's patch grid with ``rule``.

    Returns whether it resampled.
    """
    pos = sd.get("pos_embed")
    if pos is None or model.pos_embed is None or pos.ndim != 3:
        return False
    n_prefix = _prefix_pos_slots(model)
    new_grid = patch_grid(model)
    n_old = pos.shape[1] - n_prefix
    side = int(round(n_old**0.5)) if n_old > 0 else 0
    if side * side != n_old:
        if pos.shape == model.pos_embed.shape:
            return False
        raise CheckpointError(
            f"pos_embed of shape {tuple(pos.shape)} does not hold a square patch grid after "
            f"{n_prefix} prefix slot(s); model expects {tuple(model.pos_embed.shape)}"
        )
    if (side, side) == new_grid:
        return False
    if pos.shape[0] != 1:
        raise CheckpointError(f"pos_embed must have batch dimension 1, got shape {tuple(pos.shape)}")
    patches = resample_patch_pos_embed(pos[:, n_prefix:], new_grid, rule)
    sd["pos_embed"] = torch.cat([pos[:, :n_prefix], patches], dim=1)
    return True


def _adapt_to_model(sd: dict[str, torch.Tensor], model_keys: set[str]) -> None:
    """Match the model's SwiGLU parametrisation (packed ``fc1`` vs split ``fc1_g``/``fc1_x``) and drop
    classifier heads the model does not have (it is built with ``num_classes=0``)."""
    for k in list(sd):
        m = re.match(r"^(blocks\.\d+\.mlp\.)fc1\.(weight|bias)$", k)
        if m and k not in model_keys and f"{m.group(1)}fc1_g.{m.group(2)}" in model_keys:
            gate, x = sd.pop(k).chunk(2, dim=0)  # official: silu(first half) * second half
            sd[f"{m.group(1)}fc1_g.{m.group(2)}"] = gate
            sd[f"{m.group(1)}fc1_x.{m.group(2)}"] = x
        m = re.match(r"^(blocks\.\d+\.mlp\.)fc1_g\.(weight|bias)$", k)
        if m and k not in model_keys and f"{m.group(1)}fc1.{m.group(2)}" in model_keys:
            x_key = f"{m.group(1)}fc1_x.{m.group(2)}"
            if x_key in sd:
                sd[f"{m.group(1)}fc1.{m.group(2)}"] = torch.cat([sd.pop(k), sd.pop(x_key)], 0)
    for k in list(sd):
        if k.startswith(("head.", "classifier.")) and k not in model_keys:
            del sd[k]


def convert_state_dict(
    checkpoint: Mapping[str, Any], model: VisionTransformer, pos_embed_interpolation: str = "auto"
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a loaded checkpoint to ``model``'s timm state-dict layout.

    Args:
        checkpoint: a state dict in the official DINOv2, HF transformers Dinov2 or timm layout,
            possibly wrapped (``{'model': ...}``, ``{'state_dict': ...}``) or prefixed
            (``module.``, ``dinov2.``, ``backbone.`` ...).
        model: the target timm ViT (decides register/pos-embed layout, grid and SwiGLU packing).
        pos_embed_interpolation: how a position embedding stored for another grid is resampled
            (:data:`POS_EMBED_RULES`); ``"auto"`` follows the source model (:func:`pos_embed_rule`).

    Returns:
        ``(state_dict, format)`` where ``format`` is ``"official_dinov2"``, ``"hf_dinov2"`` or
        ``"timm"``. Shapes are not checked here (see :func:`load_teacher_weights`).
    """
    sd, _prefix = _strip_prefix(_unwrap_container(checkpoint))
    fmt = _detect_format(sd)
    has_registers = "register_tokens" in sd or "embeddings.register_tokens" in sd or "reg_token" in sd
    rule = pos_embed_rule(fmt, has_registers, pos_embed_interpolation)
    if fmt == FORMAT_OFFICIAL:
        sd = _official_to_timm_keys(sd)
        _cls_slot_to_model_layout(sd, model)
    elif fmt == FORMAT_HF:
        sd = _hf_to_timm_keys(sd)
        _cls_slot_to_model_layout(sd, model)
    else:
        sd = dict(sd)
    if _resample_pos_embed(sd, model, rule):
        log.info(
            "position embedding resampled to the %dx%d patch grid with rule %r (%s checkpoint%s)",
            *patch_grid(model),
            rule,
            fmt,
            " with registers" if has_registers else "",
        )
    _adapt_to_model(sd, set(model.state_dict().keys()))
    return sd, fmt


def _key_report(label: str, keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {label} key(s)" + (f": {shown}" if keys else "")


def load_teacher_weights(
    model: VisionTransformer,
    path: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    pos_embed_interpolation: str = "auto",
) -> str:
    """Load a local teacher checkpoint into a timm ViT, converting its layout as needed.

    Supported files: ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) and ``.safetensors``.
    Supported layouts (detected from the keys):

    - ``"official_dinov2"``: facebookresearch/dinov2 (``blocks.N.attn.qkv``, ``ls1.gamma``,
      ``mlp.w12/w3`` SwiGLU, ``register_tokens``, ``mask_token``, chunked ``blocks.C.N.``),
    - ``"hf_dinov2"``: transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` (``embeddings.*``,
      ``encoder.layer.N.*``, ``layernorm.*``; ``dinov2.`` or other prefixes allowed),
    - ``"timm"``: a timm state dict (optionally in ``{'model': ...}``/``{'state_dict': ...}``,
      optionally ``module.``-prefixed).

    The position embedding is resampled (prefix slots kept) to the model's patch grid, e.g. from
    the 37x37 grid of a 518 px checkpoint to 16x16 at 224 px, with the rule the source model
    itself uses at that resolution (:func:`pos_embed_rule`) unless ``pos_embed_interpolation``
    names one.

    Args:
        model: target timm ViT (e.g. from :func:`build_model`); updated in place.
        path: checkpoint file, or an already-loaded state dict.
        strict: if True, missing or unexpected keys raise; otherwise they only warn.
            Shape mismatches always raise.
        pos_embed_interpolation: ``"auto"`` (follow the source) or a rule of :data:`POS_EMBED_RULES`.

    Returns:
        The detected format name.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, or keys/shapes that do not fit the model (the message
            names the detected format and lists missing/unexpected keys with counts).
    """
    source = "<state dict>" if isinstance(path, Mapping) else os.fspath(path)
    raw = path if isinstance(path, Mapping) else _read_file(path)
    sd, fmt = convert_state_dict(raw, model, pos_embed_interpolation)
    check_finite_weights(sd, source, "teacher checkpoint")

    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        lines = [
            f"teacher checkpoint {source} (detected format: {fmt}) does not match "
            f"{type(model).__name__} (depth {len(model.blocks)}, width {model.embed_dim}):",
            "  " + _key_report("missing", missing),
            "  " + _key_report("unexpected", unexpected),
        ]
        if mismatched:
            lines.append("  " + _key_report("shape-mismatched", mismatched))
        raise CheckpointError("\n".join(lines))
    if missing or unexpected:
        warnings.warn(
            f"loading {source} (format {fmt}) non-strictly: {_key_report('missing', missing)}; "
            f"{_key_report('unexpected', unexpected)}",
            stacklevel=2,
        )
    model.load_state_dict(sd, strict=strict)
    return fmt
