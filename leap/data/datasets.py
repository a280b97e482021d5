"""Image sources for LEAP distillation: class folders, Fashion-MNIST idx files, synthetic
images, and :func:`build_dataset`, which picks one and its transform.

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

* Augmentation seeds: an index that is a :class:`leap.data.loaders.SeededIndex` (as the
  ``ResumableSampler`` yields) runs the sample's transform under its seed.

* What is read: regular files only (a named pipe called ``x.jpg`` would block the run), decoded
  in full; 16-bit images are scaled to 8 bits (:func:`to_rgb`), not clipped; Fashion-MNIST labels
  outside the 10 classes and truncated or corrupt IDX files are refused with one line.

Why this module is long: three sources with one sample contract, and the image folder's
listing, decode probe and shared failure mask that training and evaluation both rely on.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ..config import DATA_SOURCES
from ..errors import ConfigError, DataError, InputNotFoundError
from .loaders import mix64
from .transforms import build_transforms

log = logging.getLogger("leap.data")

__all__ = [
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DEFAULT_ROOTS",
    "ImageFolderDataset",
    "FashionMNIST",
    "SyntheticDataset",
    "FirstN",
    "build_dataset",
    "SOURCES",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Debian's `dataset-fashion-mnist` package; searched after the user's --data path.
FASHION_MNIST_DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist",)
# Sub-folders of root that mean "this root has splits" (so a missing split is an
# error, not a reason to treat the split folders as classes).
_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


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

    def failed_indices(self) -> list[int]:
        """Indices of the files found undecodable so far (by any worker); none for in-memory sources."""
        return []

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        seed = getattr(index, "seed", None)
        img, label = self._load(int(index))
        if img is None:  # an undecodable file of a dataset that skips them (evaluation): no sample
            return None
        transform = self.transform if self.transform is not None else TF.to_tensor
        if seed is None:
            return transform(img), label
        # torchvision's v1 transforms draw only from torch's global CPU generator: seed that one alone
        # (torch.manual_seed would also queue a lazy CUDA seeding, with a stack trace, on every item) and
        # put its state back after, so that seeding here never disturbs the caller's RNG stream (matters
        # with num_workers=0, where this runs in the training process).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return transform(img), label
        finally:
            generator.set_state(state)


# --------------------------------------------------------------------------- sources


class FirstN(Dataset):
    """The first ``n`` samples of ``dataset`` (quick runs, demos).

    Indices pass through unchanged (a ``SeededIndex`` keeps its seed, so augmentation
    stays reproducible), and ``decode_failures`` / ``classes`` are forwarded.
    """

    def __init__(self, dataset: Dataset, n: int):
        if n < 1:
            raise ConfigError(
                f"the number of images to use (--limit-images / --limit-train / --limit-test) must be >= 1, got {n}"
            )
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

    def failed_indices(self) -> list[int]:
        inner = getattr(self.dataset, "failed_indices", None)
        return inner() if inner is not None else []

    @property
    def classes(self):
        return getattr(self.dataset, "classes", None)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


#: Integer modes of PIL that hold more than 8 bits per pixel (16-bit PNGs open as one of them).
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """An opened image as 8-bit RGB, decoded in full.

    16-bit images (``I;16*``, and ``I`` as 16-bit PNGs open) are scaled from [0, 65535] to [0, 255]
    (``convert("RGB")`` would clip them, so that anything above 255 became white); float images
    (``F``) are scaled from [0, 1]. Values outside those ranges are refused.

    Raises:
        DataError: naming ``path``, for a wide image whose values are outside the supported range.
    """
    if im.mode in _WIDE_INT_MODES or im.mode == "F":
        arr = np.asarray(im)
        if im.mode == "F":
            scale, top, what = 255.0, 1.0, "a float image with values outside [0, 1]"
        else:
            scale, top, what = 255.0 / 65535.0, 65535, "a 32-bit integer image with values outside [0, 65535]"
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= top):
            raise DataError(f"{os.fspath(path)}: {what} (mode {im.mode}); convert it to 8- or 16-bit")
        gray = np.rint(arr.astype(np.float64) * scale).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return im.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode the regular file ``path`` in full as 8-bit RGB (:func:`to_rgb`).

    Raises:
        DataError: ``path`` is not a regular file (a named pipe, a device: opening it could block
            forever), or its pixel values are not supported; PIL's errors for undecodable files.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{os.fspath(path)} is not a regular file (a named pipe or a device); it is not read")
    with Image.open(path) as im:
        return to_rgb(im, path)


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

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        root = Path(root).expanduser()
        layout = (
            f"expected layout: {root}/{split}/<class_name>/<image>."
            f"{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}} "
            f"(or {root}/<class_name>/<image> without a split folder)"
        )
        if not root.is_dir():
            raise InputNotFoundError(f"image folder not found: {root}; {layout}")
        folder = root / split
        if not folder.is_dir():
            present = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
            if present:
                raise InputNotFoundError(f"split folder not found: {folder} (found splits: {present}); {layout}")
            folder = root  # root points directly at the class folders
        self.root = folder
        self.split = split
        self.transform = transform
        #: False (training): an undecodable file is replaced by the next one that decodes, so batches keep
        #: their size. True (evaluation): ``dataset[i]`` is None for it (the caller drops and counts it:
        #: a stand-in would duplicate another image and its label).
        self.skip_undecodable = False

        self.classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {folder}; {layout}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        samples: list[tuple[str, int]] = []
        special: list[str] = []
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
                dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in visited)
                for f in sorted(filenames):
                    if not _is_image_file(f):
                        continue
                    path = os.path.join(dirpath, f)
                    # Regular files only: opening a named pipe called x.jpg would block the run forever.
                    if os.path.isfile(path):
                        samples.append((path, self.class_to_idx[c]))
                    else:
                        special.append(path)
        self.special_files = special
        if special:
            log.warning(
                "skipping %d image name(s) under %s that are not regular files (named pipes, devices or "
                "dangling links), e.g. %s",
                len(special),
                folder,
                special[0],
            )
        if not samples:
            raise DataError(f"no images found under {folder} (extensions {IMAGE_EXTENSIONS}); {layout}")
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
                open_image(path)
                return
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
                # Named and counted like the files found bad later (decode_failures reads the mask).
                log.warning("skipping undecodable image %s: %s: %s", path, type(e).__name__, e)
                self._bad[i] = 1
        example = self.samples[0][0]
        raise DataError(
            f"none of the {len(self.samples)} image files under {self.root} could be decoded "
            f"(e.g. {example}); check that the files are JPEG/PNG/WebP/BMP images"
        )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decode_failures(self) -> int:
        return int(self._bad.sum())

    def failed_indices(self) -> list[int]:
        """Indices of the files found undecodable so far (by any worker)."""
        return torch.nonzero(self._bad).flatten().tolist()

    def failed_paths(self) -> list[str]:
        """Paths of the files found undecodable so far (by any worker)."""
        return [self.samples[i][0] for i in self.failed_indices()]

    def _decode(self, i: int) -> Image.Image | None:
        path = self.samples[i][0]
        try:
            return open_image(path)  # forces the full decode inside the try
        except Exception as e:  # PIL raises many types for corrupt data
            if not self._bad[i]:
                log.warning("skipping undecodable image %s: %s: %s", path, type(e).__name__, e)
            self._bad[i] = 1
            return None

    def _load(self, index: int) -> tuple[Image.Image | None, int]:
        n = len(self.samples)
        if self.skip_undecodable:  # evaluation: no stand-in, the caller drops and counts the sample
            img = None if self._bad[index] else self._decode(index)
            return img, self.samples[index][1]
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
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz (BadGzipFile is an OSError)
        raise DataError(
            f"{path}: could not read the file ({type(e).__name__}: {e}); it is truncated or corrupt: download it again"
        ) from None
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes); download the file again")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expect_magic:
        raise DataError(f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expect_magic:08x}")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimension sizes expected, the file has {len(data)} bytes; "
            "download the file again"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"{path}: expected {count} bytes of data for shape {dims}, got {len(data) - offset}")
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

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", transform: Callable | None = None):
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
                f"t10k-labels-idx1-ubyte.gz) into a folder and pass it as the data path."
            )
        img_path, lbl_path = found
        self.root = img_path.parent
        self.files = [str(img_path), str(lbl_path)]
        log.info("Fashion-MNIST %s: reading %s and %s", split, img_path, lbl_path)
        self.images = _read_idx(img_path, 0x00000803)
        self.labels = _read_idx(lbl_path, 0x00000801).astype(np.int64)
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"{img_path} has {self.images.shape[0]} images but {lbl_path} has {self.labels.shape[0]} labels"
            )
        bad = np.flatnonzero(self.labels >= len(self.classes))  # uint8 on disk: never negative
        if bad.size:
            raise DataError(
                f"{lbl_path}: label {int(self.labels[bad[0]])} at index {int(bad[0])} is outside the "
                f"{len(self.classes)} Fashion-MNIST classes (0..{len(self.classes) - 1}; {bad.size} such labels); "
                "the file is corrupt or not a Fashion-MNIST label file"
            )
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
    def find_files(cls, root: str | os.PathLike | None, split: str) -> tuple[Path, Path] | None:
        """(images_path, labels_path) of the first candidate folder holding both."""
        prefix = cls.split_prefix(split)
        for d in cls.candidate_dirs(root):
            pair = []
            for kind in ("images-idx3", "labels-idx1"):
                base = d / f"{prefix}-{kind}-ubyte"
                hit = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
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

    def __init__(
        self, num_images: int, img_size: int, num_classes: int = 10, seed: int = 0, transform: Callable | None = None
    ):
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


# --------------------------------------------------------------------------- datasets


def _idx_files_in(path: str | os.PathLike) -> bool:
    """True if ``path`` (or torchvision's FashionMNIST/raw under it) holds idx files."""
    p = Path(path).expanduser()
    for d in (p, p / "FashionMNIST" / "raw", p / "fashion-mnist"):
        if d.is_dir() and any("-idx" in n and "-ubyte" in n for n in os.listdir(d)):
            return True
    return False


SOURCES = DATA_SOURCES


def build_dataset(
    source: str, path: str | os.PathLike | None, split: str, img_size: int, augment: bool = True, **kw
) -> Dataset:
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
        transform = build_transforms(
            img_size, train=train, augment=augment, grayscale_source=source == "fashion-mnist", **kw
        )
    elif kw:
        raise TypeError(f"unexpected options with an explicit transform: {sorted(kw)}")

    if source == "folder":
        if path is None:
            raise DataError("source 'folder' needs a data path")
        return ImageFolderDataset(path, split, transform=transform)
    if source == "fashion-mnist":
        return FashionMNIST(path, split, transform=transform)
    num_images = syn_kw.get("num_images", 1024 if train else 256)
    seed = mix64(syn_kw.get("seed", 0), sum(map(ord, split))) & 0x7FFFFFFF
    return SyntheticDataset(num_images, img_size, syn_kw.get("num_classes", 10), seed=seed, transform=transform)
