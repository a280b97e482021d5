"""Tests for leap/data/: sources, transforms, mixup, resumable/distributed sampling."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from leap import data as D
from leap.errors import DataError

# --------------------------------------------------------------------------- helpers


def _png(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """root/train/{cat,dog}/ with 3 + 2 PNGs and one corrupt file in cat/."""
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "train" / "cat" / f"c{i}.png", (200, 10 * i, 0))
    for i in range(2):
        _png(root / "train" / "dog" / f"d{i}.PNG", (0, 10 * i, 200))
    # sorts between c0 and c1: "c0b" is not an image at all
    (root / "train" / "cat" / "c0b.jpg").write_bytes(b"definitely not a jpeg" * 10)
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


def _write_idx(path, arr, magic, gz):
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    """Tiny fake Fashion-MNIST: train gzipped (6 images), t10k raw (4 images)."""
    monkeypatch.setattr(D.datasets, "FASHION_MNIST_DEFAULT_ROOTS", (str(tmp_path / "no-such-dir"),))
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n, gz in (("train", 6, True), ("t10k", 4, False)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(root / f"{prefix}-images-idx3-ubyte", imgs, 0x803, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, 0x801, gz)
        sets[prefix] = (imgs, labels)
    return root, sets


# --------------------------------------------------------------------------- image folder


def test_image_folder_skips_and_counts_corrupt(folder):
    ds = D.ImageFolderDataset(folder, "train")
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 6  # 5 good + 1 corrupt; .txt ignored, .PNG accepted
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("c0b.jpg")][0]
    img, label = ds[bad]  # falls back to the next index: c1.png, also a cat
    assert img.shape == (3, 10, 12) and label == 0
    assert torch.equal(img, ds[bad + 1][0])
    assert ds.decode_failures == 1
    assert ds.failed_paths()[0].endswith("c0b.jpg")
    ds[bad]  # known-bad: skipped again, counted once (distinct files)
    assert ds.decode_failures == 1
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 0, 0, 1, 1]


def test_image_folder_loader_with_workers_counts_in_main_process(folder):
    ds = D.ImageFolderDataset(folder, "train", transform=D.build_transforms(14, train=True))
    loader = D.build_loader(ds, batch_size=2, num_workers=2, seed=0, drop_last=False)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == 6
    assert batches[0][0].shape == (2, 3, 14, 14) and batches[0][1].dtype == torch.int64
    # the bad-file mask lives in shared memory: workers' finds are visible here
    assert ds.decode_failures == 1
    del loader


def test_image_folder_root_is_class_folder(folder):
    ds = D.ImageFolderDataset(folder / "train", "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 6


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="expected layout") as e:
        D.ImageFolderDataset(tmp_path / "missing", "train")
    assert "missing" in str(e.value)
    with pytest.raises(FileNotFoundError, match="val"):
        D.ImageFolderDataset(folder, "val")  # root has train/ but no val/
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        D.ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        D.ImageFolderDataset(tmp_path / "noimg")


def test_image_folder_all_corrupt_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    # Refused when the dataset is built (one clear error before training), not at the first batch.
    with pytest.raises(DataError, match="none of the 1 image files .* could be decoded"):
        D.ImageFolderDataset(tmp_path, "train")


# --------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_gz_and_raw(fmnist):
    root, sets = fmnist
    train = D.FashionMNIST(root, "train")
    test = D.FashionMNIST(root, "test")
    assert len(train) == 6 and len(test) == 4
    assert train.images.shape == (6, 28, 28) and test.images.shape == (4, 28, 28)
    np.testing.assert_array_equal(train.images, sets["train"][0])
    np.testing.assert_array_equal(test.labels, sets["t10k"][1])
    img, label = test[3]
    assert img.shape == (3, 28, 28) and label == 3
    # gray replicated to 3 channels, exact pixel values
    expected = torch.from_numpy(sets["t10k"][0][3]).float() / 255
    for c in range(3):
        assert torch.allclose(img[c], expected)


def test_fashion_mnist_via_build_dataset_resizes(fmnist):
    root, _ = fmnist
    for source in ("fashion-mnist", "auto"):
        ds = D.build_dataset(source, str(root), "train", img_size=42, augment=True)
        assert isinstance(ds, D.FashionMNIST)
        x, y = ds[0]
        assert x.shape == (3, 42, 42) and x.dtype == torch.float32
    ds = D.build_dataset("fashion-mnist", str(root), "val", img_size=42, augment=False)
    assert len(ds) == 4 and ds[1][0].shape == (3, 42, 42)


def test_fashion_mnist_torchvision_layout(tmp_path, fmnist):
    root, _ = fmnist
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.parent.mkdir(parents=True)
    root.rename(raw)
    assert len(D.FashionMNIST(tmp_path / "tv", "train")) == 6


def test_fashion_mnist_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setattr(D.datasets, "FASHION_MNIST_DEFAULT_ROOTS", (str(tmp_path / "sys"),))
    with pytest.raises(FileNotFoundError) as e:
        D.FashionMNIST(tmp_path / "nothing", "train")
    msg = str(e.value)
    for part in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "nothing",
        str(tmp_path / "sys"),
        "apt-get install dataset-fashion-mnist",
    ):
        assert part in msg


def test_fashion_mnist_bad_magic(tmp_path, monkeypatch):
    monkeypatch.setattr(D.datasets, "FASHION_MNIST_DEFAULT_ROOTS", ())
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), 0x801, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2), 0x801, False)
    with pytest.raises(ValueError, match="magic"):
        D.FashionMNIST(tmp_path, "train")


# --------------------------------------------------------------------------- synthetic / build


def test_synthetic_deterministic():
    a = D.SyntheticDataset(8, 16, num_classes=4, seed=3)
    b = D.SyntheticDataset(8, 16, num_classes=4, seed=3)
    c = D.SyntheticDataset(8, 16, num_classes=4, seed=4)
    x0, y0 = a[5]
    assert x0.shape == (3, 16, 16) and 0 <= x0.min() and x0.max() <= 1
    assert torch.equal(x0, b[5][0]) and y0 == b[5][1] == 1
    assert torch.equal(a[5][0], x0)  # re-reading the same index is stable
    assert not torch.equal(x0, a[6][0]) and not torch.equal(x0, c[5][0])
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_build_dataset_sources(tmp_path, folder):
    tr = D.build_dataset("synthetic", None, "train", 14, True, num_images=6)
    va = D.build_dataset("synthetic", None, "val", 14, False, num_images=6)
    assert len(tr) == 6 and tr[0][0].shape == (3, 14, 14)
    assert not torch.equal(D.SyntheticDataset(6, 14, seed=tr.seed)[0][0], D.SyntheticDataset(6, 14, seed=va.seed)[0][0])
    assert isinstance(D.build_dataset("auto", str(folder), "train", 14, True), D.ImageFolderDataset)
    assert isinstance(D.build_dataset("folder", str(folder), "train", 14, True, hflip=False), D.ImageFolderDataset)
    with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
        D.build_dataset("imagenet", None, "train", 14, True)
    with pytest.raises(FileNotFoundError):
        D.build_dataset("auto", str(tmp_path / "nope"), "train", 14, True)


# --------------------------------------------------------------------------- transforms


def test_transforms_shapes_and_switches():
    img = Image.new("RGB", (50, 37), (120, 60, 30))
    for train, augment in ((True, True), (True, False), (False, True)):
        t = D.build_transforms(28, train=train, augment=augment)
        assert t(img).shape == (3, 28, 28)
    names = lambda t: [type(o).__name__ for o in t.transforms]  # noqa: E731
    tr = names(D.build_transforms(28, train=True))
    assert tr == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomApply",
        "RandomGrayscale",
        "ToTensor",
        "Normalize",
    ]
    assert D.build_transforms(28, train=True).transforms[0].scale == (0.14, 1.0)
    jitter = D.build_transforms(28, train=True).transforms[2]
    assert jitter.p == 0.8
    assert names(D.build_transforms(28, train=True, augment=False)) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    gray = names(D.build_transforms(28, train=True, grayscale_source=True))
    assert "RandomGrayscale" not in gray
    assert names(D.build_transforms(28, train=False, normalize=False))[-1] == "ToTensor"
    # eval is deterministic; normalized constant image has the expected value
    e = D.build_transforms(28, train=False)(img)
    want = (120 / 255 - D.IMAGENET_MEAN[0]) / D.IMAGENET_STD[0]
    assert torch.allclose(e[0], torch.full((28, 28), want), atol=1e-2)


# --------------------------------------------------------------------------- mixup


def test_mixup_formula_and_reproducible():
    x = torch.randn(6, 3, 4, 4)
    mixed, lam, perm = D.mixup(x, generator=torch.Generator().manual_seed(7), return_perm=True)
    assert 0.0 <= lam <= 1.0 and isinstance(lam, float)
    assert sorted(perm.tolist()) == list(range(6))
    # one lambda for the whole batch
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)
    # documented draw order: lam, then perm
    g = torch.Generator().manual_seed(7)
    assert lam == torch.rand(1, generator=g).item()
    assert torch.equal(perm, torch.randperm(6, generator=g))
    mixed2, lam2 = D.mixup(x, generator=torch.Generator().manual_seed(7))
    assert lam2 == lam and torch.equal(mixed2, mixed)
    _, lam3 = D.mixup(x, generator=torch.Generator().manual_seed(8))
    assert lam3 != lam


def test_mixup_lambda_range_and_disabled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    lams = [D.mixup(x, generator=g)[1] for _ in range(200)]
    assert all(0.0 <= v <= 1.0 for v in lams) and 0.3 < np.mean(lams) < 0.7
    same, lam = D.mixup(x, generator=g, enabled=False)
    assert same is x and lam == 1.0
    half = x.half()
    assert D.mixup(half, generator=g)[0].dtype == torch.float16


# --------------------------------------------------------------------------- sampling


def test_resumable_sampler_order_and_offset():
    s = D.ResumableSampler(20, seed=5)
    s.set_epoch(3)
    order = list(s)
    assert sorted(order) == list(range(20)) and len(s) == 20
    s2 = D.ResumableSampler(20, seed=5)
    s2.set_epoch(3)
    assert list(s2) == order
    s2.set_epoch(4)
    assert list(s2) != order
    s2.set_epoch(3, start=7)
    assert list(s2) == order[7:] and s2.remaining == 13 and len(s2) == 20
    s2.set_epoch(3)  # plain set_epoch clears the offset
    assert list(s2) == order
    # the seeds attached to indices depend on (seed, epoch, index) only
    s2.set_epoch(3, start=7)
    assert [i.seed for i in s2] == [i.seed for i in order[7:]]
    no_shuffle = D.ResumableSampler(5, shuffle=False)
    assert list(no_shuffle) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        s.set_epoch(0, start=21)


@pytest.mark.parametrize("n,drop_last", [(20, False), (21, True), (21, False)])
def test_resumable_sampler_matches_distributed_sampler(n, drop_last):
    ranks = []
    for rank in range(2):
        ours = D.ResumableSampler(n, seed=11, num_replicas=2, rank=rank, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=11, drop_last=drop_last)
        ours.set_epoch(2)
        ref.set_epoch(2)
        got = [int(i) for i in ours]
        assert got == list(ref) and len(ours) == len(ref)
        ranks.append(got)
    assert len(ranks[0]) == len(ranks[1])
    if n % 2 == 0 or drop_last:
        # disjoint shards; together they cover everything that was not dropped
        assert not set(ranks[0]) & set(ranks[1])
        assert len(set(ranks[0]) | set(ranks[1])) == n - (n % 2)
    else:
        assert set(ranks[0]) | set(ranks[1]) == set(range(n))  # padded by one repeat


def test_build_loader_distributed_explicit_ranks():
    ds = D.SyntheticDataset(16, 8)
    seen = []
    for rank in range(2):
        loader = D.build_loader(ds, 4, num_workers=0, distributed=True, num_replicas=2, rank=rank, seed=1)
        assert isinstance(loader.sampler, D.ResumableSampler) and len(loader) == 2
        D.set_loader_epoch(loader, 0)
        seen.append({int(i) for i in loader.sampler})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16
    with pytest.raises(RuntimeError, match="process group"):
        D.build_loader(ds, 4, num_workers=0, distributed=True)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_exact_resume_with_augmentation():
    ds = D.build_dataset("synthetic", None, "train", 16, True, num_images=24)
    loader = D.build_loader(ds, 4, num_workers=0, seed=3)
    assert len(loader) == 6
    D.set_loader_epoch(loader, 1)
    rng_before = torch.get_rng_state()
    full = _batches(loader)
    # seeded per-sample augmentation never touches the caller's global RNG
    assert torch.equal(torch.get_rng_state(), rng_before)
    D.set_loader_epoch(loader, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, _batches(loader)))
    # resume after 2 batches: exactly the tail, augmentations included
    D.set_loader_epoch(loader, 1, start_batch=2)
    tail = _batches(loader)
    assert len(tail) == 4 and len(loader) == 6
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a different epoch is a different order
    D.set_loader_epoch(loader, 2)
    assert not torch.equal(_batches(loader)[0][1], full[0][1])


def test_loader_workers_match_single_process():
    ds = D.build_dataset("synthetic", None, "train", 16, True, num_images=12)
    single = D.build_loader(ds, 3, num_workers=0, seed=9)
    multi = D.build_loader(ds, 3, num_workers=2, seed=9)
    assert multi.persistent_workers and not single.persistent_workers
    D.set_loader_epoch(single, 4, start_batch=1)
    D.set_loader_epoch(multi, 4, start_batch=1)
    a, b = _batches(single), _batches(multi)
    assert len(a) == len(b) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    del multi


def test_seeded_index_pickles():
    i = D.SeededIndex(5, 123)
    j = pickle.loads(pickle.dumps(i))
    assert j == 5 and j.seed == 123 and isinstance(j, int)
    assert [10, 11, 12, 13, 14, 15][i] == 15
