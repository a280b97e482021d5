"""Teacher checkpoints: reading a local file in the official, Hugging Face or timm layout of DINOv2
(timm ``nn.Module``) or DINOv3 (timm ``Eva``) and converting it to the timm model's state dict.

Public API (also importable from :mod:`leap.models`)
----------------------------------------------------
- :func:`load_teacher_weights` -- load a local checkpoint into a timm model, with a report of missing
  and unexpected keys.
- :func:`convert_state_dict` -- the conversion step of :func:`load_teacher_weights`, without I/O.
- :func:`pos_embed_rule`, :func:`resample_patch_pos_embed`, :data:`POS_EMBED_RULES` -- how a stored
  position embedding is resampled to the model's grid (DINOv2; DINOv3 has none: rotary embedding).

Layouts (checked against timm 1.0.29-1.0.31, transformers 5.17-5.25): :data:`FORMATS`, described in
:func:`load_teacher_weights`; the DINOv3 renames are those of timm's own ``eva.checkpoint_filter_fn``.

DINOv2 notes: timm's ``vit_giant_patch14_*dinov2`` uses ``mlp_layer=SwiGLUPacked`` = ``GluMlp(act=SiLU,
gate_last=False)``: ``mlp.fc1`` is the packed ``(2*H, D)`` input projection (``x1, x2 = fc1(x).chunk(2);
silu(x1) * x2``), exactly the official ``SwiGLUFFN`` (``w12``/``w3``) and the HF ``Dinov2SwiGLUFFN``
(``weights_in``/``weights_out``). A model built with timm's unpacked ``SwiGLU`` (``fc1_g``/``fc1_x``) is
also supported: ``fc1_g`` is the first (SiLU-gated) half. Official/HF checkpoints keep one position slot
for CLS (``pos_embed`` ``(1, 1+N, D)``) and none for registers; timm's register models use
``no_embed_class=True``, so the CLS slot is folded into ``cls_token``, as timm's ``checkpoint_filter_fn`` does.

DINOv3 notes: q and v biases become timm's ``q_bias``/``v_bias``. timm's k bias is a constant zero (the
release masks it with ``qkv.bias_mask``, and the rotary embedding would make a nonzero one matter: it is
rotated with k), so a masked or all-zero k bias is dropped and any other is reported as an unexpected key.
The ``_qkvb`` models have q/v biases; the others do not, and all-zero q/v biases (the released distilled
models) are then dropped; nonzero ones are reported as unexpected keys (use the ``_qkvb`` model). SwiGLU:
``w1``/``gate_proj`` is the SiLU-gated projection (timm ``fc1_g``), ``w2``/``up_proj`` the other (``fc1_x``).
The rotary periods are not loaded: timm computes them (in fp32; the release stored them in bf16).

Why this module is long: five checkpoint layouts with their key maps, position-embedding and register
conversions, each with error messages that name the offending keys.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_finite_weights, check_float_weights, read_torch_file
from .errors import CheckpointError, InputNotFoundError
from .vit import EVA, patch_grid

__all__ = [
    "load_teacher_weights",
    "convert_state_dict",
    "pos_embed_rule",
    "resample_patch_pos_embed",
    "POS_EMBED_RULES",
    "FORMATS",
]

log = logging.getLogger("leap.models")

FORMAT_OFFICIAL = "official_dinov2"
FORMAT_HF = "hf_dinov2"
FORMAT_OFFICIAL_V3 = "official_dinov3"
FORMAT_HF_V3 = "hf_dinov3"
FORMAT_TIMM = "timm"
#: Every layout :func:`load_teacher_weights` reads.
FORMATS = (FORMAT_OFFICIAL, FORMAT_HF, FORMAT_OFFICIAL_V3, FORMAT_HF_V3, FORMAT_TIMM)


_CONTAINER_KEYS = ("state_dict", "model", "teacher", "module", "model_state_dict")

# Keys that locate the parameter root inside a possibly prefixed state dict, best first.
_ANCHORS = (
    "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.weight",
    "embeddings.cls_token",
    "cls_token",
    "encoder.layer.0.norm1.weight",
    "layer.0.norm1.weight",
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


def _detect_format(sd: Mapping[str, torch.Tensor], dinov3: bool = False) -> str:
    """The layout of ``sd`` (prefix stripped); ``dinov3``: the target is a DINOv3 (Eva) model."""
    keys = list(sd)
    if any(re.match(r"(model\.)?layer\.\d+\.", k) for k in keys) and any(k.startswith("embeddings.") for k in keys):
        return FORMAT_HF_V3
    if any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in keys):
        return FORMAT_HF
    if "storage_tokens" in sd or any(k.startswith("rope_embed.") or k.endswith(".bias_mask") for k in keys):
        return FORMAT_OFFICIAL_V3
    official = (
        "mask_token" in sd
        or "register_tokens" in sd
        or any(re.match(r"blocks\.\d+\.\d+\.", k) or re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k) for k in keys)
    )
    if dinov3 and (official or any(re.match(r"blocks\.\d+\.(ls[12]\.gamma|mlp\.w[123]\.)", k) for k in keys)):
        return FORMAT_OFFICIAL_V3
    return FORMAT_OFFICIAL if official else FORMAT_TIMM


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


def _rename_first(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``key`` with the first of ``renames`` (regex, replacement) that matches applied; unchanged if none does."""
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


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
        out[_rename_first(k, _HF_RENAMES)] = v
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p][1] for p in ("query", "key", "value")], 0)
        else:  # incomplete: keep the originals so they show up as unexpected keys
            out.update({name: t for name, t in parts.values()})
    return out


# ---- DINOv3 (timm Eva) ----------------------------------------------------------------------


def _qv_biases(
    out: dict[str, torch.Tensor], block: str, q: torch.Tensor, v: torch.Tensor, model_keys: set[str], originals: tuple
) -> None:
    """Put the q and v biases of ``block`` (``"blocks.N"``) into ``out`` as timm's ``attn.q_bias``/
    ``attn.v_bias``. A model without them (not ``_qkvb``) takes all-zero biases as absent; nonzero
    ones stay under their checkpoint names ``originals`` (reported as unexpected keys)."""
    if f"{block}.attn.q_bias" in model_keys:
        out[f"{block}.attn.q_bias"], out[f"{block}.attn.v_bias"] = q, v
    elif torch.count_nonzero(q) or torch.count_nonzero(v):
        out[originals[0]], out[originals[1]] = q, v


def _official_v3_to_timm_keys(sd: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename official DINOv3 keys to timm's ``Eva`` (timm's ``eva.checkpoint_filter_fn`` renames)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if (
            k.endswith((".periods", ".bias_mask"))
            or k in ("mask_token",)
            or k.startswith(("rope_embed.", "projectors."))
        ):
            continue  # the rotary periods (timm computes them), the k-bias mask, pretraining-only tensors
        if k.startswith("local_cls_norm"):  # the 7B's pretraining head on local crops
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # chunked blocks
        m = re.match(r"^(blocks\.\d+)\.attn\.qkv\.bias$", k)
        if m:  # [q | k | v]; the release masks the k third to zero (bias_mask), whatever it stores
            q, kb, vb = v.chunk(3, dim=-1)
            mask = sd.get(f"{k}_mask")
            if mask is not None:
                kb = torch.where(mask.chunk(3, dim=-1)[1].bool(), kb, torch.zeros_like(kb))
            _qv_biases(out, m.group(1), q, vb, model_keys, (f"{m.group(1)}.attn.q_bias", f"{m.group(1)}.attn.v_bias"))
            if torch.count_nonzero(kb):
                out[f"{m.group(1)}.attn.k_bias"] = kb  # timm's k bias is a constant zero: unexpected
            continue
        k = k.replace("storage_tokens", "reg_token")
        k = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k)
        for old, new in (
            (".mlp.w12.", ".mlp.fc1."),
            (".mlp.w1.", ".mlp.fc1_g."),
            (".mlp.w2.", ".mlp.fc1_x."),
            (".mlp.w3.", ".mlp.fc2."),
        ):
            k = k.replace(old, new)
        out[k] = v
    return out


_HF_V3_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.gamma_\2"),
    (r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),
    (r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^norm\.", "norm."),
)
_HF_V3_QKV = re.compile(r"^layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$")


def _hf_v3_to_timm_keys(sd: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename transformers ``DINOv3ViTModel`` keys to timm's ``Eva``; q/k/v weights are concatenated
    into ``qkv``, the q/v biases become ``q_bias``/``v_bias`` and an all-zero k bias is dropped."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    gated = {m.group(1) for k in sd if (m := re.match(r"^(?:model\.)?layer\.(\d+)\.mlp\.gate_proj\.", k))}
    for key, v in sd.items():
        k = re.sub(r"^model\.layer\.", "layer.", key)  # transformers >= 5 nests the layers under .model
        if k in ("embeddings.mask_token",) or k.startswith("rope_embeddings."):
            continue
        m = _HF_V3_QKV.match(k)
        if m:
            qkv.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = (key, v)
            continue
        m = re.match(r"^layer\.(\d+)\.mlp\.up_proj\.(weight|bias)$", k)
        if m:  # the gated MLP's value projection (timm SwiGLU fc1_x), else the plain MLP's fc1
            out[f"blocks.{m.group(1)}.mlp.{'fc1_x' if m.group(1) in gated else 'fc1'}.{m.group(2)}"] = v
            continue
        new = _rename_first(k, _HF_V3_RENAMES)
        out[new if new != k or k.startswith("norm.") else key] = v
    for layer, parts in qkv.items():
        block = f"blocks.{layer}"
        if {"q.weight", "k.weight", "v.weight"} <= set(parts):
            out[f"{block}.attn.qkv.weight"] = torch.cat([parts[f"{p}.weight"][1] for p in "qkv"], 0)
        else:  # incomplete: keep the originals so they show up as unexpected keys
            out.update({name: t for part, (name, t) in parts.items() if part.endswith("weight")})
        if "q.bias" in parts and "v.bias" in parts:
            names = (parts["q.bias"][0], parts["v.bias"][0])
            _qv_biases(out, block, parts["q.bias"][1], parts["v.bias"][1], model_keys, names)
        elif "q.bias" in parts or "v.bias" in parts:
            out.update({name: t for part, (name, t) in parts.items() if part in ("q.bias", "v.bias")})
        if "k.bias" in parts and torch.count_nonzero(parts["k.bias"][1]):
            out[parts["k.bias"][0]] = parts["k.bias"][1]  # timm's k bias is a constant zero: unexpected
    return out


def _prefix_pos_slots(model: nn.Module) -> int:
    """Number of leading pos-embed slots that belong to prefix tokens in a timm model."""
    return 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)


def _cls_slot_to_model_layout(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
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
      facebookresearch/dinov2 ``Dinonn.Module.interpolate_pos_encoding``; the hub
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


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module, rule: str) -> bool:
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
    checkpoint: Mapping[str, Any], model: nn.Module, pos_embed_interpolation: str = "auto"
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a loaded checkpoint to ``model``'s timm state-dict layout.

    Args:
        checkpoint: a state dict in one of :data:`FORMATS` (official DINOv2/DINOv3, Hugging Face
            Dinov2/DINOv3ViT, timm), possibly wrapped (``{'model': ...}``, ``{'state_dict': ...}``)
            or prefixed (``module.``, ``dinov2.``, ``backbone.`` ...).
        model: the target timm ``VisionTransformer`` or ``Eva`` (decides register/pos-embed layout,
            grid, SwiGLU packing and whether q/v biases exist).
        pos_embed_interpolation: how a position embedding stored for another grid is resampled
            (:data:`POS_EMBED_RULES`); ``"auto"`` follows the source model (:func:`pos_embed_rule`).

    Returns:
        ``(state_dict, format)`` where ``format`` is one of :data:`FORMATS`. Shapes are not checked
        here (see :func:`load_teacher_weights`).
    """
    sd, _prefix = _strip_prefix(_unwrap_container(checkpoint))
    model_keys = set(model.state_dict().keys())
    fmt = _detect_format(sd, dinov3=_is_eva(model))
    has_registers = any(
        k in sd for k in ("register_tokens", "embeddings.register_tokens", "reg_token", "storage_tokens")
    )
    rule = pos_embed_rule(fmt, has_registers, pos_embed_interpolation)
    if fmt == FORMAT_OFFICIAL:
        sd = _official_to_timm_keys(sd)
        _cls_slot_to_model_layout(sd, model)
    elif fmt == FORMAT_HF:
        sd = _hf_to_timm_keys(sd)
        _cls_slot_to_model_layout(sd, model)
    elif fmt == FORMAT_OFFICIAL_V3:
        sd = _official_v3_to_timm_keys(sd, model_keys)
    elif fmt == FORMAT_HF_V3:
        sd = _hf_v3_to_timm_keys(sd, model_keys)
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
    _adapt_to_model(sd, model_keys)
    return sd, fmt


def _is_eva(model: nn.Module) -> bool:
    return EVA.matches(model)


def _key_report(label: str, keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {label} key(s)" + (f": {shown}" if keys else "")


def load_teacher_weights(
    model: nn.Module,
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
    - ``"official_dinov3"``: facebookresearch/dinov3 (``storage_tokens``, ``attn.qkv.bias`` with its
      ``bias_mask``, ``ls1.gamma``, ``mlp.w1/w2/w3`` SwiGLU, ``rope_embed.periods``) into a timm ``Eva``,
    - ``"hf_dinov3"``: transformers ``DINOv3ViTModel`` (``embeddings.*``, ``layer.N.*`` or
      ``model.layer.N.*``, ``norm.*``) into a timm ``Eva``,
    - ``"timm"``: a timm state dict (optionally in ``{'model': ...}``/``{'state_dict': ...}``,
      optionally ``module.``-prefixed).

    The position embedding is resampled (prefix slots kept) to the model's patch grid, e.g. from
    the 37x37 grid of a 518 px checkpoint to 16x16 at 224 px, with the rule the source model
    itself uses at that resolution (:func:`pos_embed_rule`) unless ``pos_embed_interpolation``
    names one.

    Args:
        model: target timm ``VisionTransformer`` or ``Eva`` (e.g. from :func:`leap.models.build_model`);
            updated in place.
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
    check_float_weights(sd, expected, source)  # int8 weights would load into float parameters as garbage
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
