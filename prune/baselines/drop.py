"""Methods that delete blocks: ``tail``, ``shortgpt`` (Block Influence) and ``angular`` (Gromov et al.)."""

from __future__ import annotations

import numpy as np

from chiptuning.errors import ChipTuningError
from chiptuning.prune.baselines.calibration import (
    Calibration,
    angular_distances_from_cache,
    block_influence_from_cache,
    layer_stats,
)
from chiptuning.prune.baselines.plan import Plan, check_n, kept_groups, select_lowest
from chiptuning.registry import num_blocks


def plan_tail(model, n: int) -> Plan:
    """Drop the last ``n`` blocks."""
    L = num_blocks(model)
    check_n(n, L, "tail")
    removed = list(range(L - n + 1, L + 1))
    return Plan("tail", kept_groups(L, removed), removed)


def plan_shortgpt(model, n: int, tokenizer=None, calibration: Calibration | None = None, cache=None) -> Plan:
    """Remove the ``n`` blocks of lowest Block Influence: over all real tokens of ``calibration``,
    or at the last token, straight from ``cache``."""
    L = num_blocks(model)
    check_n(n, L, "shortgpt")
    if cache is not None:
        bi, source = block_influence_from_cache(cache), "cache (last token)"
    elif calibration is not None:
        bi, source = layer_stats(model, tokenizer, calibration).block_influence, "calibration (all tokens)"
    else:
        raise ChipTuningError("shortgpt needs calibration text or a cache")
    removed = select_lowest(bi, n)
    return Plan("shortgpt", kept_groups(L, removed), removed,
                {"block_influence": [float(x) for x in bi], "scores_from": source})


def plan_angular(model, n: int, tokenizer=None, calibration: Calibration | None = None, cache=None) -> Plan:
    """Remove the ``n`` blocks l+1..l+n of smallest last-token angular distance d(x_l, x_{l+n}),
    from ``cache`` (exact) or from ``calibration``."""
    L = num_blocks(model)
    check_n(n, L, "angular")
    if cache is not None:
        d, source = angular_distances_from_cache(cache, n), "cache (last token)"
    elif calibration is not None:
        d, source = layer_stats(model, tokenizer, calibration, spans=[n]).span_angular_last[n], "calibration (last token)"
    else:
        raise ChipTuningError("angular needs calibration text or a cache")
    start = int(np.argmin(d))
    removed = list(range(start + 1, start + n + 1))
    return Plan("angular", kept_groups(L, removed), removed,
                {"angular_distance": [float(x) for x in d], "start_layer": start, "scores_from": source})
