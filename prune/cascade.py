"""Real early exit: each example stops at its cascade's first confident chip and leaves the batch, so
later blocks compute less; the answers equal :func:`chiptuning.probe.cascade.simulate` on the cache's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chiptuning.features import (
    StopForward,
    capture_layers,
    hidden_from_args,
    last_token_index,
    rewrite_block_calls,
    run_backbone,
)
from chiptuning.registry import get_final_norm


@dataclass
class Exit:
    """One exit of a cascade: a layer, its chip, the confidence an example needs to stop there."""

    layer: int
    chip: Any
    threshold: float


def _cut(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` (a tensor, or a tuple or list of them) with its first axis cut to ``rows`` if it is ``batch`` long."""
    if torch.is_tensor(value):
        return value.index_select(0, rows.to(value.device)) if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, rows, batch) for v in value)
    return value


@torch.no_grad()
def run_cascade(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, exits: Sequence[Exit],
                mode: str = "raw", class_mask: np.ndarray | None = None, **other_inputs: torch.Tensor
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class (B,), exit layer (B,), probabilities (B, C) of the answering chip) of a (B, T)
    padded batch, by early exit through ``exits`` (ascending layers; the last answers every row left).
    ``class_mask`` (B, C): the classes each row may take; ``other_inputs``: the model's other inputs (``pixel_values``...)."""
    batch = input_ids.shape[0]
    norm = get_final_norm(model) if mode == "normed" else None
    by_layer, last_exit = {e.layer: e for e in exits}, exits[-1].layer
    rows, last = torch.arange(batch), last_token_index(attention_mask).cpu()  # the rows still running
    prediction, exit_layer = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
    probabilities: list[np.ndarray | None] = [None] * batch

    def at_exit(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        nonlocal rows, last
        h = hidden[torch.arange(len(rows), device=hidden.device), last.to(hidden.device)]  # (B', H)
        h = norm(h) if norm is not None else h
        mask = None if class_mask is None else class_mask[rows.numpy()]
        proba = np.asarray(by_layer[layer].chip.predict_proba(h.float().cpu().numpy(), class_mask=mask))  # (B', C)
        stop = np.ones(len(rows), dtype=bool) if layer == last_exit else proba.max(axis=1) >= by_layer[layer].threshold
        for k in np.flatnonzero(stop):
            i = int(rows[k])
            prediction[i], exit_layer[i], probabilities[i] = int(proba[k].argmax()), layer, proba[k]
        if stop.all():
            raise StopForward
        keep = torch.from_numpy(np.flatnonzero(~stop))
        rows, last = rows[keep], last[keep]
        return hidden.index_select(0, keep.to(hidden.device))

    def before_block(args, kwargs):
        if len(rows) == batch:
            return None
        hidden = hidden_from_args(args, kwargs)  # already cut by the previous exit
        args = tuple(a if a is hidden else _cut(a, rows, batch) for a in args)
        kwargs = {k: (v if v is hidden else _cut(v, rows, batch)) for k, v in kwargs.items()}
        return args, kwargs

    later = range(exits[0].layer, last_exit)  # the blocks after the first exit run on the rows left
    with capture_layers(model, by_layer, at_exit), rewrite_block_calls(model, later, before_block):
        run_backbone(model, input_ids, attention_mask, **other_inputs)
    return prediction, exit_layer, np.stack(probabilities)


__all__ = ["Exit", "run_cascade"]
