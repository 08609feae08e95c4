"""Methods that merge consecutive blocks by parameter arithmetic: ``slm`` (sliding layer merging)
and ``laco`` (layer collapse).

Both accept a merge when the model's output stays at least ``threshold`` similar to the original
(:class:`~chiptuning.prune.baselines.calibration.OutputSimilarity`). Given a target number of
blocks to lose, a sweep that falls short is followed by another at a lower threshold: the k-th
highest similarity the sweep rejected, k being the number of blocks still to lose, so the next
sweep can accept about as many merges as are missing (never more than the target: merging stops
there). Every threshold used is recorded in the plan's details.

On a streamed model (:func:`chiptuning.models.load_model` with ``offload="stream"``) a merge reads
only the blocks of its window, one at a time, and each similarity pass streams every block that is
not a merge: the merged blocks are the only weights the plan holds in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from chiptuning.errors import ChipTuningError
from chiptuning.models import is_streamed, materialized_copy
from chiptuning.prune.baselines.calibration import Calibration, OutputSimilarity
from chiptuning.prune.baselines.plan import Plan, check_n
from chiptuning.registry import get_blocks, num_blocks

log = logging.getLogger(__name__)


def merge_blocks(blocks: Sequence[nn.Module]) -> nn.Module:
    """One block from consecutive blocks: theta = theta_base + sum_j (theta_j - theta_base).

    The base is the first (lowest) block; every floating-point parameter is merged, buffers are
    the base's. A single block is returned as a copy. Streamed blocks stay streamed: their weights
    are read one block at a time (:func:`~chiptuning.models.materialized_copy`), so a merge
    holds the result, the base and one other block, however wide the window.
    """
    merged = materialized_copy(blocks[0])
    base = {name: p.detach().float() for name, p in merged.named_parameters() if p.is_floating_point()}
    total = {name: value.clone() for name, value in base.items()}
    for block in blocks[1:]:
        other = dict((materialized_copy(block) if is_streamed(block) else block).named_parameters())
        for name, value in total.items():
            value += other[name].detach().float() - base[name]
        del other
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if name in total:
                param.copy_(total[name].to(param.dtype))
    return merged


def merge_start(model, n: int | None, tokenizer, calibration: Calibration, method: str):
    """Shared start of the merging methods: (L, output similarity, [(block, [layer])], target depth)."""
    L = num_blocks(model)
    if n is not None:
        check_n(n, L, method)
    similarity = OutputSimilarity(model, tokenizer, calibration)
    current = [(b, [i + 1]) for i, b in enumerate(get_blocks(model))]
    return L, similarity, current, (L - n if n is not None else 1)


def merge_plan(method: str, current: list[tuple[nn.Module, list[int]]], L: int, details: dict) -> Plan:
    groups = [g for _, g in current]
    removed = sorted(i for g in groups if len(g) > 1 for i in g)
    return Plan(method, groups, removed, details, blocks=[m for m, _ in current])


def next_threshold(rejected: Sequence[float], missing: int) -> float:
    """The next sweep's threshold: the ``missing``-th highest similarity the last sweep rejected
    (the lowest one when it rejected fewer); -inf when it rejected nothing."""
    if not rejected:
        return -math.inf
    ranked = sorted(rejected, reverse=True)
    return ranked[min(max(missing, 1), len(ranked)) - 1]


def merge_window(current, low, high) -> tuple[nn.Module, list[int]]:
    members = current[low:high + 1]
    return merge_blocks([m for m, _ in members]), [i for _, g in members for i in g]


def plan_slm(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
             max_sweeps: int = 100) -> Plan:
    """Sliding layer merging, from the top down (see the module docstring).

    Args:
        n: blocks to lose (the target), or None to make one sweep at ``threshold`` and stop.
        threshold: cosine similarity to the original output that a merged window must keep.
    """
    L, similarity, current, target = merge_start(model, n, tokenizer, calibration, "slm")
    sweeps, t = [], float(threshold)
    while len(current) > target and len(sweeps) < max_sweeps:
        rejected, merges = [], []
        high = len(current) - 1
        while high > 0 and len(current) > target:
            accepted, low = None, high - 1
            while low >= 0 and (high - low) <= len(current) - target:
                candidate = merge_window(current, low, high)
                sim = similarity([m for m, _ in current[:low]] + [candidate[0]] + [m for m, _ in current[high + 1:]])
                if sim >= t:
                    accepted, low = (low, candidate, sim), low - 1
                else:
                    rejected.append(sim)
                    break
            if accepted is not None:
                a_low, (module, group), sim = accepted
                current = current[:a_low] + [(module, group)] + current[high + 1:]
                merges.append({"blocks": group, "similarity": sim})
                high = a_low - 1
            else:
                high -= 1
        sweeps.append({"threshold": t, "merges": merges})
        if n is None or len(current) <= target:
            break
        t = next_threshold(rejected, len(current) - target)
        if not math.isfinite(t):
            break
        log.info("slm: %d blocks after a sweep, target %d; threshold lowered to %.6f", len(current), target, t)
    details = {"threshold": threshold, "sweeps": sweeps, "similarity_evaluations": similarity.evaluations,
               "similarity": "mean cosine of the last block's output over real calibration tokens"}
    return merge_plan("slm", current, L, details)


def plan_laco(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
              merge_layers: int = 4, interval: int = 2, max_sweeps: int = 100) -> Plan:
    """LaCo: from the top down, collapse ``merge_layers`` consecutive layers into the lowest one
    (base + sum of differences) when the output similarity stays >= ``threshold``; after a merge
    step down ``interval`` layers, else one. Merges never overshoot the target ``n``."""
    if merge_layers < 2 or interval < 1:
        raise ChipTuningError(f"laco needs merge_layers >= 2 and interval >= 1, got {merge_layers}, {interval}")
    L, similarity, current, target = merge_start(model, n, tokenizer, calibration, "laco")
    sweeps, t = [], float(threshold)
    while len(current) > target and len(sweeps) < max_sweeps:
        rejected, merges = [], []
        size = min(merge_layers, len(current) - target + 1)
        low = len(current) - size
        while low >= 0 and len(current) > target:
            size = min(merge_layers, len(current) - target + 1, len(current) - low)
            if size < 2:
                low -= 1
                continue
            candidate = merge_window(current, low, low + size - 1)
            sim = similarity([m for m, _ in current[:low]] + [candidate[0]] + [m for m, _ in current[low + size:]])
            if sim >= t:
                current = current[:low] + [candidate] + current[low + size:]
                merges.append({"blocks": candidate[1], "similarity": sim})
                low -= interval
            else:
                rejected.append(sim)
                low -= 1
        sweeps.append({"threshold": t, "merges": merges})
        if n is None or len(current) <= target:
            break
        t = next_threshold(rejected, len(current) - target)
        if not math.isfinite(t):
            break
        log.info("laco: %d blocks after a sweep, target %d; threshold lowered to %.6f", len(current), target, t)
    details = {"threshold": threshold, "merge_layers": merge_layers, "interval": interval, "sweeps": sweeps,
               "similarity_evaluations": similarity.evaluations,
               "similarity": "mean cosine of the last block's output over real calibration tokens"}
    return merge_plan("laco", current, L, details)
