"""chip-tuning: prune a language model for one classification task.

Stages: ``chiptuning.extract`` (model -> HDF5 cache), ``chiptuning.cache`` (the cache format),
``chiptuning.probe`` (chips trained from the cache), ``chiptuning.prune`` (truncated checkpoint).
"""

__version__ = "0.1.0"

__all__ = ["ChipModel", "__version__"]


def __getattr__(name):
    if name == "ChipModel":  # imported on first use: `import chiptuning` (and `--help`) loads no torch
        from chiptuning.prune import ChipModel

        return ChipModel
    raise AttributeError(f"module 'chiptuning' has no attribute {name!r}")
