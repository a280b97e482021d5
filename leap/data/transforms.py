"""Image transforms for LEAP distillation: DINO-style augmentation and batch mixup.

Spec section 4: DINO-style augmentation (RandomResizedCrop scale (0.14, 1), hflip,
colour jitter p=0.8 (0.4, 0.4, 0.2, 0.1), grayscale p=0.2) plus mixup with one
lambda ~ U(0, 1) per batch; the same mixed images go to teacher and student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms", "mixup"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------- transforms


def build_transforms(
    img_size: int,
    *,
    train: bool,
    augment: bool = True,
    grayscale_source: bool = False,
    crop: bool = True,
    hflip: bool = True,
    color_jitter: bool = True,
    random_grayscale: bool = True,
    normalize: bool = True,
    crop_scale: tuple[float, float] = (0.14, 1.0),
    eval_crop_pct: float | None = None,
) -> T.Compose:
    """PIL RGB image -> float tensor (3, img_size, img_size).

    Train with ``augment`` (DINO-style, spec section 4):
        RandomResizedCrop(img_size, scale=crop_scale, bicubic), RandomHorizontalFlip,
        RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2),
        ToTensor, Normalize(ImageNet mean/std).
    Eval, or train with ``augment=False``:
        Resize(img_size / eval_crop_pct) + CenterCrop(img_size), ToTensor, Normalize.

    Each augmentation is switchable (``crop``, ``hflip``, ``color_jitter``,
    ``random_grayscale``; ``crop=False`` resizes the whole image to img_size).
    ``grayscale_source=True`` (e.g. Fashion-MNIST): saturation/hue jitter and
    RandomGrayscale are dropped (no-ops on gray input), and the eval path resizes
    the whole image (crop pct 1.0) since small images have no border to spare.
    ``eval_crop_pct`` defaults to 0.875 (1.0 for grayscale sources).
    """
    if eval_crop_pct is None:
        eval_crop_pct = 1.0 if grayscale_source else 0.875
    bicubic = T.InterpolationMode.BICUBIC
    ops: list[Callable] = []
    if train and augment:
        if crop:
            ops.append(T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=bicubic))
        else:
            ops.append(T.Resize((img_size, img_size), interpolation=bicubic))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        if color_jitter:
            sat, hue = (0.0, 0.0) if grayscale_source else (0.2, 0.1)
            ops.append(T.RandomApply([T.ColorJitter(0.4, 0.4, sat, hue)], p=0.8))
        if random_grayscale and not grayscale_source:
            ops.append(T.RandomGrayscale(p=0.2))
    else:
        if not 0.0 < eval_crop_pct <= 1.0:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {eval_crop_pct}")
        resize = int(round(img_size / eval_crop_pct))
        ops += [T.Resize(resize, interpolation=bicubic), T.CenterCrop(img_size)]
    ops.append(T.ToTensor())
    if normalize:
        ops.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(ops)


# --------------------------------------------------------------------------- mixup


def mixup(
    images: torch.Tensor, *, generator: torch.Generator | None = None, enabled: bool = True, return_perm: bool = False
):
    """Batch mixup with one lambda for the whole batch (spec sections 2 and 4).

    ``mixed = lam * images + (1 - lam) * images[perm]`` with ``lam ~ U(0, 1)`` and
    ``perm`` a random permutation of the batch. Draw order from ``generator``:
    ``lam`` first (``torch.rand(1)``), then ``perm`` (``torch.randperm(B)``), both
    on the generator's device (CPU generator -> perm moved to the images' device),
    so a seeded generator makes runs reproducible. Feed ``mixed`` to both the
    teacher and the student; labels are not mixed (distillation is label-free).

    Args:
        images: (B, C, H, W) any float dtype / device.
        enabled: ``False`` returns ``(images, 1.0)`` and draws nothing.
    Returns:
        ``(mixed (B, C, H, W), lam: float)``, plus ``perm (B,) int64`` on
        ``images.device`` if ``return_perm``.
    """
    b = images.shape[0]
    if not enabled:
        ident = torch.arange(b, device=images.device)
        return (images, 1.0, ident) if return_perm else (images, 1.0)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    lam = float(torch.rand(1, generator=generator, device=gen_device).item())
    perm = torch.randperm(b, generator=generator, device=gen_device).to(images.device)
    mixed = images * lam + images[perm] * (1.0 - lam)
    return (mixed, lam, perm) if return_perm else (mixed, lam)
