"""Host reads of device values per training step (leap/run/readback.py): the trainer must not make the
device wait for the host on every step.

On a CPU every tensor is on the host, so "a sync" here is any read of a tensor's value into Python:
``aten::_local_scalar_dense`` (``item``, ``float``, ``int``, ``bool``) seen by a dispatch mode, and
``Tensor.tolist``. Three kinds of reads are host-side by design and not counted: the optimizers' step
counters (``torch.optim`` keeps them on the CPU unless ``capturable``), mixup's draw from its CPU
generator, and the data pipeline's augmentation draws (CPU generators, in the DataLoader workers when
there are any). On a GPU, the ``gpu`` test below runs baseline steps under ``torch.cuda.set_sync_debug_mode``.

Targets (issue: "the trainer must cost no more than the loop a user would write"): the baseline reads
nothing between read points (every ``--log-every`` steps, checkpoints, epoch ends) and once at each;
LEAP reads once per CKA measurement (the controller decides on a step's score before the next step,
as the reference does).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from tiny import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from leap.run.loop import Trainer

#: Reads that are host-side by design, by a frame on their stack: the optimizers' CPU step counters, and
#: the data pipeline (augmentation draws from CPU generators, in the DataLoader workers when there are any;
#: mixup's CPU generator).
HOST_SIDE = ("torch/optim/", "torchvision/", "torch/utils/data/", "leap/data/")


class HostReads(TorchDispatchMode):
    """Records every host read of a tensor value with the trainer's step and whether a read-back made it."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = trainer
        self.reads: list[tuple[int, bool]] = []  # (trainer.step at the read, inside the trainer's _read_back)
        self._tolist = torch.Tensor.tolist

    def _record(self) -> None:
        stack = traceback.extract_stack()
        frames = [f for f in stack if "test_host_syncs" not in f.filename and "_python_dispatch" not in f.filename]
        if any(tag in f.filename.replace("\\", "/") for f in frames for tag in HOST_SIDE):
            return
        self.reads.append((self.trainer.step, any(f.name == "_read_back" for f in frames)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original, mode = self._tolist, self

        def counted_tolist(tensor):
            mode._record()
            return original(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _run_counting(config) -> tuple[Trainer, HostReads]:
    trainer = Trainer(config)
    counter = HostReads(trainer)
    original_epoch = trainer._run_epoch

    def counted_epoch():
        with counter:
            return original_epoch()

    trainer._run_epoch = counted_epoch
    trainer.fit()
    return trainer, counter


def test_baseline_reads_only_at_read_points(tmp_path):
    # 16 images x 3 epochs at batch 2: 8 steps per epoch; read points every 3 steps and at epoch ends.
    cfg = tiny_config(tmp_path, curriculum="off", batch_size=2, epochs=3, log_every=3, clip_grad=1.0)
    trainer, counter = _run_counting(cfg)
    assert trainer.step == 24
    read_points = {s for s in range(1, 25) if s % 3 == 0 or s % 8 == 0}
    outside = [step for step, in_read_back in counter.reads if not in_read_back]
    by_step = {}
    for step, in_read_back in counter.reads:
        if in_read_back:
            by_step[step] = by_step.get(step, 0) + 1
    # Outside a read-back only the epoch-end checkpoint reads (its finite-weights check), never a step.
    assert set(outside) <= {8, 16, 24}, counter.reads
    assert by_step == {s: 1 for s in read_points}, by_step
    assert trainer.readback.reads == len(read_points)


def test_leap_reads_once_per_cka_measurement(tmp_path):
    cfg = tiny_config(tmp_path, curriculum="cka", batch_size=2, epochs=1, log_every=100, tau=2.0)
    trainer, counter = _run_counting(cfg)
    steps = trainer.step
    assert steps == 8
    in_read_back = [step for step, inside in counter.reads if inside]
    # One read per step (its CKA), made inside the step before the optimizer update (trainer.step is the
    # previous step then); the calibration scan of the first step reads its scores once more.
    assert sorted(in_read_back) == list(range(steps)), counter.reads
    outside = [step for step, inside in counter.reads if not inside]
    assert outside.count(0) == 1 and set(outside) <= {0, steps}, counter.reads  # calibration; epoch-end checkpoint


@pytest.mark.parametrize("curriculum", ["off", "cka"])
def test_deferred_reads_log_every_step_in_order(tmp_path, curriculum):
    # Deferring the reads changes when values reach the host, not what is logged.
    cfg = tiny_config(tmp_path, curriculum=curriculum, batch_size=2, epochs=2, log_every=5)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    import json

    with open(tmp_path / "log.jsonl") as f:
        steps = [r for r in map(json.loads, f) if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(r["loss"] == r["loss"] and r["images_per_s"] > 0 for r in steps)  # read, not NaN placeholders
    assert summary["steps"] == 16 and summary["final_loss"] == steps[-1]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_baseline_steps_never_synchronize(tmp_path):
    # CUDA's own verdict: a baseline step between read points makes no synchronizing call (no .item(), no
    # device-to-host copy, no torch.cuda.synchronize); the read points themselves are outside train_step.
    import warnings

    cfg = tiny_config(tmp_path, curriculum="off", batch_size=2, epochs=1, log_every=100, device="cuda", mixup=False)
    trainer = Trainer(cfg)
    original = trainer.train_step
    caught: list[str] = []

    def watched(images):
        if trainer.step == 0:  # the first step builds lazy state (cuBLAS handles, autotune): not a steady step
            return original(images)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                result = original(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        caught.extend(str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message))
        return result

    trainer.train_step = watched
    trainer.fit()
    assert trainer.step == 8 and not caught, caught


def test_nonfinite_step_found_at_the_next_read_point_is_never_saved(tmp_path, monkeypatch):
    # Baseline, reads every 4 steps: a NaN loss at step 2 stops the run at the read point of step 4,
    # naming step 2; the epoch-1 checkpoint (step 8) is never written, and the log has steps 1 only.
    import json

    from leap.errors import NonFiniteLossError
    from leap.objective import DistillModule

    calls = {"n": 0}
    original = DistillModule.forward

    def poisoned(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        return (out[0] * float("nan"), *out[1:]) if calls["n"] == 2 else out

    monkeypatch.setattr(DistillModule, "forward", poisoned)
    trainer = Trainer(tiny_config(tmp_path, curriculum="off", batch_size=2, epochs=1, log_every=4))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 .*applied before the read at step 4"):
        trainer.fit()
    assert trainer.step == 4 and not (tmp_path / "checkpoint.pt").exists()
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log if r["type"] == "step"] == [1]
    assert [r["step"] for r in log if r["type"] == "error"] == [2]
