"""SIGTERM under DDP (two gloo CPU ranks): a signal that reaches one rank only stops every rank
after the same step, with one checkpoint and the conventional exit code (issue "Reliability", item 8)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from spawn import free_port, run_processes, set_ddp_env
from tiny import tiny_config

WORLD = 2


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    set_ddp_env(rank, world, port)
    from leap.errors import RunInterrupted
    from leap.run.loop import Trainer

    original = Trainer.train_step

    def step(self, images):
        result = original(self, images)
        if rank == 1 and result.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
        return result

    Trainer.train_step = step
    cfg = tiny_config(
        os.path.join(tmp, "run"), teacher_depth=3, synthetic_size=32, epochs=2, curriculum="off", device="cpu"
    )
    outcome = {"code": None, "steps": None}
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    except RunInterrupted as e:
        outcome["code"] = e.exit_code
    outcome["steps"] = trainer.step
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_after_the_same_step(tmp_path):
    run_processes(_worker, (WORLD, free_port(), str(tmp_path)), WORLD, timeout_s=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == r1 == {"code": 143, "steps": 1}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "checkpoint"] == [1]
    assert log[-1]["type"] == "interrupted" and log[-1]["signal"] == signal.SIGTERM
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1
