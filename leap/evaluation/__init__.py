"""Evaluations of frozen features: the LEAP paper's linear probe, revisitop retrieval mAP, kNN.

Modules:

- :mod:`~leap.evaluation.features`: loading a model (run directory, checkpoint, teacher at block K,
  raw pixels), the evaluation transform, one-pass CLS + mean-patch feature extraction, the disk cache;
- :mod:`~leap.evaluation.linear`: the paper's linear probe and the train/val splits;
- :mod:`~leap.evaluation.retrieval`: revisitop ground truth (restricted unpickler, JSON), mAP at
  Easy/Medium/Hard;
- :mod:`~leap.evaluation.knn`: the weighted cosine kNN accuracy;
- :mod:`~leap.evaluation.records`: the ``RUN_DIR/eval.jsonl`` records;
- :mod:`~leap.evaluation.run`: the three evaluations end to end.

The command line is :mod:`leap.cli.evaluate` (``leap eval linear | retrieval | knn``). The
modules import the trainer's pieces they use (models, checkpoints, data) directly: those
sit below the evaluation.

Submodules are imported on use (``import leap.evaluation`` stays light).
"""

from .errors import EvaluationError

__all__ = ["EvaluationError"]
