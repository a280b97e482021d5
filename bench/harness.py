"""Benchmark harness shared by every op's benchmark.

For each case and variant (eager PyTorch, torch.compile of the same PyTorch code,
ours, ...) it measures one forward+backward: the median time over many runs and the
peak memory allocated above the inputs. Rows go to a CSV tagged with the device
name, torch/Triton versions and the git SHA, and a Markdown table is printed.

Timing: CUDA events around each run after warm-up (median of ``iters``); on CPU a
host clock. With ``interleave=True`` the variants of a case take turns run by run (one
run of each, then the next round), so that a noisy neighbour slows all of them alike.

Peak extra memory of one run, above what was allocated before it: on CUDA the caching
allocator's ``max_memory_allocated``; on CPU the allocation and free events of torch's CPU
allocator recorded by the profiler (``profile_memory=True``; the running sum of their sizes,
in time order, and its maximum), i.e. every tensor allocated during the run, like
tracemalloc for Python objects. Memory outside torch's allocator (oneDNN/MKL scratch) is
not counted on either device.

The same functions serve the pytest-benchmark suite (``pytest bench/``, see bench/conftest.py) and
the CSV scripts (bench_feature_loss.py, bench_attention.py, bench_cpu.py): :class:`RoundTimer` is
one timed round, :func:`peak_extra_mb` the memory figure (:func:`peak_total_mb`
the whole of it), :func:`environment` and
:func:`device_class` what identifies the machine.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Measurement:
    case: str
    variant: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mb: float | None
    iters: int
    error: str = ""


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        sha += "-dirty" if dirty else ""
    except Exception:
        sha = "unknown"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": sha,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def versions() -> dict:
    """Versions of what the timings depend on (for the benchmark JSON's machine info)."""
    import importlib
    import platform

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
    }
    for name in ("triton", "timm", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed: recorded, not fatal
            out[name] = "none"
    return out


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("cpu" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def device_class(device: torch.device | str) -> str:
    """The name results and baselines are filed under: the GPU's name (``nvidia-h200``), or
    ``cpu-<threads>core-<cpu model>`` (``cpu-2core-intel-r-xeon-r-processor``), since absolute times
    only compare within one class."""
    device = torch.device(device)
    if device.type == "cuda":
        return device_slug(torch.cuda.get_device_name(device))
    return f"cpu-{torch.get_num_threads()}core-{device_slug(cpu_name())}"


def cpu_peak_extra_mb(fn: Callable[[], None]) -> float:
    """Peak of the tensor memory allocated by ``fn`` on CPU above the memory before it, in MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if "cpu" not in str(e.device_type()).lower():
            continue
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def peak_extra_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated above what existed before, during one call of ``fn`` (MB)."""
    if device.type != "cuda":
        return cpu_peak_extra_mb(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_total_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak GPU memory (MiB, everything allocated: weights included) during one call of ``fn``; ``None`` off
    CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def finish(out: str, rows: list[Measurement], env: dict) -> int:
    """Write the CSV, print the markdown table and where the CSV went; the script's exit code."""
    write_csv(out, rows, env)
    print(markdown_table(rows, env))
    print(f"\nwrote {out}")
    return 0


class RoundTimer:
    """One timed round of ``fn`` (one fwd+bwd), callable; the unit both timing paths share.

    On CUDA a round synchronizes, records a CUDA event, runs ``fn``, records a second event and
    synchronizes again, so the host time of a round (what pytest-benchmark measures around the
    call) covers all the GPU work of ``fn`` and nothing queued before it; the device time between
    the events is appended to ``device_ms``. On CPU a round is ``fn()``; ``device_ms`` stays empty.
    """

    def __init__(self, fn: Callable[[], None], device: torch.device):
        self.fn = fn
        self.cuda = torch.device(device).type == "cuda"
        self.device_ms: list[float] = []

    def __call__(self) -> None:
        if not self.cuda:
            self.fn()
            return
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.fn()
        stop.record()
        stop.synchronize()
        torch.cuda.synchronize()
        self.device_ms.append(start.elapsed_time(stop))

    def host_ms(self) -> float:
        """Runs one round; its host-clock time in ms."""
        t0 = time.perf_counter()
        self()
        return (time.perf_counter() - t0) * 1e3


def do_bench_ms(fn: Callable[[], object], rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn`` on CUDA by ``triton.testing.do_bench``: its default flush of
    the L2 cache between runs, so an op does not find its inputs cached from the previous run (the
    method of the project's attention anchors)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def measure(
    fn: Callable[[], None], *, iters: int, warmup: int, device: torch.device
) -> tuple[list[float], float | None]:
    """Times ``fn`` (one fwd+bwd) ``iters`` times; returns (times in ms, peak extra MB).

    Times are CUDA-event times on GPU (:class:`RoundTimer`), host-clock times on CPU."""
    for _ in range(warmup):
        fn()
    timer = RoundTimer(fn, device)
    host = [timer.host_ms() for _ in range(iters)]
    times = timer.device_ms if timer.cuda else host
    return times, peak_extra_mb(fn, device)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_variants(
    case: str,
    variants: dict[str, Callable[[], Callable[[], None]]],
    *,
    iters: int,
    warmup: int,
    device: torch.device,
    interleave: bool = False,
) -> list[Measurement]:
    """``variants`` maps a name to a factory returning the fwd+bwd closure (built lazily, so a
    variant that fails to build, e.g. torch.compile on an unsupported setup, is reported, not fatal).

    ``interleave``: the variants take turns run by run (see the module docstring)."""
    if interleave:
        return _run_interleaved(case, variants, iters=iters, warmup=warmup, device=device)
    rows = []
    for name, factory in variants.items():
        try:
            fn = factory()
            times, peak = measure(fn, iters=iters, warmup=warmup, device=device)
            rows.append(_measured(case, name, times, peak, iters))
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            rows.append(_failed(case, name, exc))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measured(case: str, name: str, times: list[float], peak: float | None, iters: int) -> Measurement:
    """The row of a variant timed ``times`` (ms): median, 20th and 80th percentiles."""
    return Measurement(case, name, statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), peak, iters)


def _failed(case: str, name: str, exc: Exception) -> Measurement:
    return Measurement(
        case,
        name,
        float("nan"),
        float("nan"),
        float("nan"),
        None,
        0,
        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
    )


def _run_interleaved(case, variants, *, iters, warmup, device) -> list[Measurement]:
    fns, failed = {}, {}
    for name, factory in variants.items():
        try:
            fn = factory()
            for _ in range(warmup):
                fn()
            fns[name] = fn
        except Exception as exc:  # reported in the table, the others still run
            failed[name] = _failed(case, name, exc)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in list(fns.items()):
            try:
                times[name].append(RoundTimer(fn, device).host_ms())
            except Exception as exc:
                failed[name] = _failed(case, name, exc)
                del fns[name]
    rows = []
    for name in variants:
        if name in failed:
            rows.append(failed[name])
            continue
        fn = fns[name]
        peak = peak_extra_mb(fn, device)
        rows.append(_measured(case, name, times[name], peak, len(times[name])))
    return rows


#: The first columns of every benchmark CSV: the machine and code (:func:`environment`), the case, the variant and
#: its times (:func:`csv_times`).
CSV_FIELDS = ("date", "device", "torch", "triton", "git_sha", "case", "variant", "median_ms", "p20_ms", "p80_ms")


def csv_times(median_ms: float, p20_ms: float, p80_ms: float) -> dict[str, str]:
    """The time columns of a CSV row (ms, 4 decimals)."""
    return {"median_ms": f"{median_ms:.4f}", "p20_ms": f"{p20_ms:.4f}", "p80_ms": f"{p80_ms:.4f}"}


def write_csv_rows(path: str, fields: Sequence[str], rows: Iterable[dict]) -> None:
    """Write ``rows`` under the header ``fields`` to ``path`` (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_csv(path: str, rows: list[Measurement], env: dict, baselines=("eager", "compile")) -> None:
    by_case: dict[str, dict[str, Measurement]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r
    fields = [*CSV_FIELDS, "peak_extra_mb", "iters", *[f"speedup_vs_{b}" for b in baselines], "error"]
    out = []
    for r in rows:
        row = {**env, **dataclasses.asdict(r)}
        for b in baselines:
            base = by_case[r.case].get(b)
            ok = base is not None and base.median_ms == base.median_ms and r.median_ms == r.median_ms
            row[f"speedup_vs_{b}"] = f"{base.median_ms / r.median_ms:.3f}" if ok and r.median_ms > 0 else ""
        row.update(csv_times(r.median_ms, r.p20_ms, r.p80_ms))
        row["peak_extra_mb"] = "n/a" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}"
        out.append(row)
    write_csv_rows(path, fields, out)


def _speedup(base: Measurement | None, r: Measurement) -> str:
    """``base``'s median over ``r``'s (``""`` without a base or with a failed run: NaN medians)."""
    if base is None or not (base.median_ms == base.median_ms) or not (r.median_ms == r.median_ms):
        return ""
    return f"{base.median_ms / r.median_ms:.2f}x"


def _peak_ratio(base: Measurement | None, r: Measurement) -> str:
    if base is None or base.peak_extra_mb in (None, 0) or r.peak_extra_mb is None:
        return ""
    return f"{r.peak_extra_mb / base.peak_extra_mb:.2f}"


def markdown_table(rows: list[Measurement], env: dict) -> str:
    lines = [
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git_sha']}",
        "",
        "| case | variant | median ms | peak extra MB | vs eager | vs compile | peak / eager's |",
        "|---|---|---|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, Measurement]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r
    for r in rows:
        eager, compiled = by_case[r.case].get("eager"), by_case[r.case].get("compile")
        peak = "n/a" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}"
        median = f"{r.median_ms:.3f}" if r.median_ms == r.median_ms else f"failed: {r.error}"
        lines.append(
            f"| {r.case} | {r.variant} | {median} | {peak} | {_speedup(eager, r)} | {_speedup(compiled, r)} "
            f"| {_peak_ratio(eager, r)} |"
        )
    return "\n".join(lines)
