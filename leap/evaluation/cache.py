"""The evaluation's on-disk feature cache and the file hashing its keys use.

Entries are ``torch.save`` files read back with ``weights_only=True``, written atomically (with
fsync) next to a readable JSON note of what each holds. The key is the SHA-256 of the canonical
JSON of its parts (checkpoint hash, recipe, block, dataset identity, split, transform, precision;
:mod:`.features` builds them) and :data:`EXTRACTOR_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..runlog import atomic_write

__all__ = ["EXTRACTOR_VERSION", "FeatureCache", "default_cache_dir", "file_sha256"]

# Bumped when the extraction (:func:`.features.extract_features`) changes what it computes.
EXTRACTOR_VERSION = 1


def default_cache_dir() -> str:
    """``$LEAP_CACHE_DIR/features``, else ``$XDG_CACHE_HOME/leap/features`` (``~/.cache/leap/features``)."""
    if os.environ.get("LEAP_CACHE_DIR"):
        return os.path.join(os.environ["LEAP_CACHE_DIR"], "features")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "leap", "features")


def file_sha256(path: str, cache_dir: str | None = None) -> str:
    """SHA-256 of a file's content (hex).

    With ``cache_dir``, the digest is memoized there under the file's absolute path, size and
    modification time, so a multi-GB teacher is hashed once.
    """
    st = os.stat(path)
    memo_key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = os.path.join(cache_dir, "sha256-memo.json") if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and os.path.isfile(memo_path):
        try:
            with open(memo_path, encoding="utf-8") as f:
                memo = json.load(f)
        except (OSError, json.JSONDecodeError):
            memo = {}
        if isinstance(memo, dict) and isinstance(memo.get(memo_key), str):
            return memo[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_path:
        memo = memo if isinstance(memo, dict) else {}
        memo[memo_key] = digest
        text = json.dumps(memo)
        atomic_write(memo_path, lambda f: f.write(text), binary=False)
    return digest


class FeatureCache:
    """Features on disk, one ``torch.save`` file per key (read back with ``weights_only=True``).

    ``FeatureCache(None)`` caches nothing. ``hits`` / ``misses`` count lookups (tests, messages).
    """

    def __init__(self, directory: str | None):
        self.directory = directory
        self.hits = 0
        self.misses = 0

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
