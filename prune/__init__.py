"""The prune stage: cut a model after the chip's layer (``truncate.py``), package it (:func:`prune`, its
provenance record, card, export and :func:`push_to_hub`), serve it (:class:`ChipModel`, :func:`evaluate`);
the depth-pruning baselines (``baselines/``). Names resolve lazily: ``truncate`` needs only torch."""

from __future__ import annotations

import importlib
import warnings

_MODULES = {
    "provenance": ("PROVENANCE_FILE", "CheckpointRecord", "load_record", "read_provenance", "verify_checksums"),
    "checkpoint": ("PrunedTask", "load_task_chips", "prune", "save_pruned"),
    "chip_model": ("ChipModel",), "evaluation": ("evaluate",), "hub": ("push_to_hub",), "truncate": ("truncate_",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


_RENAMED = {"TaskChip": "PrunedTask"}  # old name -> new name


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f"chiptuning.prune.{name} is now {_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return __getattr__(_RENAMED[name])
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chiptuning.prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chiptuning.prune.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
