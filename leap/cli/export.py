"""``leap export RUN_DIR --format {timm,safetensors,onnx} --out PATH``: the run's student backbone as a
deployable file, checked after writing, with a JSON model card (:func:`leap.apps.api.export`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from .command import run_alone
from .options import Formatter

__all__ = ["NAME", "HELP", "FORMATS", "add_parser", "run", "main"]

NAME = "export"
HELP = "export a run's student backbone (timm / safetensors state dict, ONNX), checked, with a model card"
#: The formats (leap.apps.export.FORMATS; spelled here so `leap --help` does not import torch).
FORMATS = ("timm", "safetensors", "onnx")

DESCRIPTION = """\
Write the student backbone of a `leap distill` run (no projection head, no trainer state) as

  timm         a state dict (.pth) that timm.create_model(NAME, pretrained=True,
               pretrained_cfg_overlay=dict(file=PATH, num_classes=0), **KWARGS) loads with strict=True
  safetensors  the same state dict as .safetensors
  onnx         an ONNX graph (torch.onnx.export, dynamo exporter): input images (batch, 3, H, W),
               outputs cls (batch, D), patch (batch, D: mean of the patch tokens) and patch_tokens
               (batch, N, D), as `leap eval` computes its features; batch is dynamic

Each export is checked right after writing: timm loads the state dict strictly and gives exactly the
student's features; onnxruntime runs the graph on random inputs (batch 1 and 3) and must match PyTorch
within 1e-4 (fp32): the error is printed. Beside the file, PATH.json is its model card: the student's
name, overrides and timm call, the image size and normalization, the teacher and its block trajectory,
the recipe, every eval.jsonl record of the run and the source checkpoint's SHA-256. Files are written
under temporary names and renamed once checked: a failed export leaves nothing behind."""

EPILOG = """\
examples:
  leap export runs/vits --format safetensors --out vits.safetensors
  leap export runs/vits --format onnx --out vits.onnx --int8 --eval-data /data/imagenet100
  leap export runs/vits --format timm --out vits.pth --checkpoint best   # by the run's eval.jsonl

the formats need: timm/safetensors the trainer's packages; onnx the export extra
(pip install "leap-kernels[export]": onnx, onnxscript, onnxruntime)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``export`` to the ``leap`` subcommands."""
    p = sub.add_parser(NAME, help=HELP, description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("run", metavar="RUN_DIR", help="run directory of `leap distill` (or a checkpoint file)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the file to write (.pth, .safetensors, .onnx; a folder: FOLDER/student.EXT); the card is PATH.json",
    )
    p.add_argument(
        "--checkpoint",
        default="last",
        metavar="best|last|PATH",
        help="last = RUN_DIR/checkpoint.pt; best = of it and the kept checkpoint-stepN.pt, the one whose "
        "eval.jsonl records score highest (linear, else knn, else retrieval); or a checkpoint file (default: last)",
    )
    onnx = p.add_argument_group("onnx")
    onnx.add_argument(
        "--int8",
        action="store_true",
        help="also write STEM.int8.onnx beside PATH (onnxruntime dynamic quantization); report its size and error",
    )
    onnx.add_argument(
        "--eval-data",
        metavar="PATH",
        help="with --int8: a labelled set (as for `leap eval knn`) to compare the kNN top-1 of the fp32 student "
        "and the int8 model on",
    )
    onnx.add_argument(
        "--eval-data-source", default="auto", choices=("auto", "folder", "fashion-mnist"), help="how to read it"
    )
    onnx.add_argument("--eval-limit", type=int, metavar="N", help="at most N images of each split")
    return p


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _summary(path: str, card: dict[str, Any]) -> list[str]:
    export, source = card["export"], card["source"]
    where = source.get("checkpoint") or "?"
    if where != "?" and not os.path.relpath(where).startswith(".."):
        where = os.path.relpath(where)
    chosen = f", {source['why']}" if source.get("why") else ""
    lines = [
        f"leap export: wrote {path} ({export['format']}, {_mb(export['bytes'])}) from {where} "
        f"(step {source.get('step')}{chosen}; sha256 {source['checkpoint_sha256'][:16]}...)"
    ]
    if export["format"] == "onnx":
        check = export["check"]
        errors = ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_error"].items())
        batches = " and ".join(str(b) for b in check["batches"])
        lines.append(
            f"  check: onnxruntime vs PyTorch on random inputs (batch {batches}): max abs error {errors} "
            f"(tolerance 1e-4 + 1e-4 |value|)"
        )
        int8 = export.get("int8")
        if int8:
            errors = ", ".join(f"{k} {v:.2e}" for k, v in int8["random_inputs_max_abs_error"].items())
            lines.append(
                f"  int8: {int8['file']}, {_mb(int8['bytes'])} ({int8['bytes'] / int8['fp32_bytes']:.0%} of "
                f"{_mb(int8['fp32_bytes'])}); max abs error on random inputs: {errors}"
            )
            acc = int8.get("accuracy")
            if acc:
                parts = [
                    f"{kind} {100 * acc[kind]['fp32']:.2f}% -> {100 * acc[kind]['int8']:.2f}% "
                    f"({100 * acc[kind]['change']:+.2f} points)"
                    for kind in ("cls", "patch")
                ]
                lines.append(
                    f"  int8 vs fp32, kNN top-1 on {acc['data']['path']} ({acc['data']['val_images']} images): "
                    + "; ".join(parts)
                )
    else:
        lines.append("  check: timm loads it with strict=True and gives exactly the student's features")
        lines.append(f"  load: {export['load']}")
    lines.append(f"  model card: {path}.json")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run ``leap export`` with parsed ``args``; returns the exit code."""
    from ..apps import api

    options: dict[str, Any] = {"checkpoint": args.checkpoint}
    if args.int8:
        options["int8"] = True
    if args.eval_data is not None:
        options.update(eval_data=args.eval_data, eval_data_source=args.eval_data_source, eval_limit=args.eval_limit)
    quiet = logging.getLogger("leap.export")  # the summary below says it all, once
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        path = api.export(args.run, args.format, args.out, **options)
    finally:
        quiet.setLevel(level)
    with open(path + ".json", encoding="utf-8") as f:
        card = json.load(f)
    print("\n".join(_summary(path, card)), flush=True)
    return 0


def main(argv=None) -> int:
    """``leap export`` from ``argv`` (the arguments after ``export``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
