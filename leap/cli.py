"""``leap`` command line: ``leap distill ...`` (also ``python -m leap distill ...``).

Every option is a field of :class:`leap.config.TrainConfig`; a ``--config`` YAML/JSON file
sets any of them, and flags given on the command line override the file.

Exit codes: 0 success; 2 bad input (options, config file, data, models, checkpoint);
1 training failure (NaN/Inf loss); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

from .config import CHOICES, ConfigError, TrainConfig, config_fields, load_config_file, normalize_mapping

__all__ = ["main", "build_parser", "config_from_args"]

PROG = "leap"

_DESCRIPTION = """\
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
      --img-size 28 --data-source synthetic --synthetic-size 64 --batch-size 8 --epochs 2 --out runs/smoke

  # settings from a file (CLI flags win), continue an interrupted run
  leap distill --config vits.yaml --resume auto

  # 4 GPUs on one machine
  torchrun --nproc_per_node 4 -m leap distill --config vits.yaml

data layout for --data-source folder: DATA/train/<class>/<image>.jpg (or DATA/<class>/<image>.jpg).
--lr: for LARS the peak lr is lr * sqrt(global_batch / 1536) (paper: 6 -> 2.45 at batch 256);
for AdamW it is lr itself. The schedule is linear warmup, then cosine to lr * --min-lr-ratio."""


def _default_text(name: str) -> str:
    """`` (default: X)`` from the TrainConfig field, so help and library never disagree."""
    f = config_fields()[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or default == "":
        return ""
    if isinstance(default, dict):
        default = json.dumps(default)
    return f" (default: {default})"


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at position {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def _int_at_least(minimum: int):
    """argparse ``type=`` for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=100)


def _add_distill_options(p: argparse.ArgumentParser) -> None:
    def opt(group, flag: str, help: str, **kw):
        name = flag.lstrip("-").replace("-", "_")
        if kw.get("action") is not argparse.BooleanOptionalAction:
            help += _default_text(name)
        group.add_argument(flag, dest=name, help=help, **kw)

    g = p.add_argument_group("models")
    opt(g, "--teacher", "teacher model name (timm ViT, e.g. vit_giant_patch14_reg4_dinov2); required", metavar="NAME")
    opt(g, "--teacher-weights", "local teacher checkpoint (.pth/.pt/.bin/.safetensors; official DINOv2, "
        "Hugging Face or timm layout). Without it the teacher is random (smoke tests only)", metavar="FILE")
    opt(g, "--student", "student model name (e.g. vit_small_patch14_dinov2, vit_tiny_patch14_dinov2); "
        "random init; required", metavar="NAME")
    opt(g, "--teacher-overrides", "JSON object of extra model arguments for the teacher, "
        "e.g. '{\"depth\": 4, \"embed_dim\": 48}'", type=_json_dict, metavar="JSON")
    opt(g, "--student-overrides", "JSON object of extra model arguments for the student", type=_json_dict,
        metavar="JSON")
    opt(g, "--img-size", "input resolution; teacher and student must give the same patch grid",
        type=_positive_int, metavar="PX")

    g = p.add_argument_group("data")
    opt(g, "--data", "dataset path: a folder of class folders (optionally under train/), or a folder "
        "with Fashion-MNIST idx files", metavar="PATH")
    opt(g, "--data-source", "how to read --data; auto picks fashion-mnist for idx files, else folder",
        choices=CHOICES["data_source"])
    opt(g, "--synthetic-size", "number of images for --data-source synthetic", type=_positive_int, metavar="N")
    opt(g, "--limit-images", "train on the first N images of the source only (quick runs)",
        type=_positive_int, metavar="N")
    opt(g, "--augment", "DINO-style augmentation (random resized crop, flip, color jitter, grayscale) "
        "(default: on)", action=argparse.BooleanOptionalAction)
    opt(g, "--mixup", "batch mixup, one lambda per batch, same images to teacher and student (default: on)",
        action=argparse.BooleanOptionalAction)
    opt(g, "--workers", "DataLoader worker processes per GPU/process (default: from the CPU count)",
        type=_non_negative_int, metavar="N")

    g = p.add_argument_group("schedule")
    opt(g, "--epochs", "number of epochs", type=_positive_int, metavar="N")
    opt(g, "--batch-size", "batch size per process (global batch = this x number of processes)",
        type=_positive_int, metavar="N")
    opt(g, "--max-steps", "stop after N optimizer steps in total (the lr schedule still follows --epochs, "
        "so the run can be resumed exactly)", type=_positive_int, metavar="N")

    g = p.add_argument_group("optimization")
    opt(g, "--optimizer", "LARS (paper) or AdamW", choices=CHOICES["optimizer"])
    opt(g, "--lr", "base learning rate; LARS: peak = lr * sqrt(global_batch/1536), default 6.0; "
        "AdamW: peak = lr, default 5e-4", type=float, metavar="LR")
    opt(g, "--weight-decay", "weight decay (default: 1e-6 for LARS, 0.05 for AdamW); never applied to "
        "biases, norms, cls/register tokens, position embeddings or LayerScale", type=float, metavar="WD")
    opt(g, "--momentum", "LARS momentum", type=float, metavar="BETA")
    opt(g, "--trust-coefficient", "LARS trust coefficient (eta)", type=float, metavar="ETA")
    opt(g, "--warmup-epochs", "linear warmup length in epochs (fractions allowed)", type=float, metavar="EPOCHS")
    opt(g, "--min-lr-ratio", "final lr of the cosine decay, as a fraction of the peak", type=float, metavar="RATIO")
    opt(g, "--clip-grad", "clip the global gradient norm to this value (0 = off)", type=float, metavar="NORM")
    opt(g, "--precision", "auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler (CUDA only)",
        choices=CHOICES["precision"])

    g = p.add_argument_group("loss")
    opt(g, "--loss", "mse = the paper's MSE on projected features; token-mse = MSE of per-token "
        "normalized features (no loss jump when the target block changes)", choices=CHOICES["loss"])
    opt(g, "--cls-weight", "weight of the CLS-token loss (same head as the patch tokens)", type=float, metavar="W")

    g = p.add_argument_group("curriculum")
    opt(g, "--curriculum", "cka = LEAP adaptive target block; off = baseline, always the last teacher block",
        choices=CHOICES["curriculum"])
    opt(g, "--tau", "CKA threshold for moving to the next teacher block (paper: 0.85 ImageNet-100, "
        "0.80 ImageNet-1K)", type=float, metavar="TAU")
    opt(g, "--alpha", "EMA weight of each new CKA value (1 = no smoothing)", type=float, metavar="A")
    opt(g, "--max-epochs-per-block", "move on after this many epochs on one block (0 = never)",
        type=_non_negative_int, metavar="M")
    opt(g, "--cka-every", "measure CKA (and maybe level up) every N steps", type=_positive_int, metavar="N")
    opt(g, "--start-block", "start at this teacher block (1-indexed) instead of the CKA calibration",
        type=_positive_int, metavar="K")
    opt(g, "--snap-to-last", "jump straight to the last block once the target reaches block S",
        type=_positive_int, metavar="S")

    g = p.add_argument_group("run")
    opt(g, "--out", "run directory (log.jsonl, checkpoint.pt, summary.json)", metavar="RUN_DIR")
    opt(g, "--ckpt-every", "also checkpoint every N steps (0 = only at epoch ends)", type=_non_negative_int,
        metavar="N")
    opt(g, "--resume", "continue a run from a checkpoint file, or 'auto' = RUN_DIR/checkpoint.pt if it "
        "exists", metavar="PATH|auto")
    opt(g, "--seed", "random seed (model init, data order, augmentation, mixup)", type=int, metavar="N")
    opt(g, "--device", "auto, cpu, cuda or cuda:N (under torchrun: the GPU of LOCAL_RANK)", metavar="DEVICE")
    opt(g, "--progress", "tqdm progress bar per epoch (only on a terminal) (default: on)",
        action=argparse.BooleanOptionalAction)
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (keys as in this help, "
                   "e.g. 'batch_size: 64' or 'batch-size: 64'); command-line flags override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved options as YAML and exit (a starting point for --config)")


def build_parser() -> argparse.ArgumentParser:
    """The ``leap`` parser; option defaults are suppressed so explicit flags can be told apart."""
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    distill = sub.add_parser(
        "distill", help="distill a teacher ViT into a student ViT (LEAP or baseline)",
        description=_DESCRIPTION, epilog=_DISTILL_EPILOG, formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS,
    )
    _add_distill_options(distill)
    for name, (_, _, help_text) in _DELEGATED.items():
        # Parsed by the command's own parser (``leap NAME --help``).
        sub.add_parser(name, help=help_text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return parser


# Commands with their own argparse parser: name -> (module, function(argv) -> int, help).
_DELEGATED = {
    "flops": ("leap.flops", "main_flops", "per-image FLOPs of teacher/student and the savings of a block trajectory"),
    "report": ("leap.report", "main_report", "plots and a Markdown summary of a run directory"),
    "train-teacher": ("leap.pretrain", "main_train_teacher", "train a small ViT teacher classifier (e.g. on Fashion-MNIST)"),
    "eval": ("leap.knn", "main_eval", "evaluate frozen features: `leap eval knn --checkpoint ... --data ...`"),
    "demo": ("leap.demo", "main_demo", "baseline vs LEAP on Fashion-MNIST with the bundled teacher (make demo)"),
}


def _run_delegated(name: str, argv: Sequence[str]) -> int:
    import importlib

    module_name, function, _ = _DELEGATED[name]
    debug = os.environ.get("LEAP_DEBUG", "") not in ("", "0")
    from .models import CheckpointError

    try:
        return int(getattr(importlib.import_module(module_name), function)(list(argv)) or 0)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else _error(e.code, 2)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except (ConfigError, CheckpointError, ValueError, TypeError, OSError, RuntimeError) as e:
        if debug:
            raise
        return _error(f"{name}: {e}", 2)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- ``--config`` file <- explicit command-line flags; then validate."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(normalize_mapping(load_config_file(config_path), source=f"config file {config_path}"))
    fields = config_fields()
    values.update({k: v for k, v in vars(args).items() if k in fields})
    return TrainConfig(**values).validate()


def _print_summary(s: dict[str, Any]) -> None:
    def fmt(v, spec=".4g"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"leap distill ({'LEAP curriculum' if s['mode'] == 'leap' else 'baseline'}) "
        f"{s['status'].replace('_', ' ')}: {s['steps']} steps, {s['epochs_completed']}/{s['epochs']} epochs",
        f"  target block: start {s['start_block']}, final {s['final_block']} of {s['num_blocks']} "
        f"(mean {fmt(s['mean_block'], '.2f')}), {len(s['level_ups'])} level-up(s)",
        f"  teacher blocks run: {s['teacher_blocks_run']} of {s['teacher_blocks_full']} "
        f"({fmt(None if s['teacher_block_savings'] is None else 100 * s['teacher_block_savings'], '.1f')}% saved)",
        f"  loss: final {fmt(s['final_loss'])}, last epoch mean {fmt(s['last_epoch_mean_loss'])}; "
        f"{fmt(s['images_per_s'], '.1f')} images/s",
        f"  run dir: {s['run_dir']} (log.jsonl, summary.json, checkpoint.pt)",
    ]
    if s.get("decode_failures"):
        lines.append(f"  {s['decode_failures']} undecodable image(s) were skipped")
    print("\n".join(lines), flush=True)


def _error(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (``--help`` returns 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _run_delegated(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"{PROG}: %(message)s",
                        stream=sys.stderr)
    debug = os.environ.get("LEAP_DEBUG", "") not in ("", "0")

    from .models import CheckpointError

    try:
        config = config_from_args(args)
        if getattr(args, "print_config", False):
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        from .train import TrainingError, train

        try:
            summary = train(config)
        except TrainingError as e:
            if debug:
                raise
            return _error(str(e), 1)
    except KeyboardInterrupt:
        return _error("interrupted; continue the run with --resume auto", 130)
    except (ConfigError, CheckpointError, ValueError, TypeError, OSError) as e:
        # Bad input (options, files, model names, data): a message, not a traceback.
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, TypeError):  # e.g. an unknown key in --student-overrides reaching timm
            msg += "\n(set LEAP_DEBUG=1 to see the traceback)"
        return _error(msg, 2)
    if rank == 0:
        _print_summary(summary)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
