"""The whole-run time of LEAP over the paper's curriculum trajectory, from measured step times.

    pytest bench/test_bench_step.py --benchmark-json=step.json      # step times at k = 10, 20, 40
    python bench/whole_run.py step.json [--trajectory runs/x] [--out whole-run.json]

A LEAP run spends its steps at different target blocks k; the time of a run is the sum of its steps'
times. With the steps spread over the epochs evenly, the mean step time of the run is the mean over
the per-epoch target blocks of the step time at that block, each step time linearly interpolated
between the measured k (the teacher's cost is linear in k; ``leap.run.timing.wall_clock_savings`` does the
interpolation and the weighting). Per variant of the step benchmark (``ours``, ``stock-eager``,
``stock-compile``) this prints the step time at each measured k, the run's mean step time, its saving
against the same variant at full depth (every step at k = L, the baseline of the paper's "train
time saved") and its speedup over stock eager PyTorch at full depth: the project's target is
>= 2x for ``ours``.

The trajectory (``--trajectory``: anything ``leap flops --trajectory`` takes, e.g. a run directory)
defaults to :func:`paper_trajectory`, the shape of the paper's ViT-S / ImageNet-100 run (ViT-g/14
teacher, L = 40), scaled to the teacher depth L.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEP_CASE_PREFIX = "leap-step"
BASELINE_VARIANT = "stock-eager"
TARGET_SPEEDUP = 2.0


def paper_trajectory(num_blocks: int = 40, epochs: int = 100) -> list[float]:
    """Target block per epoch of the paper's ViT-S run (its curriculum plot, described in the spec):
    start at block about 2, block 12 within the first epoch (mean about 7 over it), then linearly to
    block 24 at epoch 18, then one block about every 5 epochs (the M = 5 timeout drives it) to block 40
    at epoch 94, and block 40 to the end. Mean 29.35 of 40 (the paper: "about 30", 25.1% teacher
    FLOPs saved). Blocks are scaled by ``num_blocks / 40`` for another teacher depth, epochs by
    ``epochs / 100``."""
    if num_blocks < 1 or epochs < 1:
        raise ValueError(f"need num_blocks >= 1 and epochs >= 1, got {num_blocks}, {epochs}")
    blocks = []
    for e in range(epochs):
        t = e * 100.0 / epochs  # position on the paper's 100-epoch axis
        if t < 1:
            k = 7.0
        elif t <= 18:
            k = 12.0 + 12.0 * (t - 1) / 17.0
        else:
            k = min(40.0, 24.0 + math.floor((t - 18) * 16 / 76))
        blocks.append(k * num_blocks / 40.0)
    return blocks


def step_times(path: str) -> dict[str, dict[int, float]]:
    """``{variant: {k: seconds per step}}`` from a pytest-benchmark JSON of bench/test_bench_step.py."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"whole_run: {path}: cannot read it as JSON ({exc})") from exc
    out: dict[str, dict[int, float]] = {}
    for bench in data.get("benchmarks", []) if isinstance(data, dict) else []:
        extra = bench.get("extra_info") or {}
        if not str(extra.get("case", "")).startswith(STEP_CASE_PREFIX):
            continue
        median = extra.get("median_ms")
        if not isinstance(median, (int, float)) or not median > 0:
            continue
        out.setdefault(str(extra["variant"]), {})[int(extra["k"])] = median / 1e3
    if not out:
        raise SystemExit(
            f"whole_run: {path}: no LEAP-step benchmarks with times (run pytest bench/test_bench_step.py "
            "--benchmark-json=...)"
        )
    return out


def whole_run(times: dict[str, dict[int, float]], trajectory, num_blocks: int) -> dict:
    """Per variant: the step times, the trajectory's mean step time, the saving against the same
    variant at full depth and the speedup over ``stock-eager`` at full depth."""
    from leap.run.timing import wall_clock_savings

    results = {}
    for variant, by_k in sorted(times.items()):
        steps = {str(k): v for k, v in sorted(by_k.items())}
        try:
            s = wall_clock_savings(trajectory, by_k, num_blocks)
        except ValueError as exc:  # e.g. one k measured: nothing to interpolate from
            results[variant] = {"step_s": steps, "error": str(exc)}
            continue
        results[variant] = {
            "step_s": steps,
            "mean_step_s": s["mean_step_time_s"],
            "full_depth_step_s": s["baseline_step_time_s"],
            "saving_vs_own_full_depth": s["saving"],
            "mean_block": s["mean_block"],
            "interpolated_blocks": len(s["interpolated"]),
        }
    # Stock eager at full depth: measured at L, else from the fitted line.
    base = times.get(BASELINE_VARIANT, {}).get(num_blocks) or results.get(BASELINE_VARIANT, {}).get("full_depth_step_s")
    for r in results.values():
        if base and "mean_step_s" in r:
            r["speedup_vs_stock_eager_full_depth"] = base / r["mean_step_s"]
    return results


def table(results: dict, num_blocks: int, mean_block: float) -> str:
    ks = sorted({int(k) for r in results.values() for k in r.get("step_s", {})})
    lines = [
        f"whole run over the trajectory (mean block {mean_block:.2f} of {num_blocks}); step times in ms",
        "",
        "| variant | " + " | ".join(f"k={k}" for k in ks) + " | run mean | saving vs own full depth "
        f"| speedup vs {BASELINE_VARIANT} full depth (target >= {TARGET_SPEEDUP:g}x for ours) |",
        "|---|" + "---|" * len(ks) + "---|---|---|",
    ]
    for variant, r in results.items():
        cells = [f"{r['step_s'][str(k)] * 1e3:.1f}" if str(k) in r["step_s"] else "" for k in ks]
        if "error" in r:
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | n/a ({r['error']}) | | |")
            continue
        speedup = r.get("speedup_vs_stock_eager_full_depth")
        lines.append(
            f"| {variant} | " + " | ".join(cells) + f" | {r['mean_step_s'] * 1e3:.1f} "
            f"| {r['saving_vs_own_full_depth'] * 100:.1f}% | {f'{speedup:.2f}x' if speedup else 'n/a'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_json", help="pytest-benchmark JSON of bench/test_bench_step.py")
    parser.add_argument(
        "--trajectory",
        default=None,
        help="target block per epoch (as leap flops --trajectory); default: the paper's shape",
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="teacher depth L (default: the largest measured k)"
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from leap.runlog import Trajectory

    times = step_times(args.step_json)
    num_blocks = args.num_blocks or max(k for by_k in times.values() for k in by_k)
    trajectory = Trajectory.of(args.trajectory) if args.trajectory else Trajectory(paper_trajectory(num_blocks))
    results = whole_run(times, trajectory, num_blocks)
    print(table(results, num_blocks, trajectory.mean()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "num_blocks": num_blocks,
                    "mean_block": trajectory.mean(),
                    "trajectory": "paper" if not args.trajectory else args.trajectory,
                    "variants": results,
                },
                f,
                indent=1,
            )
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
