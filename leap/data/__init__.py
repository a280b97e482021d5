"""Data for LEAP distillation: image sources, DINO-style augmentation, batch mixup, and a
resumable (optionally distributed) sampler.

Modules (one contract: per-sample seeded augmentation that survives worker counts and
mid-epoch resumes):

- :mod:`~leap.data.datasets`: class folders, Fashion-MNIST idx files, synthetic images,
  :func:`build_dataset`, shared decode-failure accounting;
- :mod:`~leap.data.transforms`: the training/eval transforms and :func:`mixup`;
- :mod:`~leap.data.loaders`: :class:`ResumableSampler` (its :class:`SeededIndex` carries each
  sample's augmentation seed), :func:`build_loader`, :func:`set_loader_epoch`;
- :mod:`~leap.data.device_pipeline`: ``--data-pipeline device``: workers read file bytes, the batch is
  decoded and augmented on the device (:func:`build_device_loader`).

The names below are the package's public API (``from leap.data import build_dataset``).
"""

from .datasets import (
    FASHION_MNIST_DEFAULT_ROOTS,
    IMAGE_EXTENSIONS,
    SOURCES,
    FashionMNIST,
    FirstN,
    ImageFolderDataset,
    SyntheticDataset,
    build_dataset,
)
from .device_pipeline import DeviceAugment, DeviceBatchLoader, EncodedImages, build_device_loader
from .loaders import ResumableSampler, SeededIndex, build_loader, default_num_workers, set_loader_epoch
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, mixup

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
    "EncodedImages",
    "DeviceAugment",
    "DeviceBatchLoader",
    "build_device_loader",
]
