"""Compare a pytest-benchmark JSON of the suite (``pytest bench/ --benchmark-json=NEW``) with a baseline.

    python bench/compare.py BASELINE.json NEW.json [--threshold 1.25] [--check both|ratio|absolute]
    python bench/compare.py --baseline-dir bench/baselines NEW.json     # the baseline of NEW's device class
    python bench/compare.py --show NEW.json                             # one run's table, no comparison

Benchmarks are matched by test name (``test_fused_loss[mse-fp32-M2048-384x1536-ours-cpp]``). Two
figures per benchmark:

* time: its median (``extra_info.median_ms``: CUDA-event median on GPU, host median on CPU), new over
  baseline. Absolute times only mean something within one device class, so this check needs both
  files from the same class (``machine_info.leap_bench.device_class``).
* ratio: its median over the median of the case's reference variant *in the same run* (``eager``;
  ``timm`` for the teacher, ``stock-eager`` for the LEAP step), new over baseline. A slower or busier
  machine slows the reference too, so the ratio moves less from run to run and machine to machine
  than the time; it is checked for our variants (``ours``, ``ours-<backend>``) only, since a change
  of ``compile`` against ``eager`` is torch's, not ours.

A benchmark regresses when a checked figure grew by more than ``--threshold`` (default 1.25, i.e.
25% slower). ``--check both`` (default) checks both figures, ``ratio`` or ``absolute`` one.
Benchmarks only in the baseline are "missing" (a failure unless ``--allow-missing``: a backend that
stopped working drops its benchmarks), only in the new run "new" (reported).

Exit status: 0 no regression, 1 regression or missing benchmark, 2 unusable input (the message names
the file and what is wrong). With ``--baseline-dir``, a device class or size without a baseline is
reported and exits 0 (``--require-baseline``: 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

#: Per case, the variant ratios are taken against: the first of these present in the case.
REFERENCES = ("eager", "timm", "stock-eager")


class InputError(Exception):
    """A JSON file that cannot be compared (missing, not JSON, not a pytest-benchmark file)."""


@dataclass
class Entry:
    name: str
    case: str | None
    variant: str | None
    median_ms: float | None
    ratio: float | None = None  # median / the case reference's median, same run
    reference: str | None = None

    @property
    def ours(self) -> bool:
        return bool(self.variant) and (self.variant == "ours" or self.variant.startswith("ours-"))


@dataclass
class Run:
    path: str
    device_class: str | None
    size: str | None
    device: str | None
    entries: dict[str, Entry]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def load(path: str) -> Run:
    """Reads one pytest-benchmark JSON; ratios to each case's reference variant are computed here."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise InputError(
            f"{path}: not a pytest-benchmark JSON (expected an object with a 'benchmarks' list, "
            f"got {type(data).__name__}{' without benchmarks' if isinstance(data, dict) else ''})"
        )
    info = (data.get("machine_info") or {}).get("leap_bench") or {}
    entries: dict[str, Entry] = {}
    for bench in data["benchmarks"]:
        if not isinstance(bench, dict) or "name" not in bench:
            raise InputError(f"{path}: a benchmark without a name: {str(bench)[:120]}")
        extra = bench.get("extra_info") or {}
        median = _number(extra.get("median_ms"))
        if median is None and "median_ms" not in extra:
            stats = bench.get("stats") or {}
            median = _number(stats.get("median") * 1e3) if _number(stats.get("median")) else None
        name = bench["name"]
        if name in entries:
            name = bench.get("fullname", name)  # the same test name in two modules
        entries[name] = Entry(name, extra.get("case"), extra.get("variant"), median)
    by_case: dict[str, dict[str, Entry]] = {}
    for e in entries.values():
        if e.case is not None and e.variant is not None:
            by_case.setdefault(e.case, {})[e.variant] = e
    for variants in by_case.values():
        ref_name = next((r for r in REFERENCES if r in variants and variants[r].median_ms), None)
        if ref_name is None:
            continue
        for e in variants.values():
            if e.median_ms is not None:
                e.ratio = e.median_ms / variants[ref_name].median_ms
                e.reference = ref_name
    return Run(path, info.get("device_class"), info.get("size"), info.get("device"), entries)


@dataclass
class Row:
    name: str
    status: str
    base: Entry | None
    new: Entry | None
    time_change: float | None = None
    ratio_change: float | None = None


def compare(baseline: Run, new: Run, *, threshold: float, check: str) -> list[Row]:
    """One row per benchmark name of either run; ``status`` is ok, faster, REGRESSION (...), missing, new
    or no data."""
    rows = []
    for name in sorted(set(baseline.entries) | set(new.entries)):
        b, n = baseline.entries.get(name), new.entries.get(name)
        if n is None:
            rows.append(Row(name, "missing", b, None))
            continue
        if b is None:
            rows.append(Row(name, "new", None, n))
            continue
        row = Row(name, "ok", b, n)
        if b.median_ms and n.median_ms:
            row.time_change = n.median_ms / b.median_ms
        if b.ratio and n.ratio and b.reference == n.reference:
            row.ratio_change = n.ratio / b.ratio
        if row.time_change is None and row.ratio_change is None:
            row.status = "no data"
            rows.append(row)
            continue
        reasons = []
        if check in ("both", "absolute") and row.time_change is not None and row.time_change > threshold:
            reasons.append("time")
        if check in ("both", "ratio") and n.ours and row.ratio_change is not None and row.ratio_change > threshold:
            reasons.append(f"vs {n.reference}")
        if reasons:
            row.status = f"REGRESSION ({', '.join(reasons)})"
        else:
            checked = [
                c
                for c in (
                    row.time_change if check != "ratio" else None,
                    row.ratio_change if check != "absolute" and n.ours else None,
                )
                if c is not None
            ]
            if checked and max(checked) < 1.0 / threshold:
                row.status = "faster"
        rows.append(row)
    return rows


def _ms(e: Entry | None) -> str:
    return f"{e.median_ms:.3f}" if e is not None and e.median_ms else ""


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else ""


def _ratio(e: Entry | None) -> str:
    return f"{e.ratio:.3f}" if e is not None and e.ratio is not None else ""


def comparison_table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | base ms | new ms | time new/base | base vs ref | new vs ref | ratio new/base | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_ms(r.base)} | {_ms(r.new)} | {_x(r.time_change)} | {_ratio(r.base)} "
            f"| {_ratio(r.new)} | {_x(r.ratio_change)} | {r.status} |"
        )
    return "\n".join(lines)


def run_table(run: Run) -> str:
    """One run: each benchmark's median and its ratio to the case's reference variant."""
    lines = [
        f"{run.path}: device {run.device} (class {run.device_class}), size {run.size}",
        "",
        "| benchmark | median ms | vs reference |",
        "|---|---|---|",
    ]
    for name in sorted(run.entries):
        e = run.entries[name]
        ratio = f"{e.ratio:.3f} x {e.reference}" if e.ratio is not None else ""
        lines.append(f"| {name} | {_ms(e) or 'no data'} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="BASELINE NEW, or NEW with --baseline-dir / --show")
    parser.add_argument(
        "--threshold", type=float, default=1.25, help="slowdown factor counted as a regression (default 1.25)"
    )
    parser.add_argument(
        "--check",
        choices=("both", "ratio", "absolute"),
        default="both",
        help="which figure to check: the time, the ratio to the reference variant, or both (default)",
    )
    parser.add_argument("--baseline-dir", default=None, help="take the baseline <dir>/<device class of NEW>.json")
    parser.add_argument(
        "--require-baseline",
        action="store_true",
        help="with --baseline-dir: no baseline for NEW's device class and size is a failure",
    )
    parser.add_argument("--allow-missing", action="store_true", help="benchmarks missing from NEW do not fail")
    parser.add_argument("--show", action="store_true", help="print NEW's table only")
    args = parser.parse_args(argv)
    if not args.threshold > 1.0:
        parser.error(f"--threshold: expected a factor > 1, got {args.threshold}")
    one_file = args.show or args.baseline_dir is not None
    if len(args.files) != (1 if one_file else 2):
        parser.error("expected BASELINE NEW, or one NEW file with --baseline-dir or --show")
    try:
        if args.show:
            print(run_table(load(args.files[0])))
            return 0
        if args.baseline_dir is not None:
            new = load(args.files[0])
            if not new.device_class:
                raise InputError(f"{new.path}: no machine_info.leap_bench.device_class (not written by pytest bench/)")
            path = os.path.join(args.baseline_dir, f"{new.device_class}.json")
            if not os.path.isfile(path):
                print(
                    f"no baseline for device class {new.device_class} ({path} does not exist); to make one, "
                    f"commit this run's JSON there"
                )
                return 1 if args.require_baseline else 0
            baseline = load(path)
            if baseline.size != new.size:
                print(f"the baseline {path} is size {baseline.size}, this run is size {new.size}: not compared")
                return 1 if args.require_baseline else 0
        else:
            baseline, new = load(args.files[0]), load(args.files[1])
    except InputError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if args.check != "ratio" and baseline.device_class != new.device_class:
        print(
            f"compare: absolute times compare only within one device class: the baseline is "
            f"{baseline.device_class}, the new run {new.device_class}; use --check ratio",
            file=sys.stderr,
        )
        return 2
    rows = compare(baseline, new, threshold=args.threshold, check=args.check)
    print(
        f"baseline {baseline.path} ({baseline.device_class}, size {baseline.size}) vs new {new.path} "
        f"({new.device_class}, size {new.size}); threshold {args.threshold}x, check {args.check}\n"
    )
    print(comparison_table(rows))
    regressions = [r for r in rows if r.status.startswith("REGRESSION")]
    missing = [r for r in rows if r.status == "missing"]
    new_names = [r for r in rows if r.status == "new"]
    print(
        f"\n{len(rows)} benchmarks: {len(regressions)} regressed, {sum(r.status == 'faster' for r in rows)} faster, "
        f"{len(missing)} missing from the new run, {len(new_names)} new"
    )
    for r in missing:
        print(f"missing: {r.name}")
    for r in new_names:
        print(f"new: {r.name}")
    failed = bool(regressions) or (bool(missing) and not args.allow_missing)
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
