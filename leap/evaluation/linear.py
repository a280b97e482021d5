"""The paper's linear probe on frozen features (``leap eval linear``).

Protocol: features extracted once (:mod:`leap.evaluation.features`: CLS token, or the mean of the
patch tokens, after the final norm; Resize 256 -> CenterCrop 224 at the model's resolution, or the
whole image resized for small images such as Fashion-MNIST), then a zero-initialized linear classifier
``Linear(D, C)`` trained on the cached features with SGD (lr 0.1, momentum 0.9, no weight decay), a
cosine learning-rate schedule to 0 over all steps, 100 epochs, batch 256 (shuffled, last partial batch
kept), cross-entropy. After every epoch the classifier is evaluated on the validation split.

Reported numbers: ``best_top1`` = the best validation top-1 over the epochs (the paper's protocol;
it selects the epoch on the validation set, so it is optimistic), ``best_epoch``, and ``last_top1`` =
validation top-1 after the last epoch (no selection).

Splits: the dataset's own (``train/`` and ``val/`` class folders (``test/`` if there is no ``val/``), or
Fashion-MNIST's train and t10k files). A dataset without a held-out split is refused: accuracy is
never measured on training images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import FashionMNIST, ImageFolderDataset
from ..distributed import resolve_device
from .errors import EvaluationError
from .features import LoadedModel, eval_transform, extract_features

__all__ = [
    "ProbeResult",
    "train_linear_probe",
    "ProbeOptions",
    "train_probes",
    "probe_top1",
    "LabelledSplits",
    "LabelledFeatures",
    "open_splits",
    "labelled_features",
    "limit",
    "folder_fingerprint",
]

_VAL_NAMES = ("val", "test")


@dataclasses.dataclass
class ProbeResult:
    """Result of :func:`train_linear_probe` (accuracies are fractions in [0, 1])."""

    best_top1: float  # best validation top-1 over epochs (paper protocol)
    best_epoch: int  # 1-based epoch of best_top1 (the first one if tied)
    last_top1: float  # validation top-1 after the last epoch
    history: list[float]  # validation top-1 after each epoch
    train_images: int
    val_images: int
    dim: int
    num_classes: int
    #: The classifier after the last epoch (``leap eval robustness`` applies it to corrupted features).
    linear: torch.nn.Linear | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (every field but the classifier)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "linear"}


def _check_features(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise EvaluationError(f"{name} features: expected shape (N, D), got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise EvaluationError(f"{name} labels: expected shape ({x.shape[0]},), got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise EvaluationError(f"{name}: no images")
    if not x.is_floating_point():
        raise EvaluationError(f"{name} features: expected a floating dtype, got {x.dtype}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise EvaluationError(f"{name} labels: expected an integer dtype, got {y.dtype}")
    if int(y.min()) < 0:
        raise EvaluationError(f"{name} labels: expected >= 0, got {int(y.min())}")


@torch.no_grad()
def _top1(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    correct = 0
    for s in range(0, x.shape[0], chunk):
        correct += (linear(x[s : s + chunk]).argmax(1) == y[s : s + chunk]).sum().item()
    return correct / x.shape[0]


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "linear probe",
) -> ProbeResult:
    """Train the zero-initialized linear probe; evaluate on the validation features after each epoch.

    Args:
        train_x ``(N, D)``, train_y ``(N,)``: training features (any float dtype; used as fp32) and labels.
        val_x ``(M, D)``, val_y ``(M,)``: validation features and labels.
        num_classes: default ``max(label) + 1`` over both splits.
        epochs, batch_size, lr, momentum, weight_decay: the paper's 100, 256, 0.1, 0.9, 0.
        seed: seeds the shuffling (the initialization is zero, so this is the only randomness).
        device: where to train.
        progress: a progress bar over epochs (only on a terminal).

    Returns:
        :class:`ProbeResult`.

    Raises:
        EvaluationError: bad shapes or dtypes, non-finite features, mismatched widths, bad settings.
    """
    _check_features(train_x, train_y, "training")
    _check_features(val_x, val_y, "validation")
    if train_x.shape[1] != val_x.shape[1]:
        raise EvaluationError(f"feature widths differ: training {train_x.shape[1]}, validation {val_x.shape[1]}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise EvaluationError(
            f"linear probe: expected epochs >= 1, batch size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    dev = torch.device(device)
    x = train_x.to(dev, torch.float32)
    xv = val_x.to(dev, torch.float32)
    if not (torch.isfinite(x).all() and torch.isfinite(xv).all()):
        raise EvaluationError("features contain NaN or Inf; the model's outputs are not finite")
    y, yv = train_y.to(dev, torch.long), val_y.to(dev, torch.long)
    classes = int(max(y.max().item(), yv.max().item())) + 1
    if num_classes is None:
        num_classes = classes
    elif num_classes < classes:
        raise EvaluationError(f"num_classes {num_classes} is smaller than the largest label + 1 ({classes})")

    linear = torch.nn.Linear(x.shape[1], num_classes).to(dev)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    # Cosine over all steps, evaluated per step (step t uses lr * (1 + cos(pi t / total)) / 2).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total)))
    gen = torch.Generator().manual_seed(seed)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    show = progress and tqdm is not None and sys.stderr.isatty()
    epochs_iter = tqdm(range(epochs), desc=desc, leave=False) if show else range(epochs)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and batch_size * x.shape[1] * num_classes < 1 << 22:
        # Steps this small are dominated by thread start-up; on a busy CPU several threads
        # make them 10x slower than one.
        torch.set_num_threads(1)
    try:
        history = _run_epochs(epochs_iter, x, y, xv, yv, _Probe(linear, opt, sched, gen), batch_size, show)
    finally:
        torch.set_num_threads(threads)
    best_epoch = max(range(epochs), key=lambda e: (history[e], -e)) + 1
    return ProbeResult(
        best_top1=history[best_epoch - 1],
        best_epoch=best_epoch,
        last_top1=history[-1],
        history=history,
        train_images=int(x.shape[0]),
        val_images=int(xv.shape[0]),
        dim=int(x.shape[1]),
        num_classes=num_classes,
        linear=linear.eval(),
    )


@dataclasses.dataclass
class ProbeOptions:
    """The settings of :func:`train_linear_probe` that ``leap eval linear`` and ``robustness`` share."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int

    def record(self, **between: Any) -> dict[str, Any]:
        """The settings as the records list them: the optimizer's, the cosine schedule, ``between``, the seed."""
        options = dataclasses.asdict(self)
        seed = options.pop("seed")
        return {**options, "schedule": "cosine", **between, "seed": seed}


def train_probes(
    found: LabelledFeatures, kinds: tuple[str, ...], probe: ProbeOptions, device: str, progress: bool
) -> dict[str, ProbeResult]:
    """One :func:`train_linear_probe` per feature kind of ``kinds`` on ``found``'s training features, scored on
    its validation features."""
    return {
        kind: train_linear_probe(
            found.train[kind],
            found.train["labels"],
            found.val[kind],
            found.val["labels"],
            num_classes=len(found.splits.classes),
            device=resolve_device(device),
            progress=progress,
            desc=f"linear probe ({kind})",
            **dataclasses.asdict(probe),
        )
        for kind in kinds
    }


def probe_top1(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 of a trained probe (:attr:`ProbeResult.linear`) on features ``x (M, D)`` with labels ``y (M,)``."""
    _check_features(x, y, "evaluation")
    weight = linear.weight
    return _top1(linear, x.to(weight.device, torch.float32), y.to(weight.device, torch.long))


@dataclasses.dataclass
class _Probe:
    """The probe being trained: the linear layer, its optimizer and schedule, the shuffling generator."""

    linear: torch.nn.Linear
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator


def _run_epochs(epochs_iter, x, y, xv, yv, probe: _Probe, batch_size: int, show: bool) -> list[float]:
    """Train over ``epochs_iter``; the validation top-1 after each epoch."""
    history: list[float] = []
    for _ in epochs_iter:
        perm = torch.randperm(x.shape[0], generator=probe.gen).to(x.device)
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(probe.linear(x[idx]), y[idx])
            probe.opt.zero_grad(set_to_none=True)
            loss.backward()
            probe.opt.step()
            probe.sched.step()
        history.append(_top1(probe.linear, xv, yv))
        if show:
            epochs_iter.set_postfix(val_top1=f"{100 * history[-1]:.2f}%")
    return history


# ----------------------------------------------------------------------------- train/val splits


@dataclasses.dataclass
class LabelledSplits:
    """The training and validation datasets of a labelled source, with what identifies them.

    ``identity`` (path, kind, file sizes/times or the file list's hash) goes into the feature-cache key.
    """

    kind: str  # "fashion-mnist" or "folder"
    train: Dataset
    val: Dataset
    val_split: str
    classes: list[str]
    identity: dict[str, Any]
    transform_id: str


def _fashion_dir(data: str | None) -> tuple[Any, Any] | None:
    """Fashion-MNIST train and t10k files under ``data`` itself (not the system default folders)."""
    local = [os.path.realpath(d) for d in FashionMNIST.candidate_dirs(data)][:3] if data else None
    found = []
    for split in ("train", "test"):
        pair = FashionMNIST.find_files(data, split)
        if pair is not None and local is not None and os.path.realpath(pair[0].parent) not in local:
            pair = None
        found.append(pair)
    return tuple(found) if any(found) else None


def folder_fingerprint(root: str, datasets: list) -> str:
    """SHA-256 over every file of ``datasets`` (image folders): its path relative to ``root``, label,
    size and modification time in ns. Images changed in place (same names) change it, so the feature
    cache never serves the features of the old images."""
    import hashlib

    h = hashlib.sha256()
    for ds in datasets:
        for path, label in ds.samples:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\t{st.st_ctime_ns}"
            except OSError:  # gone since the listing: it will not decode either
                stamp = "missing"
            h.update(f"{os.path.relpath(path, root)}\t{label}\t{stamp}\n".encode())
    return h.hexdigest()


def _stat_id(path) -> list:
    st = os.stat(path)
    # ctime too: a same-size replacement stamped with the old mtime (touch -r) still changes it.
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def open_splits(data: str | None, img_size: int, *, source: str = "auto") -> LabelledSplits:
    """The labelled training and validation splits under ``data``, with the evaluation transform.

    Args:
        data: a folder with ``train/`` and ``val/`` (or ``test/``) class folders, or with the
            Fashion-MNIST idx files (train and t10k); ``None`` = Fashion-MNIST from the system folder.
        img_size: the model's resolution: images become ``(3, img_size, img_size)`` through
            :func:`leap.evaluation.features.eval_transform` (Resize + CenterCrop for image folders,
            the whole 28 px image resized for Fashion-MNIST).
        source: ``auto``, ``folder`` or ``fashion-mnist``.

    Raises:
        EvaluationError: missing data, or no held-out split (accuracy is never measured on training images).
    """
    if source not in ("auto", "folder", "fashion-mnist"):
        raise EvaluationError(f"--data-source: expected auto, folder or fashion-mnist, got {source!r}")
    if data is not None and not os.path.isdir(data):
        raise EvaluationError(f"--data {data}: no such folder")
    fashion = _fashion_dir(data) if source != "folder" else None
    if data is None and source != "folder":
        fashion = tuple(FashionMNIST.find_files(None, s) for s in ("train", "test"))
        if not any(fashion):
            raise EvaluationError(
                "no --data given and Fashion-MNIST is not installed in "
                "/usr/share/datasets/fashion-mnist; pass --data PATH"
            )
    if fashion is not None:
        train_files, test_files = fashion
        if train_files is None or test_files is None:
            missing = "train" if train_files is None else "t10k (test)"
            raise EvaluationError(
                f"Fashion-MNIST under {data}: the {missing} idx files are missing; the linear "
                "probe needs both the training and the test split"
            )
        transform, transform_id = eval_transform(img_size, small_images=True)
        train = FashionMNIST(os.path.dirname(train_files[0]), "train", transform=transform)
        val = FashionMNIST(os.path.dirname(test_files[0]), "test", transform=transform)
        identity = {"kind": "fashion-mnist", "files": [_stat_id(p) for p in (*train_files, *test_files)]}
        return LabelledSplits("fashion-mnist", train, val, "test", list(FashionMNIST.classes), identity, transform_id)
    if source == "fashion-mnist":
        raise EvaluationError(f"--data {data}: no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...)")
    if data is None:
        raise EvaluationError("--data PATH is required for --data-source folder")
    if not os.path.isdir(os.path.join(data, "train")):
        raise EvaluationError(
            f"--data {data}: no train/ folder; the linear probe needs train/ and val/ class "
            "folders (accuracy is never measured on training images)"
        )
    val_split = next((s for s in _VAL_NAMES if os.path.isdir(os.path.join(data, s))), None)
    if val_split is None:
        raise EvaluationError(
            f"--data {data}: no val/ (or test/) folder beside train/; the linear probe needs a "
            "held-out split (accuracy is never measured on training images)"
        )
    transform, transform_id = eval_transform(img_size)
    try:
        train = ImageFolderDataset(data, "train", transform=transform)
        val = ImageFolderDataset(data, val_split, transform=transform)
    except (ValueError, FileNotFoundError) as exc:
        raise EvaluationError(str(exc).splitlines()[0]) from None
    for ds in (train, val):  # an undecodable image is dropped and counted, never replaced by a duplicate
        ds.skip_undecodable = True
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:5]
        only_v = sorted(set(val.classes) - set(train.classes))[:5]
        raise EvaluationError(
            f"--data {data}: train/ and {val_split}/ have different class folders "
            f"(only in train: {only_t}; only in {val_split}: {only_v})"
        )
    identity = {
        "kind": "folder",
        "root": os.path.realpath(data),
        "val_split": val_split,
        "files_sha256": folder_fingerprint(data, [train, val]),
    }
    return LabelledSplits("folder", train, val, val_split, list(train.classes), identity, transform_id)


class _FirstN(Dataset):
    def __init__(self, dataset: Dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]


def limit(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` images of ``dataset`` (all with ``None``)."""
    if n is None:
        return dataset
    if n < 1:
        raise EvaluationError(f"image limit: expected >= 1, got {n}")
    return _FirstN(dataset, n)


@dataclasses.dataclass
class LabelledFeatures:
    """The features of both splits of a labelled dataset (:func:`labelled_features`): ``train`` and ``val``
    as :func:`leap.evaluation.features.extract_features` returns them."""

    splits: LabelledSplits
    dataset_id: dict[str, Any]  # the data's identity in the feature-cache key (with the limits)
    val_images: int  # images of the (limited) validation split, decoded or not
    train: dict[str, Any]
    val: dict[str, Any]

    def record_data(self, data: str | None, *, classes: bool = True) -> dict[str, Any]:
        """The ``data`` part of an evaluation record (``classes``: with the class count)."""
        return {
            "path": None if data is None else os.path.abspath(data),
            "kind": self.splits.kind,
            "val_split": self.splits.val_split,
            "train_images": len(self.train["labels"]),
            "val_images": len(self.val["labels"]),
            "skipped_images": {"train": self.train["skipped"], "val": self.val["skipped"]},
            **({"classes": len(self.splits.classes)} if classes else {}),
            "transform": self.splits.transform_id,
        }


def labelled_features(
    loaded: LoadedModel,
    data: str | None,
    source: str,
    limits: tuple[int | None, int | None],
    extraction: dict[str, Any],
) -> LabelledFeatures:
    """Open the labelled splits under ``data`` (:func:`open_splits`), keep the first ``limits`` (training,
    validation) images of each and extract (or read cached) their features.

    ``extraction``: the keyword arguments of :func:`leap.evaluation.features.extract_features` but the data's
    (:meth:`leap.evaluation.common.Evaluation.extraction`).
    """
    splits = open_splits(data, loaded.img_size, source=source)
    train_ds, val_ds = limit(splits.train, limits[0]), limit(splits.val, limits[1])
    dataset_id = {**splits.identity, "limit": list(limits)}
    common = dict(dataset_id=dataset_id, transform_id=splits.transform_id, **extraction)
    train = extract_features(loaded, train_ds, split="train", **common)
    val = extract_features(loaded, val_ds, split=splits.val_split, **common)
    return LabelledFeatures(splits, dataset_id, len(val_ds), train, val)
