"""Depth-pruning baselines from the literature, on any registered model, saved as checkpoints.

With n the number of blocks the model loses (block i turns feature(i-1) into feature(i)):

* ``tail``: drop the last n blocks (chip-tuning without a chip);
* ``shortgpt``: drop the n blocks of lowest Block Influence, mean 1 - cos(block input, output);
* ``angular`` (Gromov et al.): drop blocks l+1..l+n of smallest last-token angular distance;
* ``streamline`` (LLM-Streamline): replace the n+1 most similar consecutive blocks by one trained block;
* ``slm`` (sliding layer merging), ``laco`` (layer collapse): merge consecutive blocks by parameter
  arithmetic while the model's output stays above a cosine threshold.

The model is cut with chip-tuning's surgery and saved as a plain Hugging Face checkpoint with
``pruning.json``. Names load lazily: the CLI reads :data:`METHODS` and :data:`DEFAULTS` without torch.
"""

from __future__ import annotations

from typing import Any

from chiptuning.prune import lazy_exports

METHODS = ("tail", "shortgpt", "angular", "streamline", "slm", "laco")
#: Defaults of the method options (each documented on its ``plan_*`` function).
DEFAULTS: dict[str, dict[str, Any]] = {
    "streamline": {"replacement": "layer", "epochs": 10, "lr": 5e-4, "holdout": 0.2, "seed": 0},
    "slm": {"threshold": 0.9},
    "laco": {"threshold": 0.9, "merge_layers": 4, "interval": 2},
}

_MODULES = {
    "apply": ("DepthPruningRecord", "RECORD_FILE", "apply_plan_", "check_reload", "generation_check",
              "n_from_ratio", "plan_method", "prune_with_method", "read_record", "save_pruned_model"),
    "calibration": ("Calibration", "LayerStats", "angular_distances_from_cache", "block_influence_from_cache",
                    "calibration_from_task", "layer_stats"),
    "drop": ("plan_angular", "plan_shortgpt", "plan_tail"),
    "merging": ("merge_blocks", "plan_laco", "plan_slm"),
    "plan": ("Plan", "select_lowest"),
    "streamline": ("attention_output_projections", "capture_span", "mse_over", "plan_streamline",
                   "train_replacement"),
    "chiptuning.prune.truncate": ("rebuild_blocks_", "remove_blocks_"),
}
__all__ = sorted(["DEFAULTS", "METHODS", *(name for names in _MODULES.values() for name in names)])
__getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())
