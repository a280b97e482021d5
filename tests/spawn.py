"""Run a function in several processes (DDP tests) and fail, not hang, if they stall."""

import time

import pytest
import torch.multiprocessing as mp


def run_processes(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """``mp.spawn(fn, args, nprocs)``; terminates the workers and fails the test after ``timeout_s``."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{nprocs} worker processes timed out after {timeout_s:.0f} s")
