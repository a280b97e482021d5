"""``leap distill``: parse the options (generated from :class:`leap.config.TrainConfig`),
merge them over a ``--config`` file, train, print the summary.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..config import TrainConfig, config_fields, normalize_mapping
from ..config_schema import load_config_file
from ..errors import ConfigError
from .command import run_alone
from .options import Formatter, config_groups

__all__ = ["NAME", "HELP", "DESCRIPTION", "add_parser", "run", "main", "config_from_args"]

NAME = "distill"
HELP = "distill a teacher ViT into a student ViT (LEAP or baseline)"

DESCRIPTION = """\
LEAP: distill a large frozen ViT teacher (e.g. DINOv2 ViT-g/14) into a small ViT student
by feature regression. With --curriculum cka (LEAP) the regression target starts at an
early teacher block chosen by CKA and moves deeper whenever the student's projected
features match it (CKA >= --tau) or after --max-epochs-per-block epochs; the teacher only
runs up to the current target block, which saves teacher compute. --curriculum off is the
baseline: always the last block.

Writes to --out: log.jsonl (one JSON record per step / epoch / level-up), checkpoint.pt
(every --ckpt-every steps and at every epoch end) and summary.json."""

_DISTILL_EPILOG = """\
examples:
  # the paper's ViT-S recipe (per-GPU batch 64; launch with torchrun for several GPUs)
  leap distill --teacher vit_giant_patch14_reg4_dinov2 --teacher-weights dinov2_vitg14_reg4.pth \\
      --student vit_small_patch14_dinov2 --data /data/imagenet100 --out runs/vits-leap

  # baseline (last teacher block only), token-normalized MSE
  leap distill --teacher vit_giant_patch14_reg4_dinov2 --teacher-weights dinov2_vitg14_reg4.pth \\
      --student vit_small_patch14_dinov2 --data /data/imagenet100 --curriculum off --loss token-mse

  # tiny CPU smoke run on synthetic images
  leap distill --teacher vit_small_patch14_dinov2 --student vit_small_patch14_dinov2 \\
      --teacher-overrides '{"depth": 4, "embed_dim": 48, "num_heads": 3}' \\
      --student-overrides '{"depth": 2, "embed_dim": 32, "num_heads": 2}' \\
      --img-size 28 --data-source synthetic --synthetic-size 64 --batch-size 8 --epochs 2 \\
      --warmup-epochs 0.5 --out runs/smoke

  # settings from a file (CLI flags win), continue an interrupted run
  leap distill --config vits.yaml --resume auto

  # 4 GPUs on one machine
  torchrun --nproc_per_node 4 -m leap distill --config vits.yaml

data layout for --data-source folder: DATA/train/<class>/<image>.jpg (or DATA/<class>/<image>.jpg).
--lr: for LARS the peak lr is lr * sqrt(global_batch / 1536) (paper: 6 -> 2.45 at batch 256);
for AdamW it is lr itself. The schedule is linear warmup, then cosine to lr * --min-lr-ratio."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``distill`` to the ``leap`` subcommands. Option defaults are suppressed so explicit
    flags can be told apart from the ``--config`` file's values."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description=DESCRIPTION,
        epilog=_DISTILL_EPILOG,
        formatter_class=Formatter,
        argument_default=argparse.SUPPRESS,
    )
    run = config_groups(p)["run"]
    run.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (keys as in this help, "
        "e.g. 'batch_size: 64' or 'batch-size: 64'); command-line flags override it",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved options as YAML and exit (a starting point for --config)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` file <- explicit command-line flags; then validate."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        try:
            raw = load_config_file(config_path)
        except ConfigError as e:  # YAML's own message spans several lines, with the source quoted
            yaml_error = e.__context__
            mark = getattr(yaml_error, "problem_mark", None)
            if mark is None:
                raise ConfigError(" ".join(str(e).split())) from None
            raise ConfigError(
                f"could not parse config file {config_path}: {getattr(yaml_error, 'problem', None) or 'invalid YAML'} "
                f"at line {mark.line + 1}, column {mark.column + 1}"
            ) from None
        values.update(normalize_mapping(raw, source=f"config file {config_path}"))
    fields = config_fields()
    values.update({k: v for k, v in vars(args).items() if k in fields})
    return TrainConfig(**values).validate()


def _print_summary(s: dict[str, Any]) -> None:
    def fmt(v, spec=".4g"):
        return "n/a" if v is None else format(v, spec)

    def pct(v, spec):
        return "n/a" if v is None else format(100 * v, spec) + "%"

    flops = s.get("flops") or {}
    blocks_saved = s["teacher_block_savings"]
    lines = [
        f"leap distill ({'LEAP curriculum' if s['mode'] == 'leap' else 'baseline'}) "
        f"{s['status'].replace('_', ' ')}: {s['steps']} steps, {s['epochs_completed']}/{s['epochs']} epochs",
        f"  target block: start {s['start_block']}, final {s['final_block']} of {s['num_blocks']} "
        f"(mean {fmt(s['mean_block'], '.2f')}), {len(s['level_ups'])} level-up(s)",
        f"  teacher blocks run: {s['teacher_blocks_run']} of {s['teacher_blocks_full']} ({pct(blocks_saved, '.1f')} "
        f"saved); teacher FLOPs saved: {pct(flops.get('saved_fraction'), '.1f')}",
        f"  loss: final {fmt(s['final_loss'])}, last epoch mean {fmt(s['last_epoch_mean_loss'])}; "
        f"{fmt(s['images_per_s'], '.1f')} images/s",
        f"  run dir: {s['run_dir']} (log.jsonl, summary.json, checkpoint.pt)",
    ]
    if s.get("calibration_blocks"):  # reported apart: the savings compare training steps only
        lines.append(
            f"  calibration scan: {s['calibration_blocks']} teacher blocks once "
            f"({pct(flops.get('calibration_fraction'), '.2f')} of the baseline teacher FLOPs, not in the savings)"
        )
    if s.get("decode_failures"):
        lines.append(f"  {s['decode_failures']} undecodable image(s) were skipped")
    print("\n".join(lines), flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``leap distill`` with parsed ``args``; returns the exit code."""
    config = config_from_args(args)
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from ..apps import api

    summary = api.distill(config=config)  # the Python API's code path (leap.distill)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    return 0


def main(argv=None) -> int:
    """``leap distill`` from ``argv`` (the arguments after ``distill``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
