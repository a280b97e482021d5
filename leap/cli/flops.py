"""``leap flops``: per-image costs of a teacher/student pair and the savings of a curriculum
trajectory (:mod:`leap.cost`), optionally with the measured wall-clock saving (:mod:`leap.run.timing`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .command import run_alone
from .options import Formatter, add_config_options

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "flops"
HELP = "per-image FLOPs of teacher/student and the savings of a block trajectory"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME,
        help=HELP,
        formatter_class=Formatter,
        description="Per-image FLOPs of a LEAP teacher/student pair and the savings of a curriculum "
        "trajectory vs. the full-depth baseline (models are built on the meta device; "
        "nothing is allocated unless --measure).",
    )
    add_config_options(
        p,
        ["teacher", "student", "img_size", "teacher_overrides", "student_overrides", "concat_teacher_last"],
        required=("teacher", "student"),
    )
    p.add_argument(
        "--trajectory",
        metavar="FILE",
        help="target block per epoch/step: text of ints (whitespace/comma separated), a JSON "
        "list, a JSON object with 'blocks', a log.jsonl or a run directory",
    )
    p.add_argument("--no-cka", action="store_true", help="leave the per-step CKA out of C(k)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also time one training step per distinct block of the trajectory and report the "
        "wall-clock saving (allocates the models: use a GPU for large ones)",
    )
    add_config_options(
        p,
        ["batch_size", "device"],
        defaults={"batch_size": 32},
        help={"batch_size": "batch size for --measure", "device": "device for --measure: auto, cpu, cuda, cuda:1 ..."},
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps per block for --measure (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    """``leap flops``: print per-image costs and the savings of a trajectory. Returns an exit code.

    Raises:
        LeapError: unknown models, mismatched patch grids, an unreadable trajectory.
    """
    from ..cost import CostModel, savings
    from ..runlog import load_trajectory

    cm = CostModel(
        args.teacher,
        args.student,
        include_cka=not args.no_cka,
        img_size=args.img_size,
        teacher_overrides=args.teacher_overrides,
        student_overrides=args.student_overrides,
        concat_teacher_last=args.concat_teacher_last,
    )
    traj = load_trajectory(args.trajectory) if args.trajectory else None
    if args.measure and traj is None:
        args.parser.error("--measure needs --trajectory")
    if args.measure and args.concat_teacher_last:  # its step time does not depend on k: nothing to measure
        args.parser.error("--measure times the plain target; it does not model --concat-teacher-last")

    result: dict[str, Any] = {
        "teacher": args.teacher,
        "student": args.student,
        "img_size": args.img_size,
        "teacher_tokens": cm.teacher_cost.tokens,
        "student_tokens": cm.student_cost.tokens,
        "num_blocks": cm.num_blocks,
        "costs_macs": cm.breakdown(),
    }
    if traj is not None:
        result["savings"] = savings(traj, cost_model=cm)
    if args.measure:
        from ..distributed import resolve_device
        from ..models import build_model
        from ..run.timing import measure_step_times, wall_clock_savings

        dev = resolve_device(args.device)
        with dev:  # initialize directly on the device (a ViT-g inits slowly on CPU)
            teacher = build_model(args.teacher, img_size=args.img_size, **args.teacher_overrides)
            student = build_model(args.student, img_size=args.img_size, **args.student_overrides)
        ks = sorted({int(round(b)) for b in traj.blocks} | {cm.num_blocks})
        times = measure_step_times(
            teacher,
            student,
            ks,
            batch_size=args.batch_size,
            device=dev,
            repeats=args.repeats,
            include_cka=not args.no_cka,
        )
        result["step_times_s"] = {str(k): v for k, v in times.items()}
        result["device"] = str(dev)
        result["batch_size"] = args.batch_size
        result["wall_clock"] = wall_clock_savings(traj, times, cm.num_blocks)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_tables(result, cm)
    return 0


def _unit(largest_macs: float) -> tuple[str, float]:
    """Table unit prefix for costs up to ``largest_macs`` (G for real models, M/K for toys)."""
    for prefix, scale in (("G", 1e9), ("M", 1e6)):
        if largest_macs >= scale:
            return prefix, scale
    return "", 1.0


def _print_tables(result: dict[str, Any], cm: Any) -> None:
    out = sys.stdout
    b = result["costs_macs"]
    L = cm.num_blocks
    T = cm.tokens_per_image
    print(
        f"teacher {result['teacher']} ({L} blocks, width {cm.d_t}, {result['teacher_tokens']} tokens), "
        f"student {result['student']} ({cm.student_cost.depth} blocks, width {cm.d_s}, "
        f"{result['student_tokens']} tokens), {result['img_size']} px",
        file=out,
    )
    rows = [
        ("teacher patch embed", b["teacher_embed_macs"]),
        ("teacher block (one)", b["teacher_block_macs"]),
        (f"teacher full ({L} blocks)", b["teacher_full_macs"]),
        ("student forward", b["student_forward_macs"]),
        ("student step (3x fwd)", b["student_step_macs"]),
        (f"head forward ({T + 1} tokens)", b["head_forward_macs"]),
        ("head step (3x fwd)", b["head_step_macs"]),
        ("CKA per step" + ("" if cm.include_cka else " (off)"), b["cka_macs"]),
        ("C(L): full-depth step", b["step_full_depth_macs"]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    prefix, scale = _unit(b["step_full_depth_macs"])
    print(f"\n{'per-image cost':<{width}}{prefix + 'MACs':>10}{prefix + 'FLOPs':>10}", file=out)
    for name, macs in rows:
        print(f"{name:<{width}}{macs / scale:10.3f}{2 * macs / scale:10.3f}", file=out)
    s = result.get("savings")
    if s:
        print(f"\ntrajectory: {s['entries']} entries, mean target block {s['mean_block']:.2f} of {L}", file=out)
        print(f"  teacher-only saving (1 - mean k / L):          {100 * s['teacher_only_saving']:6.2f}%", file=out)
        print(f"  teacher forward saving (incl. patch embed):    {100 * s['teacher_saving']:6.2f}%", file=out)
        print(f"  total saving (incl. student step, head, CKA):  {100 * s['total_saving']:6.2f}%", file=out)
    else:
        print("\n(no --trajectory given: no savings computed)", file=out)
    if "step_times_s" in result:
        print(f"\nmeasured step time ({result['device']}, batch {result['batch_size']}):", file=out)
        for k, v in result["step_times_s"].items():
            print(f"  k = {k:>3}: {1000 * v:9.2f} ms", file=out)
        wc = result["wall_clock"]
        print(f"  wall-clock saving vs all steps at k = {L}:    {100 * wc['saving']:6.2f}%", file=out)


def main(argv=None) -> int:
    """``leap flops`` from ``argv`` (the arguments after ``flops``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
