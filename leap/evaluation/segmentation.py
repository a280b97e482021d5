"""Linear semantic segmentation on frozen patch tokens (``leap eval segmentation``): the linear protocol of
the paper's Table 3 (DINOv2's linear head).

Protocol:

- each image is resized whole to the model's resolution ``S x S`` (bicubic, aspect ratio not kept, ImageNet
  normalization); the model's patch tokens after the final norm (CLS and registers dropped), a
  ``S/p x S/p`` grid of ``D``-dim features, are extracted once and cached (fp16) with the training labels;
- the head (:class:`LinearSegHead`): BatchNorm over the ``D`` channels then one linear layer ``D -> C``
  (``bn-linear``, DINOv2's linear head, a BN and a 1x1 convolution), or the linear layer alone
  (``linear``); its logits ``(C, S/p, S/p)`` are upsampled bilinearly to the label size;
- training, on the cached tokens: cross-entropy over the labelled pixels of the masks resized (nearest) to
  ``S x S``; AdamW (lr 1e-3, weight decay 1e-4), linear warmup over the first 5% of the steps then linear
  decay to 0 (mmseg's poly schedule with power 1), batch 16, 30 epochs;
- evaluation: the logits upsampled bilinearly to each validation mask's own size, argmax, one confusion
  matrix over every labelled pixel of the split; ``mIoU`` = the mean over classes of ``TP / (TP + FP + FN)``
  (classes absent from both the labels and the predictions are left out, as mmseg's ``nanmean``), with
  ``aAcc`` (pixel accuracy) and ``mAcc`` (mean class accuracy).

Layouts (:func:`find_segmentation_data`):

- ``ade20k``: ``ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png`` (``ROOT`` may be ``ADEChallengeData2016`` itself); 150 classes;
  mask value 0 ("other") is ignored and value ``k`` is class ``k - 1`` (mmseg's ``reduce_zero_label``);
- ``folders``: ``ROOT/images/{train,val}/NAME.*`` with ``ROOT/masks/{train,val}/NAME.png``; mask values are
  the class indices ``0..C-1``, ``ignore_index`` (255) is ignored; ``C`` is ``num_classes``, else the largest
  training label + 1.

Masks are single-channel images (8- or 16-bit PNG) matched to images by file name without extension.

Why this module is long: the two layouts, the token extraction with its cache entry, the head's training
and the mIoU belong to one protocol and share its label conventions (the ignored value, the class shift).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..data.datasets import IMAGE_EXTENSIONS, open_image
from .cache import FeatureCache
from .common import begin
from .errors import EvaluationError
from .extraction import ExtractionPass, to_storage
from .features import LoadedModel
from .transforms import normalize

log = logging.getLogger("leap.eval")

__all__ = [
    "ADE_DIR",
    "LAYOUTS",
    "HEADS",
    "SegmentationData",
    "find_segmentation_data",
    "read_mask",
    "SegmentationImages",
    "extract_patch_tokens",
    "LinearSegHead",
    "train_segmentation_head",
    "confusion_matrix",
    "segmentation_scores",
    "evaluate_segmentation",
]

ADE_DIR = "ADEChallengeData2016"
LAYOUTS = ("auto", "ade20k", "folders")
HEADS = ("bn-linear", "linear")
_ADE_SPLITS = ("training", "validation")
_IGNORE = -1  # the ignored label inside this module, whatever the dataset's value


@dataclasses.dataclass
class SegmentationData:
    """A segmentation dataset: ``(image, mask)`` path pairs per split and how masks map to classes."""

    layout: str  # "ade20k" or "folders"
    root: str
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    num_classes: int | None  # None: the largest training label + 1 (folders)
    ignore_index: int  # the mask value that is ignored (ADE20K: 0)
    reduce_zero_label: bool  # ADE20K: value k -> class k - 1

    def map_mask(self, mask: np.ndarray, path: str) -> np.ndarray:
        """Mask values -> class indices ``(H, W)`` int64, ignored pixels -1.

        Raises:
            EvaluationError: a value outside the classes (naming the file).
        """
        m = mask.astype(np.int64)
        ignored = m == self.ignore_index
        cls = m - 1 if self.reduce_zero_label else m.copy()
        cls[ignored] = _IGNORE
        bad = (cls < 0) & ~ignored
        if self.num_classes is not None:
            bad |= cls >= self.num_classes
        if bad.any():
            first = 1 if self.reduce_zero_label else 0
            expected = f"{first}..{self.num_classes - 1 + first}" if self.num_classes else "0 or more"
            raise EvaluationError(
                f"{path}: mask value {int(m[bad][0])} is not a class (expected {expected}, "
                f"{self.ignore_index} = ignored); check --num-classes and --ignore-index"
            )
        return cls


def _pairs(image_dir: str, mask_dir: str) -> list[tuple[str, str]]:
    if not os.path.isdir(image_dir) or not os.path.isdir(mask_dir):
        missing = image_dir if not os.path.isdir(image_dir) else mask_dir
        raise EvaluationError(f"--data: no folder {missing}")
    masks = {os.path.splitext(n)[0]: os.path.join(mask_dir, n) for n in os.listdir(mask_dir) if not n.startswith(".")}
    images = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not images:
        raise EvaluationError(f"--data: no images in {image_dir}")
    unmatched = [n for n in images if os.path.splitext(n)[0] not in masks]
    if unmatched:
        raise EvaluationError(
            f"{len(unmatched)} of {len(images)} images in {image_dir} have no mask in {mask_dir} "
            f"(e.g. {unmatched[0]}; a mask has the image's name with its own extension, e.g. .png)"
        )
    return [(os.path.join(image_dir, n), masks[os.path.splitext(n)[0]]) for n in images]


def find_segmentation_data(
    root: str, layout: str = "auto", *, num_classes: int | None = None, ignore_index: int = 255
) -> SegmentationData:
    """Find the image/mask pairs of both splits under ``root`` (see the module docstring for the layouts).

    Raises:
        EvaluationError: an unknown layout, a missing folder, an image without a mask, bad class settings.
    """
    if layout not in LAYOUTS:
        raise EvaluationError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not os.path.isdir(root):
        raise EvaluationError(f"--data {root}: no such folder")
    if num_classes is not None and not 1 <= num_classes <= 32767:
        raise EvaluationError(f"--num-classes: expected 1..32767, got {num_classes}")
    ade = os.path.join(root, ADE_DIR) if os.path.isdir(os.path.join(root, ADE_DIR)) else root
    if layout == "auto":
        layout = "ade20k" if os.path.isdir(os.path.join(ade, "annotations", "training")) else "folders"
    if layout == "ade20k":
        train, val = (_pairs(os.path.join(ade, "images", s), os.path.join(ade, "annotations", s)) for s in _ADE_SPLITS)
        return SegmentationData("ade20k", os.path.realpath(ade), train, val, num_classes or 150, 0, True)
    if not os.path.isdir(os.path.join(root, "images")):
        raise EvaluationError(
            f"--data {root}: expected {ADE_DIR}/images + annotations (ADE20K) or images/{{train,val}} + "
            "masks/{train,val} (folders)"
        )
    train, val = (_pairs(os.path.join(root, "images", s), os.path.join(root, "masks", s)) for s in ("train", "val"))
    return SegmentationData("folders", os.path.realpath(root), train, val, num_classes, ignore_index, False)


def read_mask(path: str) -> np.ndarray:
    """A mask file as an integer array ``(H, W)``.

    Raises:
        EvaluationError: a colour mask (class indices must be one channel).
    """
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1"):
            raise EvaluationError(f"{path}: expected a single-channel mask of class indices, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def _fingerprint(pairs: list[tuple[str, str]], root: str) -> str:
    """SHA-256 over every image and mask: path relative to ``root``, size, modification/change times, inode."""
    h = hashlib.sha256()
    for pair in pairs:
        for path in pair:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t{st.st_ctime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{os.path.relpath(path, root)}\t{stamp}\n".encode())
    return h.hexdigest()


class SegmentationImages(Dataset):
    """Images resized to ``size x size`` and normalized, with the training labels resized (nearest) to the
    same size: yields ``(image (3, S, S), labels (S, S) int16 or None, index)``, or ``None`` for a pair that
    does not decode (dropped and counted)."""

    def __init__(self, pairs: list[tuple[str, str]], data: SegmentationData, size: int, *, labels: bool):
        self.pairs, self.data, self.size, self.labels = pairs, data, size, labels
        self.transform = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), normalize()])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image_path, mask_path = self.pairs[i]
        try:
            img = open_image(image_path)
            mask = read_mask(mask_path) if self.labels else None
        except EvaluationError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for undecodable files
            log.warning("skipping undecodable image or mask %s: %s: %s", image_path, type(exc).__name__, exc)
            return None
        lab = None
        if mask is not None:
            lab = torch.from_numpy(self.data.map_mask(mask, mask_path))[None, None].float()
            lab = F.interpolate(lab, size=(self.size, self.size), mode="nearest")[0, 0].to(torch.int16)
        return self.transform(img), lab, i


def _collate(batch):
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, torch.zeros(0, dtype=torch.long), len(batch)
    images, labels, index = zip(*kept)
    lab = torch.stack(labels) if labels[0] is not None else None
    return torch.stack(images), lab, torch.as_tensor(index), len(batch) - len(kept)


@torch.no_grad()
def extract_patch_tokens(
    loaded: LoadedModel,
    dataset: SegmentationImages,
    *,
    split: str,
    dataset_id: dict[str, Any],
    transform_id: str,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The patch tokens of every image (and its resized labels), in one pass or from the cache.

    Returns:
        ``{"tokens": (N, T, D) fp16 (fp32 where a value does not fit), "labels": (N, S, S) int16 or None,
        "index": (N,) int64 (the images that decoded), "skipped": int}``.
    """
    run = ExtractionPass(
        loaded, dataset, split, dataset_id, transform_id, device, precision, cache, features="patch-tokens"
    )
    hit = run.hit
    if hit is not None and all(k in hit for k in ("tokens", "index", "skipped")):
        if len(hit["index"]) + int(hit["skipped"]) == len(dataset):
            return {**hit, "labels": hit.get("labels"), "skipped": int(hit["skipped"])}
    net, in_dtype = run.model()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    bar = run.progress_bar(progress, len(dataset), f"patch tokens ({split})")
    tokens, labels, index, skipped = [], [], [], 0
    for images, lab, idx, n_skipped in loader:
        skipped += n_skipped
        if images is not None:
            with run.autocast():
                out = net.patch_tokens(images.to(run.dev, in_dtype))
            tokens.append(out.float().cpu())
            index.append(idx)
            if lab is not None:
                labels.append(lab)
        if bar is not None:
            bar.update(len(idx) + n_skipped)
    if bar is not None:
        bar.close()
    run.require_images(bool(index), skipped)
    out = {
        "tokens": to_storage(torch.cat(tokens)),
        "labels": torch.cat(labels) if labels else None,
        "index": torch.cat(index),
        "skipped": torch.tensor(skipped),
    }
    return run.save(out, skipped)


class LinearSegHead(nn.Module):
    """Patch tokens ``(B, g*g, D)`` -> logits ``(B, C, g, g)``: BatchNorm over ``D`` (``bn``), ``Linear(D, C)``."""

    def __init__(self, dim: int, num_classes: int, *, bn: bool = True):
        super().__init__()
        # momentum=None: the running statistics are the mean over every training batch (the features are
        # fixed, so that is the whole training set's), not a recent-batches estimate.
        self.bn = nn.BatchNorm1d(dim, momentum=None) if bn else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, d = tokens.shape
        if t != grid[0] * grid[1]:
            raise EvaluationError(f"patch tokens: expected {grid[0]} x {grid[1]} = {grid[0] * grid[1]}, got {t}")
        logits = self.linear(self.bn(tokens.reshape(b * t, d)))
        return logits.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def train_segmentation_head(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    grid: tuple[int, int],
    num_classes: int,
    head: str = "bn-linear",
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearSegHead:
    """Train the head on cached tokens ``(N, g*g, D)`` against labels ``(N, S, S)`` (-1 = ignored): the logits
    upsampled bilinearly to ``S x S``, cross-entropy over the labelled pixels, AdamW, warmup then linear decay.

    Raises:
        EvaluationError: bad settings or shapes, non-finite tokens, no labelled pixel at all.
    """
    if head not in HEADS:
        raise EvaluationError(f"--head: expected one of {', '.join(HEADS)}, got {head!r}")
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise EvaluationError(
            "segmentation head: expected epochs >= 1, batch size >= 1, lr > 0, weight decay >= 0; got "
            f"{epochs}, {batch_size}, {lr}, {weight_decay}"
        )
    if tokens.ndim != 3 or labels.ndim != 3 or tokens.shape[0] != labels.shape[0]:
        raise EvaluationError(
            f"expected tokens (N, T, D) and labels (N, S, S), got {tuple(tokens.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(tokens).all():
        raise EvaluationError("patch tokens contain NaN or Inf; the model's outputs are not finite")
    if not (labels >= 0).any():
        raise EvaluationError("no labelled pixel in the training masks (all ignored)")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearSegHead(tokens.shape[2], num_classes, bn=head == "bn-linear").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = tokens.shape[0]
    total = epochs * math.ceil(n / batch_size)
    warmup = max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min((t + 1) / warmup, max(0.0, (total - t) / (total - warmup + 1)))
    )
    size = tuple(labels.shape[1:])
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            y = labels[idx].to(dev, torch.long)
            if not (y >= 0).any():
                sched.step()
                continue
            logits = model(tokens[idx].to(dev, torch.float32), grid)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=_IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = label, columns = prediction, over the pixels whose label is not -1."""
    keep = target >= 0
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and int(t.max()) >= num_classes:
        raise EvaluationError(
            f"label {int(t.max())} is outside the {num_classes} classes (set by the training masks; pass --num-classes)"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` and the per-class ``iou`` (``None`` where a class is absent from both the
    labels and the predictions; such classes are left out of the means) of a confusion matrix."""
    c = confusion.double()
    tp, labelled, predicted = c.diag(), c.sum(1), c.sum(0)
    union = labelled + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, float("nan")))
    total = float(labelled.sum())
    return {
        "mIoU": float(iou.nanmean()) if (union > 0).any() else float("nan"),
        "mAcc": float(acc.nanmean()) if (labelled > 0).any() else float("nan"),
        "aAcc": float(tp.sum()) / total if total else float("nan"),
        "classes_scored": int((union > 0).sum()),
        "iou": [None if v != v else round(float(v), 6) for v in iou.tolist()],
    }


@torch.no_grad()
def _validate(model, tokens, index, data: SegmentationData, grid, num_classes: int, device) -> torch.Tensor:
    """The confusion matrix of the head on the validation tokens, each logit map upsampled to its mask's size."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    dev = torch.device(device)
    for row, i in enumerate(index.tolist()):
        mask_path = data.val[i][1]
        target = torch.from_numpy(data.map_mask(read_mask(mask_path), mask_path))
        logits = model(tokens[row : row + 1].to(dev, torch.float32), grid)
        logits = F.interpolate(logits, size=tuple(target.shape), mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits[0].argmax(0).cpu(), target, num_classes)
    return conf


def evaluate_segmentation(
    model_options: dict[str, Any],
    data: str,
    *,
    layout: str = "auto",
    num_classes: int | None = None,
    ignore_index: int = 255,
    head: str = "bn-linear",
    epochs: int = 30,
    probe_batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    no_cache: bool = False,
    run_dir: str | None = None,
    write_record: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The linear segmentation probe (see the module docstring). ``numbers`` of the record: ``mIoU``,
    ``mAcc``, ``aAcc`` (fractions), ``classes_scored`` and the per-class ``iou``.

    Raises:
        EvaluationError: missing or malformed data, mask values outside the classes, bad settings.
    """
    from ..distributed import resolve_device

    if data is None:
        raise EvaluationError("--data ROOT is required for segmentation (ADE20K or images/ + masks/ folders)")
    found = find_segmentation_data(data, layout, num_classes=num_classes, ignore_index=ignore_index)
    ev = begin(model_options, cache_dir, no_cache, run_dir, write_record)
    loaded = ev.loaded
    size, patch = loaded.img_size, loaded.patch_size
    if size % patch:
        raise EvaluationError(f"--img-size {size}: expected a multiple of the patch size {patch}")
    grid = (size // patch, size // patch)
    train_pairs = found.train[:limit_train] if limit_train else found.train
    val_pairs = found.val[:limit_val] if limit_val else found.val
    dataset_id = {
        "kind": "segmentation",
        "layout": found.layout,
        "root": found.root,
        "files_sha256": _fingerprint(train_pairs + val_pairs, found.root),
        "classes": [found.num_classes, found.ignore_index, found.reduce_zero_label],
        "limit": [limit_train, limit_val],
    }
    transform_id = f"resize{size}x{size}-bicubic-imagenet-norm+labels-nearest{size}x{size}"
    extraction = ev.extraction(batch_size, workers, device, precision, progress)
    common = dict(dataset_id=dataset_id, transform_id=transform_id, **extraction)
    train_ds = SegmentationImages(train_pairs, found, size, labels=True)
    train_f = extract_patch_tokens(loaded, train_ds, split="train", **common)
    val_f = extract_patch_tokens(
        loaded, SegmentationImages(val_pairs, found, size, labels=False), split="val", **common
    )
    classes = found.num_classes or int(train_f["labels"].max()) + 1
    found = dataclasses.replace(found, val=val_pairs, num_classes=classes)
    dev = resolve_device(device)
    model = train_segmentation_head(
        train_f["tokens"],
        train_f["labels"],
        grid=grid,
        num_classes=classes,
        head=head,
        epochs=epochs,
        batch_size=probe_batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=dev,
    )
    scores = segmentation_scores(_validate(model, val_f["tokens"], val_f["index"], found, grid, classes, dev))
    return ev.write(
        "segmentation",
        data={
            "path": os.path.abspath(data),
            "layout": found.layout,
            "train_images": len(train_f["index"]),
            "val_images": len(val_f["index"]),
            "skipped_images": {"train": train_f["skipped"], "val": val_f["skipped"]},
            "classes": classes,
            "ignored_mask_value": found.ignore_index,
            "reduce_zero_label": found.reduce_zero_label,
            "transform": transform_id,
        },
        settings={
            "features": "patch tokens after the final norm",
            "grid": list(grid),
            "head": head,
            "upsampling": "bilinear to the label size",
            "epochs": epochs,
            "batch_size": probe_batch_size,
            "optimizer": "adamw",
            "lr": lr,
            "weight_decay": weight_decay,
            "schedule": "linear warmup (5% of the steps), then linear decay to 0",
            "seed": seed,
            "precision": precision,
            "reported": "mIoU over the classes present in the labels or predictions of the validation split",
        },
        numbers=scores,
        feature_cache_hits=ev.cache_hits,
    )
