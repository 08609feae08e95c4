"""chip-tuning: prune a language model for one classification task.

Stages: ``chiptuning.extract`` (model -> HDF5 cache), ``chiptuning.cache`` (the cache format),
``chiptuning.probe`` (chips trained from the cache), ``chiptuning.prune`` (truncated checkpoint).
"""

__version__ = "0.1.0"

__all__ = ["ChipModel", "__version__"]


def __getattr__(name):
    # Lazy so that `import chiptuning` (and `chiptuning --help`) does not import torch/transformers.
    if name == "ChipModel":
        from chiptuning.prune import ChipModel  # on first use: `import chiptuning` stays light

        return ChipModel
    raise AttributeError(f"module 'chiptuning' has no attribute {name!r}")
