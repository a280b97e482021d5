"""A stand-in for pytest-benchmark where it is not installed (say, a GPU machine without network).

Only what the suite uses: ``pedantic`` timing (host clock around each call), ``extra_info``,
``group``, ``stats.stats.median``, and ``--benchmark-json`` with the same layout (machine_info,
commit_info, benchmarks with name, fullname, group, stats, extra_info), so bench/compare.py and
bench/whole_run.py read either. bench/conftest.py switches to it when the ``benchmark`` plugin is
not loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace


def _stats(times_s: list[float]) -> dict:
    ordered = sorted(times_s)
    n = len(ordered)
    q1, q3 = statistics.quantiles(ordered, n=4)[0::2] if n >= 2 else (ordered[0], ordered[0])
    return {
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "stddev": statistics.stdev(ordered) if n >= 2 else 0.0,
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "rounds": n,
        "iterations": 1,
        "data": ordered,
    }


class FallbackBenchmark:
    """The ``benchmark`` object of one test."""

    def __init__(self, name: str, fullname: str):
        self.name = name
        self.fullname = fullname
        self.group: str | None = None
        self.extra_info: dict = {}
        self.stats = None
        self.times_s: list[float] = []

    def pedantic(self, target: Callable[[], object], rounds: int = 1, warmup_rounds: int = 0, iterations: int = 1):
        if rounds < 1 or warmup_rounds < 0 or iterations != 1:
            raise ValueError(
                f"pedantic: need rounds >= 1, warmup_rounds >= 0, iterations == 1; got {rounds}, "
                f"{warmup_rounds}, {iterations}"
            )
        for _ in range(warmup_rounds):
            target()
        result = None
        for _ in range(rounds):
            t0 = time.perf_counter()
            result = target()
            self.times_s.append(time.perf_counter() - t0)
        self.stats = SimpleNamespace(stats=SimpleNamespace(**_stats(self.times_s)))
        return result

    def as_json(self) -> dict:
        return {
            "group": self.group,
            "name": self.name,
            "fullname": self.fullname,
            "params": None,
            "extra_info": self.extra_info,
            "options": {"timer": "perf_counter", "fallback": True},
            "stats": _stats(self.times_s) if self.times_s else None,
        }


def write_json(path: str, benchmarks: list[FallbackBenchmark], machine_info: dict, commit_info: dict) -> None:
    data = {
        "machine_info": machine_info,
        "commit_info": commit_info,
        "benchmarks": [b.as_json() for b in benchmarks if b.times_s],
        "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "version": "leap-bench-fallback",
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def summary_lines(benchmarks: list[FallbackBenchmark]) -> list[str]:
    lines = []
    for b in benchmarks:
        if b.times_s:
            median_ms = b.extra_info.get("median_ms") or statistics.median(b.times_s) * 1e3
            lines.append(f"{b.name}: median {median_ms:.3f} ms ({len(b.times_s)} rounds)")
    return lines
