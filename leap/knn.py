"""k-nearest-neighbour evaluation of frozen features (``leap eval knn``).

Features are the model's final-norm CLS token or the mean of its final-norm patch
tokens, L2-normalised; each test image votes among its ``k`` most cosine-similar
training images with weights ``exp(sim / T)`` (the weighted kNN of DINO; ``T`` = 0.07).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = ("cls", "mean-patch")


@torch.no_grad()
def extract_features(model: nn.Module, loader, device,
                     features: tuple[str, ...] = ("cls",)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass over ``loader``; returns ``({feature: (N, D) fp32 L2-normalised}, labels (N,))``
    for a timm ViT (``features`` from :data:`FEATURES`)."""
    for feature in features:
        if feature not in FEATURES:
            raise ValueError(f"feature: expected one of {FEATURES}, got {feature!r}")
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    labels = []
    dtype = next(model.parameters()).dtype
    prefix = getattr(model, "num_prefix_tokens", 1)
    for images, y in loader:
        tokens = model.forward_features(images.to(device, dtype))  # (B, prefix + patches, D), final norm applied
        pooled = {"cls": lambda: tokens[:, 0], "mean-patch": lambda: tokens[:, prefix:].mean(dim=1)}
        for feature in features:
            feats[feature].append(F.normalize(pooled[feature]().float(), dim=-1).cpu())
        labels.append(y.cpu())
    return {f: torch.cat(v) for f, v in feats.items()}, torch.cat(labels)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted cosine kNN top-1 accuracy. Features ``(N, D)`` already L2-normalised."""
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    k = min(k, train_features.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start:start + chunk] @ train_features.T  # (chunk, N_train)
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return correct / test_features.shape[0]


def evaluate_knn(model: nn.Module, train_loader, test_loader, device, *, k: int = 20, temperature: float = 0.07,
                 features: tuple[str, ...] = ("cls",)) -> dict[str, float]:
    """kNN top-1 accuracy per feature kind, each split read once."""
    train_f, train_y = extract_features(model, train_loader, device, features)
    test_f, test_y = extract_features(model, test_loader, device, features)
    return {f: knn_accuracy(train_f[f], train_y, test_f[f], test_y, k=k, temperature=temperature) for f in features}


# ----------------------------------------------------------------------------- CLI: leap eval knn


def load_model_for_eval(checkpoint: str, *, model: str | None = None, model_overrides: dict | None = None,
                        img_size: int | None = None) -> tuple[nn.Module, int, str]:
    """Builds the model a checkpoint holds; returns ``(model, img_size, description)``.

    Reads a ``leap distill`` checkpoint (the student), a ``leap train-teacher`` checkpoint, or,
    with ``model`` given, any weights file :func:`leap.models.load_teacher_weights` reads.
    """
    from .checkpoint import CHECKPOINT_FORMAT, read_torch_file
    from .errors import CheckpointError
    from .models import build_model, load_teacher_weights
    from .pretrain import TEACHER_META_KEY

    obj = read_torch_file(checkpoint, "checkpoint")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        cfg = obj["config"]
        size = img_size or cfg["img_size"]
        net = build_model(cfg["student"], img_size=size, **(cfg.get("student_overrides") or {}))
        net.load_state_dict(obj["student"])
        return net, size, f"student {cfg['student']} from leap distill checkpoint (step {obj.get('step')})"
    if isinstance(obj, dict) and TEACHER_META_KEY in obj and model is None:
        meta = obj[TEACHER_META_KEY]
        size = img_size or meta["img_size"]
        net = build_model(meta["model"], img_size=size, **(meta.get("model_overrides") or {}))
        load_teacher_weights(net, checkpoint)
        return net, size, f"teacher {meta['model']} from leap train-teacher checkpoint"
    if model is None:
        raise CheckpointError(
            f"{checkpoint} is neither a `leap distill` nor a `leap train-teacher` checkpoint; "
            "pass --model NAME (and --model-overrides, --img-size) to read other weights")
    size = img_size or 224
    net = build_model(model, img_size=size, **(model_overrides or {}))
    fmt = load_teacher_weights(net, checkpoint)
    return net, size, f"{model} ({fmt} weights)"


def main_eval(argv=None) -> int:
    import argparse
    import json

    from . import data as leap_data
    from .cli.options import Formatter, add_config_options
    from .config import parse_json_object

    parser = argparse.ArgumentParser(
        prog="leap eval",
        description="Evaluate frozen features. `leap eval knn`: weighted cosine kNN top-1 accuracy "
                    "(k=20, T=0.07) of a checkpoint's features on a labelled train/test source.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    knn = sub.add_parser("knn", help="kNN accuracy on frozen features",
                         formatter_class=Formatter)
    knn.add_argument("--checkpoint", required=True,
                     help="leap distill checkpoint.pt (the student), leap train-teacher file, or any weights with --model")
    add_config_options(knn, ["data", "data_source"], help={
        "data": "labelled data: image folder with train/ and test|val/, or Fashion-MNIST idx files"})
    knn.add_argument("--model", default=None, help="model name, for weights files without a recipe")
    knn.add_argument("--model-overrides", default=None, help="JSON dict of timm kwargs for --model")
    add_config_options(knn, ["img_size"], defaults={"img_size": None},
                       help={"img_size": "input resolution (default: the checkpoint's training size)"})
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default: 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default: 0.07)")
    knn.add_argument("--feature", choices=FEATURES, default="cls", help="feature evaluated (default: cls)")
    knn.add_argument("--test-split", default="test", help="split evaluated (image folders: e.g. val) (default: test)")
    knn.add_argument("--limit-train", type=int, default=None, help="first N training images as the memory bank")
    knn.add_argument("--limit-test", type=int, default=None)
    add_config_options(knn, ["batch_size", "workers", "device"], defaults={"batch_size": 256, "workers": 0},
                       help={"batch_size": "images per forward pass", "workers": "DataLoader worker processes"})
    knn.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    overrides = parse_json_object(args.model_overrides, "--model-overrides") if args.model_overrides else None
    net, size, description = load_model_for_eval(args.checkpoint, model=args.model, model_overrides=overrides,
                                                 img_size=args.img_size)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    net = net.to(device)
    test_split = args.test_split
    loaders = []
    for split, limit in (("train", args.limit_train), (test_split, args.limit_test)):
        ds = leap_data.build_dataset(args.data_source, args.data, split, size, augment=False)
        if limit is not None:
            ds = leap_data.FirstN(ds, limit)
        loaders.append(leap_data.build_loader(ds, args.batch_size, shuffle=False, num_workers=args.workers,
                                              drop_last=False))
    accuracy = evaluate_knn(net, loaders[0], loaders[1], device, k=args.k, temperature=args.temperature,
                            features=(args.feature,))[args.feature]
    result = {"checkpoint": args.checkpoint, "model": description, "feature": args.feature, "k": args.k,
              "train_images": len(loaders[0].dataset), "test_images": len(loaders[1].dataset),
              "knn_top1": accuracy}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"kNN (k={args.k}, {args.feature}) top-1: {accuracy * 100:.2f}% on {result['test_images']} test images "
              f"[{description}]")
    return 0
