"""The evaluation's on-disk feature cache and the file hashing its keys use.

Entries are ``torch.save`` files read back with ``weights_only=True``, written atomically (with
fsync) next to a readable JSON note of what each holds. The key is the SHA-256 of the canonical
JSON of its parts (checkpoint hash, recipe, block, dataset identity, split, transform, precision;
:mod:`.features` builds them) and :data:`EXTRACTOR_VERSION`. A weights file is hashed and loaded through
one descriptor (:func:`read_hashed`), so the hash is always that of the bytes loaded; temp files of killed
cache writes are removed once they are an hour old.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any

import torch

from ..runlog import TEMP_FILE_RE, atomic_write
from .errors import EvaluationError

__all__ = ["EXTRACTOR_VERSION", "FeatureCache", "default_cache_dir", "file_sha256", "fileobj_sha256", "read_hashed"]

# Bumped when the extraction (:func:`.features.extract_features`) changes what it computes.
EXTRACTOR_VERSION = 2


def default_cache_dir() -> str:
    """``$LEAP_CACHE_DIR/features``, else ``$XDG_CACHE_HOME/leap/features`` (``~/.cache/leap/features``)."""
    if os.environ.get("LEAP_CACHE_DIR"):
        return os.path.join(os.environ["LEAP_CACHE_DIR"], "features")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "leap", "features")


def _memo_key(path: str, st: os.stat_result) -> str:
    # ctime and inode too: a same-size replacement stamped with the old mtime (``touch -r``) or renamed
    # over the file still changes them (no user can set ctime).
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def file_sha256(path: str, cache_dir: str | None = None) -> str:
    """SHA-256 of a file's content (hex).

    With ``cache_dir``, the digest is memoized there under the file's absolute path, size, modification
    and change times and inode, so a multi-GB teacher is hashed once. To hash exactly the bytes that
    are loaded, open the file once and use :func:`fileobj_sha256` on that file object.
    """
    with open(path, "rb") as f:
        return fileobj_sha256(f, path, cache_dir)


def fileobj_sha256(f: Any, path: str, cache_dir: str | None = None) -> str:
    """SHA-256 of the open binary file ``f`` (the file at ``path`` when it was opened), memoized as
    :func:`file_sha256` does; ``f`` is left at position 0, ready to be loaded from.

    Reading the digest and the content through one descriptor means a file replaced on disk in
    between (a new checkpoint renamed over the old one) cannot give the old content the new hash.
    """
    st = os.fstat(f.fileno())
    memo_key = _memo_key(path, st)
    memo_path = os.path.join(cache_dir, "sha256-memo.json") if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and os.path.isfile(memo_path):
        try:
            with open(memo_path, encoding="utf-8") as m:
                memo = json.load(m)
        except (OSError, json.JSONDecodeError):
            memo = {}
        if isinstance(memo, dict) and isinstance(memo.get(memo_key), str):
            return memo[memo_key]
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    f.seek(0)
    digest = h.hexdigest()
    if memo_path:
        memo = memo if isinstance(memo, dict) else {}
        memo[memo_key] = digest
        text = json.dumps(memo)
        atomic_write(memo_path, lambda m: m.write(text), binary=False)
    return digest


def read_hashed(path: str, cache_dir: str | None = None) -> tuple[Any, str]:
    """``(content, sha256)`` of a weights file (``torch.load(weights_only=True)``, or ``.safetensors``), both
    from one open descriptor: the digest is of the bytes that were loaded, even if the file is replaced on
    disk meanwhile.

    Raises:
        EvaluationError: an unreadable file (one line: corrupt, or refused for holding Python objects).
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise EvaluationError(f"could not open {path}: {exc.strerror or exc}") from None
    with f:
        digest = fileobj_sha256(f, path, cache_dir)
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load as load_safetensors

                return load_safetensors(f.read()), digest
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types on bad files
                raise EvaluationError(
                    f"could not read {path}: not a valid .safetensors file ({type(exc).__name__})"
                ) from None
        try:
            with warnings.catch_warnings():  # torch warns about the legacy format; the verdict is ours
                warnings.simplefilter("ignore")
                return torch.load(f, map_location="cpu", weights_only=True), digest
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on bad files
            text = str(exc).lower()
            why = (
                "refused: it holds Python objects other than tensors and plain values (or is a raw pickle)"
                if "global" in text or "weights only load failed" in text
                else "the file is corrupt, truncated or not a PyTorch checkpoint"
            )
            raise EvaluationError(f"could not read checkpoint {path}: {why} ({type(exc).__name__})") from None


class FeatureCache:
    """Features on disk, one ``torch.save`` file per key (read back with ``weights_only=True``).

    ``FeatureCache(None)`` caches nothing. ``hits`` / ``misses`` count lookups (tests, messages).
    """

    #: A temp file older than this is the leftover of a killed write (a live one is minutes old at most;
    #: evaluations sharing the cache may be writing theirs right now, so fresh ones are left alone).
    STALE_TEMP_S = 3600.0

    def __init__(self, directory: str | None):
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self.removed_temp_files = self._clean_stale_temp_files() if directory else []

    def _clean_stale_temp_files(self) -> list[str]:
        """Remove the ``.NAME.XXXXXXXX.tmp`` files of writes killed over :attr:`STALE_TEMP_S` ago."""
        removed = []
        now = time.time()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return removed
        for e in entries:
            try:
                if TEMP_FILE_RE.match(e.name) and e.is_file(follow_symlinks=False):
                    if now - e.stat(follow_symlinks=False).st_mtime > self.STALE_TEMP_S:
                        os.unlink(e.path)
                        removed.append(e.path)
            except OSError:  # removed meanwhile by another evaluation
                pass
        return removed

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """SHA-256 of the canonical JSON of ``parts``."""
        text = json.dumps({"extractor_version": EXTRACTOR_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{key}.pt")

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.directory is None or not os.path.isfile(self._path(key)):
            self.misses += 1
            return None
        try:
            obj = torch.load(self._path(key), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            self.misses += 1
            return None
        self.hits += 1
        return obj

    def save(self, key: str, value: dict[str, Any], parts: dict[str, Any]) -> None:
        if self.directory is None:
            return
        atomic_write(self._path(key), lambda f: torch.save(value, f))
        # A readable note of what the entry holds, for whoever inspects the cache.
        note = json.dumps(parts, indent=1, sort_keys=True, default=str)
        atomic_write(os.path.join(self.directory, f"{key}.json"), lambda f: f.write(note), binary=False)
