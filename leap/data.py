"""Data for LEAP distillation: image sources, DINO-style augmentation, batch mixup,
and a resumable (optionally distributed) sampler.

Spec section 4: DINO-style augmentation (RandomResizedCrop scale (0.14, 1), hflip,
colour jitter p=0.8 (0.4, 0.4, 0.2, 0.1), grayscale p=0.2) plus mixup with one
lambda ~ U(0, 1) per batch; the same mixed images go to teacher and student.

Conventions
-----------
* Every dataset yields ``(image, label)``: ``image`` is whatever ``transform``
  returns for a PIL RGB image (with ``transform=None``: a float tensor in [0, 1] of
  shape (3, H, W)); ``label`` is an ``int``. Default collation gives
  ``images (B, 3, H, W) float32`` and ``labels (B,) int64``.

* Decode failures (``ImageFolderDataset``): a file that cannot be decoded is
  skipped at load time; ``__getitem__`` falls back to the next index (wrapping
  around), so batch shapes never change and ``drop_last`` stays exact. Bad files
  are recorded in a *shared-memory* byte mask (one byte per file) that every
  DataLoader worker writes into (fork or spawn: the tensor is shared, not copied),
  so ``dataset.decode_failures`` read in the main process is the number of
  distinct bad files found so far by any worker, without races (writes are
  idempotent) and without re-decoding a known-bad file. ``dataset.failed_paths()``
  lists them. Under DDP each rank has its own dataset, hence its own count;
  all-reduce it (sum) if a global number is wanted.

* Resume: ``build_loader`` always uses a ``ResumableSampler``. Its order for a
  given ``(seed, epoch)`` is fixed (identical to ``DistributedSampler`` with the
  same seed/epoch/num_replicas/rank), and ``set_epoch(epoch, start=n)`` makes the
  next iteration begin at position ``n`` of that order, without loading the
  skipped samples. Use ``set_loader_epoch(loader, epoch, start_batch=b)`` which
  converts batches to samples. The sampler also attaches a per-sample seed
  derived from ``(seed, epoch, index)`` to each index, and the datasets here run
  their transform under that seed, so augmentations are bit-identical across
  runs, across ``num_workers`` settings and after a mid-epoch resume.

Why this module is long: the three sources, the transforms, mixup and the resumable sampler
share one contract (per-sample seeded augmentation that survives worker counts and mid-epoch
resumes, shared decode-failure accounting); keeping them together keeps that contract in
one place.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .config import DATA_SOURCES
from .errors import ConfigError, DataError, InputNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DEFAULT_ROOTS",
    "ImageFolderDataset",
    "FashionMNIST",
    "SyntheticDataset",
    "FirstN",
    "build_transforms",
    "mixup",
    "build_dataset",
    "ResumableSampler",
    "SeededIndex",
    "build_loader",
    "set_loader_epoch",
    "default_num_workers",
    "SOURCES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Debian's `dataset-fashion-mnist` package; searched after the user's --data path.
FASHION_MNIST_DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist",)
# Sub-folders of root that mean "this root has splits" (so a missing split is an
# error, not a reason to treat the split folders as classes).
_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")

_MASK64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """Deterministic 63-bit hash of a few ints (splitmix64 chain).

    Used instead of ``seed + epoch`` style sums so that nearby (seed, epoch, index)
    triples give unrelated seeds. Result fits ``torch.manual_seed``.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


# --------------------------------------------------------------------------- indices


class SeededIndex(int):
    """An ``int`` dataset index that carries the seed for that sample's augmentation.

    Yielded by ``ResumableSampler``; it travels through DataLoader's batch sampler
    and worker queues unchanged (it is an int, and it pickles). Datasets that know
    about it (the ones in this module) seed their transform with ``.seed``; any
    other dataset just sees an int.
    """

    seed: int

    def __new__(cls, index: int, seed: int):
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):
        return (SeededIndex, (int(self), self.seed))

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, seed={self.seed})"


class _LeapDataset(Dataset):
    """Shared ``__getitem__``: load a PIL image, then transform it under the
    per-sample seed when the index carries one (see ``SeededIndex``)."""

    transform: Callable | None

    def _load(self, index: int) -> tuple[Image.Image, int]:  # pragma: no cover
        raise NotImplementedError

    @property
    def decode_failures(self) -> int:
        """Number of distinct files that failed to decode (0 for in-memory sources)."""
        return 0

    def __getitem__(self, index: int) -> tuple[Any, int]:
        seed = getattr(index, "seed", None)
        img, label = self._load(int(index))
        transform = self.transform if self.transform is not None else TF.to_tensor
        if seed is None:
            return transform(img), label
        # fork_rng so that seeding here never disturbs the caller's RNG stream
        # (matters with num_workers=0, where this runs in the training process).
        # torchvision's v1 transforms draw only from torch's global CPU generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(img), label


# --------------------------------------------------------------------------- sources


class FirstN(Dataset):
    """The first ``n`` samples of ``dataset`` (quick runs, demos).

    Indices pass through unchanged (a ``SeededIndex`` keeps its seed, so augmentation
    stays reproducible), and ``decode_failures`` / ``classes`` are forwarded.
    """

    def __init__(self, dataset: Dataset, n: int):
        if n < 1:
            raise ConfigError(f"the number of images to use (--limit-images / --limit-train / --limit-test) must be "
                              f">= 1, got {n}")
        self.dataset = dataset
        self.n = min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if not 0 <= int(index) < self.n:
            raise IndexError(f"index {int(index)} out of range for {self.n} samples")
        return self.dataset[index]

    @property
    def decode_failures(self) -> int:
        return getattr(self.dataset, "decode_failures", 0)

    @property
    def classes(self):
        return getattr(self.dataset, "classes", None)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderDataset(_LeapDataset):
    """Images in ``root/<split>/<class>/**/*.{jpg,jpeg,png,webp,bmp}``.

    If ``root/<split>`` does not exist and ``root`` has no split folders at all
    (train/val/test/...), ``root`` itself is taken as the folder of class folders.
    Classes are the sorted sub-folder names; labels are their indices. Files are
    only listed here; decoding happens in ``__getitem__`` (see module docstring for
    how undecodable files are skipped and counted).

    Raises:
        FileNotFoundError: the folder is missing (message shows the expected layout).
        ValueError: no class folders or no image files were found.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable | None = None):
        root = Path(root).expanduser()
        layout = (f"expected layout: {root}/{split}/<class_name>/<image>."
                  f"{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}} "
                  f"(or {root}/<class_name>/<image> without a split folder)")
        if not root.is_dir():
            raise InputNotFoundError(f"image folder not found: {root}; {layout}")
        folder = root / split
        if not folder.is_dir():
            present = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
            if present:
                raise InputNotFoundError(
                    f"split folder not found: {folder} (found splits: {present}); {layout}")
            folder = root  # root points directly at the class folders
        self.root = folder
        self.split = split
        self.transform = transform

        self.classes = sorted(e.name for e in os.scandir(folder)
                              if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {folder}; {layout}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        samples: list[tuple[str, int]] = []
        # Symbolic links are followed, but each real directory is listed once: a link
        # loop would otherwise repeat files under wrong labels or never end.
        # A link into another class's folder is skipped too (its files keep their own label).
        visited = {os.path.realpath(folder / c) for c in self.classes}
        for c in self.classes:
            top = str(folder / c)
            for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
                real = os.path.realpath(dirpath)
                if dirpath != top:
                    if real in visited:
                        dirnames[:] = []
                        continue
                    visited.add(real)
                dirnames[:] = sorted(d for d in dirnames
                                     if os.path.realpath(os.path.join(dirpath, d)) not in visited)
                samples.extend((os.path.join(dirpath, f), self.class_to_idx[c])
                               for f in sorted(filenames) if _is_image_file(f))
        if not samples:
            raise DataError(f"no images found under {folder} "
                             f"(extensions {IMAGE_EXTENSIONS}); {layout}")
        self.samples = samples
        self.targets = [t for _, t in samples]
        # One byte per file, in shared memory so DataLoader workers (forked or
        # spawned) all write into the same mask the main process reads.
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self._check_decodable()

    def _check_decodable(self) -> None:
        """Decode files in order until one works (usually the first): a folder where no image
        decodes is refused here, in the main process, with one line, before training starts."""
        for i, (path, _) in enumerate(self.samples):
            try:
                with Image.open(path) as im:
                    im.convert("RGB")
                return
            except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                self._bad[i] = 1
        example = self.samples[0][0]
        raise DataError(f"none of the {len(self.samples)} image files under {self.root} could be decoded "
                        f"(e.g. {example}); check that the files are JPEG/PNG/WebP/BMP images")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decode_failures(self) -> int:
        return int(self._bad.sum())

    def failed_paths(self) -> list[str]:
        """Paths of the files found undecodable so far (by any worker)."""
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    def _decode(self, i: int) -> Image.Image | None:
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # forces the full decode inside the try
        except Exception as e:  # PIL raises many types for corrupt data
            if not self._bad[i]:
                log.warning("skipping undecodable image %s: %s: %s",
                            path, type(e).__name__, e)
            self._bad[i] = 1
            return None

    def _load(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.samples)
        # Deterministic fallback: the next index (wrapping) that decodes.
        for k in range(n):
            i = (index + k) % n
            if self._bad[i]:
                continue
            img = self._decode(i)
            if img is not None:
                return img, self.samples[i][1]
        raise DataError(f"none of the {n} images under {self.root} could be decoded")


def _read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (raw or .gz): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expect_magic:
        raise DataError(f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expect_magic:08x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"{path}: expected {count} bytes of data for shape {dims}, "
                         f"got {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class FashionMNIST(_LeapDataset):
    """Fashion-MNIST from its IDX files (raw or gzipped).

    Looks for ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in, in order:
    ``root``, ``root/FashionMNIST/raw`` (torchvision's download layout),
    ``root/fashion-mnist``, then ``FASHION_MNIST_DEFAULT_ROOTS``. The first folder
    holding both files of the split wins. Images are 28x28 gray, returned as PIL
    RGB (gray replicated to 3 channels) into ``transform``, which should resize to
    the model's img_size (``build_transforms(..., grayscale_source=True)`` does).

    Args:
        root: folder (usually the ``--data`` path); ``None`` searches only the defaults.
        split: "train", or "test"/"val"/"t10k" for the 10k test set.

    Attributes:
        images: uint8 array (N, 28, 28). labels: int64 array (N,).
    """

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 transform: Callable | None = None):
        prefix = self.split_prefix(split)
        self.split = split
        self.transform = transform
        found = self.find_files(root, split)
        if found is None:
            dirs = self.candidate_dirs(root)
            names = [f"{prefix}-images-idx3-ubyte[.gz]", f"{prefix}-labels-idx1-ubyte[.gz]"]
            raise InputNotFoundError(
                f"Fashion-MNIST {split!r} files {names} not found in any of: "
                f"{[str(d) for d in dirs]}. Get them with `apt-get install "
                f"dataset-fashion-mnist` (installs into {FASHION_MNIST_DEFAULT_ROOTS[0]}), "
                f"or download the four idx files (train-images-idx3-ubyte.gz, "
                f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                f"t10k-labels-idx1-ubyte.gz) into a folder and pass it as the data path.")
        img_path, lbl_path = found
        self.root = img_path.parent
        self.files = [str(img_path), str(lbl_path)]
        log.info("Fashion-MNIST %s: reading %s and %s", split, img_path, lbl_path)
        self.images = _read_idx(img_path, 0x00000803)
        self.labels = _read_idx(lbl_path, 0x00000801).astype(np.int64)
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"{img_path} has {self.images.shape[0]} images but "
                             f"{lbl_path} has {self.labels.shape[0]} labels")
        self.targets = self.labels.tolist()

    @staticmethod
    def split_prefix(split: str) -> str:
        if split == "train":
            return "train"
        if split in ("test", "val", "valid", "validation", "t10k"):
            return "t10k"
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")

    @staticmethod
    def candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
        """Folders searched for the idx files: under ``root`` only when it is given (a wrong
        ``--data`` is an error, never silently the system copy), else the default roots."""
        if root is not None:
            r = Path(root).expanduser()
            return [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]
        return [Path(d) for d in FASHION_MNIST_DEFAULT_ROOTS]

    @classmethod
    def find_files(cls, root: str | os.PathLike | None,
                   split: str) -> tuple[Path, Path] | None:
        """(images_path, labels_path) of the first candidate folder holding both."""
        prefix = cls.split_prefix(split)
        for d in cls.candidate_dirs(root):
            pair = []
            for kind in ("images-idx3", "labels-idx1"):
                base = d / f"{prefix}-{kind}-ubyte"
                hit = next((p for p in (base, base.with_name(base.name + ".gz"))
                            if p.is_file()), None)
                pair.append(hit)
            if all(pair):
                return pair[0], pair[1]
        return None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _load(self, index: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[index]).convert("RGB")
        return img, int(self.labels[index])


class SyntheticDataset(_LeapDataset):
    """Deterministic random images for tests and smoke runs.

    Image ``i`` depends only on ``(seed, i)`` (its own ``numpy`` generator): a
    per-class base colour plus Gaussian noise, so the classes are (easily)
    separable. Label ``i % num_classes`` (balanced).

    Returns ``(transform(PIL RGB img_size x img_size), label)``; with
    ``transform=None`` the image is a float tensor (3, img_size, img_size) in [0, 1].
    """

    def __init__(self, num_images: int, img_size: int, num_classes: int = 10,
                 seed: int = 0, transform: Callable | None = None):
        if num_images <= 0 or img_size <= 0 or num_classes <= 0:
            raise ValueError("num_images, img_size and num_classes must be positive")
        self.num_images = num_images
        self.img_size = img_size
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_images)]
        palette_rng = np.random.default_rng([seed, 0x5EED])
        self._palette = palette_rng.uniform(40, 215, size=(num_classes, 3))

    def __len__(self) -> int:
        return self.num_images

    def _load(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, index])
        s = self.img_size
        pix = self._palette[label] + rng.normal(0.0, 40.0, size=(s, s, 3))
        return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)), label


# --------------------------------------------------------------------------- transforms


def build_transforms(img_size: int, *, train: bool, augment: bool = True,
                     grayscale_source: bool = False, crop: bool = True,
                     hflip: bool = True, color_jitter: bool = True,
                     random_grayscale: bool = True, normalize: bool = True,
                     crop_scale: tuple[float, float] = (0.14, 1.0),
                     eval_crop_pct: float | None = None) -> T.Compose:
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


def mixup(images: torch.Tensor, *, generator: torch.Generator | None = None,
          enabled: bool = True, return_perm: bool = False):
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


# --------------------------------------------------------------------------- datasets


def _idx_files_in(path: str | os.PathLike) -> bool:
    """True if ``path`` (or torchvision's FashionMNIST/raw under it) holds idx files."""
    p = Path(path).expanduser()
    for d in (p, p / "FashionMNIST" / "raw", p / "fashion-mnist"):
        if d.is_dir() and any("-idx" in n and "-ubyte" in n for n in os.listdir(d)):
            return True
    return False


SOURCES = DATA_SOURCES


def build_dataset(source: str, path: str | os.PathLike | None, split: str, img_size: int,
                  augment: bool = True, **kw) -> Dataset:
    """Dataset + transforms for one split.

    Args:
        source: "folder" (``ImageFolderDataset``), "fashion-mnist", "synthetic", or
            "auto" (``path`` holding idx files -> fashion-mnist, another existing
            folder -> folder; no path -> fashion-mnist from its default roots).
        path: the data path (``--data``); unused for "synthetic".
        split: "train" uses the training transforms (with ``augment``); any other
            split ("val", "test") uses the eval transforms.
        img_size: output side in pixels (the model's input size).
        kw: ``transform`` (overrides the built one); options of
            ``build_transforms`` (``hflip=False``, ...); for "synthetic":
            ``num_images`` (default 1024 train / 256 otherwise), ``num_classes``
            (10), ``seed`` (0; the split is folded in so train and val differ).
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if source == "auto":
        if path is None:
            source = "fashion-mnist"
        elif _idx_files_in(path):
            source = "fashion-mnist"
        elif Path(path).expanduser().is_dir():
            source = "folder"
        else:
            raise InputNotFoundError(f"data path not found: {path}")

    train = split == "train"
    transform = kw.pop("transform", None)
    syn_kw = {k: kw.pop(k) for k in ("num_images", "num_classes", "seed") if k in kw}
    if transform is None:
        transform = build_transforms(img_size, train=train, augment=augment,
                                     grayscale_source=source == "fashion-mnist", **kw)
    elif kw:
        raise TypeError(f"unexpected options with an explicit transform: {sorted(kw)}")

    if source == "folder":
        if path is None:
            raise DataError("source 'folder' needs a data path")
        return ImageFolderDataset(path, split, transform=transform)
    if source == "fashion-mnist":
        return FashionMNIST(path, split, transform=transform)
    num_images = syn_kw.get("num_images", 1024 if train else 256)
    seed = _mix64(syn_kw.get("seed", 0), sum(map(ord, split))) & 0x7FFFFFFF
    return SyntheticDataset(num_images, img_size, syn_kw.get("num_classes", 10),
                            seed=seed, transform=transform)


# --------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[int]):
    """Seeded, epoch-aware, optionally sharded sampler that can start mid-epoch.

    Order for ``(seed, epoch)``: ``torch.randperm(N)`` from a generator seeded with
    ``seed + epoch`` (or ``range(N)`` without shuffle), padded by repetition
    (``drop_last=False``) or truncated (``drop_last=True``) to a multiple of
    ``num_replicas``, then ``indices[rank::num_replicas]`` - exactly
    ``torch.utils.data.DistributedSampler``'s order, so it is a drop-in for it.
    ``set_epoch(epoch, start=n)`` makes the next ``__iter__`` yield this rank's
    order from position ``n`` on (``n`` in samples of this rank; see
    ``set_loader_epoch`` for batches). ``set_epoch(epoch)`` alone starts at 0, so
    the usual per-epoch call clears a resume offset.

    ``len(sampler)`` is the full per-rank epoch length (stable, so step counts
    derived from ``len(loader)`` do not change on resume); ``remaining`` is what
    the next iteration yields. Indices are ``SeededIndex`` (int subclass) carrying
    a seed from ``(seed, epoch, index)`` unless ``seed_samples=False``.
    """

    def __init__(self, data_source: Sequence | int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False,
                 seed_samples: bool = True):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.seed_samples = seed_samples
        self.epoch = 0
        self.start = 0
        if drop_last and n % num_replicas:
            self.num_samples = math.ceil((n - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and the position (in samples) to start from."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        else:
            indices = list(range(self.n))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices += indices[:pad]
            else:
                indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas]

    @property
    def remaining(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        for i in self.order()[self.start:]:
            yield SeededIndex(i, _mix64(self.seed, epoch, i)) if self.seed_samples else i

    def __len__(self) -> int:
        return self.num_samples


def default_num_workers(world_size: int = 1) -> int:
    """CPU cores available to this process, shared between local ranks, capped at 8,
    minus one left for the training process itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, world_size) - 1))


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True,
                 num_workers: int | None = None, seed: int = 0, distributed: bool = False,
                 drop_last: bool = True, num_replicas: int | None = None,
                 rank: int | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None,
                 collate_fn: Callable | None = None) -> DataLoader:
    """DataLoader over ``dataset`` with a ``ResumableSampler`` as ``loader.sampler``.

    Per-epoch use (call before ``iter(loader)``)::

        set_loader_epoch(loader, epoch)                  # fresh epoch
        set_loader_epoch(loader, epoch, start_batch=n)   # resume after n batches

    Args:
        batch_size: per-process batch size.
        num_workers: default ``default_num_workers(world size)``.
        distributed: shard with ``num_replicas``/``rank`` (default: from the
            initialised ``torch.distributed`` process group).
        drop_last: drop the incomplete last batch, and (distributed) the tail
            that does not divide evenly between ranks instead of padding it.
        pin_memory: default ``torch.cuda.is_available()``.
    Persistent workers are used when ``num_workers > 0``; the loader's generator
    (worker base seeds) is seeded from ``seed`` and re-seeded per epoch by
    ``set_loader_epoch``.
    """
    if distributed:
        if num_replicas is None or rank is None:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an initialised process group "
                                   "or explicit num_replicas and rank")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
    else:
        num_replicas, rank = 1, 0
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed,
                               num_replicas=num_replicas, rank=rank, drop_last=drop_last)
    if num_workers is None:
        num_workers = default_num_workers(num_replicas)
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last, persistent_workers=num_workers > 0, generator=generator,
        collate_fn=collate_fn, **extra)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select ``epoch``'s order and skip its first ``start_batch`` batches (cheaply:
    skipped samples are never loaded). Call before ``iter(loader)``."""
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        raise TypeError("loader was not built by build_loader (no ResumableSampler)")
    sampler.set_epoch(epoch, start=start_batch * loader.batch_size)
    if loader.generator is not None:
        loader.generator.manual_seed(_mix64(sampler.seed, epoch, 1))
