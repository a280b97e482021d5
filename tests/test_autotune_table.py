"""The per-card autotune shortlist (leap_kernels/ops/autotune_table.json, LEAP_KERNELS_AUTOTUNE)."""

import pytest
import torch

from leap_kernels.ops import _triton_common as tc

pytestmark = pytest.mark.skipif(not tc.HAS_TRITON, reason="needs Triton")


def _all_configs():
    """Every autotuned kernel's full config list as a GPU sees it (the interpreter keeps one)."""
    from leap_kernels.ops import _attention_triton as attention
    from leap_kernels.ops.feature_loss import triton as fl

    return {
        "_projection_loss_kernel": fl._gemm_configs(False, GROUP_M=8),
        "_grad_weight_kernel": fl._gemm_configs(False),
        "_teacher_attention_fwd_kernel": attention._attention_configs(False),
    }


def test_every_table_entry_names_an_existing_config():
    # A typo or a removed config would silently fall back to the full search.
    configs = _all_configs()
    for card, kernels in tc._autotune_table().items():
        if card.startswith("_"):
            continue
        for kernel, keys in kernels.items():
            assert kernel in configs, f"{card}: {kernel} is not an autotuned kernel this test knows"
            known = {tc.config_key(c) for c in configs[kernel]}
            assert keys and set(keys) <= known, (card, kernel, set(keys) - known)


@pytest.mark.parametrize("kernel", ["_projection_loss_kernel", "_grad_weight_kernel", "_teacher_attention_fwd_kernel"])
def test_hopper_tries_its_shortlist_and_full_tries_all(kernel, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    configs = _all_configs()[kernel]
    cuda = torch.device("cuda")
    monkeypatch.delenv(tc.ENV_AUTOTUNE, raising=False)
    short = tc.autotune_shortlist(kernel, configs, cuda)
    assert [tc.config_key(c) for c in short] == [
        k for k in map(tc.config_key, configs) if k in tc._autotune_table()["sm_90"][kernel]
    ]
    assert 0 < len(short) < len(configs)
    monkeypatch.setenv(tc.ENV_AUTOTUNE, "full")
    assert tc.autotune_shortlist(kernel, configs, cuda) == configs
    monkeypatch.setenv(tc.ENV_AUTOTUNE, "table")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # no A100 entry
    assert tc.autotune_shortlist(kernel, configs, cuda) == configs
    assert tc.autotune_shortlist(kernel, configs, torch.device("cpu")) == configs


def test_bad_switch_names_itself(monkeypatch):
    monkeypatch.setenv(tc.ENV_AUTOTUNE, "fast")
    with pytest.raises(ValueError, match="LEAP_KERNELS_AUTOTUNE"):
        tc.autotune_shortlist("_grad_weight_kernel", [], torch.device("cuda"))


def test_attention_prune_keeps_the_register_rule_then_the_shortlist(monkeypatch):
    from leap_kernels.ops import _attention_triton as attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(tc.ENV_AUTOTUNE, raising=False)
    configs = attention._attention_configs(False)
    qkv = torch.empty(0, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")), raising=False)
    kept = attention._prune_configs(configs, {"QKV": qkv, "HEAD_DIM": 128, "ROPE": False})
    keys = [tc.config_key(c) for c in kept]
    assert keys and all(k in tc._autotune_table()["sm_90"]["_teacher_attention_fwd_kernel"] for k in keys)
    assert "BLOCK_M=128 BLOCK_N=128 warps=8 stages=2" not in keys  # d = 128: spills
