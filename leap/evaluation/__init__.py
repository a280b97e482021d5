"""Evaluations of frozen features: the LEAP paper's linear probe, revisitop retrieval mAP, kNN, accuracy
under common corruptions, the linear segmentation probe.

Modules:

- :mod:`~leap.evaluation.features`: loading a model (run directory, checkpoint, teacher at block K,
  raw pixels), one-pass CLS + mean-patch feature extraction, the disk cache;
- :mod:`~leap.evaluation.transforms`: the evaluation transforms (Resize 256 -> CenterCrop 224) and their ids;
- :mod:`~leap.evaluation.linear`: the paper's linear probe and the train/val splits;
- :mod:`~leap.evaluation.retrieval`: revisitop ground truth (restricted unpickler, JSON), mAP at
  Easy/Medium/Hard, the two retrieval transforms;
- :mod:`~leap.evaluation.knn`: the weighted cosine kNN accuracy;
- :mod:`~leap.evaluation.robustness`: the 15 ImageNet-C corruptions (seeded, cached) under the clean probe;
- :mod:`~leap.evaluation.segmentation`: the linear segmentation probe on patch tokens, mIoU;
- :mod:`~leap.evaluation.records`: the ``RUN_DIR/eval.jsonl`` records;
- :mod:`~leap.evaluation.common`: what every protocol does alike (cache, record, a run's checkpoints);
- :mod:`~leap.evaluation.run`: every evaluation end to end (``evaluate_NAME``).

The command line is :mod:`leap.cli.evaluate` (``leap eval linear | retrieval | knn | robustness |
segmentation``). The modules import the trainer's pieces they use (models, checkpoints, data) directly:
those sit below the evaluation.

Submodules are imported on use (``import leap.evaluation`` stays light).
"""

from .errors import EvaluationError

__all__ = ["EvaluationError"]
