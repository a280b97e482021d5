"""The files of a run directory: names, the JSON-lines writer and reader, atomic writes, and
the typed view of a training log.

A run directory (``leap distill --out RUN_DIR``) holds::

    log.jsonl      one JSON object per line (written by :class:`JsonlWriter`, read by :func:`read_jsonl`)
    summary.json   the run's summary (:func:`write_json`, :func:`read_json`)
    checkpoint.pt  the training checkpoint (:mod:`leap.checkpoint`)

Other record files of a run directory (e.g. evaluation results) use the same
:class:`JsonlWriter` / :func:`read_jsonl` pair: every record is a JSON object with a
``"type"`` key, non-finite floats are written as ``null``, and a reader skips lines that
are not JSON objects (the half-written last line of a job that is still running).

Record types of ``log.jsonl`` (unknown types and fields are ignored by readers; optional
fields may be missing)::

    {"type": "config", "config": {...}, "resolved": {...}, "dims": {...}}
    {"type": "resume", "checkpoint", "step", "epoch", "step_in_epoch"}
    {"type": "calibration", "step", "epoch", "scores", "start_block", "teacher_blocks_run"}
    {"type": "step", "step", "epoch", "loss", "patch_loss", "cls_loss", "block", "lr",
                     "teacher_blocks_run", "mixup_lambda", "grad_norm"?, "cka"?, "images_per_s"}
    {"type": "level_up", "step", "epoch", "from_block", "to_block", "reason", "cka"?}
    {"type": "epoch", "epoch", "steps", "mean_loss", "block", "mean_block", "time_s",
                      "teacher_flops", "baseline_teacher_flops", "saved_fraction", ...}
    {"type": "checkpoint", "step", "epoch", "step_in_epoch", "path"}
    {"type": "error", "step", "epoch", "message"}
    {"type": "interrupted", "signal", "step", "epoch", "checkpoint"}   # SIGTERM/SIGINT (leap.run.guard)
    {"type": "summary", ...}

:func:`load_run` parses a run directory into a :class:`RunLog` (a resumed run may log a
step or an epoch twice: the last record wins); :func:`load_trajectory` reads the target
block trajectory of a run or of a plain file of block numbers.

Why this module is long: it is the one reader and writer of a run directory; the writer, the
typed view of ``log.jsonl`` and the trajectory parser belong together so that no other
module parses the log.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import ConfigError, InputNotFoundError, RunDirError, RunLogError

__all__ = [
    "LOG_NAME",
    "SUMMARY_NAME",
    "CHECKPOINT_NAME",
    "run_file",
    "sanitize",
    "TEMP_FILE_RE",
    "atomic_write",
    "describe_write_failure",
    "check_writable_dir",
    "write_json",
    "read_json",
    "open_run_file",
    "JsonlWriter",
    "append_jsonl",
    "read_jsonl",
    "RunLog",
    "load_run",
    "Trajectory",
    "load_trajectory",
]

LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.pt"


def run_file(run_dir: str | os.PathLike, name: str) -> str:
    """Path of the file ``name`` (e.g. :data:`LOG_NAME`) in ``run_dir``."""
    return os.path.join(os.fspath(run_dir), name)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def sanitize(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None (strict JSON has no NaN), tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


#: The temp files of :func:`atomic_write`: ``.NAME.XXXXXXXX.tmp`` (``tempfile.mkstemp``: 8 random
#: characters); the run guard removes the ones an interrupted write left behind.
TEMP_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else set briefly and back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _reason(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "unexpected pos" in str(error):  # torch.save's zip writer
        return "no space left (the disk, a quota or the file-size limit is full)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the file system is read-only" if code == errno.EROFS else "permission denied"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a regular file is in the way of the directory"
    return str(getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0])


def describe_write_failure(path: str | os.PathLike, error: BaseException) -> str:
    """``could not write PATH: REASON (N MiB free there)``: one line for a failed write."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    while directory and not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"could not write {os.fspath(path)}: {_reason(error)} ({free})"


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """Create the directory ``path`` if needed and write (and remove) a probe file in it, so a run that could
    not save its results fails before it starts: :class:`ConfigError` ``OPTION PATH: cannot write there: ...``."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)  # FileExistsError when a regular file is there
        fd, tmp = tempfile.mkstemp(prefix=".leap-write-check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(
            f"{option} {path}: cannot write there: {_reason(e)}; choose another {option.split('/')[0].strip()}"
        ) from None


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(file)`` on a temp file in the same directory, fsync, then ``os.replace``.

    A crash mid-write leaves the previous file at ``path`` intact (``os.replace`` is atomic
    on POSIX when source and target are on the same filesystem, hence the same directory).
    The temp file is named as :data:`TEMP_FILE_RE` says. Every atomic write of ``leap`` (logs,
    summaries, checkpoints, the evaluation's feature cache) goes through here.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        # mkstemp creates 0600; a run's files get the mode any file gets here (0644 under umask 022).
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as e:
        raise RunDirError(describe_write_failure(path, e)) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, RunDirError):  # a full disk, ...: one line
            raise RunDirError(describe_write_failure(path, e) + "; the previous file was left intact") from None
        raise
    try:  # persist the rename itself (best effort; not all filesystems allow it)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (non-finite floats -> null), atomically."""
    text = json.dumps(sanitize(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of a file; :class:`~leap.errors.InputNotFoundError` if it is missing,
    :class:`~leap.errors.RunLogError` if it is not JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunLogError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def open_run_file(path: str | os.PathLike, mode: str = "a") -> IO[str]:
    """Open a run file for writing (``"w"`` or ``"a"``, text) without following a symbolic link.

    Raises:
        RunLogError: ``path`` is a symbolic link (e.g. one planted to make the run overwrite a
            file elsewhere); the message says to remove it.
    """
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if mode == "w" else os.O_APPEND)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if os.path.islink(path):
            raise RunLogError(
                f"{path} is a symbolic link; a run writes its files only inside its run directory: "
                f"remove the link (or choose another --out)"
            ) from None
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


class JsonlWriter:
    """Append-only JSON-lines file, flushed per record. ``path=None`` makes a no-op writer
    (the ranks other than 0 under DDP).

    The file is opened without following a symbolic link (:func:`open_run_file`): a link
    planted at a run file's path is refused instead of overwriting its target.

    Args:
        path: the file; its directory is created.
        truncate: start a new file (True) or append to an existing one (False).
        fsync: also ``fsync`` after each record (records that must survive a power loss).
    """

    def __init__(self, path: str | os.PathLike | None, *, truncate: bool = False, fsync: bool = False):
        self.path = None if path is None else os.fspath(path)
        self._f = None
        self._fsync = fsync
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._f = open_run_file(self.path, "w" if truncate else "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with a ``"type"`` key) as one complete line."""
        if self._f is not None:
            try:
                self._f.write(json.dumps(sanitize(record), allow_nan=False) + "\n")
                self._f.flush()
                if self._fsync:
                    os.fsync(self._f.fileno())
            except OSError as e:  # a full disk, ...: one line, not a traceback
                raise RunDirError(describe_write_failure(self.path or "", e)) from None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to a JSON-lines file (opened and closed for this record)."""
    with JsonlWriter(path) as w:
        w.write(record)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Returns ``(records, skipped)``: the JSON objects of the file, and how many lines were
    not objects (e.g. the half-written last line of a job still running).

    Raises:
        InputNotFoundError: the file does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"no such log file: {path} does not exist")
    records, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


def number(v: Any) -> float | None:
    """``v`` as a finite float, else None (missing, null, NaN, strings ...)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class RunLog:
    """The parsed content of a run directory.

    ``steps`` / ``epochs``: step and epoch records, deduplicated (last wins) and sorted.
    ``config``: the run's configuration dict (from the ``config`` record, the summary or
    ``summary.json``), ``dims``/``resolved``: the trainer's extra info, if logged.
    """

    run_dir: str
    log_path: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    level_ups: list[dict[str, Any]] = field(default_factory=list)
    calibrations: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    skipped_lines: int = 0
    unknown_types: Counter = field(default_factory=Counter)

    @property
    def num_blocks(self) -> int | None:
        """Teacher depth L: from dims / summary / a ``depth`` teacher override, else the largest
        block seen in the log (exact once the run reached the last block)."""
        overrides = self.config.get("teacher_overrides")
        candidates = (
            self.dims.get("teacher_blocks"),
            self.summary.get("num_blocks"),
            overrides.get("depth") if isinstance(overrides, dict) else None,
        )
        for v in candidates:
            if number(v):
                return int(v)
        blocks = self.step_blocks() + self.epoch_blocks()
        return int(max(blocks)) if blocks else None

    def step_blocks(self) -> list[float]:
        """Target block of every logged step."""
        return [b for b in (number(r.get("block")) for r in self.steps) if b is not None]

    def epoch_blocks(self) -> list[float]:
        """Target block at the end of every logged epoch."""
        return [b for b in (number(r.get("block")) for r in self.epochs) if b is not None]

    def epoch_mean_blocks(self) -> list[float]:
        """Mean target block of every logged epoch (``mean_block``, else ``block``)."""
        out = []
        for r in self.epochs:
            b = number(r.get("mean_block"))
            b = number(r.get("block")) if b is None else b
            if b is not None:
                out.append(b)
        return out

    @property
    def images_per_step(self) -> int | None:
        """Global batch size, if logged (``resolved.global_batch`` or ``batch_size * world_size``)."""
        resolved = self.summary.get("resolved")
        gb = number(self.resolved.get("global_batch")) or number(
            resolved.get("global_batch") if isinstance(resolved, dict) else None
        )
        if gb:
            return int(gb)
        bs = number(self.config.get("batch_size"))
        if bs:
            return int(bs * (number(self.dims.get("world_size")) or 1))
        return None

    def trajectory(self) -> Trajectory:
        """Target block per epoch (``mean_block``, weighted by the epoch's steps when logged), or
        per step when the log has no epoch records."""
        epochs = [
            r
            for r in self.epochs
            if number(r.get("epoch")) is not None
            and (number(r.get("mean_block")) is not None or number(r.get("block")) is not None)
        ]
        if epochs:
            steps = [r.get("steps") for r in epochs]
            weights = [float(s) for s in steps] if all(number(s) is not None and s > 0 for s in steps) else None
            blocks = [
                number(r.get("mean_block")) if number(r.get("mean_block")) is not None else number(r.get("block"))
                for r in epochs
            ]
            return Trajectory(blocks, weights, self.log_path)
        blocks = self.step_blocks()
        if blocks:
            return Trajectory(blocks, None, self.log_path)
        raise RunLogError(f"{self.log_path}: no epoch or step records with a 'block' field")


def _dedup_sorted(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    by_key: dict[Any, dict[str, Any]] = {}
    unkeyed = []
    for r in records:
        k = number(r.get(key))
        if k is None:
            unkeyed.append(r)
        else:
            by_key[k] = r
    return [by_key[k] for k in sorted(by_key)] + unkeyed


def load_run(run_dir: str | os.PathLike, *, require_records: bool = True) -> RunLog:
    """Parse a run directory (or a ``log.jsonl`` path directly).

    Raises:
        InputNotFoundError: the directory or its ``log.jsonl`` does not exist (names the path).
        RunLogError: ``require_records`` and the log holds no step and no epoch records.
    """
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        log_path = run_file(path, LOG_NAME)
    elif os.path.isfile(path):
        log_path, path = path, os.path.dirname(os.path.abspath(path))
    else:
        raise InputNotFoundError(f"run directory not found: {path}")
    if not os.path.isfile(log_path):
        raise InputNotFoundError(f"no training log found: {log_path} does not exist")
    records, skipped = read_jsonl(log_path)
    run = RunLog(run_dir=path, log_path=log_path, skipped_lines=skipped)

    steps, epochs = [], []
    for r in records:
        t = r.get("type")
        if t == "step":
            steps.append(r)
        elif t == "epoch":
            epochs.append(r)
        elif t == "level_up":
            run.level_ups.append(r)
        elif t == "calibration":
            run.calibrations.append(r)
        elif t == "config":
            if isinstance(r.get("config"), dict):
                run.config = dict(r["config"])
            for name in ("dims", "resolved"):
                if isinstance(r.get(name), dict):
                    setattr(run, name, dict(r[name]))
        elif t == "summary":
            run.summary = dict(r)
        elif t not in ("resume", "checkpoint", "error", "interrupted"):
            run.unknown_types[str(t)] += 1
    run.steps = _dedup_sorted(steps, "step")
    run.epochs = _dedup_sorted(epochs, "epoch")
    # Level-ups of a resumed run may repeat: keep distinct ones, in step order.
    seen, ups = set(), []
    for u in run.level_ups:
        key = (u.get("step"), u.get("from_block"), u.get("to_block"))
        if key not in seen:
            seen.add(key)
            ups.append(u)
    run.level_ups = sorted(ups, key=lambda u: number(u.get("step")) or 0)

    summary_path = run_file(path, SUMMARY_NAME)
    if os.path.isfile(summary_path):
        try:
            data = read_json(summary_path)
            if isinstance(data, dict):
                run.summary = {**data, **run.summary}
        except (OSError, RunLogError):
            pass  # a summary being rewritten; the log has the same facts
    if not run.config and isinstance(run.summary.get("config"), dict):
        run.config = dict(run.summary["config"])
    if not run.resolved and isinstance(run.summary.get("resolved"), dict):
        run.resolved = dict(run.summary["resolved"])
    if require_records and not run.steps and not run.epochs:
        raise RunLogError(f"{log_path}: no step or epoch records found")
    return run


# --------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """Target block per epoch (or per step), with optional weights (e.g. steps per epoch)."""

    blocks: list[float]
    weights: list[float] | None = None
    source: str = ""

    def mean(self) -> float:
        if not self.blocks:
            raise RunLogError(f"empty trajectory{f' ({self.source})' if self.source else ''}")
        if self.weights is None:
            return math.fsum(self.blocks) / len(self.blocks)
        total = math.fsum(self.weights)
        if total <= 0:
            raise RunLogError("trajectory weights sum to zero")
        return math.fsum(b * w for b, w in zip(self.blocks, self.weights)) / total

    @classmethod
    def of(cls, trajectory: Any, weights: Sequence[float] | None = None) -> Trajectory:
        """A :class:`Trajectory` from a trajectory, a path (:func:`load_trajectory`) or numbers."""
        if isinstance(trajectory, (str, bytes, os.PathLike)):
            trajectory = load_trajectory(trajectory)
        if isinstance(trajectory, Trajectory):
            return trajectory if weights is None else Trajectory(trajectory.blocks, list(weights), trajectory.source)
        blocks = [float(b) for b in trajectory]
        if weights is not None and len(weights) != len(blocks):
            raise RunLogError(f"{len(weights)} weights for a trajectory of {len(blocks)} entries")
        return Trajectory(blocks, None if weights is None else [float(w) for w in weights])


_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read a target-block trajectory.

    Accepted: a run directory (reads its ``log.jsonl``); a ``.jsonl`` log (epoch records'
    ``mean_block``/``block``, or step records' ``block`` if no epoch records); a JSON list;
    a JSON object with key ``"blocks"`` (or ``"trajectory"``); or plain text of integers
    separated by whitespace and/or commas (``#`` starts a comment).

    Raises:
        InputNotFoundError: the path (or the run directory's ``log.jsonl``) does not exist.
        RunLogError: the content is not a trajectory (the message names the file).
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = path.decode()
    if os.path.isdir(path):
        log = run_file(path, LOG_NAME)
        if not os.path.isfile(log):
            raise InputNotFoundError(f"trajectory: run directory {path} has no {LOG_NAME} ({log} not found)")
        return load_run(log, require_records=False).trajectory()
    if not os.path.isfile(path):
        raise InputNotFoundError(f"trajectory file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.strip()
    if not stripped:
        raise RunLogError(f"trajectory file {path} is empty")
    if path.endswith(".jsonl") or (stripped.startswith("{") and "\n{" in stripped):
        return load_run(path, require_records=False).trajectory()
    if stripped[0] in "[{":
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise RunLogError(f"trajectory file {path}: invalid JSON ({e})") from None
        if isinstance(obj, dict):
            key = next((k for k in ("blocks", "trajectory") if k in obj), None)
            if key is None:
                raise RunLogError(f"trajectory file {path}: JSON object has no 'blocks' key (keys: {sorted(obj)})")
            obj = obj[key]
        if not isinstance(obj, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            raise RunLogError(f"trajectory file {path}: expected a JSON list of numbers")
        if not obj:
            raise RunLogError(f"trajectory file {path}: the list is empty")
        return Trajectory([float(v) for v in obj], None, path)
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for tok in re.split(r"[\s,;]+", line.split("#", 1)[0].strip()):
            if not tok:
                continue
            if not _NUM_RE.match(tok):
                raise RunLogError(f"trajectory file {path}, line {lineno}: {tok!r} is not a number")
            values.append(float(tok))
    if not values:
        raise RunLogError(f"trajectory file {path} holds no numbers")
    return Trajectory(values, None, path)
