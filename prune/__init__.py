"""The prune stage: truncate a model after the chip's layer and ship it as a checkpoint.

* :func:`truncate_` - in-place model surgery (blocks, config depth, per-layer config, layer ids);
* :func:`prune` - chips directory + model -> pruned checkpoint directory (``chiptuning prune``);
* :class:`ChipModel` - load a pruned checkpoint and predict from raw text;
* :func:`evaluate` - run a checkpoint end to end on a labelled file (``chiptuning eval``).

Names resolve lazily, so ``chiptuning.prune.truncate`` needs only torch and the registry (the
benchmarks run it where the cache's h5py or the tasks' datasets are not installed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PROVENANCE_FILE": "provenance",
    "ChipModel": "chip_model",
    "TaskChip": "checkpoint",
    "evaluate": "evaluation",
    "load_task_chips": "checkpoint",
    "prune": "checkpoint",
    "push_to_hub": "hub",
    "read_provenance": "provenance",
    "save_pruned": "checkpoint",
    "truncate_": "truncate",
    "verify_checksums": "provenance",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chiptuning.prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chiptuning.prune.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
