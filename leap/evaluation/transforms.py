"""The evaluation transforms: a PIL RGB image -> a normalized tensor, each with the id that goes into the
feature-cache key and the ``eval.jsonl`` records.

- :func:`geometry_transform`: Resize 256 -> CenterCrop 224 at the model's resolution (bicubic, shorter side;
  scaled for other resolutions), or the whole image resized for small images such as Fashion-MNIST; PIL in,
  PIL out. The corruptions of ``leap eval robustness`` are applied after it, as ImageNet-C does.
- :func:`eval_transform`: the geometry, then ToTensor and ImageNet mean/std normalization (the linear probe,
  kNN, robustness and the paper's retrieval transform).
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["geometry_transform", "eval_transform", "normalize"]


def normalize() -> T.Compose:
    """ToTensor and ImageNet mean/std normalization: PIL RGB ``(H, W)`` -> float32 ``(3, H, W)``."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def geometry_transform(img_size: int, *, small_images: bool = False, resize: int | None = None) -> tuple[Callable, str]:
    """The resize and crop of :func:`eval_transform` alone (PIL -> PIL ``img_size x img_size``); ``(transform, id)``."""
    bicubic = T.InterpolationMode.BICUBIC
    if small_images:
        return T.Resize((img_size, img_size), interpolation=bicubic), f"resize{img_size}x{img_size}-bicubic"
    resize = resize or int(round(img_size * 256 / 224))
    return (
        T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(img_size)]),
        f"resize{resize}-centercrop{img_size}-bicubic",
    )


def eval_transform(img_size: int, *, small_images: bool = False, resize: int | None = None) -> tuple[Callable, str]:
    """Evaluation transform for PIL RGB images; returns ``(transform, description)``.

    Default: Resize(``resize``, default ``round(img_size * 256 / 224)``, bicubic, shorter side) ->
    CenterCrop(``img_size``), i.e. Resize 256 -> CenterCrop 224 at 224 px. With ``small_images``
    (e.g. 28 px Fashion-MNIST) the whole image is resized to ``img_size`` (no border to crop).
    Then ToTensor and ImageNet mean/std normalization. Output ``(3, img_size, img_size)`` float32.
    """
    geometry, gid = geometry_transform(img_size, small_images=small_images, resize=resize)
    return T.Compose([geometry, *normalize().transforms]), f"{gid}-imagenet-norm"
