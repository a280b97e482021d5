"""The feature extractor shared by every evaluation (kNN, linear probe, retrieval).

A model comes from one of:

- a run directory (its ``checkpoint.pt``: the student of ``leap distill``);
- a checkpoint file: a ``leap distill`` checkpoint (the student) or a ``leap train-teacher``
  file (the model it trained);
- a teacher: ``--teacher NAME --teacher-weights FILE`` (official DINOv2, Hugging Face or timm
  layout), optionally cut at block ``K`` (``--block K``: patch embed, blocks 1..K, final norm);
- raw pixels (a baseline: the channel mean of the normalized image, flattened).

One forward pass per image gives both features, taken after the model's final norm:
``cls`` = the CLS token ``(D,)``, ``patch`` = the mean of the patch tokens ``(D,)`` (registers
excluded). They are cached on disk (:mod:`.cache`; fp16, or fp32 where a value would not fit fp16) under a key
made of the checkpoint's SHA-256, the model recipe and block, the dataset's identity, the split,
the transform and the precision, so a second evaluation of the same model and data reads them back.

A checkpoint's embedded model recipe is untrusted input: only the model-shape keys in
:data:`ALLOWED_MODEL_KEYS`, with plain values, reach model construction (e.g. a crafted
``pretrained_cfg_overlay`` is refused).

Why this module is long: the four model sources, the untrusted-recipe filter and the transform
all meet in the one extraction pass, and the cache key must name every one of them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import vit
from ..checkpoint import CHECKPOINT_FORMAT, TEACHER_META_KEY, check_finite_weights
from ..config_checks import check_model_overrides
from ..errors import CheckpointError, ConfigError
from ..models import build_model, load_teacher_weights
from .cache import FeatureCache, read_hashed
from .errors import EvaluationError
from .extraction import ExtractionPass, to_storage
from .transforms import eval_transform

__all__ = [
    "ALLOWED_MODEL_KEYS",
    "FEATURE_KINDS",
    "LoadedModel",
    "load_model",
    "sanitize_model_kwargs",
    "eval_transform",
    "extract_features",
]

FEATURE_KINDS = ("cls", "patch")

#: Model-construction keys a checkpoint's recipe may set (timm ``VisionTransformer`` shape and
#: layout arguments). Anything else, e.g. ``pretrained_cfg_overlay`` or ``pretrained_cfg``
#: (which can point timm at files or URLs), is refused.
ALLOWED_MODEL_KEYS = frozenset(
    {
        "patch_size",
        "depth",
        "embed_dim",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "proj_bias",
        "init_values",
        "class_token",
        "reg_tokens",
        "no_embed_class",
        "pos_embed",
        "pre_norm",
        "final_norm",
        "fc_norm",
        "global_pool",
        "in_chans",
        "dynamic_img_size",
        "dynamic_img_pad",
        "act_layer",
        # regularization: no effect in eval mode, but a run may have been trained with it
        "drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
    }
)

# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """A model ready for feature extraction.

    Attributes:
        extractor: module mapping images ``(B, 3, H, W)`` to ``(cls (B, D), patch (B, D))``.
        img_size: the model's input resolution (square).
        patch_size: its patch size (1 for pixels).
        description: human-readable, e.g. ``"student vit_small_patch14_dinov2 (leap distill, step 500)"``.
        identity: what the features depend on (goes into the cache key and the records):
            kind, name, recipe, block, checkpoint path and SHA-256.
        run_dir: the run directory the model belongs to (records go there), or ``None``.
        training: for a ``leap distill`` checkpoint, where the run was when it was written: ``epoch``
            (completed epochs), ``step``, ``teacher_flops`` (teacher FLOPs spent so far), each ``None``
            when the checkpoint does not say; the learning curves of ``leap report`` read it.
    """

    extractor: nn.Module
    img_size: int
    patch_size: int
    description: str
    identity: dict[str, Any]
    run_dir: str | None = None
    training: dict[str, Any] | None = None

    def record_info(self) -> dict[str, Any]:
        """The ``model`` part of an evaluation record."""
        return {
            "description": self.description,
            "source": self.identity.get("checkpoint"),
            "checkpoint_sha256": self.identity.get("checkpoint_sha256"),
            "kind": self.identity["kind"],
            "name": self.identity.get("name"),
            "block": self.identity.get("block"),
            "img_size": self.img_size,
            **({"training": self.training} if self.training else {}),
        }


class TokenFeatures(nn.Module):
    """Wraps a timm ViT: images ``(B, 3, H, W)`` -> ``(cls (B, D), patch (B, D))`` after the final norm.

    ``block=K`` (1-indexed) runs patch embed, blocks 1..K and the final norm (the LEAP target of
    block K); ``None`` runs the whole model (``forward_features``).
    """

    def __init__(self, model: nn.Module, block: int | None = None):
        super().__init__()
        if getattr(model, "cls_token", None) is None:
            raise EvaluationError(f"{type(model).__name__} has no CLS token; CLS features need class_token=True")
        self._family = vit.family_of(model, "TokenFeatures")
        depth = len(self._family.blocks(model))
        if block is not None and not 1 <= block <= depth:
            raise EvaluationError(f"--block: expected 1 <= K <= {depth} (the model's depth), got {block}")
        self.vit = model
        self.block = None if block in (None, depth) else int(block)
        self.prefix = self._family.num_prefix_tokens(model)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm (block K's when cut), ``(B, prefix + H/p * W/p, D)``."""
        m, family = self.vit, self._family
        if self.block is None:
            return m.forward_features(x)
        return family.final_norm(m, family.run_blocks(m, x, self.block))  # forward_features, stopped after block K

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens alone (CLS and registers dropped), row-major over the grid: ``(B, H/p * W/p, D)``."""
        return self.tokens(x)[:, self.prefix :]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(x)
        return tokens[:, 0], tokens[:, self.prefix :].mean(dim=1)


class PixelFeatures(nn.Module):
    """Raw-pixel baseline: ``(B, C, H, W)`` -> the channel mean flattened, ``(B, H*W)``, as both features."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.mean(dim=1).flatten(1)
        return flat, flat

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Each pixel a token of its normalized channels: ``(B, C, H, W)`` -> ``(B, H * W, C)``."""
        return x.flatten(2).transpose(1, 2)


def sanitize_model_kwargs(kwargs: Any, source: str) -> dict[str, Any]:
    """Keep a model recipe to :data:`ALLOWED_MODEL_KEYS` with plain values, or raise.

    Args:
        kwargs: a dict of model arguments (``None`` = none).
        source: where it came from, for the message (e.g. ``"checkpoint runs/x/checkpoint.pt"``).

    Raises:
        EvaluationError: not a dict, a key outside the allowed set, or a value that is not a
            bool/int/float/str/None (or a short list of numbers).
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise EvaluationError(f"model arguments in {source}: expected a dict, got {type(kwargs).__name__}")
    out = {}
    for key, value in kwargs.items():
        if key not in ALLOWED_MODEL_KEYS:
            raise EvaluationError(
                f"model argument {key!r} in {source} is not allowed (allowed: {', '.join(sorted(ALLOWED_MODEL_KEYS))})"
            )
        plain = value is None or isinstance(value, (bool, int, float, str))
        if isinstance(value, (list, tuple)) and len(value) <= 4:
            plain = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not plain:
            raise EvaluationError(
                f"model argument {key!r} in {source}: expected a plain value, got {type(value).__name__}"
            )
        out[key] = value
    return out


def _check_name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise EvaluationError(f"model name in {source}: expected a string, got {name!r}")
    return name


def _check_img_size(size: Any, source: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192:
        raise EvaluationError(f"img_size in {source}: expected an integer in [1, 8192], got {size!r}")
    return size


def _check_recipe_fits(name: str, img_size: int, kwargs: dict[str, Any], state: Any, source: str) -> None:
    """Refuse a checkpoint's recipe before any model is built for real: its sizes must be sane
    (:func:`leap.config_checks.check_model_overrides`) and the model it builds (on the ``meta`` device: shapes
    only, nothing allocated) must have the shapes of the weights stored beside it. A crafted
    ``embed_dim: 200000`` would otherwise allocate hundreds of GB before any check."""
    try:
        check_model_overrides(kwargs, f"model arguments in {source}")
    except ConfigError as exc:
        raise EvaluationError(str(exc)) from None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise EvaluationError(f"{source}: no stored weights (expected a state dict of tensors)")
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_model(name, img_size=img_size, **kwargs).state_dict().items()}
    except (ValueError, TypeError) as exc:
        raise EvaluationError(f"cannot build model {name!r} from {source}: {exc}") from None
    stored = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    # pos_embed is resampled to another resolution on load; every other shape must match.
    bad = [k for k in shapes if k in stored and k != "pos_embed" and stored[k] != shapes[k]]
    missing, unexpected = sorted(set(shapes) - set(stored)), sorted(set(stored) - set(shapes))
    if bad or missing or unexpected:
        if bad:
            detail = f"{bad[0]}: stored {stored[bad[0]]}, recipe {shapes[bad[0]]}"
        else:
            detail = f"{len(missing)} recipe tensor(s) not stored, {len(unexpected)} stored tensor(s) not in the recipe"
            detail += f", e.g. {(missing or unexpected)[0]}"
        raise EvaluationError(
            f"{source}: the model recipe ({name}, {kwargs}) does not fit the stored weights ({detail}); the "
            "checkpoint is damaged or was edited"
        )


def _build(name: str, img_size: int, kwargs: dict[str, Any], source: str) -> nn.Module:
    try:
        return build_model(name, img_size=img_size, **kwargs)
    except (ValueError, TypeError) as exc:
        raise EvaluationError(f"cannot build model {name!r} from {source}: {exc}") from None


def load_model(
    model: str | None = None,
    *,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    teacher_overrides: dict | None = None,
    block: int | None = None,
    img_size: int | None = None,
    pixels: bool = False,
    dynamic_size: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load the model to evaluate (see the module docstring for the sources).

    Args:
        model: a run directory or a checkpoint file (``leap distill`` or ``leap train-teacher``).
        teacher, teacher_weights, teacher_overrides: a teacher by name and weights file instead of ``model``
            (with a ``leap train-teacher`` file the name and recipe may be omitted: they are read from it).
        block: cut the model after this block (1-indexed); default: all blocks.
        img_size: input resolution; default: the checkpoint's training resolution (224 for weights
            files without a recipe; 28 for ``pixels``).
        pixels: the raw-pixel baseline instead of a model.
        dynamic_size: build the ViT for variable input sizes (retrieval at the images' aspect ratio).
        cache_dir: where the checkpoint hashes are memoized (see :func:`leap.evaluation.cache.file_sha256`).

    Raises:
        EvaluationError: conflicting or missing options, an unreadable or unknown checkpoint, a
            recipe with disallowed keys, an unknown model name, a block out of range.
    """
    sources = sum(x is not None and x is not False for x in (model, teacher or teacher_weights, pixels or None))
    if sources != 1:
        raise EvaluationError(
            "give exactly one of --model (run directory or checkpoint), --teacher/--teacher-weights, or --pixels"
        )
    if img_size is not None:
        _check_img_size(img_size, "--img-size")
    if pixels:
        if block is not None:
            raise EvaluationError("--block does not apply to --pixels")
        size = img_size or 28
        return LoadedModel(
            PixelFeatures(), size, 1, f"raw pixels at {size} px", {"kind": "pixels", "name": "pixels", "img_size": size}
        )
    extra = {"dynamic_img_size": True, "dynamic_img_pad": True} if dynamic_size else {}

    run_dir, training = None, None
    if model is not None:
        path = os.fspath(model)
        if os.path.isdir(path):
            run_dir, path = path, os.path.join(path, "checkpoint.pt")
            if not os.path.isfile(path):
                raise EvaluationError(f"--model {model}: the run directory has no checkpoint.pt")
        elif not os.path.isfile(path):
            raise EvaluationError(f"--model {model}: no such run directory or checkpoint file")
        obj, digest = read_hashed(path, cache_dir)
        source = f"checkpoint {path}"
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            cfg = obj.get("config")
            if not isinstance(cfg, dict) or not isinstance(obj.get("student"), dict):
                raise EvaluationError(f"{source}: a leap distill checkpoint without config or student weights")
            name = _check_name(cfg.get("student"), source)
            kwargs = sanitize_model_kwargs(cfg.get("student_overrides"), source)
            size = img_size or _check_img_size(cfg.get("img_size"), source)
            _check_recipe_fits(name, size, {**kwargs, **extra}, obj["student"], source)
            net = _build(name, size, {**kwargs, **extra}, source)
            try:
                if size != cfg.get("img_size") or dynamic_size:
                    load_teacher_weights(net, obj["student"])  # resamples pos_embed to the new grid
                else:
                    net.load_state_dict(obj["student"])
            except (RuntimeError, CheckpointError) as exc:
                raise EvaluationError(
                    f"{source}: student weights do not fit {name}: {str(exc).splitlines()[0]}"
                ) from None
            kind, what = "student", f"student {name} (leap distill checkpoint, step {obj.get('step')})"
            training = _training_point(obj)
            if run_dir is None:
                run_dir = os.path.dirname(os.path.abspath(path))
        elif isinstance(obj, dict) and isinstance(obj.get(TEACHER_META_KEY), dict):
            meta = obj[TEACHER_META_KEY]
            name = _check_name(meta.get("model"), source)
            kwargs = sanitize_model_kwargs(meta.get("model_overrides"), source)
            size = img_size or _check_img_size(meta.get("img_size"), source)
            _check_recipe_fits(name, size, {**kwargs, **extra}, obj.get("model"), source)
            net = _build(name, size, {**kwargs, **extra}, source)
            _load_weights(net, obj, source)
            kind, what = "trained-teacher", f"{name} (leap train-teacher checkpoint)"
        else:
            raise EvaluationError(
                f"{source} is neither a leap distill nor a leap train-teacher checkpoint; "
                "for other weights use --teacher NAME --teacher-weights FILE"
            )
    else:
        if not teacher_weights:
            raise EvaluationError("--teacher needs --teacher-weights FILE (a random teacher says nothing)")
        path = os.fspath(teacher_weights)
        if not os.path.isfile(path):
            raise EvaluationError(f"--teacher-weights {path}: no such file")
        source = f"teacher weights {path}"
        obj, digest = read_hashed(path, cache_dir)
        meta = obj.get(TEACHER_META_KEY) if isinstance(obj, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        name = _check_name(teacher or meta.get("model"), "--teacher")
        recipe = teacher_overrides if teacher_overrides is not None else meta.get("model_overrides")
        kwargs = sanitize_model_kwargs(recipe, "--teacher-overrides" if teacher_overrides is not None else source)
        size = img_size or (_check_img_size(meta["img_size"], source) if "img_size" in meta else 224)
        if teacher_overrides is None and meta:  # the file's own recipe: untrusted, checked against its weights
            _check_recipe_fits(name, size, {**kwargs, **extra}, obj.get("model"), source)
        net = _build(name, size, {**kwargs, **extra}, source)
        _load_weights(net, obj, source)
        kind, what = "teacher", f"teacher {name}"

    try:  # a model saved after a diverged run: say so instead of reporting NaN accuracies
        check_finite_weights(net.state_dict(), path, "model weights")
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
    depth = len(vit.blocks(net))
    extractor = TokenFeatures(net, block)
    if block is not None:
        what += f", block {block} of {depth}"
    patch = int(net.patch_embed.patch_size[0])
    identity = {
        "kind": kind,
        "name": name,
        "recipe": kwargs,
        "img_size": size,
        "depth": depth,
        "block": block if block is not None else depth,
        "checkpoint": os.path.abspath(path),
        "checkpoint_sha256": digest,  # of the bytes loaded above, not of the file as it is now
    }
    return LoadedModel(extractor.eval(), size, patch, what, identity, run_dir, training)


def _training_point(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``epoch``, ``step`` and cumulative ``teacher_flops`` of a distill checkpoint (untrusted: numbers only)."""

    def number(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None

    flops = ckpt.get("flops")
    total = flops.get("total") if isinstance(flops, dict) else None
    epoch, step = number(ckpt.get("epoch")), number(ckpt.get("step"))
    return {
        "epoch": None if epoch is None else int(epoch),
        "step": None if step is None else int(step),
        "teacher_flops": number(total.get("teacher_flops")) if isinstance(total, dict) else None,
    }


def _load_weights(net: nn.Module, obj: Any, source: str) -> None:
    if not isinstance(obj, dict):
        raise EvaluationError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    try:
        load_teacher_weights(net, obj)
    except (CheckpointError, FileNotFoundError) as exc:
        lines = str(exc).splitlines()
        raise EvaluationError(f"{source}: " + " ".join(s.strip() for s in lines[:3])) from None


# ----------------------------------------------------------------------------- extraction


def _default_collate_or_list(batch):
    """``(images, labels, skipped)``: the ``(image, label)`` pairs stacked when all images have one shape,
    else lists (retrieval); ``None`` samples (undecodable images) are dropped and counted in ``skipped``."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return [], torch.zeros(0, dtype=torch.long), skipped
    images, labels = zip(*kept)
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), torch.as_tensor(labels), skipped
    return list(images), torch.as_tensor(labels), skipped


@torch.no_grad()
def extract_features(
    loaded: LoadedModel,
    dataset: Dataset,
    *,
    split: str,
    dataset_id: dict[str, Any],
    transform_id: str,
    batch_size: int = 256,
    workers: int = 0,
    device: str | None = "auto",
    precision: str = "auto",
    cache: FeatureCache | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """CLS and mean-patch features of every image of ``dataset``, in one pass (or from the cache).

    Args:
        loaded: from :func:`load_model`.
        dataset: yields ``(image (3, H, W) float tensor, label int)``; images of different sizes
            are allowed (they are run in groups of equal size).
        split, dataset_id, transform_id: identify the data for the cache key (with the model's identity).
        batch_size, workers: DataLoader batch size and worker processes.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        cache: where to look up / store the features (``None``: no cache).
        progress: show a progress bar (only on a terminal).

    Returns:
        ``{"cls": (N, D), "patch": (N, D), "labels": (N,) int64, "skipped": int}``; features are not
        normalized and stored as fp16 (fp32 where a value does not fit fp16); the same tensors on a cache
        hit. ``N`` counts the images that decoded: a sample the dataset gives as ``None`` (an undecodable
        image) is dropped and counted in ``skipped``.
    """
    if batch_size < 1:
        raise EvaluationError(f"--batch-size: expected >= 1, got {batch_size}")
    if workers < 0:
        raise EvaluationError(f"--workers: expected >= 0, got {workers}")
    run = ExtractionPass(loaded, dataset, split, dataset_id, transform_id, device, precision, cache)
    hit = run.hit
    if hit is not None and all(k in hit for k in ("cls", "patch", "labels", "skipped")):
        skipped = int(hit["skipped"])
        if len(hit["labels"]) + skipped == len(dataset):
            return {**{k: hit[k] for k in ("cls", "patch", "labels")}, "skipped": skipped}

    net, in_dtype = run.model()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=run.dev.type == "cuda",
        collate_fn=_default_collate_or_list,
    )
    cls_out, patch_out, labels_out = [], [], []
    bar = run.progress_bar(progress, len(dataset), desc or f"features ({split})")
    skipped = 0
    for images, labels, n_skipped in loader:
        skipped += n_skipped
        if bar is not None:
            bar.update(n_skipped)
        if not len(labels):
            continue
        groups = [images] if torch.is_tensor(images) else _same_size_groups(images)
        for group in groups:
            x = group.to(run.dev, in_dtype, non_blocking=True)
            with run.autocast():
                cls, patch = net(x)
            cls_out.append(cls.float().cpu())
            patch_out.append(patch.float().cpu())
        if not torch.is_tensor(images):  # groups changed the order: restore it via the group indices
            order = _same_size_order(images)
            n = len(images)
            cls_b, patch_b = torch.cat(cls_out[-len(groups) :]), torch.cat(patch_out[-len(groups) :])
            del cls_out[-len(groups) :], patch_out[-len(groups) :]
            inv = torch.empty(n, dtype=torch.long)
            inv[torch.as_tensor(order)] = torch.arange(n)
            cls_out.append(cls_b[inv])
            patch_out.append(patch_b[inv])
        labels_out.append(labels.long())
        if bar is not None:
            bar.update(len(labels))
    if bar is not None:
        bar.close()
    run.require_images(bool(labels_out), skipped)
    out = {
        "cls": to_storage(torch.cat(cls_out)),
        "patch": to_storage(torch.cat(patch_out)),
        "labels": torch.cat(labels_out),
        "skipped": torch.tensor(skipped),
    }
    return run.save(out, skipped)


def _same_size_order(images: Sequence[torch.Tensor]) -> list[int]:
    """Indices of ``images`` grouped by shape (stable), the order :func:`_same_size_groups` runs them in."""
    shapes: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        shapes.setdefault(tuple(im.shape), []).append(i)
    return [i for idx in shapes.values() for i in idx]


def _same_size_groups(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    shapes: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        shapes.setdefault(tuple(im.shape), []).append(i)
    return [torch.stack([images[i] for i in idx]) for idx in shapes.values()]
