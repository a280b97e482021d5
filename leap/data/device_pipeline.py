"""The device-side image pipeline (``--data-pipeline device``): DataLoader workers only read the encoded
file bytes; the training process decodes each batch (``torchvision.io.decode_jpeg`` on a list: nvjpeg,
batched, on CUDA; libjpeg-turbo on a CPU) and runs the DINO-style augmentation of
:func:`leap.data.build_transforms` on the device, as batched tensor ops.

Pieces: :class:`EncodedImages` and :func:`collate_encoded` (workers), :func:`augment_params` and
:func:`op_plan` (CPU), :class:`DeviceAugment` (one batch), :class:`DeviceBatchLoader` (what the trainer iterates).

Randomness: item ``i`` of epoch ``e`` carries the sampler's seed ``mix64(seed, e, i)``
(:class:`leap.data.loaders.SeededIndex`). A ``torch.Generator`` seeded with it draws 33 uniforms, in
this order: 10 crop tries x (area, log aspect ratio), crop top and left, flip, jitter applied,
brightness, contrast, saturation and hue factors, 4 keys whose argsort is the jitter order, grayscale.
So an image's augmentation depends only on its seed: not on the batch, the worker count or the device,
and a resumed run gets the same images as an uninterrupted one.

Same as the PIL path (:func:`leap.data.build_transforms`): RandomResizedCrop's sampling (scale (0.14, 1),
ratio (3/4, 4/3), 10 tries, then the central fallback), crop-then-resize with an antialiased bicubic
filter (PIL's, a = -0.5), flip p = 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8 in a random order
per image, grayscale p = 0.2, ImageNet normalization; undecodable files are skipped and counted as in
:class:`leap.data.ImageFolderDataset` (a file torchvision cannot decode goes to PIL, which decides). How it
differs:

* the random stream: a given seed gives other crops, flips and factors than on the PIL path (same
  distributions; tests/test_device_pipeline.py compares them);
* decoding: libjpeg-turbo (CPU) or nvjpeg (CUDA) instead of PIL's libjpeg; pixels can differ by a few
  levels (IDCT and chroma upsampling). Non-JPEG files: ``torchvision.io.decode_image`` on the CPU, and PIL
  for what it cannot read (BMP, 16-bit PNG, ...). EXIF orientation is ignored, as on the PIL path;
* resampling: on a CPU, 8-bit separable passes like PIL's; on CUDA in float32, clamped and rounded to
  8 bits at the end: within a few levels of PIL;
* colour jitter in float32 on [0, 1], with no rounding to 8 bits between the ops; contrast blends with
  the exact mean of the grayscale image (PIL: rounded to an integer); hue is shifted in float HSV (PIL:
  an 8-bit hue channel); grayscale weights 0.2989/0.587/0.114 in float (PIL: integer 299/587/114 per mille).

``--no-augment`` runs the eval transform (Resize of the shorter side to ``round(img_size / 0.875)``, then
CenterCrop), as the PIL path does, with the same resampling difference.

Cost per batch of B images (CUDA): one batched decode, 2 kernels per image for the crop-resize (8-bit to
float copy of the crop, antialiased bicubic), then a fixed number of batched ops (about 250 at most, most
of them for the jitter's four stages; ``bench/bench_data.py`` counts them): about 2B + 250 launches.

Why this module is long: one contract (bytes in the workers, one seed per image, batched ops on the
device, the image folder's skip-and-count rule) whose parts - reading, random parameters, resampling,
colour ops, decoding and the prefetching loader - only make sense together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ..errors import ConfigError, DataError
from .datasets import FirstN, ImageFolderDataset
from .loaders import build_loader
from .transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("leap.data")

__all__ = [
    "EncodedImages",
    "EncodedBatch",
    "collate_encoded",
    "AugmentParams",
    "augment_params",
    "op_plan",
    "resized_crops",
    "eval_crops",
    "DeviceAugment",
    "DeviceBatchLoader",
    "build_device_loader",
]

#: The augmentation of :func:`leap.data.build_transforms` (tests check that both paths agree).
CROP_SCALE = (0.14, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, FLIP_P, GRAYSCALE_P = 0.8, 0.5, 0.2
EVAL_CROP_PCT = 0.875
_TRIES = 10
_N_DRAWS = 2 * _TRIES + 13  # crop tries, top, left, flip, jitter, 4 factors, 4 order keys, grayscale
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE, _FLIP, _GRAY = range(6)
_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


# --------------------------------------------------------------------------- workers: bytes only


class EncodedImages(Dataset):
    """The files of an image folder as encoded bytes: ``dataset[i]`` is ``(data, label, seed, i)`` with
    ``data`` a 1-D uint8 tensor of the file (empty when it cannot be read: it is then undecodable),
    ``seed`` the index's augmentation seed (:class:`~leap.data.SeededIndex`; a random one for a plain int).

    Args:
        dataset: an :class:`~leap.data.ImageFolderDataset`, or a :class:`~leap.data.FirstN` of one.
    Raises:
        ConfigError: any other source (synthetic, Fashion-MNIST: they hold no image files).
    """

    def __init__(self, dataset: Dataset):
        self.n = len(dataset)
        folder = dataset.dataset if isinstance(dataset, FirstN) else dataset
        if not isinstance(folder, ImageFolderDataset):
            raise ConfigError(
                f"--data-pipeline device: reads the image files of a folder (--data-source folder); this run's "
                f"data is {type(folder).__name__}, which has none: use --data-pipeline cpu"
            )
        self.folder = folder

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        seed = getattr(index, "seed", None)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        path, label = self.folder.samples[int(index)]
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe would block: never opened (as on PIL's path)
                raise OSError(f"{path} is not a regular file")
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError:
            data = torch.empty(0, dtype=torch.uint8)
        return data, label, seed, int(index)

    def fallback(self, index: int) -> tuple[torch.Tensor, int]:
        """PIL's verdict on item ``index``: ``(image (3, H, W) uint8, label)`` of this file or, when PIL cannot
        decode it either, of the next one that decodes (the file is then logged and counted as undecodable,
        exactly as :class:`~leap.data.ImageFolderDataset` does on the PIL path)."""
        img, label = self.folder._load(int(index))  # the folder's own skip-and-count rule
        if img is None:
            raise DataError(f"{self.folder.samples[int(index)][0]}: could not be decoded")
        return pil_to_tensor(img), label


@dataclass
class EncodedBatch:
    """A batch of encoded files: ``data`` (B tensors of bytes), ``seeds`` and ``indices`` (B,) int64."""

    data: list[torch.Tensor]
    seeds: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.data)


def collate_encoded(items: Sequence[tuple[torch.Tensor, int, int, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """``collate_fn`` of :class:`EncodedImages`: ``(EncodedBatch, labels (B,) int64)``."""
    data, labels, seeds, indices = zip(*items)
    batch = EncodedBatch(list(data), torch.tensor(seeds, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64))
    return batch, torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------- random parameters (CPU)


@dataclass
class AugmentParams:
    """Every random choice of a batch (CPU tensors): ``boxes (B, 4)`` int64 crop top, left, height, width;
    ``flip``, ``jitter``, ``gray (B,)`` bool; ``factors (B, 4)`` float64 brightness, contrast, saturation
    and hue; ``order (B, 4)`` int64, the jitter ops in the order they run (0..3 as in ``factors``)."""

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor


def augment_params(
    seeds: Sequence[int] | torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    *,
    augment: bool = True,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> AugmentParams:
    """The augmentation of images of ``sizes`` ((H, W) each) under ``seeds`` (one per image), drawn as
    the module docstring says, batched: RandomResizedCrop's tries for all images at once.
    ``augment=False``: nothing random (boxes are the whole images: :func:`eval_crops` crops them)."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if len(seeds) != len(sizes):
        raise ValueError(f"augment_params: {len(seeds)} seeds for {len(sizes)} image sizes")
    b = len(seeds)
    hw = torch.tensor(sizes, dtype=torch.float64).reshape(b, 2)
    height, width = hw[:, 0], hw[:, 1]
    off = torch.zeros(b, dtype=torch.bool)
    if not augment:  # the whole image: resized, then centre-cropped (:func:`eval_crops`)
        boxes = torch.stack([torch.zeros_like(height), torch.zeros_like(width), height, width], 1).long()
        return AugmentParams(boxes, off, off, torch.ones(b, 4, dtype=torch.float64), torch.arange(4).repeat(b, 1), off)
    gen = torch.Generator()
    u = torch.stack([torch.rand(_N_DRAWS, generator=gen.manual_seed(s), dtype=torch.float64) for s in seeds])
    u = u.reshape(b, _N_DRAWS)
    # RandomResizedCrop.get_params, every try of every image at once; the first try that fits wins.
    area = (height * width)[:, None]
    target = area * (crop_scale[0] + u[:, 0 : 2 * _TRIES : 2] * (crop_scale[1] - crop_scale[0]))
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_lo + u[:, 1 : 2 * _TRIES : 2] * (log_hi - log_lo))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    found = fits.any(1)
    # No try fits: the whole image, cut to the nearest allowed aspect ratio, centred.
    ratio = width / height
    fb_w = torch.where(ratio > CROP_RATIO[1], torch.round(height * CROP_RATIO[1]), width)
    fb_h = torch.where(ratio < CROP_RATIO[0], torch.round(width / CROP_RATIO[0]), height)
    w = torch.where(found, w.gather(1, first)[:, 0], fb_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fb_h)
    top = torch.where(found, torch.floor(u[:, 2 * _TRIES] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, 2 * _TRIES + 1] * (width - w + 1)), torch.floor((width - w) / 2))
    boxes = torch.stack([torch.minimum(top, height - h), torch.minimum(left, width - w), h, w], 1).long()
    k = 2 * _TRIES + 2
    # ColorJitter's ranges: [max(0, 1 - j), 1 + j] for brightness, contrast, saturation; [-j, j] for hue.
    lows = torch.tensor([max(0.0, 1 - j) for j in JITTER[:3]] + [-JITTER[3]], dtype=torch.float64)
    highs = torch.tensor([1 + j for j in JITTER[:3]] + [JITTER[3]], dtype=torch.float64)
    factors = lows + u[:, k + 2 : k + 6] * (highs - lows)
    return AugmentParams(
        boxes=boxes,
        flip=u[:, k] < FLIP_P,
        jitter=u[:, k + 1] <= JITTER_P,  # torchvision's RandomApply: skipped when p < rand
        factors=factors,
        order=torch.argsort(u[:, k + 6 : k + 10], dim=1),
        gray=u[:, k + 10] < GRAYSCALE_P,
    )


# --------------------------------------------------------------------------- batched image ops


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop ``boxes`` (B, 4: top, left, height, width; CPU) out of ``images`` (B tensors (3, H_i, W_i) uint8,
    one device) and resize each to ``size`` (side, or (height, width)) with the antialiased bicubic filter of PIL.

    Returns: (B, 3, height, width) float32 in [0, 1], on the images' device, on the 8-bit grid.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(images) != boxes.shape[0]:
        raise ValueError(f"resized_crops: {len(images)} images for {boxes.shape[0]} boxes")
    out = []
    for img, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = img[:, top : top + h, left : left + w].unsqueeze(0)
        if img.device.type != "cpu":  # CUDA resamples float (one copy + convert of the crop, one kernel)
            crop = crop.float()
        out.append(F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False))
    x = torch.cat(out)
    if x.dtype == torch.uint8:  # the CPU's 8-bit path (PIL-like separable passes)
        return x.float().mul_(1 / 255)
    return x.clamp_(0, 255).round_().mul_(1 / 255)


def eval_crops(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """The eval transform of :func:`leap.data.build_transforms` on ``images`` (B tensors (3, H_i, W_i) uint8):
    Resize(round(size / 0.875), antialiased bicubic) of the shorter side, then CenterCrop(size).

    Returns: (B, 3, size, size) float32 in [0, 1], on the 8-bit grid.
    """
    short = int(round(size / EVAL_CROP_PCT))
    out = []
    for img in images:
        h, w = int(img.shape[1]), int(img.shape[2])
        rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # torchvision's rounding
        x = resized_crops([img], torch.tensor([[0, 0, h, w]]), (rh, rw))
        top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
        out.append(x[:, :, top : top + size, left : left + size])
    return torch.cat(out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W): ITU-R 601 luma (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul_(f).add_(other * (1 - f)).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` (n, 3, H, W) in [0, 1] by ``shift`` (n, 1, 1, 1) turns (torchvision's
    rgb -> hsv -> rgb round trip, written as V - C * clamp(min(k, 4 - k), 0, 1) with k in sextants)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = h + 6 * shift[:, 0]
    k = torch.stack([h + 5, h + 3, h + 1], 1).remainder_(6)
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * k


def _apply(op: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One op on the selected images ``x`` (n, 3, H, W) (a copy: modified in place), factors ``v`` (n,)."""
    f = v.view(-1, 1, 1, 1)
    if op == _FLIP:
        return x.flip(-1)
    if op == _GRAY:
        return _gray(x).expand_as(x).contiguous()
    if op == _BRIGHTNESS:
        return x.mul_(f).clamp_(0, 1)
    if op == _CONTRAST:
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)
    if op == _SATURATION:
        return _blend(x, _gray(x), f)
    return _hue(x, f)


def op_plan(params: AugmentParams) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The batched ops of ``params`` in the order they run: flip, the 4 jitter stages (each image runs its
    own order), grayscale, as ``(ops [(op, count)], indices (N,) int64, factors (N,) float32)``: op ``k``
    runs on the next ``count`` indices with their factors. Computed on the CPU and uploaded in two copies,
    so the device never waits for a selection."""
    ops, picks, factors = [], [], []

    def add(op: int, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
        idx = mask.nonzero().flatten()
        if idx.numel():
            ops.append((op, idx.numel()))
            picks.append(idx)
            factors.append(values[idx] if values is not None else torch.zeros(idx.numel(), dtype=torch.float64))

    add(_FLIP, params.flip)
    for stage in range(4):
        for op in (_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE):
            add(op, params.jitter & (params.order[:, stage] == op), params.factors[:, op])
    add(_GRAY, params.gray)
    if not ops:
        return [], torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return ops, torch.cat(picks), torch.cat(factors).float()


# --------------------------------------------------------------------------- decode + augment


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and tuple(data[:3].tolist()) == _JPEG_MAGIC


class DeviceAugment:
    """Decode a batch of encoded files on ``device`` and augment it there (see the module docstring).

    Args:
        img_size: output side in pixels.
        device: where the images are decoded (CUDA: nvjpeg) and augmented.
        augment: False: the eval transform's centre crop, no flip, jitter or grayscale.
        normalize: subtract the ImageNet mean, divide by its std.
        fallback: ``fallback(index) -> (image (3, H, W) uint8, label)`` for a file torchvision cannot decode
            (:meth:`EncodedImages.fallback`: PIL, then the image folder's skip-and-count rule); None: a
            :class:`~leap.errors.DataError` naming the item.
    """

    def __init__(
        self,
        img_size: int,
        device: torch.device | str = "cpu",
        *,
        augment: bool = True,
        normalize: bool = True,
        crop_scale: tuple[float, float] = CROP_SCALE,
        fallback: Callable[[int], tuple[torch.Tensor, int]] | None = None,
    ):
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.img_size, self.device, self.augment, self.normalize = img_size, torch.device(device), augment, normalize
        self.crop_scale, self.fallback = crop_scale, fallback
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # torchvision >= 0.29 marks its decoders deprecated in favour of torchcodec; they are what runs here.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)

    def __call__(self, batch: EncodedBatch, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, 3, img_size, img_size) float32 on device, labels (B,) int64)``; ``labels`` change
        where an undecodable file was replaced by the next one (the image folder's rule)."""
        labels = torch.zeros(len(batch), dtype=torch.int64) if labels is None else labels.clone()
        images = self.decode(batch, labels)
        return self.augment_images(images, batch.seeds), labels

    def decode(self, batch: EncodedBatch, labels: torch.Tensor) -> list[torch.Tensor]:
        """B tensors (3, H_i, W_i) uint8 on ``device``: JPEGs in one batched call, the rest on the CPU; a file
        torchvision cannot decode goes to ``fallback``, and ``labels`` (B,) is updated in place where another
        file stands in for it."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        rgb = ImageReadMode.RGB
        out: list[torch.Tensor | None] = [None] * len(batch)
        jpegs = [i for i, d in enumerate(batch.data) if _is_jpeg(d)]
        is_jpeg = set(jpegs)
        if jpegs:
            try:
                decoded = decode_jpeg([batch.data[i] for i in jpegs], mode=rgb, device=self.device)
            except RuntimeError:  # one bad file fails the whole call: decode them one by one
                decoded = [
                    self._try(lambda d=batch.data[i]: decode_jpeg(d, mode=rgb, device=self.device)) for i in jpegs
                ]
            for i, img in zip(jpegs, decoded):
                out[i] = img
        for i in range(len(batch)):
            if out[i] is None and i not in is_jpeg and batch.data[i].numel():
                out[i] = self._try(lambda d=batch.data[i]: decode_image(d, mode=rgb))
            img = out[i]
            if img is None or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                out[i], labels[i] = self._fallback(int(batch.indices[i]))
            else:
                out[i] = img.to(self.device, non_blocking=True)
        return out  # type: ignore[return-value]

    @staticmethod
    def _try(fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        try:
            return fn()
        except (RuntimeError, ValueError):  # torchvision's decoders raise these for data they cannot read
            return None

    def _fallback(self, index: int) -> tuple[torch.Tensor, int]:
        if self.fallback is None:
            raise DataError(f"item {index}: torchvision could not decode it (no fallback given)")
        img, label = self.fallback(index)
        return img.to(self.device), label

    def augment_images(self, images: Sequence[torch.Tensor], seeds: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Decoded ``images`` (B tensors (3, H_i, W_i) uint8 on ``device``) under ``seeds`` (B,) ->
        (B, 3, img_size, img_size) float32: crop-resize, flip, jitter, grayscale, normalization."""
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        params = augment_params(seeds, sizes, augment=self.augment, crop_scale=self.crop_scale)
        return self.apply(images, params.boxes, op_plan(params))

    def apply(
        self,
        images: Sequence[torch.Tensor],
        boxes: torch.Tensor,
        plan: tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The device work of :meth:`augment_images` for drawn crop ``boxes`` (B, 4) and ``plan`` (:func:`op_plan`)."""
        x = resized_crops(images, boxes, self.img_size) if self.augment else eval_crops(images, self.img_size)
        ops, idx, vals = plan
        if ops:
            idx, vals = self._upload(idx), self._upload(vals)
            start = 0
            for op, n in ops:
                i, v = idx[start : start + n], vals[start : start + n]
                start += n
                x.index_copy_(0, i, _apply(op, x.index_select(0, i), v))
        if self.normalize:
            x.sub_(self.mean).div_(self.std)
        return x

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


# --------------------------------------------------------------------------- the loader


_END = object()


class DeviceBatchLoader:
    """What the trainer iterates for ``--data-pipeline device``: ``(images (B, 3, S, S) float32 on the
    device, labels (B,))`` per batch of ``loader`` (a DataLoader of :class:`EncodedImages` with
    :func:`collate_encoded`), augmented by ``augment``.

    ``sampler``, ``batch_size``, ``generator`` and ``len()`` are the DataLoader's, so
    :func:`~leap.data.set_loader_epoch` and resume work unchanged. ``prefetch > 0``: a thread prepares
    up to that many batches ahead (on CUDA on its own stream, so nvjpeg and the augmentation overlap the
    training step); 0: each batch is prepared when it is asked for.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, augment: DeviceAugment, prefetch: int = 0):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.loader, self.augment, self.prefetch = loader, augment, prefetch

    sampler = property(lambda self: self.loader.sampler)
    batch_size = property(lambda self: self.loader.batch_size)
    generator = property(lambda self: self.loader.generator)
    dataset = property(lambda self: self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.prefetch == 0:
            for batch, labels in self.loader:
                yield self.augment(batch, labels)
            return
        yield from self._prefetched()

    def _prefetched(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.augment.device
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    for batch, labels in self.loader:
                        images, labels = self.augment(batch, labels)
                        event = None
                        if stream is not None:
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not put((images, labels, event)):
                            return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=produce, name="leap-device-pipeline", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, labels, event = item
                if event is not None:  # the step's stream waits for the batch, and owns its memory from now on
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    images.record_stream(current)
                yield images, labels
        finally:
            stop.set()
            thread.join()


def build_device_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    *,
    img_size: int,
    augment: bool = True,
    prefetch: int | None = None,
    **loader_kw,
) -> DeviceBatchLoader:
    """The ``--data-pipeline device`` loader over an image folder ``dataset`` (or a FirstN of one):
    :func:`~leap.data.build_loader` (``loader_kw``: shuffle, num_workers, seed, distributed, drop_last)
    of its bytes, decoded and augmented on ``device``. ``prefetch`` defaults to 2 batches on CUDA, 0 on
    a CPU (where decoding in the training process is slower than the PIL path's workers: tests only).

    Raises:
        ConfigError: a source without image files (:class:`EncodedImages`).
    """
    device = torch.device(device)
    encoded = EncodedImages(dataset)
    if device.type == "cpu":
        log.warning(
            "--data-pipeline device on a CPU decodes and augments in the training process, which is slower "
            "than --data-pipeline cpu with DataLoader workers; it is meant for CUDA devices"
        )
    loader = build_loader(encoded, batch_size, pin_memory=False, collate_fn=collate_encoded, **loader_kw)
    aug = DeviceAugment(img_size, device, augment=augment, fallback=encoded.fallback)
    return DeviceBatchLoader(
        loader, aug, prefetch=(2 if device.type == "cuda" else 0) if prefetch is None else prefetch
    )
