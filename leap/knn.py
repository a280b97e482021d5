"""k-nearest-neighbour accuracy of frozen features (used by ``leap eval knn`` in :mod:`leap.evaluation`).

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
