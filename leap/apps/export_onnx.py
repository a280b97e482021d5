"""``leap export --format onnx``: the student as an ONNX graph, checked with onnxruntime; ``--int8``.

The graph is :class:`StudentFeatures` around the student: input ``images`` ``(batch, 3, H, W)`` float32
(normalized as the model card says; ``batch`` is dynamic), outputs

- ``cls`` ``(batch, D)``: the CLS token after the final norm,
- ``patch`` ``(batch, D)``: the mean of the patch tokens (registers excluded),
- ``patch_tokens`` ``(batch, N, D)``: the patch tokens,

i.e. the two features of ``leap eval`` (:class:`leap.evaluation.features.TokenFeatures`) and the tokens
they are pooled from. It is exported with ``torch.onnx.export(..., dynamo=True)`` on the CPU in fp32 and
checked right away: onnxruntime runs it on random inputs of two batch sizes, and every output must
match PyTorch within ``|onnx - torch| <= 1e-4 + 1e-4 |torch|`` (:data:`TOLERANCE`); the error is reported.

``--int8`` also writes ``STEM.int8.onnx``: onnxruntime's dynamic quantization (int8 weights of the
MatMul/Gemm layers, activations quantized at run time). It reports both sizes, the int8 model's error on
the same random inputs, and with ``--eval-data`` the kNN top-1 (``leap eval knn``'s protocol: k = 20,
T = 0.07, CLS and mean-patch features) of the fp32 student and of the int8 model on that labelled set.

The packages are the ``export`` extra (``onnx``, ``onnxscript``, ``onnxruntime``); without them
:func:`require_onnx` raises :class:`~leap.errors.MissingDependencyError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import vit
from ..errors import MissingDependencyError
from .export_source import ExportError

__all__ = [
    "TOLERANCE",
    "OUTPUTS",
    "StudentFeatures",
    "require_onnx",
    "export_onnx_files",
    "int8_path",
    "compare_on_data",
]

log = logging.getLogger("leap.export")

#: The check of the exported graph: ``|onnx - torch| <= atol + rtol |torch|`` elementwise, fp32.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
#: The graph's outputs, in order.
OUTPUTS = ("cls", "patch", "patch_tokens")


class StudentFeatures(nn.Module):
    """``images (B, 3, H, W) -> (cls (B, D), patch (B, D), patch_tokens (B, N, D))`` of a timm ViT (or a
    model family :mod:`leap.vit` knows), from ``forward_features`` (after the final norm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.prefix = vit.num_prefix_tokens(model)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(images)
        patch_tokens = tokens[:, self.prefix :]
        return tokens[:, 0], patch_tokens.mean(dim=1), patch_tokens


def require_onnx(int8: bool = False) -> None:
    """Check that the ``export`` extra is installed.

    Raises:
        MissingDependencyError: ``onnx``, ``onnxscript`` or ``onnxruntime`` is missing (names the extra).
    """
    import importlib.util

    needed = ("onnx", "onnxscript", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"--format onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            'install them with: pip install "leap-kernels[export]"'
        )


def int8_path(path: str) -> str:
    """``STEM.int8.onnx`` beside ``STEM.onnx``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.int8{ext}"


#: Loggers of the exporter's passes, which log every rewrite at INFO (the ``leap`` command shows INFO).
_CHATTY = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "onnxruntime")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """The exporter prints its progress on stdout and logs its passes: keep the output for an error
    message, and the passes' INFO and WARNING lines (constant folding skipped, ...) out of the command's output."""
    buf = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in _CHATTY}
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _export(wrapper: StudentFeatures, path: str, img_size: int) -> list[str]:
    """``torch.onnx.export`` (dynamo) of ``wrapper`` to ``path``; returns the files written (the graph
    and, for a model over 2 GB, its external data)."""
    before = set(os.listdir(os.path.dirname(path)))
    example = torch.randn(2, 3, img_size, img_size)  # batch 2: a batch of 1 would be specialized
    batch = torch.export.Dim("batch", min=1)
    with _quiet() as printed:
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=list(OUTPUTS),
                dynamic_shapes={"images": {0: batch}},
            )
            program.save(path)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; one message with its last words
            tail = " ".join(printed.getvalue().split()[-40:])
            raise ExportError(
                f"torch.onnx.export (dynamo) failed for this student ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}){'; exporter output: ' + tail if tail else ''}"
            ) from None
    return sorted(set(os.listdir(os.path.dirname(path))) - before)


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> list[np.ndarray]:
    return session.run(list(OUTPUTS), {"images": x.numpy()})


def _random_inputs(img_size: int, batches: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, img_size, img_size, generator=gen) for b in batches]


def _compare(session: Any, wrapper: StudentFeatures, inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Max abs error per output and whether every element is within :data:`TOLERANCE`."""
    errors = dict.fromkeys(OUTPUTS, 0.0)
    scale = dict.fromkeys(OUTPUTS, 0.0)
    ok = True
    for x in inputs:
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(x)]
        got = _run(session, x)
        for name, r, g in zip(OUTPUTS, ref, got):
            if g.shape != r.shape:
                raise ExportError(f"ONNX output {name!r} has shape {g.shape} for batch {len(x)}, PyTorch {r.shape}")
            diff = np.abs(g.astype(np.float64) - r)
            errors[name] = max(errors[name], float(diff.max()))
            scale[name] = max(scale[name], float(np.abs(r).max()))
            ok = ok and bool((diff <= TOLERANCE["atol"] + TOLERANCE["rtol"] * np.abs(r)).all())
    return {"max_abs_error": errors, "max_abs_value": scale, "within_tolerance": ok}


def _error_text(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in errors.items())


def export_onnx_files(
    student: nn.Module,
    path: str,
    img_size: int,
    *,
    int8: bool = False,
    eval_data: str | None = None,
    eval_data_source: str = "auto",
    eval_limit: int | None = None,
    verify_batches: tuple[int, ...] = (1, 3),
) -> tuple[dict[str, Any], list[str]]:
    """Export, check and (``int8``) quantize the student into the folder of ``path`` (a staging folder:
    :func:`leap.apps.export.export_run` renames the files into place).

    Returns:
        ``(export, extra)``: the ``export`` part of the model card (graph, opset, inputs/outputs, check,
        int8 report) and the names of the files written besides ``path`` (external data, the int8 model).

    Raises:
        ExportError: the exporter failed, or onnxruntime's outputs are not within :data:`TOLERANCE`.
    """
    import onnx

    wrapper = StudentFeatures(student.float().eval().cpu()).eval()
    files = _export(wrapper, path, img_size)
    session = _session(path)
    inputs = _random_inputs(img_size, verify_batches)
    check = _compare(session, wrapper, inputs)
    check.update(batches=list(verify_batches), tolerance=dict(TOLERANCE), runtime="onnxruntime CPUExecutionProvider")
    text = _error_text(check["max_abs_error"])
    if not check["within_tolerance"]:
        raise ExportError(
            f"onnxruntime's outputs differ from PyTorch beyond |error| <= 1e-4 + 1e-4 |value| (max abs error: {text}); "
            "nothing was written"
        )
    log.info("ONNX check, onnxruntime vs PyTorch on random inputs (batches %s): max abs error %s", verify_batches, text)
    graph = onnx.load(path, load_external_data=False)
    d, n = int(getattr(student, "embed_dim", 0)), vit.patch_grid(student)[0] * vit.patch_grid(student)[1]
    export: dict[str, Any] = {
        "format": "onnx",
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": {"images": ["batch", 3, img_size, img_size]},
        "outputs": {"cls": ["batch", d], "patch": ["batch", d], "patch_tokens": ["batch", n, d]},
        "check": check,
    }
    extra = [f for f in files if f != os.path.basename(path)]
    if int8:
        report, written = _int8(path, wrapper, inputs, img_size, eval_data, eval_data_source, eval_limit)
        export["int8"] = report
        extra += written
    return export, extra


def _int8(
    path: str,
    wrapper: StudentFeatures,
    inputs: list[torch.Tensor],
    img_size: int,
    eval_data: str | None,
    eval_data_source: str,
    eval_limit: int | None,
) -> tuple[dict[str, Any], list[str]]:
    """Dynamic int8 quantization of the graph at ``path``: ``(report, files written)``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = int8_path(path)
    root = logging.getLogger()
    level = root.level
    try:
        with _quiet():
            root.setLevel(logging.ERROR)  # the quantizer logs each skipped tensor on the root logger
            quantize_dynamic(path, target, weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        raise ExportError(f"onnxruntime dynamic quantization failed ({type(e).__name__}: {e})") from None
    finally:
        root.setLevel(level)
    q = _session(target)
    errors = _compare(q, wrapper, inputs)["max_abs_error"]
    report: dict[str, Any] = {
        "file": os.path.basename(target),
        "method": "onnxruntime.quantization.quantize_dynamic, weight_type=QInt8",
        "bytes": os.path.getsize(target),
        "fp32_bytes": os.path.getsize(path),
        "random_inputs_max_abs_error": errors,
    }
    log.info(
        "int8 model: %.2f MB (fp32 %.2f MB); max abs error on random inputs: %s",
        report["bytes"] / 1e6,
        report["fp32_bytes"] / 1e6,
        _error_text(errors),
    )
    if eval_data is not None:
        report["accuracy"] = compare_on_data(
            lambda x: [t.numpy() for t in wrapper(x)],
            lambda x: _run(q, x),
            img_size,
            eval_data,
            data_source=eval_data_source,
            limit=eval_limit,
        )
    return report, [os.path.basename(target)]


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` pairs, dropping the ``None`` of an image that did not decode."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in kept]), torch.as_tensor([int(b[1]) for b in kept])


def compare_on_data(
    reference: Callable[[torch.Tensor], list[np.ndarray]],
    candidate: Callable[[torch.Tensor], list[np.ndarray]],
    img_size: int,
    data: str,
    *,
    data_source: str = "auto",
    limit: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
) -> dict[str, Any]:
    """kNN top-1 of two feature functions on a labelled set, ``leap eval knn``'s protocol.

    Args:
        reference, candidate: ``images (B, 3, H, W) -> [cls (B, D), patch (B, D), ...]`` as numpy.
        img_size: the model's resolution (the evaluation transform).
        data, data_source: a labelled set with a held-out split (:func:`leap.evaluation.linear.open_splits`).
        limit: at most this many images of each split.

    Returns:
        ``{"data": {...}, "k", "temperature", "cls"|"patch": {"fp32": top1, "int8": top1, "change": int8 - fp32}}``.
    """
    from torch.utils.data import DataLoader

    from ..evaluation.knn import knn_accuracy
    from ..evaluation.linear import limit as first_n
    from ..evaluation.linear import open_splits

    splits = open_splits(data, img_size, source=data_source)
    train, val = first_n(splits.train, limit), first_n(splits.val, limit)

    def features(ds) -> dict[str, Any]:
        out: dict[str, list] = {"ref_cls": [], "ref_patch": [], "cand_cls": [], "cand_patch": [], "labels": []}
        for images, labels in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_collate):
            if not len(labels):
                continue
            with torch.no_grad():
                r, c = reference(images.float()), candidate(images.float())
            out["ref_cls"].append(r[0])
            out["ref_patch"].append(r[1])
            out["cand_cls"].append(c[0])
            out["cand_patch"].append(c[1])
            out["labels"].append(labels)
        return {k: (torch.cat(v) if k == "labels" else torch.from_numpy(np.concatenate(v))) for k, v in out.items()}

    tr, va = features(train), features(val)
    norm = torch.nn.functional.normalize
    result: dict[str, Any] = {
        "data": {
            "path": os.path.abspath(data),
            "kind": splits.kind,
            "train_images": len(train),
            "val_images": len(val),
        },
        "protocol": "knn",
        "k": k,
        "temperature": temperature,
    }
    for kind in ("cls", "patch"):
        top1 = {
            who: knn_accuracy(
                norm(tr[f"{pre}_{kind}"].float(), dim=1),
                tr["labels"],
                norm(va[f"{pre}_{kind}"].float(), dim=1),
                va["labels"],
                k=k,
                temperature=temperature,
            )
            for who, pre in (("fp32", "ref"), ("int8", "cand"))
        }
        result[kind] = {**top1, "change": top1["int8"] - top1["fp32"]}
    log.info(
        "int8 vs fp32 kNN top-1 on %s: cls %.2f%% -> %.2f%%, patch %.2f%% -> %.2f%%",
        data,
        100 * result["cls"]["fp32"],
        100 * result["cls"]["int8"],
        100 * result["patch"]["fp32"],
        100 * result["patch"]["int8"],
    )
    return result
