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


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]], namespace: dict,
                 renamed: dict[str, str] | None = None):
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose names (``modules``: module -> names; a
    module without a dot is one of the package's) are imported on first use into its ``namespace``;
    ``renamed`` (old name -> new) answers old names with a DeprecationWarning."""
    exports = {name: module for module, names in modules.items() for name in names}
    renamed = renamed or {}

    def __getattr__(name: str):
        if name in renamed:
            warnings.warn(f"{package}.{name} is now {renamed[name]}", DeprecationWarning, stacklevel=2)
            return __getattr__(renamed[name])
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        value = getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        namespace[name] = value  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals(), renamed={"TaskChip": "PrunedTask"})
