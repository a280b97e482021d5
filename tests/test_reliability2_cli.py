"""Reliability, round 2 (issue 27): options and the command line. Ignored or impossible options are
refused with one line before anything is written (--data with synthetic images, start blocks beyond the
teacher, nonsense model overrides, bad kernel environment variables, --start-block without the
curriculum); unwritable --out; malformed YAML; raw-pickle teachers; the reference of mixed dtypes.

Each test failed before its fix (the item numbers are the issue's).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
import warnings

import pytest
import torch
from test_reliability2_data import tiny_config
from tiny import tiny_argv

from leap.cli import main
from leap.config_checks import KERNEL_BACKENDS
from leap.errors import CheckpointError, ConfigError
from leap.run.loop import Trainer

TINY = tiny_argv(batch_size=8, data_source="synthetic", synthetic_size=32, epochs=1)


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("leap: error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 7, 27, 28, 31: options


def test_data_with_synthetic_images_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line_error(capsys, ["distill", *TINY, "--data", "/nonexistent", "--out", str(out)])
    assert "--data: '/nonexistent' is not read with --data-source synthetic" in line
    assert not out.exists()


@pytest.mark.parametrize("option", ["--start-block", "--snap-to-last"])
def test_blocks_beyond_the_teacher_are_refused(tmp_path, capsys, option):
    line = one_line_error(capsys, ["distill", *TINY, option, "9", "--out", str(tmp_path / "run")])
    assert f"{option} 9: the teacher vit_small_patch14_dinov2 has 4 blocks; give a block in 1..4" in line


@pytest.mark.parametrize(
    "overrides,why",
    [
        ({"depth": -1}, r"depth must be an integer in \[1, 1000\], got -1"),
        ({"depth": 0}, "depth must be an integer"),
        ({"depth": "4"}, "depth must be an integer .* got '4' \\(a string: write the number without quotes\\)"),
        ({"depth": {"a": 1}}, "depth must be an integer"),
        ({"embed_dim": 0}, "embed_dim must be an integer"),
        ({"patch_size": 0}, "patch_size must be an integer"),
        ({"mlp_ratio": 1e9}, r"mlp_ratio must be a number in \(0, 64\]"),
    ],
)
def test_nonsense_model_overrides_are_one_line(capsys, tmp_path, overrides, why):
    for option in ("--teacher-overrides", "--student-overrides"):
        argv = ["distill", *TINY, option, json.dumps(overrides), "--out", str(tmp_path / "run")]
        line = one_line_error(capsys, argv)
        assert f"{option}: " in line
        assert __import__("re").search(why, line), line


def test_start_block_without_the_curriculum_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--start-block: applies to --curriculum cka only"):
        tiny_config(tmp_path, start_block=2, curriculum="off").validate()
    with pytest.raises(ConfigError, match="--snap-to-last: applies to --curriculum cka only"):
        tiny_config(tmp_path, snap_to_last=2, curriculum="one-to-one").validate()


# ----------------------------------------------------------------------------- 29: the kernels' environment


@pytest.mark.parametrize(
    "name,value,why",
    [
        ("LEAP_KERNELS_BACKEND", "bogus", "expected one of auto, cuda, triton, cpp, torch"),
        ("LEAP_KERNELS_CHUNK_TOKENS", "0", "expected a positive integer"),
        ("LEAP_KERNELS_CHUNK_TOKENS", "many", "expected a positive integer"),
    ],
)
def test_bad_kernel_environment_fails_before_the_run_dir_exists(tmp_path, capsys, monkeypatch, name, value, why):
    monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    line = one_line_error(capsys, ["distill", *TINY, "--out", str(out)])
    assert f"{name}='{value}'" in line and why in line
    assert not out.exists()


def test_kernel_backend_names_match_the_kernels():
    import leap_kernels._backends as B

    assert KERNEL_BACKENDS == (B.AUTO, *B.backend_names())


# ----------------------------------------------------------------------------- 19, 23: unwritable --out


def _read_only(monkeypatch, root):
    """Writes under ``root`` fail as on a read-only file system (the tests may run as root, which ignores
    permission bits)."""
    mkstemp, makedirs = tempfile.mkstemp, os.makedirs

    def ro_mkstemp(*args, dir=None, **kw):
        if dir is not None and os.path.realpath(dir).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkstemp(*args, dir=dir, **kw)

    def ro_makedirs(path, *args, **kw):
        if os.path.realpath(path).startswith(str(root)) and not os.path.isdir(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return makedirs(path, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", ro_mkstemp)
    monkeypatch.setattr(os, "makedirs", ro_makedirs)


def test_out_on_a_read_only_fs_or_under_a_file(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"--out .*file/run: cannot write there: a regular file is in the way"):
        Trainer(tiny_config(a_file / "run"))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    _read_only(monkeypatch, readonly)
    for out in (readonly, readonly / "run"):
        with pytest.raises(ConfigError, match=r"--out .*ro.*: cannot write there: the file system is read-only"):
            Trainer(tiny_config(out))


def test_train_teacher_checks_out_before_training(tmp_path, capsys, monkeypatch):
    import leap.data as D

    def never(*args, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(D, "build_dataset", never)
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = one_line_error(capsys, ["train-teacher", "--out", str(a_file / "t.pth"), "--no-progress"])
    assert "--out" in line and "cannot write there: a regular file is in the way" in line
    readonly = tmp_path / "ro"
    readonly.mkdir()
    _read_only(monkeypatch, readonly)
    line = one_line_error(capsys, ["train-teacher", "--out", str(readonly / "t.pth"), "--no-progress"])
    assert "read-only" in line
    line = one_line_error(capsys, ["train-teacher", "--model-overrides", '{"depth": 0}', "--out", "t.pth"])
    assert "--model-overrides: depth must be an integer" in line


# ----------------------------------------------------------------------------- 32, 33: files


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 2\n  batch_size: 8\nlr: [\n")
    line = one_line_error(capsys, ["distill", "--config", str(config)])
    assert f"could not parse config file {config}: " in line and "at line 2, column" in line


def test_a_raw_pickle_teacher_is_refused_as_such(tmp_path):
    from leap.models import build_model, load_teacher_weights

    path = tmp_path / "teacher.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.ones(2)}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's UserWarning about the pickle protocol leaked before
        with pytest.raises(CheckpointError, match="refused: it is a raw Python pickle") as e:
            load_teacher_weights(build_model("vit_small_patch14_dinov2", img_size=28, depth=1), path)
    assert "corrupt" not in str(e.value)


# ----------------------------------------------------------------------------- 38: the reference, mixed dtypes


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_accepts_the_mixed_dtypes_the_op_accepts(normalize):
    from leap_kernels import fused_feature_loss, fused_feature_loss_reference

    student = torch.randn(2, 7, 16).to(torch.bfloat16)
    weight, bias = torch.randn(24, 16), torch.randn(24)  # fp32 master parameters, as under autocast
    target = torch.randn(2, 7, 24).to(torch.bfloat16)
    ref = fused_feature_loss_reference(student, weight, bias, target, normalize=normalize)
    exact = fused_feature_loss_reference(
        student.double(), weight.double(), bias.double(), target.double(), normalize=normalize
    )
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-6)
    op = fused_feature_loss(student, weight, bias, target, normalize=normalize)
    torch.testing.assert_close(op.double(), exact, rtol=2e-2, atol=1e-3)  # the op keeps some bf16 rounding
