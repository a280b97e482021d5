"""What the two extraction passes do alike around their loops: :func:`leap.evaluation.features.extract_features`
(CLS and mean-patch features) and :func:`leap.evaluation.segmentation.extract_patch_tokens` (patch tokens).

:class:`ExtractionPass` resolves the device and the precision, looks the split up in the feature cache, puts
the model on the device at that precision, shows the progress bar, refuses a split where no image decoded and
stores the result; :func:`to_storage` is the storage dtype rule of every cached tensor.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..distributed import resolve_device
from ..precision import DTYPES, resolve_precision
from .cache import FeatureCache
from .errors import EvaluationError

__all__ = ["ExtractionPass", "extraction_precision", "to_storage"]


def extraction_precision(precision: str, device: torch.device) -> str:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` -> the precision the extraction runs at on ``device``."""
    if precision != "auto" and precision not in DTYPES:
        raise EvaluationError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    return resolve_precision(precision, device)


def to_storage(x: torch.Tensor) -> torch.Tensor:
    """fp16 for storage when every value fits (|x| < 60000), else fp32."""
    x = x.float()
    finite = torch.isfinite(x)
    if finite.all() and (x.abs().amax() if x.numel() else 0) < 6.0e4:
        return x.half()
    return x


class ExtractionPass:
    """One pass of a model over one split: the device, the precision and the split's feature-cache entry.

    The arguments are those of the extraction functions (in their order); ``hit`` is what the cache holds
    under the entry's key (``None``: nothing), the caller checks that it has every tensor it needs. ``extra``
    parts go into the key after the usual ones (model, data, split, transform, precision, image count).
    """

    def __init__(
        self,
        loaded: Any,
        dataset: Any,
        split: str,
        dataset_id: dict[str, Any],
        transform_id: str,
        device: str | None,
        precision: str,
        cache: FeatureCache | None,
        **extra: Any,
    ):
        self.loaded, self.split = loaded, split
        self.dev = resolve_device(device)
        self.prec = extraction_precision(precision, self.dev)
        self.cache = cache or FeatureCache(None)
        self.parts = {
            "model": loaded.identity,
            "data": dataset_id,
            "split": split,
            "transform": transform_id,
            "precision": self.prec,
            "images": len(dataset),
            **extra,
        }
        self.key = FeatureCache.key(self.parts)
        self.hit = self.cache.load(self.key)
        # bf16/fp16 run under autocast on CUDA; elsewhere the model and its inputs are cast instead.
        self.use_autocast = self.prec != "fp32" and self.dev.type == "cuda"

    def model(self) -> tuple[nn.Module, torch.dtype]:
        """The extractor on the device (cast to the precision off CUDA) and the dtype its inputs go in."""
        net = self.loaded.extractor.to(self.dev).eval()
        if self.prec != "fp32" and self.dev.type != "cuda":
            net = net.to(DTYPES[self.prec])
        in_dtype = torch.float32 if (self.use_autocast or self.prec == "fp32") else DTYPES[self.prec]
        return net, in_dtype

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward passes (disabled but on CUDA at bf16/fp16)."""
        return torch.autocast(self.dev.type, dtype=DTYPES[self.prec], enabled=self.use_autocast)

    def progress_bar(self, progress: bool, total: int, desc: str) -> Any:
        """A tqdm bar over ``total`` images when ``progress`` and stderr is a terminal, else ``None``."""
        if not (progress and sys.stderr.isatty()):
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency of the trainer
            return None
        return tqdm(total=total, desc=desc, unit="img", leave=False)

    def require_images(self, decoded: bool, skipped: int) -> None:
        """Refuse a split in which no image decoded (``skipped`` did not)."""
        if not decoded:
            why = f" ({skipped} could not be decoded)" if skipped else ""
            raise EvaluationError(f"no images in the {self.split} split{why}")

    def save(self, out: dict[str, Any], skipped: int) -> dict[str, Any]:
        """Store ``out`` (its ``None`` values left out) under the entry's key; ``out`` with ``skipped`` an int."""
        self.cache.save(self.key, {k: v for k, v in out.items() if v is not None}, self.parts)
        return {**out, "skipped": skipped}
