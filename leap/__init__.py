"""LEAP trainer: truncated teacher, adaptive curriculum, training loop, the ``leap`` command.

Module map (one concern per module; :mod:`leap.errors` and :mod:`leap.config` import no
other ``leap`` module that needs torch):

==================  ==========================================================================
``errors``          the exception types (user-facing ones map to exit status 2 in the CLI)
``config``          :class:`TrainConfig`: every option with its type, default, help, choices
``runlog``          the run directory's files: JSONL writer/reader, summary, typed log view
``models``          building timm ViTs, loading teacher checkpoints (DINOv2, HF, timm layouts)
``teacher``         :class:`~leap.teacher.TruncatedTeacher`: blocks ``1..k`` only, early exit
``cka``             linear CKA (device, no sync) and its float64 reference
``curriculum``      the target-block controller (calibration, EMA, threshold, timeout)
``data``            image sources, augmentation, mixup, the resumable sampler
``optim``           LARS, parameter groups, the warmup-cosine schedule
``distill``         :class:`~leap.distill.DistillModule` (student + head + loss), counting teacher
``distributed``     the process group life cycle, all-reduce helpers, device choice
``checkpoint``      the checkpoint layout, atomic save, validated load, RNG states
``build``           what a run is built from: data, models, optimizer and schedule
``runstats``        typed ``StepResult`` / ``RunStats``
``train``           :class:`Trainer`: the loop (resume, steps, epoch ends, checkpoints, summary)
``cost``            the analytic cost model (per-image FLOPs, savings, per-epoch counters)
``timing``          measured step times and the wall-clock saving of a trajectory
``report``          plots and ``report.md`` of a run directory
``knn``, ``pretrain``, ``demo``   kNN accuracy, the demo teacher's training, the demo
``evaluation``      ``leap eval``: linear probe, revisitop retrieval, kNN on cached features
``cli``             the ``leap`` command; ``cli.options`` generates options from ``TrainConfig``
==================  ==========================================================================
"""

# Imported lazily so `import leap` and `leap --help` stay fast:
#   leap.TrainConfig, leap.Trainer; the function is leap.train.train(config) -> summary dict
#   (`leap.train` is the submodule, so it cannot also be the function).
__all__ = ["TrainConfig", "Trainer", "__version__"]


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Trainer":
        import importlib

        return importlib.import_module(f"{__name__}.train").Trainer
    if name == "__version__":  # one version for the distribution: leap_kernels.__version__
        from leap_kernels import __version__

        return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
