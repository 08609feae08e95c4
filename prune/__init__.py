"""The prune stage: cut a model after the chip's layer, package it, serve it.

* surgery: :func:`truncate_` (``truncate.py``) - blocks, config depth, per-layer config, layer ids;
* packaging: :func:`prune` / :func:`save_pruned` (``checkpoint.py``), the provenance record
  (``provenance.py``), the model card (``card.py``), export to ``*ForSequenceClassification``
  (``export.py``) and :func:`push_to_hub` (``hub.py``);
* serving: :class:`ChipModel` (``chip_model.py``), :func:`evaluate` (``evaluation.py``) and the
  dense comparison (``dense.py``);
* the depth-pruning baselines (``baselines/``).

Names resolve lazily, so ``chiptuning.prune.truncate`` needs only torch and the registry (the
benchmarks run it where the cache's h5py or the tasks' datasets are not installed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PROVENANCE_FILE": "provenance",
    "ChipModel": "chip_model",
    "CheckpointRecord": "provenance",
    "TaskChip": "checkpoint",
    "evaluate": "evaluation",
    "load_record": "provenance",
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
