"""Run a function in several processes (DDP tests) and fail, not hang, if they stall."""

import os
import socket
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


def free_port() -> int:
    """A TCP port free on the loopback interface now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_ddp_env(rank: int, world: int, port: int) -> None:
    """The torchrun environment of one CPU rank (gloo on the loopback), one thread per process."""
    import torch

    torch.set_num_threads(1)  # several processes on a 2-core machine
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LEAP_KERNELS_BACKEND="torch",
    )
