"""LEAP trainer: truncated teacher, adaptive curriculum, training loop, the ``leap`` command.

Layout (one concern per module or folder; lower rows never import upper ones; :mod:`leap.errors`
and :mod:`leap.config` import no other ``leap`` module that needs torch):

==================  ==========================================================================
``errors``          the exception types and the command's exit codes
``config``          :class:`TrainConfig` (every option with its type, default, help, choices),
                    :class:`TeacherTrainConfig`
``runlog``          the run directory's files: JSONL writer/reader, atomic writes, typed log view
``precision``       precision names -> dtypes, the ``auto`` rule, the teacher's dtype and autocast
``vit``             the one adapter over a timm ViT's internals (embedding, blocks, final norm)
``models``          building timm ViTs (DINOv2 and DINOv3 names); ``weights``: teacher checkpoint layouts
``hub``             ``hf-hub:ORG/NAME`` and ``timm/NAME`` model names, from the local Hugging Face cache
``teacher``         :class:`~leap.teacher.TruncatedTeacher`: blocks ``1..k`` only, early exit
``cka``             linear CKA (device, no sync) and its float64 reference
``curriculum``      the target-block controller and its :class:`~leap.curriculum.LevelUp` events
``level_up``        what a level-up does besides the target: lr restarts, head resets
``data/``           image sources, transforms and mixup, the resumable sampler and loader
``optim``           LARS, parameter groups, the warmup-cosine schedule
``objective``       :class:`~leap.objective.DistillModule` (student + head + loss), counting teacher
``distributed``     the process group life cycle, all-reduce helpers, device choice
``checkpoint``      the checkpoint layout, atomic save, validated load, RNG states
``cost``            the analytic cost model (per-image FLOPs, savings, per-epoch counters)
``run/``            a training run: build, loop (:class:`Trainer`), guard, stats, timing
``evaluation/``     frozen-feature evaluations: linear probe, revisitop retrieval, kNN
``apps/``           report, plotting, pretrain (the demo teacher), demo, experiment, export, the
                    Python API (``apps.api``: ``leap.distill``, ``leap.evaluate``, ``leap.export``)
``cli/``            the ``leap`` command: one module per command, ``cli.command`` their shape
==================  ==========================================================================
"""

# Imported lazily so `import leap` and `leap --help` stay fast:
#   leap.TrainConfig, leap.Trainer; the function is leap.run.loop.train(config) -> summary dict;
#   the Python API leap.distill(...), leap.evaluate(...), leap.export(...) (leap.apps.api).
__all__ = ["TrainConfig", "Trainer", "__version__", "distill", "evaluate", "export"]


def __getattr__(name):
    if name in ("distill", "evaluate", "export"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.apps.api"), name)
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Trainer":
        import importlib

        return importlib.import_module(f"{__name__}.run.loop").Trainer
    if name == "__version__":  # one version for the distribution: leap_kernels.__version__
        from leap_kernels import __version__

        return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
