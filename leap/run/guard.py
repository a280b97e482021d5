"""What keeps a run directory trustworthy: one run at a time, stop signals, kept checkpoints,
divergence stops, leftovers of interrupted writes, and a log that holds each step once.

:class:`RunGuard` is owned by :class:`leap.run.loop.Trainer`, which calls it at a few points:

- :meth:`RunGuard.start` (setup): take an exclusive lock on the run directory (rank 0; a
  second run on the same ``--out`` is refused with one line naming the pid and host of the
  holder; a lock left by a dead process is taken over), remove the temp files of writes that
  were interrupted (``.NAME.XXXXXXXX.tmp``), and agree on the outcome over every rank.
- :func:`truncate_log` (resume): drop the records of ``log.jsonl`` after the checkpoint's step,
  so every reader sees each step once.
- :meth:`RunGuard.catch_signals` / :meth:`RunGuard.stop_requested` (the loop): SIGTERM (what
  SLURM and Kubernetes send before killing) and SIGINT only set a flag; after the current step
  every rank agrees (one all-reduce), a checkpoint is written and the run exits with
  ``128 + signal`` (143, 130) through :class:`leap.errors.RunInterrupted`. A second SIGINT
  interrupts at once.
- :meth:`RunGuard.check_step` / :meth:`RunGuard.check_weights`: a loss spike (``loss >
  --divergence-factor x`` the median of the recent steps) or a parameter-norm blow-up (norm
  ``> --divergence-factor x`` the norm at the start) stops the run before a checkpoint is
  written, like a NaN does.
- :meth:`RunGuard.keep_previous` (before each checkpoint write): the checkpoint about to be
  replaced is kept as ``checkpoint-stepNNNNNNNNN.pt`` (a hard link, no copy), the newest
  ``--keep-checkpoints - 1`` of them are kept, so ``--resume`` can go back one.

The lock dies with the run: forked children (DataLoader workers) close their copy of its
descriptor at once, and a lock whose writer is dead is taken over even when orphans still hold
the old file. A stop signal starts a watchdog: a step that stays blocked (a hung read) for
``LEAP_STOP_GRACE_S`` seconds (60) ends the process without writing anything new.

Why this module is long: each guard is small, but the lock (flock, its fallbacks, the take-over),
the signals with their watchdog, the divergence checks and the kept checkpoints all hold the
run directory's invariants and share its state.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import signal
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, RunInterrupted, TrainingError
from ..runlog import TEMP_FILE_RE, atomic_write, check_writable_dir, run_file

__all__ = [
    "LOCK_NAME",
    "RunDirLock",
    "RunGuard",
    "clean_stale_temp_files",
    "truncate_log",
    "kept_checkpoints",
    "config_warnings",
]

log = logging.getLogger("leap.train")

LOCK_NAME = ".leap.lock"
_KEPT_RE = re.compile(r"^checkpoint-step(\d+)\.pt$")
_SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


# --------------------------------------------------------------------------------------
# Run-directory lock
# --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Descriptors of the run-directory locks this process holds. A forked child (a DataLoader worker)
#: closes its copies at once: the ``flock`` belongs to the open file, so a worker that outlived a
#: killed run would otherwise keep the run directory locked.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)  # only this process's copy: the parent's lock stays
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunDirLock:
    """An exclusive lock on ``run_dir`` (file ``run_dir/.leap.lock``, holding ``pid host time``).

    ``flock`` on the file is the lock (released by the kernel when the process dies, so a crashed
    run never blocks the next one); where the filesystem has no ``flock``, the pid and host in the
    file decide: a lock of this host whose process is gone is stale and taken over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: int | None = None

    @staticmethod
    def _describe(text: str) -> str:
        parts = text.split()
        if len(parts) >= 2:
            when = ""
            if len(parts) >= 3:
                try:
                    when = ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(parts[2])))
                except ValueError:
                    pass
            return f"pid {parts[0]} on host {parts[1]}{when}"
        return "another process"

    def _refuse(self, holder: str) -> ConfigError:
        return ConfigError(
            f"run directory {self.run_dir} is in use by another leap run ({holder}; lock file {self.path}): "
            "wait for it to finish, or choose another --out"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`~leap.errors.ConfigError` (one line: who holds it)."""
        import fcntl

        os.makedirs(self.run_dir, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(5):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ConfigError(f"{self.path} is a symbolic link; remove it") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace")
                parts = holder.split()
                if (
                    len(parts) >= 2
                    and parts[1] == socket.gethostname()
                    and parts[0].isdigit()
                    and int(parts[0]) != os.getpid()
                    and not _pid_alive(int(parts[0]))
                ):
                    # The run that wrote the lock is dead; processes that inherited its descriptor (e.g.
                    # orphaned workers of a killed run) still hold the flock. Take over with a new lock file.
                    try:
                        if os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False)):
                            os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    os.close(fd)
                    log.warning(
                        "%s: the run that held it (pid %s) is gone; its lock is taken over", self.path, parts[0]
                    )
                    continue
                os.close(fd)
                raise self._refuse(self._describe(holder)) from None
            except OSError:  # no flock on this filesystem: decide by pid and host
                holder = os.read(fd, 200).decode("utf-8", "replace").split()
                if (
                    holder
                    and len(holder) >= 2
                    and holder[1] == socket.gethostname()
                    and holder[0].isdigit()
                    and int(holder[0]) != os.getpid()
                    and _pid_alive(int(holder[0]))
                ):
                    os.close(fd)
                    raise self._refuse(self._describe(" ".join(holder))) from None
                if holder and len(holder) >= 2 and holder[1] != socket.gethostname():
                    os.close(fd)
                    raise self._refuse(
                        self._describe(" ".join(holder)) + "; if that run is gone, delete the lock file"
                    ) from None
            # The file may have been removed (by the holder's release) between open and flock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode())
            self._fd = fd
            _HELD_LOCK_FDS.add(fd)
            return
        raise self._refuse("the lock file keeps changing")

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        _HELD_LOCK_FDS.discard(self._fd)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# --------------------------------------------------------------------------------------
# Files of a run directory
# --------------------------------------------------------------------------------------


def clean_stale_temp_files(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temp files of interrupted atomic writes (``.NAME.XXXXXXXX.tmp``) from ``run_dir``.

    Call it only while holding the run-directory lock (no other writer is active then).
    Returns the removed paths.
    """
    run_dir = os.fspath(run_dir)
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return removed
    for e in entries:
        if TEMP_FILE_RE.match(e.name) and (e.is_file(follow_symlinks=False) or e.is_symlink()):
            try:
                os.unlink(e.path)
                removed.append(e.path)
            except FileNotFoundError:
                pass
    return removed


def truncate_log(path: str | os.PathLike, step: int) -> int:
    """Drop the records of the JSON-lines log ``path`` written after optimizer step ``step``.

    A record is dropped when its ``"step"`` is larger than ``step`` (steps, level-ups, epochs,
    checkpoints, errors of the lost steps), and so is a ``summary`` record (the run goes on: it is
    no longer the run's outcome). Records without a step and unreadable lines are kept as they
    are. The file is rewritten atomically. Returns the number of records dropped.
    """
    import json

    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isfile(path):
        return 0
    kept, dropped, partial = [], 0, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                partial = True  # the half-written last line of a killed run
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                kept.append(line)
                continue
            s = rec.get("step") if isinstance(rec, dict) else None
            if (isinstance(s, (int, float)) and not isinstance(s, bool) and s > step) or (
                isinstance(rec, dict) and rec.get("type") == "summary"
            ):
                dropped += 1
                continue
            kept.append(line)
    if dropped or partial:
        atomic_write(path, lambda f: f.write("".join(kept)), binary=False)
    return dropped


def kept_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the kept earlier checkpoints of a run, newest first."""
    run_dir = os.fspath(run_dir)
    out = []
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return out
    for name in names:
        m = _KEPT_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(out, reverse=True)


def config_warnings(cfg: Any) -> list[str]:
    """Settings that are valid but probably not meant (printed as warnings at the start)."""
    out = []
    if cfg.warmup_epochs > cfg.epochs:
        out.append(
            f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs {cfg.epochs}: the learning rate "
            f"never reaches its peak (it ends at {cfg.epochs / cfg.warmup_epochs:.0%} of it); lower "
            "--warmup-epochs"
        )
    if cfg.curriculum == "cka" and cfg.tau > 1:
        out.append(
            f"--tau {cfg.tau:g} > 1: CKA never reaches it, so the target block moves only after "
            "--max-epochs-per-block epochs" + (" (0: never)" if not cfg.max_epochs_per_block else "")
        )
    return out


# --------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------


class RunGuard:
    """See the module docstring. ``is_main``: this rank writes the run directory (rank 0)."""

    def __init__(
        self,
        run_dir: str,
        *,
        is_main: bool = True,
        keep_checkpoints: int = 2,
        divergence_factor: float = 100.0,
        window: int = 50,
        min_history: int = 10,
        on_error: Any = None,
    ):
        self.run_dir = run_dir
        self.is_main = is_main
        self.keep = max(1, int(keep_checkpoints))
        self.factor = float(divergence_factor)
        self.lock = RunDirLock(run_dir)
        self._created_dir = False
        self._losses: deque[float] = deque(maxlen=window)
        self._min_history = min_history
        self._ref_norm: float | None = None
        self._block: int | None = None
        self.signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._on_error = on_error  # called with the "error" log record before a divergence stop
        self._watchdog: threading.Timer | None = None  # exits a run whose step blocks after a stop signal

    def _diverged(self, msg: str, step: int) -> TrainingError:
        if self._on_error is not None:
            self._on_error({"type": "error", "step": step, "message": msg})
        return TrainingError(msg)

    # ---- start / end

    def start(self, group: Any = None, device: torch.device | None = None) -> list[str]:
        """Lock the run directory (rank 0) and clean temp files; every rank fails if rank 0 could not.

        Returns the removed temp files.
        """
        error: BaseException | None = None
        removed: list[str] = []
        if self.is_main:
            self._created_dir = not os.path.isdir(self.run_dir)
            if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
                error = ConfigError(
                    f"--out {self.run_dir} exists and is not a directory; give a run directory "
                    "(it is created if missing)"
                )
            else:
                try:
                    check_writable_dir(self.run_dir, "--out")  # read-only, under a file, ...: before any work
                    self.lock.acquire()
                    removed = clean_stale_temp_files(self.run_dir)
                except ConfigError as e:
                    error = e
        if group is not None and getattr(group, "enabled", False):
            from ..distributed import all_reduce_sum

            flag = torch.tensor([1.0 if error is not None else 0.0], device=device)
            if all_reduce_sum(flag).item() > 0 and error is None:
                error = ConfigError(f"rank 0 could not take the run directory {self.run_dir} (see its message)")
        if error is not None:
            raise error
        for path in removed:
            log.info("removed %s (left by an interrupted write)", path)
        return removed

    def close(self, *, failed_early: bool = False) -> None:
        """Release the lock and restore signal handlers. ``failed_early``: the run wrote nothing, so a
        run directory created for it is removed again if it is empty."""
        self.restore_signals()
        if self.lock.held:
            self.lock.release()
            if failed_early and self._created_dir:
                try:
                    os.rmdir(self.run_dir)
                except OSError:
                    pass

    # ---- signals

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT set a flag instead of stopping the process (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # pragma: no cover - not allowed here
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            log.warning(
                "%s received: finishing the current step, then writing a checkpoint "
                "(press Ctrl-C again to stop at once)",
                _SIGNAL_NAMES.get(signum, signum),
            )
            # A second signal acts at once.
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            # A step blocked for good (a hung network file system, a pipe) would absorb the signal:
            # after a grace period the process exits anyway, without writing anything new.
            self._watchdog = threading.Timer(stop_grace_s(), self._blocked_exit, args=(signum,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def _blocked_exit(self, signum: int) -> None:
        name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
        ckpt = run_file(self.run_dir, "checkpoint.pt")
        msg = (
            f"stopped by {name}: the current step did not finish within {stop_grace_s():g} s (blocked, e.g. reading "
            f"data), so no new checkpoint was written. Last good checkpoint: "
            f"{ckpt if os.path.isfile(ckpt) else 'none'}; continue with --resume auto (same --out)"
        )
        try:
            if self._on_error is not None and self.is_main:
                self._on_error({"type": "error", "signal": int(signum), "message": msg})
        except Exception:  # noqa: BLE001 - the exit must happen whatever the log does
            pass
        os.write(2, f"leap: error: {msg}\n".encode())
        os._exit(RunInterrupted.exit_code_of(signum))

    def restore_signals(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for sig, handler in self._old_handlers.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # pragma: no cover
                pass
        self._old_handlers.clear()

    def stop_requested(self, group: Any = None, device: torch.device | None = None) -> int | None:
        """The signal to stop on, agreed by every rank (one all-reduce under DDP), else None."""
        mine = float(self.signal or 0)
        if group is not None and getattr(group, "enabled", False):
            from ..distributed import all_reduce_sum

            t = torch.tensor([1.0 if mine else 0.0, mine], device=device)
            count, total = all_reduce_sum(t).tolist()
            if count == 0:
                return None
            return self.signal or int(round(total / count))
        return self.signal

    @staticmethod
    def interrupted(signum: int, step: int, checkpoint: str) -> RunInterrupted:
        name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
        return RunInterrupted(
            f"stopped by {name} after step {step}; checkpoint written to {checkpoint}: continue with "
            f"--resume auto (same --out)",
            exit_code=RunInterrupted.exit_code_of(signum),
        )

    # ---- divergence

    def set_reference(self, params: Iterable[torch.Tensor]) -> None:
        """The parameter norm at the start (after a resume: of the checkpoint's weights)."""
        self._ref_norm = _norm(params)

    def check_step(self, loss: float, step: int, last_good: str, block: int | None = None) -> None:
        """Raise :class:`~leap.errors.TrainingError` on a loss spike (see the module docstring).

        A new target ``block`` starts a new reference: the loss of a new target (and a reset head)
        is expected to jump, so the check waits for ``min_history`` steps on it.
        """
        if block is not None and block != self._block:
            self._block = block
            self._losses.clear()
        if self.factor > 0 and len(self._losses) >= self._min_history:
            ref = statistics.median(self._losses)
            if ref > 0 and loss > self.factor * ref:
                raise self._diverged(
                    f"the loss jumped to {loss:.4g} at step {step}, {loss / ref:.0f}x the median of the last "
                    f"{len(self._losses)} steps ({ref:.4g}): training diverged and was stopped; no checkpoint was "
                    f"written after it. {last_good} Resume from it with a lower --lr (or set "
                    f"--divergence-factor 0 to disable this check)",
                    step,
                )
        if math.isfinite(loss):
            self._losses.append(loss)

    def check_weights(self, params: Iterable[torch.Tensor], step: int, last_good: str) -> None:
        """Raise :class:`~leap.errors.TrainingError` if the parameter norm blew up (nothing is written)."""
        if self.factor <= 0 or not self._ref_norm:
            return
        norm = _norm(params)
        if norm > self.factor * self._ref_norm:
            raise self._diverged(
                f"the student/head parameter norm reached {norm:.4g} by step {step}, {norm / self._ref_norm:.0f}x "
                f"its value at the start ({self._ref_norm:.4g}): training diverged; the checkpoint was NOT "
                f"overwritten. {last_good} Resume from it with a lower --lr (or set --divergence-factor 0 to "
                "disable this check)",
                step,
            )

    # ---- kept checkpoints

    def keep_previous(self, ckpt_path: str, step: int) -> None:
        """Before ``ckpt_path`` is replaced: keep it as ``checkpoint-step{step}.pt`` and drop the
        oldest kept ones beyond ``keep - 1`` (rank 0 only)."""
        if not self.is_main:
            return
        if self.keep > 1 and os.path.isfile(ckpt_path) and not os.path.islink(ckpt_path):
            # The file's own step (after a resume from an earlier kept checkpoint, the file on disk is
            # not the one resumed from); mmap: only the small entries are read.
            step = _step_of(ckpt_path, step)
            target = os.path.join(os.path.dirname(ckpt_path), f"checkpoint-step{max(step, 0):09d}.pt")
            if step >= 0 and not os.path.exists(target):
                try:
                    os.link(ckpt_path, target)
                except OSError:  # no hard links on this filesystem
                    shutil.copyfile(ckpt_path, target)
        for _, path in kept_checkpoints(os.path.dirname(ckpt_path))[self.keep - 1 :]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def last_good_text(self, last_good: str | None) -> str:
        """``Last good checkpoint: X (earlier: Y).`` for error messages."""
        earlier = [p for _, p in kept_checkpoints(self.run_dir)]
        text = f"Last good checkpoint: {last_good or 'none (no checkpoint was written yet)'}"
        if earlier:
            text += f" (earlier: {', '.join(earlier)})"
        return text + "."


def stop_grace_s() -> float:
    """Seconds a run may take to finish its step after SIGTERM/SIGINT before it exits without a new
    checkpoint: ``LEAP_STOP_GRACE_S``, default 60."""
    try:
        value = float(os.environ.get("LEAP_STOP_GRACE_S", "60"))
    except ValueError:
        value = 60.0
    return value if value > 0 else 60.0


def _step_of(path: str, default: int) -> int:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(obj["step"])
    except Exception:  # noqa: BLE001 - an unreadable file keeps the caller's step
        return default


def _norm(params: Iterable[torch.Tensor]) -> float:
    sq = [p.detach().float().pow(2).sum() for p in params if p.is_floating_point()]
    if not sq:
        return 0.0
    return float(torch.stack(sq).sum().sqrt().item())
