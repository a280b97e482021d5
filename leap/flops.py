"""FLOP accounting for LEAP: per-image costs, curriculum savings, measured step times.

Conventions
-----------
* Costs are **per image** and counted analytically from a timm ``VisionTransformer``'s
  configuration (module shapes; works on ``meta``-device models, so a ViT-g never has to be
  allocated). ``*_macs`` functions return multiply-accumulates, ``*_flops`` return
  ``FLOPs = 2 * MACs``.
* Only matrix products are counted: every ``nn.Linear`` (qkv, attention output projection,
  MLP ``fc1``/``fc2``; a packed SwiGLU ``fc1`` is ``D -> 2H``, an unpacked one is two
  ``D -> H`` layers), the patch-embedding convolution, and the two attention products
  ``Q K^T`` and ``A V`` (``N^2 * D_attn`` MACs each, summed over heads). Norms, softmax,
  activations, the GLU gate multiply, LayerScale, residual adds and biases are elementwise
  and not counted (about 1% of a ViT block). This is the same convention as
  :class:`torch.utils.flop_counter.FlopCounterMode`, which the tests check it against.
  The teacher's final LayerNorm (applied after block ``k``) is therefore 0 here too.
* A ViT at image size ``H x W`` with patch ``p`` runs ``N = P + (H/p)(W/p)`` tokens, where
  ``P = num_prefix_tokens`` (CLS + registers; a ViT-g/14 reg4 at 224 px: N = 5 + 256 = 261).

Savings formula (spec section 6)
--------------------------------
Per image and training step with the teacher target at block ``k`` of ``L``::

    C(k) = F_embed + k * F_block + F_final_norm + 3 * (F_student + F_head) [+ F_cka]

* ``F_embed``: teacher patch embedding; ``F_block``: one teacher block; ``F_final_norm = 0``
  (elementwise, see above).
* ``3 * (...)``: student forward + backward (backward ~ 2x forward) of the student ViT
  and of the ``Linear(D_s -> D_t)`` head on ``T + 1`` tokens (``T`` patch tokens + CLS).
* ``F_cka`` (``include_cka=True``): the per-step linear CKA in feature space on the ``T``
  patch tokens of the image, ``X^T Y, X^T X, Y^T Y`` = ``3 T D_t^2`` MACs, plus centering
  (``2 T D_t``) and the three Frobenius norms (``3 D_t^2``), plus re-projecting the detached
  student patch tokens through the head (``T D_s D_t``; the fused loss never materializes
  the projection). The one-off calibration scan of the first step is ignored.

Because ``C`` is linear in ``k``, the mean cost of a trajectory ``k_1..k_n`` (target block
per epoch or per step, optionally weighted by steps) is ``C(mean k)``, and the savings vs.
the full-depth baseline (every step at ``k = L``, same cost model) are:

* ``teacher_only_saving = 1 - mean(k) / L`` -- teacher blocks only. This is the number the
  LEAP paper reports (25.1% for ViT-g -> ViT-S: mean target block about 30 of 40).
* ``teacher_saving = 1 - (F_embed + mean(k) F_block) / (F_embed + L F_block)`` -- whole
  teacher forward (patch embedding included); a hair below the previous one.
* ``total_saving = 1 - C(mean k) / C(L)`` -- including the student step, head and CKA
  (about 23.4% for the paper's ViT-S run).

Measured wall-clock savings (:func:`measure_step_times`, :func:`wall_clock_savings`) are
lower still: data loading, the optimizer and kernel overheads do not shrink with ``k``.

CLI: :func:`main_flops` implements ``leap flops``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .jsonl import read_jsonl

__all__ = [
    "ViTCost",
    "vit_cost",
    "patch_embed_macs",
    "patch_embed_flops",
    "block_macs",
    "block_flops",
    "forward_macs",
    "forward_flops",
    "head_macs",
    "head_flops",
    "cka_macs",
    "cka_flops",
    "student_step_macs",
    "student_step_flops",
    "counted_flops",
    "CostModel",
    "Trajectory",
    "load_trajectory",
    "savings",
    "TeacherFlopsTracker",
    "measure_step_times",
    "wall_clock_savings",
    "main_flops",
]


# --------------------------------------------------------------------------------------
# Analytic per-image costs of a timm ViT
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTCost:
    """Configuration and analytic per-image MACs of one timm ``VisionTransformer``.

    Attributes:
        depth, embed_dim, num_heads: as in the model (``num_heads`` of the first block).
        patch_size, img_size, grid: ``(h, w)`` tuples; ``grid = img_size / patch_size``.
        num_prefix_tokens: CLS + register tokens.
        num_patches: ``grid[0] * grid[1]`` patch tokens.
        tokens: sequence length ``N = num_prefix_tokens + num_patches``.
        mlp_hidden: MLP hidden width ``H`` (the input width of ``fc2``).
        mlp_kind: ``"mlp"`` (fc1 -> act -> fc2), ``"glu-packed"`` (timm ``GluMlp`` /
            ``SwiGLUPacked``: ``fc1`` is ``D -> 2H``, gate is elementwise) or
            ``"glu"`` (timm ``SwiGLU``: ``fc1_g``, ``fc1_x`` each ``D -> H``).
        patch_embed_macs: patch-embedding conv (or linear) MACs.
        block_macs: MACs of each block, in order.
        block_breakdown: MACs of the first block by part (``qkv``, ``attn_scores`` (QK^T),
            ``attn_values`` (AV), ``attn_proj``, ``mlp``, ``other``).
        head_macs: classifier head (0 for ``num_classes=0``, the LEAP setting).
    """

    depth: int
    embed_dim: int
    num_heads: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int
    num_patches: int
    tokens: int
    mlp_hidden: int
    mlp_kind: str
    patch_embed_macs: int
    block_macs: tuple[int, ...]
    block_breakdown: dict[str, int] = field(default_factory=dict)
    head_macs: int = 0

    def forward_macs(self, blocks: int | None = None, *, include_head: bool = False) -> int:
        """Patch embed + the first ``blocks`` blocks (all if None) [+ classifier head]."""
        n = self.depth if blocks is None else _check_blocks(blocks, self.depth)
        return self.patch_embed_macs + sum(self.block_macs[:n]) + (self.head_macs if include_head else 0)


def _unwrap(model: Any) -> nn.Module:
    """The timm ViT inside ``model`` (itself, or ``.model`` of a wrapper such as TruncatedTeacher)."""
    if isinstance(model, nn.Module) and not hasattr(model, "patch_embed"):
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "patch_embed"):
            return inner
    if not isinstance(model, nn.Module) or not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise TypeError(
            f"expected a timm VisionTransformer (or a wrapper with .model), got {type(model).__name__}"
        )
    return model


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _check_blocks(blocks: Any, depth: int) -> int:
    if isinstance(blocks, bool) or int(blocks) != blocks or not 0 <= int(blocks) <= depth:
        raise ValueError(f"blocks={blocks!r} out of range: expected an int in [0, {depth}]")
    return int(blocks)


def _patch_embed_macs(vit: nn.Module, num_patches: int) -> int:
    proj = getattr(vit.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        kh, kw = proj.kernel_size
        return num_patches * proj.out_channels * (proj.in_channels // proj.groups) * kh * kw
    if isinstance(proj, nn.Linear):
        return num_patches * proj.in_features * proj.out_features
    raise TypeError(f"unsupported patch_embed.proj {type(proj).__name__}: expected Conv2d or Linear")


def _block_breakdown(block: nn.Module, tokens: int) -> dict[str, int]:
    """MACs of one transformer block on ``tokens`` tokens, by part."""
    parts = {"qkv": 0, "attn_scores": 0, "attn_values": 0, "attn_proj": 0, "mlp": 0, "other": 0}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            macs = tokens * mod.in_features * mod.out_features
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("attn."):
                parts["attn_proj" if leaf == "proj" else "qkv"] += macs
            elif name.startswith("mlp."):
                parts["mlp"] += macs
            else:
                parts["other"] += macs
        elif isinstance(mod, nn.modules.conv._ConvNd):
            raise TypeError(f"unsupported convolution {name!r} inside a ViT block")
        # Self-attention: Q K^T and A V, N^2 * (heads * head_dim) MACs each.
        if hasattr(mod, "num_heads") and hasattr(mod, "head_dim") and (
            hasattr(mod, "qkv") or hasattr(mod, "q_proj") or hasattr(mod, "q")
        ):
            inner = int(mod.num_heads) * int(mod.head_dim)
            parts["attn_scores"] += tokens * tokens * inner
            parts["attn_values"] += tokens * tokens * inner
    return parts


def _mlp_info(block: nn.Module) -> tuple[int, str]:
    mlp = getattr(block, "mlp", None)
    fc2 = getattr(mlp, "fc2", None)
    hidden = int(fc2.in_features) if isinstance(fc2, nn.Linear) else 0
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):
        return hidden, "glu"
    fc1 = getattr(mlp, "fc1", None)
    if isinstance(fc1, nn.Linear) and hidden and fc1.out_features == 2 * hidden:
        return hidden, "glu-packed"
    return hidden, "mlp"


def vit_cost(model: Any) -> ViTCost:
    """Read the configuration of a timm ViT and count its per-image MACs.

    Args:
        model: a timm ``VisionTransformer`` (any device, ``meta`` included), a wrapper holding
            it as ``.model`` (:class:`leap.teacher.TruncatedTeacher`), or a :class:`ViTCost`
            (returned unchanged).
    """
    if isinstance(model, ViTCost):
        return model
    vit = _unwrap(model)
    pe = vit.patch_embed
    patch = _pair(pe.patch_size)
    img = _pair(pe.img_size)
    grid = _pair(pe.grid_size)
    num_patches = grid[0] * grid[1]
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    tokens = prefix + num_patches
    blocks = list(vit.blocks)
    if not blocks:
        raise ValueError("model has no transformer blocks")
    per_block = [_block_breakdown(b, tokens) for b in blocks]
    hidden, kind = _mlp_info(blocks[0])
    attn = getattr(blocks[0], "attn", None)
    head = getattr(vit, "head", None)
    head_m = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
    return ViTCost(
        depth=len(blocks),
        embed_dim=int(vit.embed_dim),
        num_heads=int(getattr(attn, "num_heads", 0)),
        patch_size=patch,
        img_size=img,
        grid=grid,
        num_prefix_tokens=prefix,
        num_patches=num_patches,
        tokens=tokens,
        mlp_hidden=hidden,
        mlp_kind=kind,
        patch_embed_macs=_patch_embed_macs(vit, num_patches),
        block_macs=tuple(sum(p.values()) for p in per_block),
        block_breakdown=per_block[0],
        head_macs=head_m,
    )


def patch_embed_macs(model: Any) -> int:
    """Per-image MACs of the patch embedding (the ``p x p`` stride-``p`` convolution)."""
    return vit_cost(model).patch_embed_macs


def patch_embed_flops(model: Any) -> int:
    """Per-image FLOPs (2 x MACs) of the patch embedding."""
    return 2 * patch_embed_macs(model)


def block_macs(model: Any, index: int = 0) -> int:
    """Per-image MACs of one transformer block (block ``index``, 0-based; all are equal in a ViT).

    ``N D 3D_attn`` (qkv) + ``2 N^2 D_attn`` (``QK^T`` and ``AV``) + ``N D_attn D`` (proj)
    + MLP (``N D H + N H D``; packed SwiGLU ``N D 2H + N H D``).
    """
    return vit_cost(model).block_macs[index]


def block_flops(model: Any, index: int = 0) -> int:
    """Per-image FLOPs (2 x MACs) of one transformer block."""
    return 2 * block_macs(model, index)


def forward_macs(model: Any, blocks: int | None = None, *, include_head: bool = False) -> int:
    """Per-image MACs of patch embed + the first ``blocks`` blocks (all if None).

    ``include_head`` adds a classifier ``head`` (none in LEAP models, ``num_classes=0``).
    """
    return vit_cost(model).forward_macs(blocks, include_head=include_head)


def forward_flops(model: Any, blocks: int | None = None, *, include_head: bool = False) -> int:
    """Per-image FLOPs (2 x MACs) of :func:`forward_macs`."""
    return 2 * forward_macs(model, blocks, include_head=include_head)


def head_macs(d_s: int, d_t: int, tokens: int) -> int:
    """MACs of the ``Linear(d_s -> d_t)`` projection head on ``tokens`` tokens."""
    return int(tokens) * int(d_s) * int(d_t)


def head_flops(d_s: int, d_t: int, tokens: int) -> int:
    """FLOPs (2 x MACs) of the projection head on ``tokens`` tokens."""
    return 2 * head_macs(d_s, d_t, tokens)


def cka_macs(n_tokens: int, d: int, d_y: int | None = None) -> int:
    """MACs of one feature-space linear CKA on ``X (n, d)``, ``Y (n, d_y)`` (``d_y`` defaults to ``d``).

    ``X^T Y, X^T X, Y^T Y``: ``n (d d_y + d^2 + d_y^2)`` (``3 n d^2`` for equal widths);
    centering (column means + subtraction, counted as ``n (d + d_y)`` MAC-equivalents);
    the three squared Frobenius norms ``d d_y + d^2 + d_y^2``.
    """
    n, dx = int(n_tokens), int(d)
    dy = dx if d_y is None else int(d_y)
    grams = dx * dy + dx * dx + dy * dy
    return n * grams + n * (dx + dy) + grams


def cka_flops(n_tokens: int, d: int, d_y: int | None = None) -> int:
    """FLOPs (2 x MACs) of :func:`cka_macs`."""
    return 2 * cka_macs(n_tokens, d, d_y)


def student_step_macs(model: Any) -> int:
    """MACs of one student training step per image: forward + backward ~ 3 x forward."""
    return 3 * forward_macs(model)


def student_step_flops(model: Any) -> int:
    """FLOPs of one student training step per image: ``3 * forward_flops(model)``."""
    return 2 * student_step_macs(model)


def counted_flops(model: nn.Module, x: torch.Tensor | None = None, *, backward: bool = False,
                  blocks: int | None = None) -> int:
    """FLOPs of a real forward (and backward) as counted by ``FlopCounterMode``, per batch.

    Runs ``patch_embed -> _pos_embed -> blocks[:blocks] -> norm`` (``forward_features`` when
    ``blocks`` is None). Fused attention (``F.scaled_dot_product_attention``) is switched off
    for the call -- the CPU SDPA kernel is not in FlopCounterMode's registry, so fused
    attention would be silently uncounted -- which makes the count the same on every device.
    ``x`` defaults to one random image at the model's size. Meant for checks on small models.
    """
    from torch.utils.flop_counter import FlopCounterMode

    vit = _unwrap(model)
    if x is None:
        p = next(vit.parameters())
        h, w = _pair(vit.patch_embed.img_size)
        x = torch.randn(1, 3, h, w, device=p.device, dtype=p.dtype)
    saved = [(m, m.fused_attn) for m in vit.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            if blocks is None:
                out = vit.forward_features(x)
            else:
                h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
                for blk in list(vit.blocks)[: _check_blocks(blocks, len(vit.blocks))]:
                    h = blk(h)
                out = vit.norm(h)
            if backward:
                out.float().square().mean().backward()
        return int(counter.get_total_flops())
    finally:
        for m, v in saved:
            m.fused_attn = v


# --------------------------------------------------------------------------------------
# Cost model of one LEAP step
# --------------------------------------------------------------------------------------


def _build_meta(name: str, img_size: int, overrides: Mapping[str, Any] | None) -> nn.Module:
    """Build a named model on the ``meta`` device (shapes only, nothing allocated)."""
    from .models import build_model

    with torch.device("meta"):
        return build_model(name, img_size=img_size, **dict(overrides or {}))


def _as_cost(model: Any, img_size: int, overrides: Mapping[str, Any] | None = None) -> ViTCost:
    if isinstance(model, str):
        return vit_cost(_build_meta(model, img_size, overrides))
    return vit_cost(model)


@dataclass
class CostModel:
    """Per-image cost of one LEAP training step as a function of the target block ``k``.

    ``C(k) = F_embed + k * F_block + final_norm + 3 * (F_student + F_head) [+ F_cka]``
    (``final_norm`` = 0: elementwise ops are not counted; see the module docstring).

    Args:
        teacher, student: timm ViTs (``meta`` device is fine), wrappers with ``.model``,
            :class:`ViTCost` objects, or model names for :func:`leap.models.build_model`
            (built on the ``meta`` device at ``img_size`` with ``*_overrides``).
        d_t: target width (default: the teacher's ``embed_dim``).
        tokens_per_image: patch tokens per image ``T`` (default: the student's patch count).
            The head runs on ``T + 1`` tokens (patches + CLS), CKA on ``T``.
        include_cka: count the per-step CKA (``F_cka``).

    All ``*_flops`` attributes are per image in FLOPs (2 x MACs).
    """

    teacher: Any = field(repr=False)
    student: Any = field(repr=False)
    d_t: int | None = None
    tokens_per_image: int | None = None
    include_cka: bool = True
    img_size: int = 224
    teacher_overrides: Mapping[str, Any] | None = field(default=None, repr=False)
    student_overrides: Mapping[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.teacher_cost: ViTCost = _as_cost(self.teacher, self.img_size, self.teacher_overrides)
        self.student_cost: ViTCost = _as_cost(self.student, self.img_size, self.student_overrides)
        t, s = self.teacher_cost, self.student_cost
        if self.tokens_per_image is None and t.grid != s.grid:
            raise ValueError(
                f"teacher patch grid {t.grid[0]}x{t.grid[1]} != student patch grid {s.grid[0]}x{s.grid[1]}; "
                "pass tokens_per_image to override"
            )
        self.d_t = int(self.d_t if self.d_t is not None else t.embed_dim)
        self.d_s = int(s.embed_dim)
        self.tokens_per_image = int(self.tokens_per_image if self.tokens_per_image is not None else s.num_patches)
        self.num_blocks = t.depth

    # ---- components (MACs) -------------------------------------------------------------
    @property
    def embed_macs(self) -> int:
        return self.teacher_cost.patch_embed_macs

    @property
    def block_macs(self) -> int:
        """One teacher block (the first; all blocks of a ViT are equal)."""
        return self.teacher_cost.block_macs[0]

    @property
    def final_norm_macs(self) -> int:
        return 0

    @property
    def student_forward_macs(self) -> int:
        return self.student_cost.forward_macs()

    @property
    def head_forward_macs(self) -> int:
        """Head forward on ``T + 1`` tokens (patch tokens + CLS)."""
        return head_macs(self.d_s, self.d_t, self.tokens_per_image + 1)

    @property
    def student_step_macs(self) -> int:
        """``3 * (F_student + F_head)``: student and head forward + backward."""
        return 3 * (self.student_forward_macs + self.head_forward_macs)

    @property
    def cka_macs(self) -> int:
        """Per-step CKA per image (0 if ``include_cka`` is False): linear CKA at width ``d_t``
        on ``T`` tokens + re-projecting the detached student patch tokens through the head."""
        if not self.include_cka:
            return 0
        return cka_macs(self.tokens_per_image, self.d_t) + head_macs(self.d_s, self.d_t, self.tokens_per_image)

    def teacher_macs(self, k: float) -> float:
        """Teacher forward to block ``k`` per image: ``F_embed + k F_block + final_norm``."""
        k = self._check_k(k)
        per_block = self.teacher_cost.block_macs
        if float(k).is_integer():
            blocks = sum(per_block[: int(k)])
        else:  # fractional k (a mean over a trajectory): mean block cost
            blocks = k * sum(per_block) / len(per_block)
        return self.embed_macs + blocks + self.final_norm_macs

    def step_macs(self, k: float) -> float:
        """``C(k)`` in MACs per image."""
        return self.teacher_macs(k) + self.student_step_macs + self.cka_macs

    # ---- FLOPs ---------------------------------------------------------------------
    def teacher_flops(self, k: float) -> float:
        """Teacher forward to block ``k``, FLOPs per image."""
        return 2 * self.teacher_macs(k)

    def step_flops(self, k: float) -> float:
        """``C(k)`` in FLOPs per image."""
        return 2 * self.step_macs(k)

    def baseline_teacher_flops(self) -> float:
        return self.teacher_flops(self.num_blocks)

    def baseline_step_flops(self) -> float:
        return self.step_flops(self.num_blocks)

    def _check_k(self, k: float) -> float:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0 <= k <= self.num_blocks:
            raise ValueError(f"target block k={k!r} out of range: expected 0 <= k <= {self.num_blocks}")
        return k

    def breakdown(self) -> dict[str, float]:
        """Per-image component costs in MACs (keys end in ``_macs``), for tables and JSON."""
        return {
            "teacher_embed_macs": self.embed_macs,
            "teacher_block_macs": self.block_macs,
            "teacher_full_macs": self.teacher_macs(self.num_blocks),
            "student_forward_macs": self.student_forward_macs,
            "student_step_macs": 3 * self.student_forward_macs,
            "head_forward_macs": self.head_forward_macs,
            "head_step_macs": 3 * self.head_forward_macs,
            "cka_macs": self.cka_macs,
            "step_full_depth_macs": self.step_macs(self.num_blocks),
        }


# --------------------------------------------------------------------------------------
# Trajectories and savings
# --------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """Target block per epoch (or per step), with optional weights (e.g. steps per epoch)."""

    blocks: list[float]
    weights: list[float] | None = None
    source: str = ""

    def mean(self) -> float:
        if not self.blocks:
            raise ValueError(f"empty trajectory{f' ({self.source})' if self.source else ''}")
        if self.weights is None:
            return math.fsum(self.blocks) / len(self.blocks)
        total = math.fsum(self.weights)
        if total <= 0:
            raise ValueError("trajectory weights sum to zero")
        return math.fsum(b * w for b, w in zip(self.blocks, self.weights)) / total


def _as_trajectory(trajectory: Any, weights: Sequence[float] | None = None) -> Trajectory:
    if isinstance(trajectory, Trajectory):
        return trajectory if weights is None else Trajectory(trajectory.blocks, list(weights), trajectory.source)
    if isinstance(trajectory, (str, bytes, os.PathLike)):
        traj = load_trajectory(trajectory)
        return traj if weights is None else Trajectory(traj.blocks, list(weights), traj.source)
    blocks = [float(b) for b in trajectory]
    if weights is not None and len(weights) != len(blocks):
        raise ValueError(f"{len(weights)} weights for a trajectory of {len(blocks)} entries")
    return Trajectory(blocks, None if weights is None else [float(w) for w in weights])


def _trajectory_from_records(records: list[dict[str, Any]], source: str) -> Trajectory:
    """Per-epoch blocks from epoch records (``mean_block`` if logged, else ``block``, weighted by
    ``steps`` when logged); per-step blocks from step records if there are no epoch records."""
    epochs: dict[Any, dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "epoch" and (r.get("mean_block") is not None or r.get("block") is not None):
            epochs[r.get("epoch", len(epochs))] = r  # a resumed run may log an epoch again: keep the last
    if epochs:
        recs = [epochs[e] for e in sorted(epochs, key=lambda e: (not isinstance(e, (int, float)), e))]
        blocks = [float(r["mean_block"] if r.get("mean_block") is not None else r["block"]) for r in recs]
        steps = [r.get("steps") for r in recs]
        weights = [float(s) for s in steps] if all(isinstance(s, (int, float)) and s > 0 for s in steps) else None
        return Trajectory(blocks, weights, source)
    steps_: dict[Any, float] = {}
    for r in records:
        if r.get("type") == "step" and r.get("block") is not None:
            steps_[r.get("step", len(steps_))] = float(r["block"])
    if steps_:
        return Trajectory([steps_[s] for s in sorted(steps_)], None, source)
    raise ValueError(f"{source}: no epoch or step records with a 'block' field")


_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read a target-block trajectory.

    Accepted: a run directory (reads its ``log.jsonl``); a ``.jsonl`` log (epoch records'
    ``mean_block``/``block``, or step records' ``block`` if no epoch records); a JSON list;
    a JSON object with key ``"blocks"`` (or ``"trajectory"``); or plain text of integers
    separated by whitespace and/or commas (``#`` starts a comment).

    Raises:
        FileNotFoundError: the path (or the run directory's ``log.jsonl``) does not exist.
        ValueError: the content is not a trajectory (the message names the file).
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = path.decode()
    if os.path.isdir(path):
        log = os.path.join(path, "log.jsonl")
        if not os.path.isfile(log):
            raise FileNotFoundError(f"trajectory: run directory {path} has no log.jsonl ({log} not found)")
        return _trajectory_from_records(read_jsonl(log)[0], log)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trajectory file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"trajectory file {path} is empty")
    if path.endswith(".jsonl") or (stripped.startswith("{") and "\n{" in stripped):
        return _trajectory_from_records(read_jsonl(path)[0], path)
    if stripped[0] in "[{":
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"trajectory file {path}: invalid JSON ({e})") from e
        if isinstance(obj, dict):
            key = next((k for k in ("blocks", "trajectory") if k in obj), None)
            if key is None:
                raise ValueError(f"trajectory file {path}: JSON object has no 'blocks' key (keys: {sorted(obj)})")
            obj = obj[key]
        if not isinstance(obj, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj
        ):
            raise ValueError(f"trajectory file {path}: expected a JSON list of numbers")
        if not obj:
            raise ValueError(f"trajectory file {path}: the list is empty")
        return Trajectory([float(v) for v in obj], None, path)
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for tok in re.split(r"[\s,;]+", line.split("#", 1)[0].strip()):
            if not tok:
                continue
            if not _NUM_RE.match(tok):
                raise ValueError(f"trajectory file {path}, line {lineno}: {tok!r} is not a number")
            values.append(float(tok))
    if not values:
        raise ValueError(f"trajectory file {path} holds no numbers")
    return Trajectory(values, None, path)


def savings(trajectory: Any, teacher: Any = None, student: Any = None, *,
            cost_model: CostModel | None = None, weights: Sequence[float] | None = None,
            include_cka: bool = True) -> dict[str, Any]:
    """FLOPs of a LEAP trajectory vs. the full-depth baseline (every step at ``k = L``).

    Args:
        trajectory: target block per epoch or per step (numbers, a :class:`Trajectory`, or a
            path accepted by :func:`load_trajectory`).
        teacher, student: as for :class:`CostModel` (ignored when ``cost_model`` is given).
        cost_model: a ready :class:`CostModel`.
        weights: optional weight per entry (e.g. steps per epoch).
        include_cka: count the per-step CKA in ``C(k)`` (both for LEAP and the baseline).

    Returns:
        dict with ``num_blocks`` (L), ``mean_block``, ``entries``, the per-image FLOPs
        ``teacher_flops`` / ``baseline_teacher_flops`` (teacher forward, mean over the
        trajectory / at L), ``step_flops`` / ``baseline_step_flops`` (``C``), and the savings
        ``teacher_only_saving = 1 - mean(k)/L`` (the paper's number),
        ``teacher_saving`` (teacher incl. patch embedding) and ``total_saving``
        (``1 - C(mean k)/C(L)``, student step, head and CKA included).
    """
    if cost_model is None:
        if teacher is None or student is None:
            raise TypeError("savings: pass teacher and student, or cost_model=")
        cost_model = CostModel(teacher, student, include_cka=include_cka)
    traj = _as_trajectory(trajectory, weights)
    L = cost_model.num_blocks
    bad = [b for b in traj.blocks if not 0 <= b <= L]
    if bad:
        raise ValueError(f"trajectory has blocks outside [0, {L}] (teacher depth): {bad[:5]}")
    mean_k = traj.mean()
    t, t_full = cost_model.teacher_flops(mean_k), cost_model.baseline_teacher_flops()
    c, c_full = cost_model.step_flops(mean_k), cost_model.baseline_step_flops()
    return {
        "num_blocks": L,
        "mean_block": mean_k,
        "entries": len(traj.blocks),
        "include_cka": cost_model.include_cka,
        "teacher_flops": t,
        "baseline_teacher_flops": t_full,
        "step_flops": c,
        "baseline_step_flops": c_full,
        "teacher_only_saving": 1.0 - mean_k / L,
        "teacher_saving": 1.0 - t / t_full,
        "total_saving": 1.0 - c / c_full,
    }


# --------------------------------------------------------------------------------------
# Per-epoch accounting for the trainer
# --------------------------------------------------------------------------------------


class TeacherFlopsTracker:
    """Running FLOP counters of a training run, per epoch and cumulative.

    Usage in the trainer::

        tracker = TeacherFlopsTracker(CostModel(teacher, student))
        ...
        tracker.add_step(k, batch_size)           # after every step (global batch under DDP)
        record.update(tracker.epoch_summary())    # at epoch end; resets the epoch counters

    All values are FLOPs (2 x MACs). "teacher" counts the teacher forward only
    (``F_embed + k F_block``); "step" counts the whole ``C(k)``. Baselines count the same
    steps at ``k = L``.
    """

    _KEYS = ("teacher_flops", "baseline_teacher_flops", "step_flops", "baseline_step_flops", "images", "steps")

    def __init__(self, cost_model: CostModel):
        self.cost_model = cost_model
        self._epoch = dict.fromkeys(self._KEYS, 0.0)
        self._total = dict.fromkeys(self._KEYS, 0.0)

    def add_step(self, k: float, batch_size: int) -> None:
        """Count one step at target block ``k`` on ``batch_size`` images."""
        cm = self.cost_model
        add = {
            "teacher_flops": batch_size * cm.teacher_flops(k),
            "baseline_teacher_flops": batch_size * cm.baseline_teacher_flops(),
            "step_flops": batch_size * cm.step_flops(k),
            "baseline_step_flops": batch_size * cm.baseline_step_flops(),
            "images": batch_size,
            "steps": 1,
        }
        for d in (self._epoch, self._total):
            for key, v in add.items():
                d[key] += v

    def add_teacher_blocks(self, blocks: int, batch_size: int) -> None:
        """Count extra teacher work (e.g. the calibration scan of all blocks) on ``batch_size``
        images; it has no baseline counterpart, so it lowers the savings."""
        extra = batch_size * (self.cost_model.teacher_flops(blocks))
        for d in (self._epoch, self._total):
            d["teacher_flops"] += extra
            d["step_flops"] += extra

    @staticmethod
    def _summarize(d: Mapping[str, float], prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}": (int(v) if k in ("images", "steps") else v) for k, v in d.items()}
        bt, bs = d["baseline_teacher_flops"], d["baseline_step_flops"]
        out[f"{prefix}saved_fraction"] = 1.0 - d["teacher_flops"] / bt if bt else 0.0
        out[f"{prefix}total_saved_fraction"] = 1.0 - d["step_flops"] / bs if bs else 0.0
        return out

    def totals(self) -> dict[str, float]:
        """Cumulative counters since construction (or :meth:`load_state_dict`)."""
        return self._summarize(self._total)

    def epoch_summary(self, reset: bool = True) -> dict[str, float]:
        """This epoch's counters (``teacher_flops``, ``baseline_teacher_flops``, ``saved_fraction``,
        ``step_flops``, ``baseline_step_flops``, ``total_saved_fraction``, ``images``, ``steps``)
        plus the cumulative ones prefixed ``cumulative_``; resets the epoch counters."""
        out = {**self._summarize(self._epoch), **self._summarize(self._total, "cumulative_")}
        if reset:
            self._epoch = dict.fromkeys(self._KEYS, 0.0)
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"epoch": dict(self._epoch), "total": dict(self._total)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        for name in ("epoch", "total"):
            d = dict.fromkeys(self._KEYS, 0.0)
            d.update({k: float(v) for k, v in state.get(name, {}).items() if k in d})
            setattr(self, f"_{name}", d)


# --------------------------------------------------------------------------------------
# Measured step times
# --------------------------------------------------------------------------------------


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_step_times(teacher: nn.Module, student: nn.Module, ks: Iterable[int], batch_size: int = 32,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                       warmup: int = 2, repeats: int = 5, cls_weight: float = 0.05,
                       include_cka: bool = True, normalize: bool = False) -> dict[int, float]:
    """Time one LEAP training step per distinct target block ``k``.

    One step: teacher forward to block ``k`` (no grad), student forward (autocast to
    ``dtype`` when it is bf16/fp16) + ``leap_kernels.fused_feature_loss`` on patch tokens
    ``+ cls_weight *`` on CLS through one ``Linear(D_s -> D_t)`` head, backward, an AdamW
    step, and (``include_cka``) the per-step CKA on the re-projected student.

    Args:
        teacher: :class:`leap.teacher.TruncatedTeacher`, or a timm ViT that is wrapped in one
            (which casts it to ``dtype``, freezes it and puts it in eval mode **in place**).
            It is moved to ``device``.
        student: timm ViT; a deep copy is trained, the original is left untouched.
        ks: target blocks to time (duplicates are timed once).
        batch_size: images per step (random inputs at the teacher's image size).
        device: e.g. ``"cuda"`` or ``"cpu"``.
        dtype: teacher dtype and student autocast dtype (default bf16 on CUDA, fp32 on CPU).
        warmup, repeats: untimed steps per ``k``, then timed steps (median reported); the
            timed steps run in interleaved rounds over all ``k``.
        cls_weight: weight of the CLS loss term (paper: 0.05).
        include_cka: also compute the per-step CKA (as LEAP does).
        normalize: token-normalized MSE instead of the paper's plain MSE.

    Returns:
        ``{k: seconds per step}`` (median of ``repeats``); CUDA events on GPU,
        ``time.perf_counter`` on CPU.
    """
    from leap_kernels import FeatureDistillationHead

    from .curriculum import linear_cka
    from .teacher import TruncatedTeacher
    from .train import DistillModule

    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    if not isinstance(teacher, TruncatedTeacher):
        teacher = TruncatedTeacher(_unwrap(teacher).to(device), dtype=dtype)
    teacher = teacher.to(device)
    ks = sorted({int(k) for k in ks})
    for k in ks:
        teacher._check_k(k)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")

    use_amp = dtype in (torch.bfloat16, torch.float16)
    s_model = copy.deepcopy(_unwrap(student))
    head = FeatureDistillationHead(int(s_model.embed_dim), teacher.embed_dim, normalize=normalize)
    # The trainer's own student + head + loss composition (patch loss + cls_weight * CLS loss).
    module = DistillModule(s_model, head, cls_weight, compute_dtype=dtype if use_amp else None).to(device).train()
    opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6, **opt_kwargs)
    h, w = _pair(teacher.model.patch_embed.img_size)
    x = torch.randn(batch_size, 3, h, w, device=device)

    def step(k: int) -> None:
        t_patch, t_cls = teacher(x, k)
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss, _, _, s_patch = module(x, t_patch, t_cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if include_cka:
            with torch.no_grad():
                linear_cka(module.head.project(s_patch), t_patch)
        opt.step()

    cuda = device.type == "cuda"

    def timed(k: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            step(k)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        step(k)
        return time.perf_counter() - t0

    # Warm up every k first, then time in interleaved rounds so slow drift (clocks, other
    # load) affects all blocks alike.
    for k in ks:
        for _ in range(warmup):
            step(k)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            samples[k].append(timed(k))
    times = {k: statistics.median(v) for k, v in samples.items()}
    return times


def _interp_time(k: float, step_times: Mapping[int, float]) -> float:
    """Step time at ``k``: the measured one, else linear interpolation between measured
    neighbours, else a least-squares line through all points (teacher cost is linear in k)."""
    pts = sorted((float(a), float(b)) for a, b in step_times.items())
    for a, b in pts:
        if a == k:
            return b
    if len(pts) < 2:
        raise ValueError(f"step time for k={k} not measured and cannot be interpolated from one point")
    for (a0, b0), (a1, b1) in zip(pts, pts[1:]):
        if a0 < k < a1:
            return b0 + (b1 - b0) * (k - a0) / (a1 - a0)
    n = len(pts)
    mx, my = sum(a for a, _ in pts) / n, sum(b for _, b in pts) / n
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    slope = sum((a - mx) * (b - my) for a, b in pts) / sxx
    return my + slope * (k - mx)


def wall_clock_savings(trajectory: Any, step_times: Mapping[int, float], num_blocks: int | None = None, *,
                       weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Realized time saving of a trajectory vs. every step at the last block.

    Args:
        trajectory: target block per epoch or per step (as for :func:`savings`).
        step_times: ``{k: seconds per step}`` from :func:`measure_step_times`. Blocks of the
            trajectory that were not measured are interpolated linearly.
        num_blocks: L (default: the largest measured ``k``).
        weights: optional weight per trajectory entry.

    Returns:
        dict with ``num_blocks``, ``mean_step_time_s`` (weighted mean over the trajectory),
        ``baseline_step_time_s`` (time at L), ``saving = 1 - mean/baseline``, and
        ``interpolated`` (blocks whose time was interpolated).
    """
    if not step_times:
        raise ValueError("wall_clock_savings: step_times is empty")
    traj = _as_trajectory(trajectory, weights)
    L = int(num_blocks if num_blocks is not None else max(step_times))
    w = traj.weights or [1.0] * len(traj.blocks)
    cache: dict[float, float] = {}
    for b in set(traj.blocks) | {float(L)}:
        cache[b] = _interp_time(b, step_times)
    mean_t = math.fsum(cache[b] * wi for b, wi in zip(traj.blocks, w)) / math.fsum(w)
    base = cache[float(L)]
    measured = {float(k) for k in step_times}
    return {
        "num_blocks": L,
        "mean_block": traj.mean(),
        "mean_step_time_s": mean_t,
        "baseline_step_time_s": base,
        "saving": 1.0 - mean_t / base,
        "interpolated": sorted(b for b in cache if b not in measured),
    }


# --------------------------------------------------------------------------------------
# CLI: leap flops
# --------------------------------------------------------------------------------------


def _unit(largest_macs: float) -> tuple[str, float]:
    """Table unit prefix for costs up to ``largest_macs`` (G for real models, M/K for toys)."""
    for prefix, scale in (("G", 1e9), ("M", 1e6)):
        if largest_macs >= scale:
            return prefix, scale
    return "", 1.0


def _parse_overrides(text: str | None, flag: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"{flag}: invalid JSON ({e}): {text!r}")
    if not isinstance(obj, dict):
        parser.error(f"{flag}: expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return obj


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leap flops",
        description="Per-image FLOPs of a LEAP teacher/student pair and the savings of a curriculum "
                    "trajectory vs. the full-depth baseline (models are built on the meta device; "
                    "nothing is allocated unless --measure).",
    )
    p.add_argument("--teacher", required=True, help="teacher model name, e.g. vit_giant_patch14_reg4_dinov2")
    p.add_argument("--student", required=True, help="student model name, e.g. vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=224, help="square input size (default 224)")
    p.add_argument("--trajectory", metavar="FILE",
                   help="target block per epoch/step: text of ints (whitespace/comma separated), a JSON "
                        "list, a JSON object with 'blocks', a log.jsonl or a run directory")
    p.add_argument("--no-cka", action="store_true", help="leave the per-step CKA out of C(k)")
    p.add_argument("--measure", action="store_true",
                   help="also time one training step per distinct block of the trajectory and report the "
                        "wall-clock saving (allocates the models: use a GPU for large ones)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for --measure (default 32)")
    p.add_argument("--device", default="auto", help="device for --measure: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per block for --measure (default 5)")
    p.add_argument("--teacher-overrides", metavar="JSON", help="extra build_model kwargs for the teacher")
    p.add_argument("--student-overrides", metavar="JSON", help="extra build_model kwargs for the student")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def main_flops(argv: Sequence[str] | None = None) -> int:
    """``leap flops``: print per-image costs and the savings of a trajectory. Returns an exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    t_ov = _parse_overrides(args.teacher_overrides, "--teacher-overrides", parser)
    s_ov = _parse_overrides(args.student_overrides, "--student-overrides", parser)
    if args.img_size < 1:
        parser.error(f"--img-size must be positive, got {args.img_size}")
    try:
        cm = CostModel(args.teacher, args.student, include_cka=not args.no_cka, img_size=args.img_size,
                       teacher_overrides=t_ov, student_overrides=s_ov)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    traj = None
    if args.trajectory:
        try:
            traj = load_trajectory(args.trajectory)
        except (OSError, ValueError) as e:
            parser.error(str(e))
    elif args.measure:
        parser.error("--measure needs --trajectory")

    result: dict[str, Any] = {
        "teacher": args.teacher, "student": args.student, "img_size": args.img_size,
        "teacher_tokens": cm.teacher_cost.tokens, "student_tokens": cm.student_cost.tokens,
        "num_blocks": cm.num_blocks, "costs_macs": cm.breakdown(),
    }
    if traj is not None:
        try:
            result["savings"] = savings(traj, cost_model=cm)
        except ValueError as e:
            parser.error(f"{args.trajectory}: {e}")
    if args.measure:
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from .models import build_model

        dev = torch.device(device)
        with dev:  # initialize directly on the device (a ViT-g inits slowly on CPU)
            teacher = build_model(args.teacher, img_size=args.img_size, **t_ov)
            student = build_model(args.student, img_size=args.img_size, **s_ov)
        ks = sorted({int(round(b)) for b in traj.blocks} | {cm.num_blocks})
        times = measure_step_times(teacher, student, ks, batch_size=args.batch_size, device=dev,
                                   repeats=args.repeats, include_cka=not args.no_cka)
        result["step_times_s"] = {str(k): v for k, v in times.items()}
        result["device"] = str(dev)
        result["batch_size"] = args.batch_size
        result["wall_clock"] = wall_clock_savings(traj, times, cm.num_blocks)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_tables(result, cm)
    return 0


def _print_tables(result: dict[str, Any], cm: CostModel, out=None) -> None:
    out = out or sys.stdout
    b = result["costs_macs"]
    L = cm.num_blocks
    T = cm.tokens_per_image
    print(f"teacher {result['teacher']} ({L} blocks, width {cm.d_t}, {result['teacher_tokens']} tokens), "
          f"student {result['student']} ({cm.student_cost.depth} blocks, width {cm.d_s}, "
          f"{result['student_tokens']} tokens), {result['img_size']} px", file=out)
    rows = [
        ("teacher patch embed", b["teacher_embed_macs"]),
        ("teacher block (one)", b["teacher_block_macs"]),
        (f"teacher full ({L} blocks)", b["teacher_full_macs"]),
        ("student forward", b["student_forward_macs"]),
        ("student step (3x fwd)", b["student_step_macs"]),
        (f"head forward ({T + 1} tokens)", b["head_forward_macs"]),
        ("head step (3x fwd)", b["head_step_macs"]),
        ("CKA per step" + ("" if cm.include_cka else " (off)"), b["cka_macs"]),
        (f"C(L): full-depth step", b["step_full_depth_macs"]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    prefix, scale = _unit(b["step_full_depth_macs"])
    print(f"\n{'per-image cost':<{width}}{prefix + 'MACs':>10}{prefix + 'FLOPs':>10}", file=out)
    for name, macs in rows:
        print(f"{name:<{width}}{macs / scale:10.3f}{2 * macs / scale:10.3f}", file=out)
    s = result.get("savings")
    if s:
        print(f"\ntrajectory: {s['entries']} entries, mean target block {s['mean_block']:.2f} of {L}", file=out)
        print(f"  teacher-only saving (1 - mean k / L):          {100 * s['teacher_only_saving']:6.2f}%", file=out)
        print(f"  teacher forward saving (incl. patch embed):    {100 * s['teacher_saving']:6.2f}%", file=out)
        print(f"  total saving (incl. student step, head, CKA):  {100 * s['total_saving']:6.2f}%", file=out)
    else:
        print("\n(no --trajectory given: no savings computed)", file=out)
    if "step_times_s" in result:
        print(f"\nmeasured step time ({result['device']}, batch {result['batch_size']}):", file=out)
        for k, v in result["step_times_s"].items():
            print(f"  k = {k:>3}: {1000 * v:9.2f} ms", file=out)
        wc = result["wall_clock"]
        print(f"  wall-clock saving vs all steps at k = {L}:    {100 * wc['saving']:6.2f}%", file=out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_flops())
