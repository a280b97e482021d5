"""Revisited Oxford / Paris retrieval (``leap eval retrieval``): the revisitop protocol.

Features: the model's CLS token after the final norm, L2-normalized, one scale; the 70 queries are
cropped to their bounding box first. Ranking: cosine similarity (dot product of the normalized features),
database images in decreasing order. The transform (:func:`retrieval_transform`, recorded in each record):

- ``center-crop`` (the default, the paper's): Resize 256 -> CenterCrop 224 at the model's resolution
  (bicubic, shorter side), as the linear probe;
- ``keep-aspect``: the longer side resized to the model's resolution, both sides snapped to the patch
  size, aspect ratio kept (the whole image or box is seen; the model runs at the image's own grid).

Scores: mAP (and mP@1, 5, 10) in the three revisitop settings, with each query's lists from the
ground truth (``easy``, ``hard``, ``junk``):

============  ===================  ===================
setting       positives            ignored (junk)
============  ===================  ===================
Easy          easy                 junk + hard
Medium        easy + hard          junk
Hard          hard                 junk + easy
============  ===================  ===================

"Ignored" images are removed from the ranking before the precision is measured (each positive's
rank drops by the number of ignored images ranked above it). A query with no positives in a setting is
left out of that setting's mean (revisitop's ``compute_map``; the count is reported as ``skipped``).
AP is revisitop's: the trapezoid rule over the precision before and after each positive.

Ground truth: revisitop's ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``, read with a restricted
unpickler (plain containers, numbers, strings and numpy arrays only: anything else, e.g. a pickle that
would import ``os``, fails), or the same content as JSON (``gnd_roxford5k.json``)::

    {"imlist": [db image names], "qimlist": [query image names],
     "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [db indices], "hard": [...], "junk": [...]}, ...]}
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.datasets import open_image
from .errors import EvaluationError
from .transforms import eval_transform, normalize

log = logging.getLogger("leap.eval")

__all__ = [
    "DATASETS",
    "SETTINGS",
    "GroundTruth",
    "RestrictedUnpickler",
    "load_ground_truth",
    "ground_truth_to_json",
    "setting_lists",
    "compute_ap",
    "compute_map",
    "rank_database",
    "revisitop_scores",
    "RevisitopImages",
    "retrieval_transform",
    "RETRIEVAL_TRANSFORMS",
    "find_dataset",
]

DATASETS = ("roxford5k", "rparis6k")
SETTINGS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)
#: The named transforms of :func:`retrieval_transform`; the first is the default (the paper's).
RETRIEVAL_TRANSFORMS = ("center-crop", "keep-aspect")


# ----------------------------------------------------------------------------- ground truth


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays/scalars, nothing else.

    Any other global a pickle names (a function such as ``os.system``, a class) raises
    :class:`EvaluationError` naming it, before anything is called.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        # Python 3 writes bytes (e.g. numpy array data) in protocol <= 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file, encoding="latin1")  # Python 2 pickles of numpy arrays need latin1
        self._source = source

    def find_class(self, module: str, name: str):
        # Protocols 0-2 may name Python 2 modules; pickle maps them the same way before importing.
        if (module, name) in self._ALLOWED or ({"__builtin__": "builtins"}.get(module), name) in self._ALLOWED:
            return super().find_class(module, name)
        raise EvaluationError(
            f"{self._source}: refusing to unpickle {module}.{name} (the ground truth may hold "
            "only lists, dicts, numbers, strings and numpy arrays; this file is not a revisitop "
            "gnd file or was tampered with)"
        )

    def persistent_load(self, pid):
        raise EvaluationError(f"{self._source}: refusing a pickle with persistent ids")


@dataclasses.dataclass
class GroundTruth:
    """Revisitop ground truth: ``imlist`` (database names), ``qimlist`` (query names), and per query
    ``bbx`` ``(x1, y1, x2, y2)`` or ``None``, and the ``easy``/``hard``/``junk`` database indices."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "imlist": list(self.imlist),
            "qimlist": list(self.qimlist),
            "gnd": [
                {
                    "bbx": None if g["bbx"] is None else list(g["bbx"]),
                    "easy": list(g["easy"]),
                    "hard": list(g["hard"]),
                    "junk": list(g["junk"]),
                }
                for g in self.gnd
            ],
        }


def _int_list(value: Any, where: str, n_db: int) -> list[int]:
    arr = np.asarray(value).reshape(-1) if value is not None else np.zeros(0, dtype=np.int64)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise EvaluationError(f"{where}: expected database indices (integers), got dtype {arr.dtype}")
    out = [int(v) for v in arr]
    bad = [v for v in out if not 0 <= v < n_db]
    if bad:
        raise EvaluationError(f"{where}: index {bad[0]} is outside the {n_db} database images")
    return out


def _validate(obj: Any, source: str) -> GroundTruth:
    if not isinstance(obj, dict) or not all(k in obj for k in ("imlist", "qimlist", "gnd")):
        found = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        raise EvaluationError(f"{source}: expected a dict with imlist, qimlist and gnd; found {found}")
    imlist, qimlist, gnd = obj["imlist"], obj["qimlist"], obj["gnd"]
    for name, lst in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(lst, (list, tuple)) or not all(isinstance(s, str) for s in lst):
            raise EvaluationError(f"{source}: {name} must be a list of image names")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        raise EvaluationError(
            f"{source}: gnd must be a list with one entry per query ({len(qimlist)}), got "
            f"{len(gnd) if isinstance(gnd, (list, tuple)) else type(gnd).__name__}"
        )
    out = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise EvaluationError(f"{source}: gnd[{i}] must be a dict, got {type(g).__name__}")
        bbx = g.get("bbx")
        if bbx is not None:
            try:
                bbx = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
            except (TypeError, ValueError):
                raise EvaluationError(
                    f"{source}: gnd[{i}].bbx must hold 4 numbers (x1, y1, x2, y2), got {bbx!r}"
                ) from None
            if len(bbx) != 4:
                raise EvaluationError(f"{source}: gnd[{i}].bbx must hold 4 numbers (x1, y1, x2, y2)")
            x1, y1, x2, y2 = bbx
            if not all(np.isfinite(bbx)):
                raise EvaluationError(f"{source}: gnd[{i}].bbx holds a non-finite number: {bbx}")
            if not (x2 > x1 and y2 > y1):
                raise EvaluationError(
                    f"{source}: gnd[{i}].bbx {bbx} is empty or inverted: expected (x1, y1, x2, y2) with x2 > x1 and "
                    "y2 > y1 (the query's bounding box in pixels)"
                )
        entry = {"bbx": None if bbx is None else tuple(bbx)}
        for key in ("easy", "hard", "junk"):
            entry[key] = _int_list(g.get(key), f"{source}: gnd[{i}].{key}", len(imlist))
        out.append(entry)
    return GroundTruth(list(imlist), list(qimlist), out)


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Read a revisitop ground-truth file: ``.pkl`` (restricted unpickler) or ``.json``.

    Raises:
        EvaluationError: missing file, a pickle naming anything but plain containers and numpy arrays,
            malformed content (missing keys, indices outside the database).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvaluationError(f"ground truth not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".json"):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"{path}: not valid JSON ({exc})") from None
    else:
        try:
            obj = RestrictedUnpickler(io.BytesIO(raw), source=path).load()
        except EvaluationError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pickles raise many types
            raise EvaluationError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    return _validate(obj, path)


def ground_truth_to_json(gt: GroundTruth, path: str | os.PathLike) -> None:
    """Write ``gt`` as the JSON form :func:`load_ground_truth` reads."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(gt.to_dict(), f)


# ----------------------------------------------------------------------------- scores


def setting_lists(gt: GroundTruth, setting: str) -> list[tuple[list[int], list[int]]]:
    """Per query ``(positives, ignored)`` for a revisitop setting (see the module docstring)."""
    if setting == "easy":
        return [(g["easy"], g["junk"] + g["hard"]) for g in gt.gnd]
    if setting == "medium":
        return [(g["easy"] + g["hard"], g["junk"]) for g in gt.gnd]
    if setting == "hard":
        return [(g["hard"], g["junk"] + g["easy"]) for g in gt.gnd]
    raise EvaluationError(f"setting: expected one of {SETTINGS}, got {setting!r}")


def compute_ap(positions: np.ndarray, num_positives: int) -> float:
    """Revisitop AP: ``positions`` = 0-based ranks of the retrieved positives (sorted, ignored images
    already removed), ``num_positives`` = size of the positive list."""
    j = np.arange(len(positions), dtype=np.float64)
    r = np.asarray(positions, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    p1 = (j + 1) / (r + 1)
    return float(((p0 + p1) / 2).sum() / num_positives)


def compute_map(
    ranks: np.ndarray, lists: Sequence[tuple[Sequence[int], Sequence[int]]], kappas: Sequence[int] = KAPPAS
) -> dict[str, Any]:
    """mAP and mean precision at ``kappas`` of rankings against per-query positive/ignored lists.

    Args:
        ranks: ``(num_queries, num_db)`` int: ``ranks[q]`` lists database indices, best match first.
        lists: per query ``(positives, ignored)`` database indices (:func:`setting_lists`).
        kappas: the ``k`` of precision@k.

    Returns:
        ``{"mAP", "mP@k" (each k), "aps" (per query; NaN for skipped), "skipped" (queries without
        positives, left out of the means as revisitop does), "queries" (the others)}``.
        With no query left, the means are NaN.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(lists) != ranks.shape[0]:
        raise EvaluationError(f"ranks: expected shape ({len(lists)}, num_db), got {ranks.shape}")
    nq, ndb = ranks.shape
    if ranks.size and (ranks.min() < 0 or ranks.max() >= ndb):
        raise EvaluationError(f"ranks: expected database indices in [0, {ndb}), got {ranks.min()}..{ranks.max()}")
    inverse = np.full_like(ranks, -1)  # inverse[q, i] = rank of database image i for query q
    inverse[np.arange(nq)[:, None], ranks] = np.arange(ndb)[None, :]
    if (inverse < 0).any():
        raise EvaluationError("ranks: every row must be a permutation of all database indices (a full ranking)")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q, (ok, ignored) in enumerate(lists):
        if len(ok) == 0:
            continue
        pos = np.sort(inverse[q, np.unique(np.asarray(ok, dtype=np.int64))])
        junk = np.sort(inverse[q, np.unique(np.asarray(ignored, dtype=np.int64))]) if len(ignored) else np.zeros(0, int)
        # Each positive moves up by the number of ignored images ranked strictly above it.
        pos = pos - np.searchsorted(junk, pos, side="left")
        aps[q] = compute_ap(pos, len(ok))
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(pos1.max(), k)
            prs[q, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    out: dict[str, Any] = {"mAP": float(aps[valid].mean()) if valid.any() else float("nan")}
    for j, k in enumerate(kappas):
        out[f"mP@{k}"] = float(prs[valid, j].mean()) if valid.any() else float("nan")
    out.update(aps=aps.tolist(), skipped=int((~valid).sum()), queries=int(valid.sum()))
    return out


def rank_database(
    query_features: torch.Tensor, db_features: torch.Tensor, exclude: torch.Tensor | None = None
) -> np.ndarray:
    """Cosine ranking: ``query (Q, D)``, ``db (N, D)`` (any float dtype; normalized here in fp32) ->
    ``(Q, N)`` database indices, most similar first (ties: lower index first). ``exclude (N,)`` bool:
    database images ranked last whatever their feature (the undecodable ones)."""
    if query_features.ndim != 2 or db_features.ndim != 2 or query_features.shape[1] != db_features.shape[1]:
        raise EvaluationError(
            f"features: expected (Q, D) and (N, D), got {tuple(query_features.shape)} and {tuple(db_features.shape)}"
        )
    q = torch.nn.functional.normalize(query_features.float(), dim=1)
    x = torch.nn.functional.normalize(db_features.float(), dim=1)
    sim = q @ x.T
    if exclude is not None:  # images without a feature (undecodable) rank last
        sim[:, exclude.to(torch.bool)] = -math.inf
    return torch.argsort(-sim, dim=1, stable=True).numpy()


def revisitop_scores(ranks: np.ndarray, gt: GroundTruth, kappas: Sequence[int] = KAPPAS) -> dict[str, dict]:
    """``{"easy": compute_map(...), "medium": ..., "hard": ...}`` for rankings ``(Q, N)``."""
    if ranks.shape != (len(gt.qimlist), len(gt.imlist)):
        raise EvaluationError(f"ranks: expected shape ({len(gt.qimlist)}, {len(gt.imlist)}), got {ranks.shape}")
    return {s: compute_map(ranks, setting_lists(gt, s), kappas) for s in SETTINGS}


# ----------------------------------------------------------------------------- images


def retrieval_transform(img_size: int, patch_size: int, mode: str = "center-crop") -> tuple[Any, str]:
    """The single-scale transform named ``mode`` (:data:`RETRIEVAL_TRANSFORMS`): ``(transform, id)``.

    ``center-crop`` (the paper's): Resize ``round(img_size * 256 / 224)`` (shorter side, bicubic) ->
    CenterCrop ``img_size``, output ``(3, img_size, img_size)``. ``keep-aspect``: longer side ->
    ``img_size``, each side rounded to a multiple of the patch size (at least one patch), bicubic, aspect
    ratio kept, output ``(3, H, W)``. Both end with ToTensor and ImageNet normalization.

    Raises:
        EvaluationError: an unknown ``mode``.
    """
    if mode not in RETRIEVAL_TRANSFORMS:
        raise EvaluationError(f"--transform: expected one of {', '.join(RETRIEVAL_TRANSFORMS)}, got {mode!r}")
    if mode == "center-crop":
        return eval_transform(img_size)
    norm = normalize()

    def transform(img: Image.Image) -> torch.Tensor:
        w, h = img.size
        scale = img_size / max(w, h)
        nw = max(patch_size, int(round(w * scale / patch_size)) * patch_size)
        nh = max(patch_size, int(round(h * scale / patch_size)) * patch_size)
        return norm(img.resize((nw, nh), Image.BICUBIC))

    return transform, f"revisitop-long{img_size}-snap{patch_size}-bicubic-imagenet-norm"


class RevisitopImages(Dataset):
    """Database or query images of a revisitop dataset: ``root/jpg/<name>.jpg``; queries are cropped
    to their ``bbx`` (rounded to pixels, clipped to the image). Yields ``(image tensor, index)``."""

    def __init__(self, root: str, names: Sequence[str], transform, bbxs: Sequence | None = None):
        self.root, self.names, self.transform, self.bbxs = root, list(names), transform, bbxs
        missing = [n for n in self.names if not os.path.isfile(self.path(n))]
        if missing:
            raise EvaluationError(
                f"{len(missing)} of {len(self.names)} images not found, e.g. "
                f"{self.path(missing[0])}; expected the revisitop layout {root}/jpg/<name>.jpg"
            )

    def path(self, name: str) -> str:
        return os.path.join(self.root, "jpg", name if name.lower().endswith(".jpg") else name + ".jpg")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        path = self.path(self.names[i])
        try:
            img = open_image(path)  # regular files only, 16-bit images scaled, decoded in full
        except Exception as exc:  # noqa: BLE001 - truncated, empty, a decompression bomb: PIL raises many types
            # As image folders do: skipped (None) and counted by the extraction, named here.
            log.warning("skipping undecodable image %s: %s: %s", path, type(exc).__name__, exc)
            return None
        if self.bbxs is not None and self.bbxs[i] is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in self.bbxs[i])
            w, h = img.size
            x1, y1 = max(0, min(x1, w - 1)), max(0, min(y1, h - 1))
            x2, y2 = max(x1 + 1, min(x2, w)), max(y1 + 1, min(y2, h))
            img = img.crop((x1, y1, x2, y2))
        return self.transform(img), i


def find_dataset(root: str, dataset: str, gnd: str | None = None) -> tuple[str, str]:
    """``(dataset folder, ground-truth file)`` for ``root`` = the folder holding ``roxford5k/``
    (revisitop's ``data/datasets``) or the dataset folder itself; ``gnd`` overrides the file."""
    if dataset not in DATASETS:
        raise EvaluationError(f"--dataset: expected one of {DATASETS}, got {dataset!r}")
    if not os.path.isdir(root):
        raise EvaluationError(f"--data {root}: no such folder")
    folder = os.path.join(root, dataset) if os.path.isdir(os.path.join(root, dataset)) else root
    if gnd is None:
        candidates = [os.path.join(folder, f"gnd_{dataset}.{ext}") for ext in ("pkl", "json")]
        gnd = next((c for c in candidates if os.path.isfile(c)), None)
        if gnd is None:
            raise EvaluationError(
                f"no gnd_{dataset}.pkl or .json in {folder}; download it from the revisitop "
                "project (see the README) or pass --gnd FILE"
            )
    if not os.path.isdir(os.path.join(folder, "jpg")):
        raise EvaluationError(f"{folder} has no jpg/ folder; expected {folder}/jpg/<name>.jpg")
    return folder, gnd
