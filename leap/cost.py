"""The analytic cost model of LEAP: per-image MACs/FLOPs of a ViT, of one training step at target
block ``k``, the savings of a curriculum trajectory, and the per-epoch FLOP counters of the trainer.

Nothing here runs a model: costs are read from module shapes (``meta``-device models work).

Conventions
-----------
* Costs are **per image** and counted analytically from a timm ``VisionTransformer``'s or
  ``Eva``'s (DINOv3) configuration (module shapes; works on ``meta``-device models, so a ViT-g or
  a ViT-7B never has to be allocated). ``*_macs`` functions return multiply-accumulates, ``*_flops``
  return ``FLOPs = 2 * MACs``.
* Only matrix products are counted: every ``nn.Linear`` (qkv, attention output projection,
  MLP ``fc1``/``fc2``; a packed SwiGLU ``fc1`` is ``D -> 2H``, an unpacked one (the DINOv3 7B and
  H+) is two ``D -> H`` layers ``fc1_g``, ``fc1_x``), the patch-embedding convolution, and the two
  attention products ``Q K^T`` and ``A V`` (``N^2 * D_attn`` MACs each, summed over heads). Norms,
  softmax, activations, the GLU gate multiply, LayerScale, residual adds and biases are elementwise
  and not counted (about 1% of a ViT block). This is the same convention as
  :class:`torch.utils.flop_counter.FlopCounterMode`, which the tests check it against.
  The teacher's final LayerNorm (applied after block ``k``) is therefore 0 here too.
* The one elementwise exception is the rotary position embedding of a DINOv3 block (``rope`` in the
  block breakdown): ``x cos + rot(x) sin`` on every channel of q and k of the ``N - P`` patch tokens,
  counted as 2 MACs per rotated element, ``4 (N - P) D_attn`` per block (0.1% of a ViT-7B block;
  FlopCounterMode does not count it).
* A ViT at image size ``H x W`` with patch ``p`` runs ``N = P + (H/p)(W/p)`` tokens, where
  ``P = num_prefix_tokens`` (CLS + registers; a ViT-g/14 reg4 at 224 px: N = 5 + 256 = 261; a DINOv3
  ViT/16 at 224 px, CLS + 4 storage tokens: N = 5 + 196 = 201).

Savings formula (spec section 6)
--------------------------------
Per image and training step with the teacher target at block ``k`` of ``L``::

    C(k) = F_embed + k * F_block + 3 * (F_student + F_head) [+ F_cka]

* ``F_embed``: teacher patch embedding; ``F_block``: one teacher block (the teacher's final
  norm is elementwise and counts 0, see above).
* ``3 * (...)``: student forward + backward (backward ~ 2x forward) of the student ViT
  and of the ``Linear(D_s -> D_t)`` head on ``T + 1`` tokens (``T`` patch tokens + CLS).
* ``F_cka`` (``include_cka=True``): the per-step linear CKA in feature space on the ``T``
  patch tokens of the image, ``X^T Y, X^T X, Y^T Y`` = ``3 T D_t^2`` MACs, plus centering
  (``2 T D_t``) and the three Frobenius norms (``3 D_t^2``), plus re-projecting the detached
  student patch tokens through the head (``T D_s D_t``; the fused loss never materializes
  the projection). The one-off calibration scan of the first step is not part of any saving:
  the trainer reports it apart (``calibration_fraction``: its FLOPs over the baseline teacher FLOPs).

Because ``C`` is linear in ``k``, the mean cost of a trajectory ``k_1..k_n`` (target block
per epoch or per step, optionally weighted by steps) is ``C(mean k)``, and the savings vs.
the full-depth baseline (every step at ``k = L``, same cost model) are:

* ``teacher_only_saving = 1 - mean(k) / L`` -- teacher blocks only. This is the number the
  LEAP paper reports (25.1% for ViT-g -> ViT-S: mean target block about 30 of 40).
* ``teacher_saving = 1 - (F_embed + mean(k) F_block) / (F_embed + L F_block)`` -- whole
  teacher forward (patch embedding included); a hair below the previous one.
* ``total_saving = 1 - C(mean k) / C(L)`` -- including the student step, head and CKA
  (about 23.4% for the paper's ViT-S run).

Measured wall-clock savings (:mod:`leap.run.timing`) are lower still: data loading, the optimizer
and kernel overheads do not shrink with ``k``.

Why this module is long: about a fifth of it is this description of the cost model, which
the README and the tests refer to; the code is the ViT cost reader, ``CostModel``,
``savings`` and the trainer's FLOP counters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ModelError, RunLogError
from .runlog import Trajectory
from .vit import FAMILIES, unwrap_vit

__all__ = ["ViTCost", "vit_cost", "pair", "head_macs", "cka_macs", "CostModel", "savings", "TeacherFlopsTracker"]

# --------------------------------------------------------------------------------------
# Analytic per-image costs of a timm ViT
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTCost:
    """Configuration and analytic per-image MACs of one timm ``VisionTransformer`` or ``Eva``.

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
            ``attn_values`` (AV), ``attn_proj``, ``mlp``, ``rope`` (rotary embedding, DINOv3),
            ``other``).
        rope: the blocks rotate q and k (DINOv3).
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
    rope: bool = False

    def forward_macs(self, blocks: int | None = None) -> int:
        """Patch embed + the first ``blocks`` blocks (all if None)."""
        n = self.depth if blocks is None else _check_blocks(blocks, self.depth)
        return self.patch_embed_macs + sum(self.block_macs[:n])


def pair(v: Any) -> tuple[int, int]:
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


def _block_breakdown(block: nn.Module, tokens: int, rotated: int = 0) -> dict[str, int]:
    """MACs of one transformer block on ``tokens`` tokens, by part; ``rotated``: tokens whose q and k
    are rotated (the patch tokens of a DINOv3 block, else 0)."""
    parts = {"qkv": 0, "attn_scores": 0, "attn_values": 0, "attn_proj": 0, "mlp": 0, "rope": 0, "other": 0}
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
        if (
            hasattr(mod, "num_heads")
            and hasattr(mod, "head_dim")
            and (hasattr(mod, "qkv") or hasattr(mod, "q_proj") or hasattr(mod, "q"))
        ):
            inner = int(mod.num_heads) * int(mod.head_dim)
            parts["attn_scores"] += tokens * tokens * inner
            parts["attn_values"] += tokens * tokens * inner
            parts["rope"] += 2 * 2 * rotated * inner  # q and k, 2 MACs per element
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
        model: a timm ``VisionTransformer`` or ``Eva`` (DINOv3; any device, ``meta`` included), a
            wrapper holding it as ``.model`` (:class:`leap.teacher.TruncatedTeacher`), or a
            :class:`ViTCost` (returned unchanged).
    """
    if isinstance(model, ViTCost):
        return model
    vit = unwrap_vit(model)
    pe = vit.patch_embed
    patch = pair(pe.patch_size)
    img = pair(pe.img_size)
    grid = pair(pe.grid_size)
    num_patches = grid[0] * grid[1]
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    tokens = prefix + num_patches
    blocks = list(vit.blocks)
    if not blocks:
        raise ValueError("model has no transformer blocks")
    rope = any(f.matches(vit) and f.has_rope(vit) for f in FAMILIES)
    per_block = [_block_breakdown(b, tokens, num_patches if rope else 0) for b in blocks]
    hidden, kind = _mlp_info(blocks[0])
    attn = getattr(blocks[0], "attn", None)
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
        rope=rope,
    )


def head_macs(d_s: int, d_t: int, tokens: int) -> int:
    """MACs of the ``Linear(d_s -> d_t)`` projection head on ``tokens`` tokens."""
    return int(tokens) * int(d_s) * int(d_t)


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


# --------------------------------------------------------------------------------------
# Cost model of one LEAP step
# --------------------------------------------------------------------------------------


def _build_meta(name: str, img_size: int, overrides: Mapping[str, Any] | None) -> nn.Module:
    """Build a named model on the ``meta`` device (shapes only, nothing allocated)."""
    from .models import build_model

    try:
        with torch.device("meta"):
            return build_model(name, img_size=img_size, **dict(overrides or {}))
    except AssertionError as e:  # timm's shape checks, e.g. "dim should be divisible by num_heads"
        from .errors import ModelError

        raise ModelError(f"{name!r} with arguments {dict(overrides or {})}: {e}") from None


def _as_cost(model: Any, img_size: int, overrides: Mapping[str, Any] | None = None) -> ViTCost:
    if isinstance(model, str):
        return vit_cost(_build_meta(model, img_size, overrides))
    return vit_cost(model)


@dataclass
class CostModel:
    """Per-image cost of one LEAP training step as a function of the target block ``k``.

    ``C(k) = F_embed + k * F_block + 3 * (F_student + F_head) [+ F_cka]``
    (the teacher's final norm is elementwise and counts 0; see the module docstring).

    Args:
        teacher, student: timm ViTs (``meta`` device is fine), wrappers with ``.model``,
            :class:`ViTCost` objects, or model names for :func:`leap.models.build_model`
            (built on the ``meta`` device at ``img_size`` with ``*_overrides``).
        d_t: target width (default: the teacher's ``embed_dim``).
        tokens_per_image: patch tokens per image ``T`` (default: the student's patch count).
            The head runs on ``T + 1`` tokens (patches + CLS), CKA on ``T``.
        include_cka: count the per-step CKA (``F_cka``).
        concat_teacher_last: ``--concat-teacher-last``: the teacher runs to block ``L`` at every
            step whatever ``k`` (``C(k) = C(L)``) and the head is ``Linear(D_s -> 2 D_t)``.

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
    concat_teacher_last: bool = False

    def __post_init__(self) -> None:
        self.teacher_cost: ViTCost = _as_cost(self.teacher, self.img_size, self.teacher_overrides)
        self.student_cost: ViTCost = _as_cost(self.student, self.img_size, self.student_overrides)
        t, s = self.teacher_cost, self.student_cost
        if self.tokens_per_image is None and t.grid != s.grid:
            raise ModelError(
                f"teacher patch grid {t.grid[0]}x{t.grid[1]} != student patch grid {s.grid[0]}x{s.grid[1]} "
                f"(patch sizes {t.patch_size[0]} and {s.patch_size[0]} at {self.img_size} px): "
                "give both models the same "
                "patch size, e.g. with --teacher-overrides / --student-overrides '{\"patch_size\": 14}'"
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
    def student_forward_macs(self) -> int:
        return self.student_cost.forward_macs()

    @property
    def head_forward_macs(self) -> int:
        """Head forward on ``T + 1`` tokens (patch tokens + CLS); ``2 D_t`` wide for the concat target."""
        return head_macs(self.d_s, self.d_t * (2 if self.concat_teacher_last else 1), self.tokens_per_image + 1)

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

    def teacher_blocks(self, k: float) -> float:
        """Teacher blocks run per image at target block ``k``: ``k``, or ``L`` with ``concat_teacher_last``."""
        k = self._check_k(k)
        return self.num_blocks if self.concat_teacher_last else k

    def teacher_macs(self, k: float) -> float:
        """Teacher forward to block ``k`` per image: ``F_embed + k F_block`` (``k = L`` for the concat target)."""
        k = self.teacher_blocks(k)
        per_block = self.teacher_cost.block_macs
        if float(k).is_integer():
            blocks = sum(per_block[: int(k)])
        else:  # fractional k (a mean over a trajectory): mean block cost
            blocks = k * sum(per_block) / len(per_block)
        return self.embed_macs + blocks

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
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, float))
            or not math.isfinite(k)
            or not 0 <= k <= self.num_blocks
        ):
            raise ValueError(f"target block k={k!r} out of range: expected 0 <= k <= {self.num_blocks}")
        return k

    def run_flops(self, steps: float, teacher_blocks_run: float) -> dict[str, float]:
        """Per-image FLOPs of ``steps`` training steps whose teacher ran ``teacher_blocks_run``
        blocks in total (a calibration scan included), and of the same steps at full depth.

        Returns ``{"teacher", "baseline_teacher", "step", "baseline_step"}``.
        """
        teacher = 2 * (steps * self.embed_macs + teacher_blocks_run * self.block_macs)
        baseline = 2 * steps * self.teacher_macs(self.num_blocks)
        rest = 2 * steps * (self.student_step_macs + self.cka_macs)
        return {
            "teacher": teacher,
            "baseline_teacher": baseline,
            "step": teacher + rest,
            "baseline_step": baseline + rest,
        }

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


def savings(
    trajectory: Any,
    teacher: Any = None,
    student: Any = None,
    *,
    cost_model: CostModel | None = None,
    weights: Sequence[float] | None = None,
    include_cka: bool = True,
) -> dict[str, Any]:
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
        ``teacher_only_saving = 1 - mean(k)/L`` (the paper's number; 0 with ``concat_teacher_last``),
        ``teacher_saving`` (teacher incl. patch embedding) and ``total_saving``
        (``1 - C(mean k)/C(L)``, student step, head and CKA included).
    """
    if cost_model is None:
        if teacher is None or student is None:
            raise TypeError("savings: pass teacher and student, or cost_model=")
        cost_model = CostModel(teacher, student, include_cka=include_cka)
    traj = Trajectory.of(trajectory, weights)
    L = cost_model.num_blocks
    bad = [b for b in traj.blocks if not 0 <= b <= L]
    if bad:
        raise RunLogError(f"trajectory has blocks outside [0, {L}] (teacher depth): {bad[:5]}")
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
        "teacher_only_saving": 1.0 - cost_model.teacher_blocks(mean_k) / L,
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

    _KEYS = (
        "teacher_flops",
        "baseline_teacher_flops",
        "step_flops",
        "baseline_step_flops",
        "calibration_flops",
        "images",
        "steps",
    )

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
        """Count the calibration scan (all blocks, once) on ``batch_size`` images. It is kept apart
        (``calibration_flops``, ``calibration_fraction`` = its share of the baseline teacher FLOPs):
        ``saved_fraction`` always compares the training steps with the same steps at full depth,
        the one definition used by the summary, the report and ``leap flops``."""
        extra = batch_size * (self.cost_model.teacher_flops(blocks))
        for d in (self._epoch, self._total):
            d["calibration_flops"] += extra

    @staticmethod
    def _summarize(d: Mapping[str, float], prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}": (int(v) if k in ("images", "steps") else v) for k, v in d.items()}
        bt, bs = d["baseline_teacher_flops"], d["baseline_step_flops"]
        out[f"{prefix}saved_fraction"] = 1.0 - d["teacher_flops"] / bt if bt else 0.0
        out[f"{prefix}total_saved_fraction"] = 1.0 - d["step_flops"] / bs if bs else 0.0
        out[f"{prefix}calibration_fraction"] = d["calibration_flops"] / bt if bt else 0.0
        return out

    def totals(self) -> dict[str, float]:
        """Cumulative counters since construction (or :meth:`load_state_dict`)."""
        return self._summarize(self._total)

    def epoch_summary(self) -> dict[str, float]:
        """This epoch's counters (``teacher_flops``, ``baseline_teacher_flops``, ``saved_fraction``,
        ``step_flops``, ``baseline_step_flops``, ``total_saved_fraction``, ``images``, ``steps``)
        plus the cumulative ones prefixed ``cumulative_``; resets the epoch counters."""
        out = {**self._summarize(self._epoch), **self._summarize(self._total, "cumulative_")}
        self._epoch = dict.fromkeys(self._KEYS, 0.0)
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"epoch": dict(self._epoch), "total": dict(self._total)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        for name in ("epoch", "total"):
            d = dict.fromkeys(self._KEYS, 0.0)
            d.update({k: float(v) for k, v in state.get(name, {}).items() if k in d})
            setattr(self, f"_{name}", d)
