"""Methods that merge consecutive blocks by parameter arithmetic, ``slm`` (sliding layer merging) and
``laco`` (layer collapse), while the model's output stays ``threshold`` similar to the original; a sweep
that falls short of the target is followed by one at a lower threshold (:func:`next_threshold`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from chiptuning.errors import ChipTuningError
from chiptuning.models import is_streamed, materialized_copy
from chiptuning.prune.baselines.calibration import Calibration, OutputSimilarity
from chiptuning.prune.baselines.plan import Plan, check_n
from chiptuning.registry import get_blocks, num_blocks

log = logging.getLogger(__name__)

#: The blocks of the model being merged: (module, the original blocks it stands for), in order.
Blocks = list[tuple[nn.Module, list[int]]]


def merge_blocks(blocks: Sequence[nn.Module]) -> nn.Module:
    """One block from consecutive blocks: theta = theta_base + sum_j (theta_j - theta_base), the base the
    first block (its buffers kept; one block gives a copy). Streamed blocks are read one at a time."""
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


def next_threshold(rejected: Sequence[float], missing: int) -> float:
    """The next sweep's threshold: the ``missing``-th highest similarity the last sweep rejected
    (the lowest one when it rejected fewer), so it can accept about as many merges as are missing;
    -inf when it rejected nothing."""
    if not rejected:
        return -math.inf
    ranked = sorted(rejected, reverse=True)
    return ranked[min(max(missing, 1), len(ranked)) - 1]


def _merged(current: Blocks, low: int, high: int) -> tuple[tuple[nn.Module, list[int]], list[nn.Module]]:
    """Blocks ``low..high`` of ``current`` merged into one, and the candidate block list with it."""
    members = current[low:high + 1]
    window = (merge_blocks([m for m, _ in members]), [i for _, g in members for i in g])
    return window, [m for m, _ in current[:low]] + [window[0]] + [m for m, _ in current[high + 1:]]


def _slm_sweep(current: Blocks, target: int, similarity, t: float) -> tuple[Blocks, list, list]:
    """From the top down, grow each window downwards while the merged model keeps similarity >= t."""
    rejected, merges = [], []
    high = len(current) - 1
    while high > 0 and len(current) > target:
        accepted, low = None, high - 1
        while low >= 0 and (high - low) <= len(current) - target:
            window, candidate = _merged(current, low, high)
            sim = similarity(candidate)
            if not sim >= t:  # a NaN similarity is no reason to merge
                rejected.append(sim)
                break
            accepted, low = (low, window, sim), low - 1
        if accepted is None:
            high -= 1
            continue
        low, window, sim = accepted
        current = current[:low] + [window] + current[high + 1:]
        merges.append({"blocks": window[1], "similarity": sim})
        high = low - 1
    return current, merges, rejected


def _laco_sweep(current: Blocks, target: int, similarity, t: float, merge_layers: int,
                interval: int) -> tuple[Blocks, list, list]:
    """From the top down, collapse ``merge_layers`` layers into the lowest one when the merged model
    keeps similarity >= t, then step down ``interval`` layers; otherwise one."""
    rejected, merges = [], []
    low = len(current) - min(merge_layers, len(current) - target + 1)
    while low >= 0 and len(current) > target:
        size = min(merge_layers, len(current) - target + 1, len(current) - low)
        if size < 2:
            low -= 1
            continue
        window, candidate = _merged(current, low, low + size - 1)
        sim = similarity(candidate)
        if sim >= t:
            current = current[:low] + [window] + current[low + size:]
            merges.append({"blocks": window[1], "similarity": sim})
            low -= interval
        else:
            rejected.append(sim)
            low -= 1
    return current, merges, rejected


def _merge(method: str, model, n: int | None, tokenizer, calibration: Calibration, threshold: float,
           max_sweeps: int, sweep: Callable, details: dict) -> Plan:
    """Sweeps of ``sweep`` at ``threshold``, lowered until the model has lost ``n`` blocks (one
    sweep when ``n`` is None)."""
    L = num_blocks(model)
    if n is not None:
        check_n(n, L, method)
    similarity = OutputSimilarity(model, tokenizer, calibration)
    current = [(b, [i + 1]) for i, b in enumerate(get_blocks(model))]
    target = L - n if n is not None else 1
    sweeps, t = [], float(threshold)
    while len(current) > target and len(sweeps) < max_sweeps:
        current, merges, rejected = sweep(current, target, similarity, t)
        sweeps.append({"threshold": t, "merges": merges})
        if n is None or len(current) <= target:
            break
        t = next_threshold(rejected, len(current) - target)
        if not math.isfinite(t):
            break
        log.info("%s: %d blocks after a sweep, target %d; threshold lowered to %.6f", method, len(current), target, t)
    groups = [g for _, g in current]
    details.update(threshold=threshold, sweeps=sweeps, similarity_evaluations=similarity.evaluations,
                   similarity="mean cosine of the last block's output over real calibration tokens")
    return Plan(method, groups, sorted(i for g in groups if len(g) > 1 for i in g), details,
                blocks=[m for m, _ in current])


def plan_slm(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
             max_sweeps: int = 100) -> Plan:
    """Sliding layer merging: from the top down, grow a window of consecutive layers while the model with
    it merged keeps its output cosine >= ``threshold``; merge it; go on below it. ``n``: blocks to lose
    (the target), or None for one sweep at ``threshold``."""
    return _merge("slm", model, n, tokenizer, calibration, threshold, max_sweeps, _slm_sweep, {})


def plan_laco(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
              merge_layers: int = 4, interval: int = 2, max_sweeps: int = 100) -> Plan:
    """LaCo: from the top down, collapse ``merge_layers`` consecutive layers into the lowest one when
    the model's output cosine stays >= ``threshold``, then step down ``interval`` layers, else one."""
    if merge_layers < 2 or interval < 1:
        raise ChipTuningError(f"laco needs merge_layers >= 2 and interval >= 1, got {merge_layers}, {interval}")
    sweep = functools.partial(_laco_sweep, merge_layers=merge_layers, interval=interval)
    return _merge("laco", model, n, tokenizer, calibration, threshold, max_sweeps, sweep,
                  {"merge_layers": merge_layers, "interval": interval})
