"""Chips: tiny per-layer classifiers trained from an activation cache (never imports transformers).

``train_chips`` trains a chip at every layer (torch chips batched across layers, or scikit-learn
logistic regression in parallel), ``select_layer`` picks the pruning layer, ``load_chips`` /
``load_chip`` read what they wrote. See ``docs/ARCHITECTURE.md``.
"""

from chiptuning.probe.artifacts import (
    ChipRecord,
    ChipSet,
    ChipsRecord,
    is_pickle,
    load_chip,
    load_chips,
    plot_layer_accuracy,
)
from chiptuning.probe.cascade import describe_exits
from chiptuning.probe.chips import CHIP_KINDS, LinearChip, LogRegChip, MLPChip, make_chip, optional_class_mask
from chiptuning.probe.select import STRATEGIES, pruning_stats, select_layer
from chiptuning.probe.train import REGIMES, TrainConfig, train_chips

__all__ = [
    "CHIP_KINDS",
    "ChipRecord",
    "ChipsRecord",
    "REGIMES",
    "STRATEGIES",
    "ChipSet",
    "LinearChip",
    "LogRegChip",
    "MLPChip",
    "TrainConfig",
    "describe_exits",
    "is_pickle",
    "load_chip",
    "load_chips",
    "make_chip",
    "optional_class_mask",
    "plot_layer_accuracy",
    "pruning_stats",
    "select_layer",
    "train_chips",
]
