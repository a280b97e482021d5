"""LEAP trainer: truncated teacher, adaptive curriculum, training loop."""


# Trainer API (imported lazily so `import leap` and `leap --help` stay fast):
#   leap.TrainConfig, leap.Trainer; the function is leap.train.train(config) -> summary dict
#   (`leap.train` is the submodule, so it cannot also be the function).
__all__ = ["TrainConfig", "Trainer"]


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Trainer":
        import importlib

        return importlib.import_module(f"{__name__}.train").Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
