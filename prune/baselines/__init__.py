"""Depth-pruning baselines from the literature, on any registered model, saved as checkpoints.

Chip-tuning claims to beat general-purpose depth pruning on classification; this module lets a
user check that claim on their own model and task. Each method decides which blocks to remove
(or merge, or replace) from calibration text or from an activation cache, then the model is cut
with the same surgery as chip-tuning (:func:`chiptuning.prune.truncate.truncate_`: config depth,
per-layer config lists, attention ``layer_idx``) and saved as a plain Hugging Face checkpoint.

Methods (``METHODS``), with n = the number of blocks the model loses:

* ``tail`` - drop the last n blocks; the final norm and LM head stay (chip-tuning without a chip).
* ``shortgpt`` - Block Influence BI_i = mean over real calibration tokens of
  1 - cos(input of block i, output of block i); remove the n blocks with the lowest BI (possibly
  not contiguous). With a cache, the last-token approximation is computed straight from it.
* ``angular`` (Gromov et al.) - d(l, n) = mean over examples of arccos(cos(x_l, x_{l+n})) / pi at
  the last token; remove blocks l+1..l+n for the smallest d. Exact from a last-token cache.
* ``streamline`` (LLM-Streamline) - the n+1 consecutive blocks whose input and output are most
  similar (cosine over all real tokens) are replaced by one trained block: MSE from the span's
  input to its output on calibration hidden states. ``replacement="layer"``: a transformer block
  initialised from the first removed block; ``"mlp"``: the same block with its attention output
  projection zeroed and frozen, so it computes exactly ``x + MLP(norm(x))`` in pre-norm models
  (a single MLP) while staying a standard layer that plain transformers loads and that generates
  with a KV cache.
* ``slm`` (sliding layer merging) - from the top down, grow a window of consecutive layers while
  the model with the window merged into one layer keeps its output on calibration text above a
  cosine threshold; merge by parameter arithmetic (base + sum of differences); repeat.
* ``laco`` (LaCo, layer collapse) - from the top down, merge ``merge_layers`` consecutive layers
  into the lowest one (same arithmetic) when the merged model's output similarity stays above
  the threshold, then step down ``interval`` layers; otherwise step down one.

For ``slm`` and ``laco`` with a target n, a sweep that ends short of the target is repeated with
the threshold lowered to the best similarity the previous sweep rejected, so the target is always
met and the thresholds actually used are recorded.

Block numbers follow the layer convention of :mod:`chiptuning.features`: block i (1..L) turns
feature(i-1) into feature(i).
"""

from chiptuning.prune.baselines.apply import (
    DEFAULTS,
    METHODS,
    RECORD_FILE,
    DepthPruningRecord,
    apply_plan_,
    check_reload,
    generation_check,
    n_from_ratio,
    plan_method,
    prune_with_method,
    read_record,
    save_pruned_model,
)
from chiptuning.prune.baselines.calibration import (
    Calibration,
    LayerStats,
    angular_distances_from_cache,
    block_influence_from_cache,
    calibration_from_task,
    layer_stats,
)
from chiptuning.prune.baselines.drop import plan_angular, plan_shortgpt, plan_tail
from chiptuning.prune.baselines.merging import merge_blocks, plan_laco, plan_slm
from chiptuning.prune.baselines.plan import Plan, select_lowest
from chiptuning.prune.baselines.streamline import (
    attention_output_projections,
    capture_span,
    mse_over,
    plan_streamline,
    train_replacement,
)
from chiptuning.prune.truncate import rebuild_blocks_, remove_blocks_

__all__ = [
    "DEFAULTS",
    "DepthPruningRecord",
    "METHODS",
    "RECORD_FILE",
    "Calibration",
    "LayerStats",
    "Plan",
    "angular_distances_from_cache",
    "attention_output_projections",
    "apply_plan_",
    "block_influence_from_cache",
    "calibration_from_task",
    "capture_span",
    "check_reload",
    "generation_check",
    "layer_stats",
    "merge_blocks",
    "mse_over",
    "n_from_ratio",
    "plan_angular",
    "plan_laco",
    "plan_method",
    "plan_shortgpt",
    "plan_slm",
    "plan_streamline",
    "plan_tail",
    "prune_with_method",
    "read_record",
    "rebuild_blocks_",
    "remove_blocks_",
    "save_pruned_model",
    "select_lowest",
    "train_replacement",
]
