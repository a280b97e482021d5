"""Reliability, round 2 (issue 27): `leap eval`. The feature cache follows the files' contents, the
checkpoint hash is of the bytes loaded, undecodable images are skipped and counted (not replaced by
duplicates), retrieval boxes and database images are checked, an untrusted recipe is checked against
its weights before anything is built, unwritable directories are refused before the evaluation, and
stale temp files leave the cache.

Each test failed before its fix (the item numbers are the issue's).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_linear import tiny_run
from test_eval_retrieval import _dataset

import leap.evaluation.features as F
from leap.evaluation import EvaluationError
from leap.evaluation.cache import FeatureCache, file_sha256
from leap.evaluation.retrieval import load_ground_truth
from leap.evaluation.run import evaluate_knn, evaluate_retrieval
from leap.models import build_model

SMALL = {"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 1}


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def labelled_folder(root, *, val_shades=(40, 200), bad_val: bool = False) -> str:
    """DATA/{train,val}/{a,b}/*.png, 4 images per class of one grey each (class a dark, b bright)."""
    for split, shades in (("train", (40, 200)), ("val", val_shades)):
        for c, shade in zip(("a", "b"), shades):
            folder = os.path.join(root, split, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), shade + i, np.uint8)).save(os.path.join(folder, f"{i}.png"))
    if bad_val:
        with open(os.path.join(root, "val", "a", "2.png"), "wb") as f:  # between two good images
            f.write(b"not an image")
    return str(root)


def knn(data, cache, **kw):
    return evaluate_knn({"pixels": True}, data, k=3, cache_dir=cache, write_record=False, progress=False, **kw)


# ----------------------------------------------------------------------------- 1, 2: what the cache key sees


def test_cache_follows_images_changed_in_place(tmp_path):
    data = labelled_folder(tmp_path / "data")
    cache = str(tmp_path / "cache")
    assert knn(data, cache)["numbers"]["cls"] == 1.0
    # The validation images are rewritten in place (same names, same sizes), their classes swapped, with the
    # old modification times put back: the cached features of the old images must not be served.
    for c, shade in (("a", 200), ("b", 40)):
        for i in range(4):
            path = os.path.join(data, "val", c, f"{i}.png")
            st = os.stat(path)
            Image.fromarray(np.full((8, 8, 3), shade + i, np.uint8)).save(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert knn(data, cache)["numbers"]["cls"] == 0.0  # the stale cache said 1.0


def test_sha256_memo_sees_a_same_size_replacement_with_the_old_mtime(tmp_path):
    path, cache = tmp_path / "w.pt", str(tmp_path / "cache")
    path.write_bytes(b"a" * 64)
    first = file_sha256(str(path), cache)
    st = os.stat(path)
    path.write_bytes(b"b" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: same size, same mtime
    assert file_sha256(str(path), cache) == hashlib.sha256(b"b" * 64).hexdigest() != first


def test_checkpoint_hash_is_of_the_bytes_loaded(tmp_path, monkeypatch):
    weights, other = tmp_path / "teacher.pth", tmp_path / "other.pth"
    torch.save(build_model("vit_small_patch14_dinov2", img_size=28, **SMALL).state_dict(), weights)
    torch.save(build_model("vit_small_patch14_dinov2", img_size=28, **SMALL).state_dict(), other)
    loaded_digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    build = F._build

    def replaced_meanwhile(*args):  # a new checkpoint is renamed over the file after it was read
        os.replace(other, weights)
        return build(*args)

    monkeypatch.setattr(F, "_build", replaced_meanwhile)
    m = F.load_model(
        teacher="vit_small_patch14_dinov2", teacher_weights=str(weights), teacher_overrides=SMALL, img_size=28
    )
    assert m.identity["checkpoint_sha256"] == loaded_digest  # not the hash of the file now on disk


# ----------------------------------------------------------------------------- 5: undecodable eval images


def test_eval_skips_and_counts_undecodable_images(tmp_path):
    data = labelled_folder(tmp_path / "data", bad_val=True)
    rec = evaluate_knn({"pixels": True}, data, k=3, no_cache=True, run_dir=str(tmp_path / "out"), progress=False)
    # 7 good validation images: the bad one is not filled with a duplicate of the next image and its label.
    assert rec["data"]["val_images"] == 7 and rec["data"]["train_images"] == 8
    assert rec["data"]["skipped_images"] == {"train": 0, "val": 1}
    assert rec["numbers"]["cls"] == 1.0
    logged = json.loads((tmp_path / "out" / "eval.jsonl").read_text().splitlines()[-1])
    assert logged["data"]["skipped_images"]["val"] == 1
    # The cache keeps the count: a hit reports it too.
    cache = str(tmp_path / "cache")
    assert knn(data, cache)["data"]["skipped_images"]["val"] == 1
    assert knn(data, cache)["data"]["skipped_images"]["val"] == 1


# ----------------------------------------------------------------------------- 11, 25: retrieval


def _gnd(tmp_path, bbx) -> str:
    path = tmp_path / "gnd.pkl"
    gnd = {"imlist": ["a", "b"], "qimlist": ["a"], "gnd": [{"bbx": bbx, "easy": [1], "hard": [], "junk": []}]}
    path.write_bytes(pickle.dumps(gnd))
    return str(path)


@pytest.mark.parametrize(
    "bbx,why",
    [
        ([30.0, 4.0, 10.0, 20.0], "empty or inverted"),
        ([0.0, 0.0, float("nan"), 9.0], "non-finite"),
        ("box", "4 numbers"),
    ],
)
def test_bad_query_boxes_are_refused(tmp_path, bbx, why):
    with pytest.raises(EvaluationError, match=rf"gnd\[0\]\.bbx .*{why}|gnd\[0\]\.bbx must hold {why}"):
        load_ground_truth(_gnd(tmp_path, bbx))
    assert load_ground_truth(_gnd(tmp_path, [1.0, 2.0, 3.0, 4.0])).gnd[0]["bbx"] == (1.0, 2.0, 3.0, 4.0)


def test_retrieval_skips_undecodable_database_images(tmp_path):
    run = tiny_run(tmp_path, step=1)
    data = _dataset(tmp_path)
    jpg = os.path.join(data, "roxford5k", "jpg")
    with open(os.path.join(jpg, "img_3.jpg"), "wb") as f:  # truncated: the first bytes of a PNG
        f.write(open(os.path.join(jpg, "img_4.jpg"), "rb").read()[:40])
    open(os.path.join(jpg, "img_0.jpg"), "wb").close()  # empty
    rec = evaluate_retrieval({"model": run}, data, "roxford5k", no_cache=True, workers=0, progress=False)
    assert rec["data"]["skipped_images"] == {"database": 2, "queries": 0}
    assert rec["numbers"]["easy"]["mAP"] == pytest.approx(1.0)  # the readable images still rank


# ----------------------------------------------------------------------------- 20: untrusted recipe sizes


@pytest.mark.parametrize("change", [{"embed_dim": 200000}, {"mlp_ratio": 1e9}, {"depth": 7}])
def test_untrusted_recipe_is_checked_before_anything_is_built(tmp_path, monkeypatch, change):
    run = tiny_run(tmp_path)
    path = os.path.join(run, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["student_overrides"].update(change)
    torch.save(ckpt, path)

    def never(*args):
        raise AssertionError("a model was built from the untrusted recipe")

    monkeypatch.setattr(F, "_build", never)
    with pytest.raises(EvaluationError, match=f"checkpoint {path}: .*(does not fit the stored weights|must be)"):
        F.load_model(run)


# ----------------------------------------------------------------------------- 24: unwritable directories


def test_unwritable_cache_and_run_dirs_are_refused_before_the_evaluation(tmp_path, monkeypatch):
    data = labelled_folder(tmp_path / "data")
    a_file = tmp_path / "file"
    a_file.write_text("")

    def never(*args, **kw):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr("leap.evaluation.linear.extract_features", never)  # where kNN extracts
    with pytest.raises(EvaluationError, match=r"--cache-dir .*file: cannot write there: a regular file"):
        evaluate_knn({"pixels": True}, data, cache_dir=str(a_file), progress=False)
    monkeypatch.setenv("LEAP_CACHE_DIR", str(a_file))
    with pytest.raises(EvaluationError, match=r"LEAP_CACHE_DIR .*cannot write there"):
        evaluate_knn({"pixels": True}, data, progress=False)
    with pytest.raises(EvaluationError, match=r"--run-dir .*file/runs: cannot write there"):
        evaluate_knn({"pixels": True}, data, no_cache=True, run_dir=str(a_file / "runs"), progress=False)
    # A read-only file system (simulated: the tests may run as root, which ignores permissions).
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kw):
        if dir is not None and os.path.realpath(dir).startswith(str(readonly)):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(EvaluationError, match=r"--run-dir .*ro: cannot write there: the file system is read-only"):
        evaluate_knn({"pixels": True}, data, no_cache=True, run_dir=str(readonly), progress=False)


# ----------------------------------------------------------------------------- 37: temp files of killed writes


def test_cache_removes_the_temp_files_of_killed_writes(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".abc.pt.k2j4h5g6.tmp", cache / ".def.pt.x8y7z6w5.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    old = time.time() - 2 * FeatureCache.STALE_TEMP_S
    os.utime(stale, (old, old))
    FeatureCache(str(cache))
    assert not stale.exists()
    assert fresh.exists()  # another evaluation may be writing it now
