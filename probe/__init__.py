"""Chips: tiny per-layer classifiers trained from an activation cache (never imports transformers).

``train_chips`` trains a chip at every layer, ``select_layer`` picks the pruning layer,
``load_chips`` / ``load_chip`` read what they wrote; see ``docs/ARCHITECTURE.md``.
"""

from chiptuning.errors import renamed
from chiptuning.probe.cascade import describe_exits
from chiptuning.probe.chips import CHIP_KINDS, LinearChip, LogRegChip, MLPChip, make_chip
from chiptuning.probe.chipset import ChipSet, check_chips_on_cache, is_pickle, load_chip, load_chips
from chiptuning.probe.data import optional_class_mask
from chiptuning.probe.plots import plot_layer_accuracy
from chiptuning.probe.records import (
    CacheRef,
    Cascade,
    ChipsRecord,
    LayerChipRecord,
    MetricRow,
    PruningStats,
    Selection,
    Simulated,
    ZeroShot,
)
from chiptuning.probe.select import STRATEGIES, pruning_stats, select_layer
from chiptuning.probe.train import REGIMES, TrainConfig, train_chips

__all__ = ["CHIP_KINDS", "REGIMES", "STRATEGIES", "CacheRef", "Cascade", "ChipSet", "ChipsRecord", "LayerChipRecord",
           "LinearChip", "LogRegChip", "MLPChip", "MetricRow", "PruningStats", "Selection", "Simulated", "TrainConfig",
           "ZeroShot", "check_chips_on_cache", "describe_exits", "is_pickle", "load_chip", "load_chips", "make_chip",
           "optional_class_mask", "plot_layer_accuracy", "pruning_stats", "select_layer", "train_chips"]

__getattr__ = renamed(__name__, {"ChipRecord": "LayerChipRecord"}, globals())
