"""Everything :mod:`leap.evaluation` uses from the rest of ``leap``, in one place.

The evaluation modules import these names from here only, so when the trainer's modules
move, this file is the one to update. Names other than the error base are resolved on first
use (module ``__getattr__``), so ``leap eval --help`` does not import timm.
"""

from __future__ import annotations

import importlib

from ..errors import LeapError

# name -> (module relative to the ``leap`` package, attribute)
_LAZY = {
    "CHECKPOINT_FORMAT": (".checkpoint", "CHECKPOINT_FORMAT"),
    "check_finite_weights": (".checkpoint", "check_finite_weights"),
    "IMAGENET_MEAN": (".data", "IMAGENET_MEAN"),
    "IMAGENET_STD": (".data", "IMAGENET_STD"),
    "FashionMNIST": (".data", "FashionMNIST"),
    "ImageFolderDataset": (".data", "ImageFolderDataset"),
    "knn_accuracy": (".knn", "knn_accuracy"),
    "CheckpointError": (".errors", "CheckpointError"),
    "build_model": (".models", "build_model"),
    "load_teacher_weights": (".models", "load_teacher_weights"),
    "TEACHER_META_KEY": (".pretrain", "TEACHER_META_KEY"),
}

__all__ = ["LeapError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, "leap"), attr)
    globals()[name] = value
    return value
