"""Two-process DDP (gloo, CPU) run of the LEAP trainer, initialised from the torchrun
environment variables (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from spawn import free_port, run_processes, set_ddp_env
from tiny import tiny_options

WORLD = 2


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    set_ddp_env(rank, world, port)
    from leap.config import TrainConfig
    from leap.run.loop import Trainer

    cfg = TrainConfig(
        **tiny_options(
            teacher_depth=3,
            epochs=2,
            out=os.path.join(tmp, "run"),
            device="cpu",
            # Calibration picks the argmax of the rank-averaged scores; tau = 0.3 makes the
            # level-ups depend on the averaged CKA of each step.
            tau=0.3,
        )
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    params = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    torch.save(
        {
            "blocks": trainer.block_history,
            "summary": summary,
            "params": params,
            "world_size": trainer.group.world_size,
            "group_left": not torch.distributed.is_initialized(),
        },
        os.path.join(tmp, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_ddp_two_cpu_ranks_stay_in_lockstep(tmp_path):
    run_processes(_worker, (WORLD, free_port(), str(tmp_path)), WORLD, timeout_s=180)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    assert r0["world_size"] == r1["world_size"] == WORLD
    assert r0["group_left"] and r1["group_left"]  # the trainer created the group and destroyed it at the end
    # 16 images / 2 ranks / batch 4 -> 2 steps per epoch, 2 epochs
    assert len(r0["blocks"]) == 4
    assert r0["blocks"] == r1["blocks"]
    assert r0["summary"]["level_ups"] == r1["summary"]["level_ups"]
    assert r0["summary"]["start_block"] == r1["summary"]["start_block"]
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["summary"]["resolved"]["global_batch"] == 8

    # Rank 0 alone wrote the run directory: one config record, one set of step records.
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "config" for r in log) == 1
    assert [r["step"] for r in log if r["type"] == "step"] == [1, 2, 3, 4]
    assert [r["block"] for r in log if r["type"] == "step"] == r0["blocks"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == WORLD  # every rank's RNG state, for an exact DDP resume
    assert torch.equal(ckpt["head"]["weight"], r1["params"]["head.weight"])
