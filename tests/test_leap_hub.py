"""Hub model names (leap/hub.py, the hook in leap.models.build_model): ``hf-hub:ORG/NAME`` and ``timm/NAME``
are built by timm from a Hugging Face cache made by the test (no network: ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from leap.errors import ModelError
from leap.hub import cached_snapshot, hub_cache_dir, hub_source, is_hub_name, model_config, parse_hub_name
from leap.models import build_model

OVERRIDES = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 7}


def fake_repo(cache, repo: str, model, *, commit: str = "0123456789abcdef", weights: str = "model.safetensors"):
    """A timm model repository in the Hub cache layout: refs/main -> snapshots/COMMIT/{config.json, weights}."""
    from safetensors.torch import save_file

    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(snapshot / weights))
    else:
        torch.save(state, snapshot / weights)
    config = {
        "architecture": "vit_small_patch14_dinov2",
        "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 28, 28], "num_classes": 0, "mean": [0.5] * 3, "std": [0.5] * 3},
        "model_args": OVERRIDES,
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache as HF_HUB_CACHE, offline."""
    directory = tmp_path / "hf-cache"
    directory.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(directory))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return directory


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("vit_small_patch14_dinov2", img_size=28, **OVERRIDES)
    with torch.no_grad():  # LayerScale starts at 1e-5: make the weights matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_names():
    assert is_hub_name("hf-hub:acme/vit") and is_hub_name("timm/vit_small_patch14_dinov2.lvd142m")
    assert not is_hub_name("vit_small_patch14_dinov2") and not is_hub_name(None)
    assert parse_hub_name("hf-hub:acme/vit@v1") == ("acme/vit", "v1")
    assert parse_hub_name("hf_hub:acme/vit") == ("acme/vit", None)
    assert parse_hub_name("timm/vit_small_patch14_dinov2.lvd142m") == ("timm/vit_small_patch14_dinov2.lvd142m", None)
    for bad in ("hf-hub:novit", "hf-hub:acme/vit@", "hf-hub:/x"):
        with pytest.raises(ModelError, match="hf-hub:ORG/NAME"):
            parse_hub_name(bad)
    assert hub_source("vit_small_patch14_dinov2", False) == ("vit_small_patch14_dinov2", False)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == str(tmp_path / "c") and hub_cache_dir(tmp_path / "x") == str(tmp_path / "x")


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_hub_name_builds_from_the_cache(cache, weights):
    net = tiny_model()
    snapshot = fake_repo(cache, "acme/tiny-vit", net, weights=weights)
    assert cached_snapshot("hf-hub:acme/tiny-vit") == str(snapshot)
    built = build_model("hf-hub:acme/tiny-vit", img_size=28)
    assert type(built).__name__ == "VisionTransformer" and built.num_classes == 0
    assert same_weights(built, net)  # timm's loader, the cached weights, the config's model arguments
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(built.eval().forward_features(x), net.eval().forward_features(x))
    assert model_config("hf-hub:acme/tiny-vit") == ("vit_small_patch14_dinov2", OVERRIDES)
    # Another resolution: timm resamples the position embedding (its own loader's rule).
    assert build_model("hf-hub:acme/tiny-vit", img_size=56).pos_embed.shape[1] == 1 + 8 * 8


def test_timm_name_and_revisions(cache):
    net = tiny_model(1)
    fake_repo(cache, "timm/vit_tiny_test.lvd", net, commit="feedc0de")
    assert same_weights(build_model("timm/vit_tiny_test.lvd", img_size=28), net)
    assert same_weights(build_model("hf-hub:timm/vit_tiny_test.lvd@feedc0de", img_size=28), net)  # a commit
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        build_model("hf-hub:timm/vit_tiny_test.lvd@v2", img_size=28)  # a revision the cache does not have


def test_missing_weights_say_how_to_get_them(cache):
    with pytest.raises(ModelError) as info:
        build_model("hf-hub:acme/absent", img_size=28)
    msg = str(info.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and str(cache) in msg
    assert "hf download acme/absent" in msg and "models--acme--absent" in msg and "HF_HUB_CACHE" in msg
    # A snapshot without weights is not a cached model either.
    snapshot = fake_repo(cache, "acme/noweights", tiny_model())
    os.remove(snapshot / "model.safetensors")
    with pytest.raises(ModelError, match="hf download acme/noweights"):
        build_model("hf-hub:acme/noweights", img_size=28)


def test_online_download_failure_is_one_clear_error(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    calls = []

    def no_network(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("cache_dir")))
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ModelError, match=r"ConnectionError.*hf download acme/vit"):
        build_model("hf-hub:acme/vit", img_size=28)
    assert calls == [("acme/vit", "config.json", str(cache))]


def test_shapes_only_under_the_meta_device(cache):
    from leap.cost import CostModel

    fake_repo(cache, "acme/tiny-vit", tiny_model())
    with torch.device("meta"):
        assert hub_source("hf-hub:acme/tiny-vit")[1] is False  # no weights are read for shapes
    cost = CostModel("hf-hub:acme/tiny-vit", "vit_small_patch14_dinov2", img_size=28, student_overrides=OVERRIDES)
    same = CostModel("vit_small_patch14_dinov2", "vit_small_patch14_dinov2", img_size=28,
                     teacher_overrides=OVERRIDES, student_overrides=OVERRIDES)  # fmt: skip
    assert cost.teacher_flops(2) == same.teacher_flops(2)


def test_distill_with_a_hub_teacher(cache, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")
    fake_repo(cache, "acme/tiny-vit", tiny_model())
    from leap.cli import main

    argv = ["distill", "--teacher", "hf-hub:acme/tiny-vit", "--student", "vit_small_patch14_dinov2"]
    argv += ["--student-overrides", json.dumps({**OVERRIDES, "embed_dim": 16})]
    argv += ["--img-size", "28", "--data-source", "synthetic", "--synthetic-size", "8", "--batch-size", "4"]
    argv += ["--workers", "0", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["config"]["teacher"] == "hf-hub:acme/tiny-vit"
    argv[2] = "hf-hub:acme/absent"
    argv[-1] = str(tmp_path / "run2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf download acme/absent" in err and "Traceback" not in err
