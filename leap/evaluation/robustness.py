"""Accuracy under common corruptions (``leap eval robustness``): the ImageNet-C protocol on any labelled
image folder (the paper's mini-ImageNet-C of Table 1 when the folder is ImageNet-100).

Protocol:

- the 15 ImageNet-C corruptions (:data:`CORRUPTIONS`: noise, blur, weather, digital) at severities 1-5,
  from ``imagecorruptions-imaug`` (a maintained fork of the ``imagecorruptions`` package, imported as
  ``imagecorruptions``; the original's last release, 1.1.2, no longer works with current libraries: it imports
  ``pkg_resources``, which setuptools 84 no longer has, and passes ``multichannel`` to scikit-image's
  ``gaussian``, which scikit-image 0.26 refuses);
- each validation image goes through the evaluation geometry (Resize 256 -> CenterCrop 224 at the model's
  resolution, :func:`leap.evaluation.transforms.geometry_transform`), is corrupted as 8-bit RGB (images
  under 32 px, the package's minimum, are upsampled bicubically to 32 px for the corruption and back), then
  normalized; every corrupted image is seeded from ``(seed, corruption, severity, image index)``
  (:func:`image_seed`), so the same settings give the same pixels on every run and machine;
- the corrupted images are cached as PNG (lossless) under ``CACHE_DIR/corrupted-images/KEY/`` (KEY: the
  dataset's identity, the split, the geometry, the corruption, severity, seed and the package version), the
  features of each model under the usual feature cache;
- the paper's linear probe (:func:`leap.evaluation.linear.train_linear_probe`) is trained on the clean
  training features once; the classifier after its last epoch is applied to the features of each corrupted
  validation set. Reported: the clean top-1 of that classifier, the top-1 per corruption and severity, the
  mean over severities per corruption, per severity, and over all corruptions and severities.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import MissingDependencyError
from .common import begin, feature_kinds
from .errors import EvaluationError
from .features import extract_features
from .transforms import geometry_transform, normalize

log = logging.getLogger("leap.eval")

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corruption_backend",
    "corrupt_image",
    "image_seed",
    "CorruptedImages",
    "evaluate_robustness",
]

#: The 15 ImageNet-C corruptions, in ImageNet-C's order.
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
#: The distribution that provides the ``imagecorruptions`` module, and the extra that installs it.
PACKAGE = "imagecorruptions-imaug"
_MIN_SIDE = 32  # imagecorruptions refuses smaller images
# The corruptions that take their own seed (the others draw from numpy's global generator, seeded here).
_SEEDED = ("glass_blur", "impulse_noise")


def _corrupt_fn() -> Callable[..., np.ndarray]:
    """The package's ``corrupt`` function (imported on first use)."""
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise MissingDependencyError(
            f"leap eval robustness needs the corruptions of the {PACKAGE} package (imported as imagecorruptions), "
            f'which is not installed; install it with: pip install "leap-kernels[robustness]"'
        ) from None
    return corrupt


def corruption_backend() -> tuple[Callable[..., np.ndarray], str]:
    """``(corrupt, "imagecorruptions-imaug X.Y.Z")``: the package's ``corrupt`` function and its version.

    Raises:
        MissingDependencyError: the package is not installed (one line naming the extra).
    """
    corrupt = _corrupt_fn()
    from importlib.metadata import PackageNotFoundError, version

    from imagecorruptions import get_corruption_names

    missing = sorted(set(CORRUPTIONS) - set(get_corruption_names("common")))
    if missing:
        raise MissingDependencyError(f"the installed imagecorruptions lacks {missing}; install {PACKAGE}")
    try:
        which = f"{PACKAGE} {version(PACKAGE)}"
    except PackageNotFoundError:  # another distribution of the module (e.g. the original imagecorruptions)
        which = "imagecorruptions (unknown distribution)"
    return corrupt, which


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The seed of one corrupted image: a hash of its settings and index, in ``[0, 2**32)`` (numpy's range)."""
    digest = hashlib.sha256(f"{seed}|{corruption}|{severity}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt_image(image: Image.Image, corruption: str, severity: int, seed: int, corrupt: Callable | None = None):
    """Corrupt an RGB image deterministically: PIL ``(W, H)`` -> PIL ``(W, H)`` RGB.

    Args:
        image: the image after the evaluation geometry.
        corruption, severity: one of :data:`CORRUPTIONS`, 1..5.
        seed: from :func:`image_seed`; numpy's global generator is seeded with it (and the corruptions with
            a generator of their own get it), so the result depends on nothing else.
        corrupt: the package's function (default: :func:`corruption_backend`'s).
    """
    if corrupt is None:
        corrupt = _corrupt_fn()
    w, h = image.size
    small = min(w, h) < _MIN_SIDE
    if small:  # upsample for the corruption, then back to the model's size
        scale = _MIN_SIDE / min(w, h)
        image = image.resize((max(_MIN_SIDE, round(w * scale)), max(_MIN_SIDE, round(h * scale))), Image.BICUBIC)
    np.random.seed(seed)
    extra = {"seed": seed} if corruption in _SEEDED else {}
    out = np.asarray(corrupt(np.asarray(image.convert("RGB")), severity=severity, corruption_name=corruption, **extra))
    result = Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8)).convert("RGB")
    return result.resize((w, h), Image.BICUBIC) if small else result


def _labels_of(dataset: Any) -> list[int] | None:
    """Every image's label without decoding (image folders and Fashion-MNIST), else ``None``."""
    if hasattr(dataset, "samples"):
        return [int(label) for _, label in dataset.samples]
    if hasattr(dataset, "labels"):
        return [int(v) for v in dataset.labels]
    return None


class CorruptedImages(Dataset):
    """The first ``n`` images of a labelled dataset, corrupted: yields ``(image (3, S, S), label)``, or
    ``None`` for an image that does not decode (dropped and counted by the extraction).

    ``base`` yields ``(PIL image, label)`` with its transform replaced by the geometry (a shallow copy is
    made here). With ``image_dir`` each corrupted image is read from ``image_dir/NNNNNNN.png`` when there,
    else made and written there (atomically: a killed write leaves no partial file under that name).
    """

    def __init__(
        self,
        base: Any,
        geometry: Callable,
        corruption: str,
        severity: int,
        *,
        seed: int = 0,
        n: int | None = None,
        image_dir: str | None = None,
    ):
        import copy

        if corruption not in CORRUPTIONS:
            raise EvaluationError(f"--corruptions: unknown corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
        if severity not in SEVERITIES:
            raise EvaluationError(f"--severities: expected 1..5, got {severity!r}")
        self.base = copy.copy(base)
        self.base.transform = geometry
        self.corruption, self.severity, self.seed = corruption, severity, seed
        self.n = len(base) if n is None else min(n, len(base))
        self.image_dir = image_dir
        self.labels = _labels_of(base)
        self.norm = normalize()

    def __len__(self) -> int:
        return self.n

    def path(self, i: int) -> str | None:
        return None if self.image_dir is None else os.path.join(self.image_dir, f"{i:07d}.png")

    def _cached(self, i: int) -> Image.Image | None:
        path = self.path(i)
        if path is None or self.labels is None or not os.path.isfile(path):
            return None
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception:  # noqa: BLE001 - a damaged cache file is made again
            return None

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        img = self._cached(i)
        if img is not None:
            return self.norm(img), self.labels[i]
        item = self.base[i]
        if item is None:
            return None
        clean, label = item
        seed = image_seed(self.seed, self.corruption, self.severity, i)
        img = corrupt_image(clean, self.corruption, self.severity, seed)
        path = self.path(i)
        if path is not None:
            _write_png(img, path)
        return self.norm(img), int(label)


def _png_count(directory: str | None) -> int:
    try:
        return sum(name.endswith(".png") and not name.startswith(".") for name in os.listdir(directory or ""))
    except OSError:
        return 0


def _write_png(img: Image.Image, path: str) -> None:
    """Write a cache PNG under a temp name, then rename (no fsync: a damaged file is only made again)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _choices(values: Sequence | None, known: Sequence, what: str) -> tuple:
    if values is None:
        return tuple(known)
    values = tuple(values)
    bad = [v for v in values if v not in known]
    if bad or not values:
        got = ", ".join(map(str, values)) or "nothing"
        raise EvaluationError(f"{what}: expected some of {', '.join(map(str, known))}, got {got}")
    return tuple(dict.fromkeys(values))


def evaluate_robustness(
    model_options: dict[str, Any],
    data: str | None,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    corruption_seed: int = 0,
    features: str = "both",
    data_source: str = "auto",
    epochs: int = 100,
    probe_batch_size: int = 256,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    no_cache: bool = False,
    run_dir: str | None = None,
    write_record: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 of the clean-trained linear probe under the ImageNet-C corruptions (see the module docstring).

    ``corruptions`` (default: all 15) and ``severities`` (default: 1-5) choose a subset; ``corruption_seed``
    seeds the corruptions, ``seed`` the probe's shuffling (as for :func:`leap.evaluation.run.evaluate_linear`).
    ``numbers`` of the record, per feature kind (``cls``, ``patch``): ``clean_top1``, ``mean_top1`` (over every
    corruption and severity), ``severity_mean_top1`` (``{"1": ...}``) and ``corruptions`` =
    ``{name: {"mean_top1", "top1": {"1": ..., ..., "5": ...}}}``.

    Raises:
        MissingDependencyError: ``imagecorruptions-imaug`` is not installed.
        EvaluationError: unknown corruptions or severities, and the errors of the linear probe's data.
    """
    from .linear import ProbeOptions, labelled_features, probe_top1, train_probes

    kinds = feature_kinds(features)
    names = _choices(corruptions, CORRUPTIONS, "--corruptions")
    levels = _choices(severities, SEVERITIES, "--severities")
    _, backend = corruption_backend()  # a missing package fails before any work
    ev = begin(model_options, cache_dir, no_cache, run_dir, write_record)
    loaded, cache = ev.loaded, ev.cache
    if loaded.identity["kind"] == "pixels":
        kinds = ("cls",)  # one probe on the pixels, under "cls" (as the linear probe)
    extraction = ev.extraction(batch_size, workers, device, precision, progress)
    found = labelled_features(loaded, data, data_source, (limit_train, limit_val), extraction)
    splits = found.splits
    geometry, geometry_id = geometry_transform(loaded.img_size, small_images=splits.kind == "fashion-mnist")
    probe = ProbeOptions(epochs, probe_batch_size, lr, momentum, weight_decay, seed)
    probes = train_probes(found, kinds, probe, device, progress)
    top1: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in kinds}
    images_dir = os.path.join(cache.directory, "corrupted-images") if cache.directory else None
    made = 0  # corrupted images written to the cache by this evaluation
    for name in names:
        for severity in levels:
            settings = {"geometry": geometry_id, "corruption": name, "severity": severity, "seed": corruption_seed}
            key = {"data": found.dataset_id, "split": splits.val_split, "backend": backend, **settings}
            image_dir = os.path.join(images_dir, cache.key(key)[:32]) if images_dir else None
            ds = CorruptedImages(
                splits.val, geometry, name, severity, seed=corruption_seed, n=found.val_images, image_dir=image_dir
            )
            before = _png_count(image_dir)
            transform_id = (
                f"{geometry_id}-{name}-s{severity}-seed{corruption_seed}-{backend.replace(' ', '-')}-imagenet-norm"
            )
            feats = extract_features(
                loaded,
                ds,
                split=f"{splits.val_split}-corrupted",
                dataset_id=found.dataset_id,
                transform_id=transform_id,
                desc=f"features ({name}, severity {severity})",
                **extraction,
            )
            made += _png_count(image_dir) - before
            for kind in kinds:
                top1[kind].setdefault(name, {})[str(severity)] = probe_top1(
                    probes[kind].linear, feats[kind], feats["labels"]
                )
    numbers = {kind: _summarize(probes[kind].last_top1, top1[kind], levels) for kind in kinds}
    return ev.write(
        "robustness",
        data={
            **found.record_data(data),
            "corrupted_transform": f"{geometry_id} -> corruption (8-bit RGB, >= 32 px) -> imagenet-norm",
            "corrupted_images": images_dir,
        },
        settings={
            "features": list(kinds),
            "corruptions": list(names),
            "severities": list(levels),
            "corruption_seed": corruption_seed,
            "implementation": backend,
            "probe": {**probe.record(), "trained_on": "clean training features", "applied": "after its last epoch"},
            "precision": precision,
            "reported": "top-1 on the corrupted validation images; mean_top1 = mean over corruptions and severities",
        },
        numbers=numbers,
        corrupted_images_made=made,
    )


def _summarize(clean: float, top1: dict[str, dict[str, float]], levels: Sequence[int]) -> dict[str, Any]:
    """The numbers of one feature kind from ``{corruption: {severity: top1}}``."""
    per = {name: {"mean_top1": float(np.mean(list(by_sev.values()))), "top1": by_sev} for name, by_sev in top1.items()}
    return {
        "clean_top1": clean,
        "mean_top1": float(np.mean([v for by_sev in top1.values() for v in by_sev.values()])),
        "severity_mean_top1": {str(s): float(np.mean([by[str(s)] for by in top1.values()])) for s in levels},
        "corruptions": per,
    }
