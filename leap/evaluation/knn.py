"""k-nearest-neighbour accuracy of frozen features (``leap eval knn``, :func:`leap.evaluation.run.evaluate_knn`).

Features (from :func:`leap.evaluation.features.extract_features`) are L2-normalised; each test
image votes among its ``k`` most cosine-similar training images with weights ``exp(sim / T)``
(the weighted kNN of DINO; ``T`` = 0.07).
"""

from __future__ import annotations

import torch

__all__ = ["knn_accuracy"]


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted cosine kNN top-1 accuracy. Features ``(N, D)`` already L2-normalised."""
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    k = min(k, train_features.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start : start + chunk] @ train_features.T  # (chunk, N_train)
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return correct / test_features.shape[0]
