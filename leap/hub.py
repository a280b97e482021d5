"""Model names on the Hugging Face Hub: ``hf-hub:ORG/NAME`` and ``timm/NAME``, built by timm's own loader
from the local Hugging Face cache.

``--teacher hf-hub:ORG/NAME`` (or ``--student``) names a timm model repository:
its ``config.json`` (architecture, pretrained config, model arguments) and its weights
(``model.safetensors`` or ``pytorch_model.bin``). ``timm/NAME`` is short for ``hf-hub:timm/NAME``, the
repositories of timm's own pretrained weights (e.g. ``timm/vit_small_patch14_dinov2.lvd142m``). A
revision may follow the name: ``hf-hub:ORG/NAME@REVISION`` (a branch, a tag or a commit hash).

Resolution, in order:

1. the repository's snapshot in the local cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``, read when the model is built): timm builds the model from that folder
   (``timm.create_model("local-dir:SNAPSHOT", pretrained=True, ...)``: the pretrained config, the weight
   filter and the position-embedding resampling are timm's), with no network access;
2. not cached and ``HF_HUB_OFFLINE=1`` (no network): :class:`~leap.errors.ModelError` saying how to
   get the files;
3. not cached, online: ``config.json`` and the weights are downloaded into the cache first
   (``huggingface_hub.hf_hub_download``), then 1.; a failed download is the same error.

:func:`hub_source` is what :func:`leap.models.build_model` calls for such a name.

This module imports nothing else from ``leap`` but :mod:`leap.errors`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .errors import ModelError

__all__ = [
    "HUB_PREFIXES",
    "WEIGHT_FILES",
    "is_hub_name",
    "parse_hub_name",
    "hub_cache_dir",
    "cached_snapshot",
    "model_config",
    "hub_source",
]

#: Name prefixes that make a model name a Hub name (``hf_hub:`` is timm's older spelling).
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
#: Weight files timm reads from a model repository, in its order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_name(name: Any) -> bool:
    """Whether ``name`` is ``hf-hub:ORG/NAME`` or ``timm/NAME`` (optionally ``@REVISION``)."""
    return isinstance(name, str) and name.startswith(HUB_PREFIXES)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of a Hub name: ``"hf-hub:ORG/NAME@rev"`` -> ``("ORG/NAME", "rev")``,
    ``"timm/NAME"`` -> ``("timm/NAME", None)``.

    Raises:
        ModelError: not a Hub name, or not of the form ``ORG/NAME``.
    """
    if not is_hub_name(name):
        raise ModelError(f"{name!r} is not a Hub model name (expected hf-hub:ORG/NAME or timm/NAME)")
    rest = name.split(":", 1)[1] if name.startswith(("hf-hub:", "hf_hub:")) else name
    repo, _, revision = rest.partition("@")
    if not _REPO_RE.match(repo) or (revision == "" and "@" in rest):
        raise ModelError(f"model name {name!r}: expected hf-hub:ORG/NAME[@REVISION] or timm/NAME, got repo {repo!r}")
    return repo, revision or None


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face Hub cache folder: ``cache_dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub`` (the environment is read now,
    not at import)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value (read now, as the Hub client reads it at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(name: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The cached snapshot folder of a Hub name holding ``config.json`` and a weight file, or None.

    The cache layout is the Hugging Face Hub's: ``models--ORG--NAME/refs/REVISION`` holds a commit hash,
    ``models--ORG--NAME/snapshots/COMMIT/`` the files (a commit hash given as the revision is used as is).
    """
    repo, revision = parse_hub_name(name)
    root = os.path.join(hub_cache_dir(cache_dir), "models--" + repo.replace("/", "--"))
    commit = revision or "main"
    ref = os.path.join(root, "refs", commit)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    snapshot = os.path.join(root, "snapshots", commit)
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        return None
    if not any(os.path.isfile(os.path.join(snapshot, w)) for w in WEIGHT_FILES):
        return None
    return snapshot


def _how_to_get(name: str, cache: str) -> str:
    repo, revision = parse_hub_name(name)
    rev = f" --revision {revision}" if revision else ""
    return (
        f"get them on a machine with network access with `hf download {repo}{rev}` (huggingface_hub; older "
        f"releases: `huggingface-cli download {repo}{rev}`), then copy its cache folder models--"
        f"{repo.replace('/', '--')} into {cache} (or point HF_HUB_CACHE or HF_HOME at the cache that holds it)"
    )


def model_config(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """``(architecture, model_args)`` of a cached Hub model's ``config.json`` (timm's layout).

    Raises:
        ModelError: the model is not in the cache, or its ``config.json`` names no architecture.
    """
    snapshot = cached_snapshot(name, cache_dir)
    if snapshot is None:
        raise ModelError(f"{name}: not in the local Hugging Face cache ({hub_cache_dir(cache_dir)})")
    try:
        with open(os.path.join(snapshot, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name}: unreadable config.json in {snapshot} ({e})") from None
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{name}: config.json in {snapshot} names no timm 'architecture'")
    args = cfg.get("model_args") or {}
    return arch, dict(args) if isinstance(args, dict) else {}


def _download(name: str, cache: str) -> None:
    """Fetch ``config.json`` and the first weight file of :data:`WEIGHT_FILES` the repository has into the
    cache (``huggingface_hub.hf_hub_download``).

    Raises:
        ModelError: no network, no such repository or file (says how to get them another way).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    repo, revision = parse_hub_name(name)
    try:
        hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache)
        for weights in WEIGHT_FILES:
            try:
                hf_hub_download(repo, weights, revision=revision, cache_dir=cache)
                return
            except EntryNotFoundError:  # try the next name
                continue
        raise ModelError(f"{name}: the repository has none of the weight files {', '.join(WEIGHT_FILES)}")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - network, missing repository or file: one line that says what to do
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ModelError(
            f"{name}: could not get it from the Hugging Face Hub ({why}); {_how_to_get(name, cache)}"
        ) from None


def hub_source(name: str, pretrained: bool = False) -> tuple[str, bool]:
    """What :func:`leap.models.build_model` hands ``timm.create_model`` for ``name``: ``(source, pretrained)``.

    A Hub name becomes ``("local-dir:SNAPSHOT", True)``: its cached snapshot (downloaded first when it is
    missing and the Hub can be reached), built by timm with its weights (without them under
    ``torch.device("meta")``, where only shapes are wanted). Any other name is returned as is.

    Raises:
        ModelError: a Hub name whose files are not cached and cannot be downloaded (``HF_HUB_OFFLINE=1``,
            no network, no such repository): the message says how to get them.
    """
    if not is_hub_name(name):
        return name, pretrained
    import torch

    cache = hub_cache_dir()
    snapshot = cached_snapshot(name, cache)
    if snapshot is None:
        if _offline():
            raise ModelError(
                f"{name}: the weights are not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 "
                f"forbids downloading them; {_how_to_get(name, cache)}"
            )
        _download(name, cache)
        snapshot = cached_snapshot(name, cache)
        if snapshot is None:
            raise ModelError(f"{name}: downloaded, but no config.json and weights in the cache {cache}")
    return "local-dir:" + snapshot, torch.empty(0).device.type != "meta"
