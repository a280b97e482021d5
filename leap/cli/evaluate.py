"""``leap eval linear | retrieval | knn | robustness | segmentation``: the command line of :mod:`leap.evaluation`.

The ``eval`` parser holds the protocols as sub-commands (each one's handler is in ``args.handler``;
:func:`run` calls it, once per checkpoint with ``--all-checkpoints``). Exit codes as for every command
(:mod:`leap.cli.command`): 0 success, 2 bad input (one line on stderr, ``leap: error: eval: ...``), 130
interrupted.

Why this module is long: five protocols, each with its options, help text and printed summary, share one
parser and one set of model and run options.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..evaluation.errors import EvaluationError
from .command import run_alone
from .options import Formatter

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "eval"
HELP = (
    "evaluate frozen features: linear probe, revisitop retrieval, kNN, corruption robustness, linear "
    "segmentation (`leap eval PROTOCOL --help`)"
)

_EVAL_DESCRIPTION = """\
Evaluate the frozen features of a student, a teacher (optionally cut at block K) or any
`leap train-teacher` model. Features are extracted once (CLS token and mean of the patch
tokens, after the final norm) and cached on disk by checkpoint hash, data and transform;
each evaluation appends a JSON record to RUN_DIR/eval.jsonl (one per checkpoint with
--all-checkpoints: learning curves, plotted by `leap report`)."""

_MODEL_HELP = """\
model (exactly one of):
  --model RUN_DIR|CHECKPOINT   a `leap distill` run directory or checkpoint (the student), or a
                               `leap train-teacher` checkpoint
  --teacher NAME --teacher-weights FILE [--block K]
                               a teacher (official DINOv2, Hugging Face or timm weights), cut after
                               block K (patch embed, blocks 1..K, final norm); default: all blocks
  --pixels                     raw pixels (a baseline)
  --all-checkpoints            with --model RUN_DIR: every checkpoint-epochE.pt kept by
                               `leap distill --save-every-epochs N`, then checkpoint.pt, one record each"""

_LINEAR_EPILOG = (
    _MODEL_HELP
    + """

protocol (the paper's): zero-initialized linear classifier on the cached features, SGD lr 0.1,
momentum 0.9, no weight decay, cosine schedule, 100 epochs, batch 256. Reported: best validation
top-1 over the epochs (the paper's number) and the top-1 after the last epoch.
data: DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg (or test/), or a folder with the
Fashion-MNIST idx files (train and t10k). Without a held-out split the command refuses to run.

examples:
  leap eval linear --model runs/vits-leap --data /data/imagenet100
  leap eval linear --teacher vit_giant_patch14_reg4_dinov2 --teacher-weights dinov2_vitg14_reg4.pth \\
      --block 30 --data /data/imagenet100 --features patch --run-dir runs/teacher-evals"""
)

_RETRIEVAL_EPILOG = (
    _MODEL_HELP
    + """

protocol (revisitop, the paper's): L2-normalized CLS features, single scale (--transform center-crop:
Resize 256 -> CenterCrop 224 at the model's resolution; keep-aspect: longer side = the resolution, aspect
kept), queries cropped to their bounding box, cosine ranking; mAP and mP@1/5/10 at Easy
(easy positives, hard ignored), Medium (easy + hard positives) and Hard (hard positives, easy
ignored); junk always ignored; queries without positives in a setting are left out of its mean.
data: ROOT/roxford5k/jpg/*.jpg and ROOT/roxford5k/gnd_roxford5k.pkl (or .json), the layout of
revisitop's download script; ROOT may also be the dataset folder itself. Nothing is downloaded.

example:
  leap eval retrieval --model runs/vits-leap --data ~/revisitop/data/datasets --dataset roxford5k"""
)

_KNN_EPILOG = (
    _MODEL_HELP
    + """

protocol: weighted cosine kNN (DINO): each validation image votes among its k most similar training
images with weights exp(sim / T); features L2-normalized.

example:
  leap eval knn --model runs/vits-leap --data /data/imagenet100 --features both"""
)

_ROBUSTNESS_EPILOG = (
    _MODEL_HELP
    + """

protocol (ImageNet-C): the 15 corruptions of imagecorruptions-imaug at severities 1-5 applied to the
validation images after Resize 256 -> CenterCrop 224, seeded per image and cached as PNG under the
cache directory; the paper's linear probe trained on the clean training features is applied to each
corrupted set. Reported: clean top-1, top-1 per corruption and severity, the mean per corruption and
over all of them. Needs: pip install "leap-kernels[robustness]".

example:
  leap eval robustness --model runs/vits-leap --data /data/imagenet100 --features cls"""
)

_SEGMENTATION_EPILOG = (
    _MODEL_HELP
    + """

protocol (DINOv2's linear head): images resized to the model's resolution, frozen patch tokens (cached),
BatchNorm + linear (or --head linear), logits upsampled bilinearly to the label size, cross-entropy
over the labelled pixels; mIoU (with aAcc, mAcc) on the validation split.
data: ROOT/ADEChallengeData2016/images/{training,validation} + annotations/... (ADE20K: 150 classes,
0 = ignored), or ROOT/images/{train,val} + ROOT/masks/{train,val} (class indices, --ignore-index).

example:
  leap eval segmentation --model runs/vits-leap --data /data/ade20k --img-size 448"""
)


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def _int_min(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


def _add_common(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "--checkpoint",
        dest="model",
        metavar="RUN_DIR|CHECKPOINT",
        help="run directory or checkpoint file (leap distill or leap train-teacher)",
    )
    g.add_argument("--teacher", metavar="NAME", help="teacher model name (timm ViT)")
    g.add_argument("--teacher-weights", metavar="FILE", help="teacher weights file")
    g.add_argument(
        "--teacher-overrides",
        type=_json_dict,
        metavar="JSON",
        help="model-shape arguments for --teacher, e.g. '{\"depth\": 8}' (default: the file's recipe)",
    )
    g.add_argument(
        "--block",
        type=_int_min(1),
        metavar="K",
        help="features after block K (1-indexed) and the final norm (default: the last block)",
    )
    g.add_argument("--pixels", action="store_true", help="raw pixels instead of a model (a baseline)")
    g.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="evaluate every kept checkpoint of --model RUN_DIR (checkpoint-epochE.pt, then checkpoint.pt)",
    )
    g.add_argument(
        "--img-size", type=_int_min(1), metavar="PX", help="input resolution (default: the model's training resolution)"
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="feature extraction: auto = bf16 autocast on CUDA, fp32 on CPU (default: auto)",
    )
    g.add_argument(
        "--batch-size", type=_int_min(1), default=batch_size, help=f"images per forward pass (default: {batch_size})"
    )
    workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    g.add_argument(
        "--workers",
        type=_int_min(0),
        default=workers,
        help=f"DataLoader worker processes (default: {workers}, from the CPU count)",
    )
    g.add_argument(
        "--cache-dir", metavar="DIR", help="feature cache (default: $LEAP_CACHE_DIR/features or ~/.cache/leap/features)"
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    g.add_argument(
        "--run-dir",
        metavar="DIR",
        help="append the record to DIR/eval.jsonl (default: the model's run directory; none for teachers)",
    )
    g.add_argument("--no-record", action="store_true", help="write no eval.jsonl record")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--json", action="store_true", help="print the record as JSON")


def _add_labelled_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="PATH",
        help="train/ + val/ class folders, or Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--data-source",
        default="auto",
        choices=("auto", "folder", "fashion-mnist"),
        help="how to read --data (default: auto)",
    )
    _add_limits(g, "--limit-test")


def _add_limits(g: Any, *val_aliases: str) -> None:
    """``--limit-train N`` and ``--limit-val N`` (with ``val_aliases``)."""
    g.add_argument("--limit-train", type=_int_min(1), metavar="N", help="first N training images only")
    g.add_argument(
        "--limit-val",
        *val_aliases,
        dest="limit_val",
        type=_int_min(1),
        metavar="N",
        help="first N validation images only",
    )


def _add_probe(p: argparse.ArgumentParser) -> None:
    """The linear probe's options (``linear``, ``robustness``)."""
    g = p.add_argument_group("probe")
    g.add_argument(
        "--features",
        default="both",
        choices=("cls", "patch", "both"),
        help="CLS token, mean of the patch tokens, or a probe on each (default: both)",
    )
    g.add_argument("--epochs", type=_int_min(1), default=100, help="(default: 100)")
    g.add_argument("--probe-batch-size", type=_int_min(1), default=256, help="(default: 256)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD peak learning rate, cosine to 0 (default: 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    g.add_argument("--seed", type=int, default=0, help="shuffling seed (default: 0)")


def _csv(parse):
    def split(text: str) -> list:
        try:
            return [parse(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return split


def _add_linear(p: argparse.ArgumentParser) -> None:
    _add_labelled_data(p)
    _add_probe(p)


def _add_retrieval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="ROOT", help="folder holding roxford5k/ and/or rparis6k/")
    g.add_argument("--dataset", required=True, choices=("roxford5k", "rparis6k"))
    g.add_argument("--gnd", metavar="FILE", help="ground truth .pkl or .json (default: ROOT/DATASET/gnd_DATASET.pkl)")
    g.add_argument(
        "--transform",
        default="center-crop",
        choices=("center-crop", "keep-aspect"),
        help="center-crop: Resize 256 -> CenterCrop 224 (the paper's); keep-aspect: longer side = the model's "
        "resolution, aspect kept (default: center-crop)",
    )


def _add_knn(p: argparse.ArgumentParser) -> None:
    _add_labelled_data(p)
    g = p.add_argument_group("kNN")
    g.add_argument("--features", default="cls", choices=("cls", "patch", "both"), help="(default: cls)")
    g.add_argument("--k", type=_int_min(1), default=20, help="neighbours (default: 20)")
    g.add_argument("--temperature", type=float, default=0.07, help="(default: 0.07)")


def _add_robustness(p: argparse.ArgumentParser) -> None:
    _add_labelled_data(p)
    _add_probe(p)
    g = p.add_argument_group("corruptions")
    g.add_argument("--corruptions", type=_csv(str), metavar="LIST", help="comma-separated subset (default: all 15)")
    g.add_argument("--severities", type=_csv(int), metavar="LIST", help="comma-separated subset of 1-5 (default: all)")
    g.add_argument("--corruption-seed", type=int, default=0, help="seed of the corrupted images (default: 0)")


def _add_segmentation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="ROOT", help="ADE20K or images/ + masks/ folders")
    g.add_argument("--layout", default="auto", choices=("auto", "ade20k", "folders"), help="(default: auto)")
    g.add_argument("--num-classes", type=_int_min(1), metavar="C", help="(default: 150 for ADE20K, else from masks)")
    g.add_argument("--ignore-index", type=int, default=255, help="ignored mask value, folders layout (default: 255)")
    _add_limits(g)
    g = p.add_argument_group("head")
    g.add_argument("--head", default="bn-linear", choices=("bn-linear", "linear"), help="(default: bn-linear)")
    g.add_argument("--epochs", type=_int_min(1), default=30, help="(default: 30)")
    g.add_argument("--probe-batch-size", type=_int_min(1), default=16, help="images per step (default: 16)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: 0.001)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 0.0001)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``linear``, ``retrieval``, ``knn``, ``robustness``, ``segmentation``) to an argparse
    sub-parsers object.

    The parsed namespace has ``handler``: :func:`run` calls ``args.handler(args)`` -> exit code.
    """
    ev = subparsers.add_parser(NAME, help=HELP, description=_EVAL_DESCRIPTION, formatter_class=Formatter)
    sub = ev.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    # name, help, description, epilog, the protocol's own options, default --batch-size, handler
    protocols = (
        (
            "linear",
            "the paper's linear probe (best and last validation top-1)",
            "Linear probe on frozen features (the LEAP paper's protocol).",
            _LINEAR_EPILOG,
            _add_linear,
            256,
            _run_linear,
        ),
        (
            "retrieval",
            "Revisited Oxford/Paris mAP (Easy, Medium, Hard)",
            "Image retrieval on Revisited Oxford 5k / Paris 6k (revisitop protocol).",
            _RETRIEVAL_EPILOG,
            _add_retrieval,
            32,
            _run_retrieval,
        ),
        (
            "knn",
            "weighted cosine kNN top-1",
            "k-nearest-neighbour accuracy of frozen features (DINO's weighted kNN).",
            _KNN_EPILOG,
            _add_knn,
            256,
            _run_knn,
        ),
        (
            "robustness",
            "linear-probe top-1 under the 15 ImageNet-C corruptions",
            "Accuracy under common corruptions (ImageNet-C protocol) of the clean-trained linear probe.",
            _ROBUSTNESS_EPILOG,
            _add_robustness,
            256,
            _run_robustness,
        ),
        (
            "segmentation",
            "linear segmentation probe on frozen patch tokens (mIoU)",
            "Linear semantic segmentation on frozen patch tokens (DINOv2's linear protocol).",
            _SEGMENTATION_EPILOG,
            _add_segmentation,
            64,
            _run_segmentation,
        ),
    )
    for name, help_text, description, epilog, add_options, batch_size, handler in protocols:
        p = sub.add_parser(name, help=help_text, description=description, epilog=epilog, formatter_class=Formatter)
        add_options(p)
        _add_common(p, batch_size=batch_size)
        p.set_defaults(handler=handler)
    return ev


def run(args: argparse.Namespace) -> int:
    """Run the protocol parsed into ``args`` (on each checkpoint with ``--all-checkpoints``); the exit code."""
    if not getattr(args, "all_checkpoints", False):
        return int(args.handler(args) or 0)
    from ..evaluation.common import run_checkpoints

    if not args.model:
        raise EvaluationError("--all-checkpoints needs --model RUN_DIR")
    paths = run_checkpoints(args.model)
    if not args.json:
        print(f"{len(paths)} checkpoint(s) of {args.model}: " + ", ".join(os.path.basename(p) for p in paths))
    for path in paths:
        if not args.json:
            print(f"-- {os.path.basename(path)}")
        code = int(args.handler(argparse.Namespace(**{**vars(args), "model": path})) or 0)
        if code:
            return code
    return 0


def main(argv=None) -> int:
    """``leap eval PROTOCOL ...`` from ``argv`` (without the leading ``eval``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)


# ----------------------------------------------------------------------------- handlers


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    return _pick(args, "model", "teacher", "teacher_weights", "teacher_overrides", "block", "img_size", "pixels")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **_pick(args, "batch_size", "workers", "device", "precision", "cache_dir", "no_cache", "run_dir"),
        "write_record": not args.no_record,
        "progress": not args.no_progress,
    }


#: Argument names passed on as they are: the labelled data's (linear, kNN, robustness), the linear probe's
#: (linear, robustness), the segmentation's.
_LABELLED = ("data_source", "limit_train", "limit_val")
_PROBE = ("features", "epochs", "probe_batch_size", "lr", "momentum", "weight_decay", "seed")
_SEGMENTATION = ("layout", "num_classes", "ignore_index", "head", "epochs", "probe_batch_size", "lr", "weight_decay")
_SEGMENTATION += ("seed", "limit_train", "limit_val")


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """``{name: args.name}`` for each of ``names``: the keyword arguments of an ``evaluate_*`` function."""
    return {name: getattr(args, name) for name in names}


def _kind_names(rec: dict[str, Any]) -> dict[str, str]:
    """How the summary names the feature kinds of a probe record."""
    return {"cls": "pixels" if rec["model"]["kind"] == "pixels" else "CLS", "patch": "mean-patch"}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _emit(args: argparse.Namespace, record: dict[str, Any], lines: list[str]) -> int:
    skipped = {k: v for k, v in (record.get("data", {}).get("skipped_images") or {}).items() if v}
    if skipped:
        lines = [
            *lines,
            "  undecodable images skipped (not counted): " + ", ".join(f"{v} {k}" for k, v in skipped.items()),
        ]
    if args.json:
        print(json.dumps(record))
        return 0
    print("\n".join(lines))
    if record.get("log"):
        print(f"record appended to {record['log']}")
    elif not args.no_record:
        print("no run directory for this model: no record written (give --run-dir DIR to keep one)")
    return 0


def _run_linear(args: argparse.Namespace) -> int:
    from ..evaluation.run import evaluate_linear

    rec = evaluate_linear(_model_options(args), args.data, **_pick(args, *_PROBE, *_LABELLED), **_run_options(args))
    d = rec["data"]
    lines = [
        f"linear probe [{rec['model']['description']}], {d['train_images']} training / {d['val_images']} "
        f"{d['val_split']} images, {rec['settings']['epochs']} epochs:"
    ]
    names = _kind_names(rec)
    for kind, r in rec["numbers"].items():
        lines.append(
            f"  {names[kind]:>10}: best top-1 {_pct(r['best_top1'])} (epoch {r['best_epoch']}, paper "
            f"protocol), last-epoch top-1 {_pct(r['last_top1'])}"
        )
    return _emit(args, rec, lines)


def _run_retrieval(args: argparse.Namespace) -> int:
    from ..evaluation.run import evaluate_retrieval

    opts = _model_options(args)
    img_size = opts.pop("img_size")
    rec = evaluate_retrieval(
        opts, args.data, args.dataset, gnd=args.gnd, img_size=img_size, transform=args.transform, **_run_options(args)
    )
    n = rec["numbers"]
    lines = [
        f"{args.dataset} retrieval [{rec['model']['description']}], {rec['data']['database_images']} "
        f"database images, {rec['data']['queries']} queries, transform {args.transform}:",
        "  mAP  E: {}  M: {}  H: {}".format(*(_pct(n[s]["mAP"]) for s in ("easy", "medium", "hard"))),
        "  mP@10 E: {}  M: {}  H: {}".format(*(_pct(n[s].get("mP@10")) for s in ("easy", "medium", "hard"))),
    ]
    skipped = {s: n[s]["skipped"] for s in n if n[s]["skipped"]}
    if skipped:
        lines.append(f"  queries without positives, left out: {skipped}")
    return _emit(args, rec, lines)


def _run_knn(args: argparse.Namespace) -> int:
    from ..evaluation.run import evaluate_knn

    options = _pick(args, "features", "k", "temperature", *_LABELLED)
    rec = evaluate_knn(_model_options(args), args.data, **options, **_run_options(args))
    names = {"cls": "CLS", "patch": "mean-patch"}
    d = rec["data"]
    lines = [
        f"kNN (k={args.k}, T={args.temperature}) [{rec['model']['description']}], {d['train_images']} "
        f"training / {d['val_images']} {d['val_split']} images:"
    ]
    lines += [f"  {names[kind]:>10}: top-1 {_pct(v)}" for kind, v in rec["numbers"].items()]
    return _emit(args, rec, lines)


def _run_robustness(args: argparse.Namespace) -> int:
    from ..evaluation.run import evaluate_robustness

    options = _pick(args, "corruptions", "severities", "corruption_seed", *_PROBE, *_LABELLED)
    rec = evaluate_robustness(_model_options(args), args.data, **options, **_run_options(args))
    d, levels = rec["data"], rec["settings"]["severities"]
    lines = [
        f"corruption robustness [{rec['model']['description']}], {d['train_images']} training / {d['val_images']} "
        f"{d['val_split']} images, {len(rec['settings']['corruptions'])} corruptions x {len(levels)} severities:"
    ]
    for kind, r in rec["numbers"].items():
        name = _kind_names(rec)[kind]
        lines.append(f"  {name}: clean top-1 {_pct(r['clean_top1'])}, corrupted mean {_pct(r['mean_top1'])}")
        for corruption, c in r["corruptions"].items():
            per = "  ".join(f"s{s} {_pct(c['top1'][str(s)])}" for s in levels)
            lines.append(f"    {corruption:<18} {per}  mean {_pct(c['mean_top1'])}")
    return _emit(args, rec, lines)


def _run_segmentation(args: argparse.Namespace) -> int:
    from ..evaluation.run import evaluate_segmentation

    rec = evaluate_segmentation(_model_options(args), args.data, **_pick(args, *_SEGMENTATION), **_run_options(args))
    d, n = rec["data"], rec["numbers"]
    lines = [
        f"linear segmentation [{rec['model']['description']}], {d['layout']}, {d['train_images']} training / "
        f"{d['val_images']} validation images, {d['classes']} classes, head {args.head}:",
        f"  mIoU {_pct(n['mIoU'])}  aAcc {_pct(n['aAcc'])}  mAcc {_pct(n['mAcc'])} "
        f"({n['classes_scored']} classes scored)",
    ]
    return _emit(args, rec, lines)
