"""Real early exit: the pruned model stops each example at its cascade's first confident chip.

The model runs its own forward (embeddings, masks, positions and rotary embeddings, per-layer
attention types, exactly as the full forward computes them), with two kinds of hooks on its blocks
(:func:`chiptuning.features.capture_layers` on the exit layers' outputs,
:func:`chiptuning.features.rewrite_block_calls` on the later blocks' inputs):

* after each exit layer, the chip of that layer reads feature(l) at the last real token of every
  row still running; rows whose top probability reaches the threshold stop there (their answer and
  exit layer are recorded), and the rest go on as a *smaller batch*: the hidden states of the
  exited rows are dropped (compaction), so later blocks really compute less;
* before each later block, the batch-shaped inputs the forward prepared once for the whole batch
  (attention mask, position ids, rotary cos/sin) are cut to the rows still running.

When no row is left the forward stops (:class:`chiptuning.features.StopForward`): at batch size 1
a confident example runs no block after its exit layer. The answers equal what the cascade gives
on the cache's features (:func:`chiptuning.probe.cascade.simulate`), example by example.
"""

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
    """One exit of a cascade: a layer, its chip, the confidence an example needs to stop there
    (the last exit answers every example left, whatever its confidence)."""

    layer: int
    chip: Any
    threshold: float


def _cut(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with its batch rows cut to ``rows``: tensors whose first axis is the original
    batch, inside tuples and lists too; anything else unchanged."""
    if torch.is_tensor(value):
        return value.index_select(0, rows.to(value.device)) if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, rows, batch) for v in value)
    return value


@torch.no_grad()
def run_cascade(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, exits: Sequence[Exit],
                mode: str = "raw", class_mask: np.ndarray | None = None, **extra: torch.Tensor
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify a batch with early exit.

    Args:
        model: the (pruned) backbone, a registered architecture.
        input_ids, attention_mask: (B, T) padded batch.
        exits: the cascade, ascending layers; the last exit answers every example left.
        mode: "raw" or "normed" features (as the chips were trained).
        class_mask: (B, C) bool, the classes each row may take (None: all).
        **extra: the model's other inputs (a vision-language model's ``pixel_values``...): they
            are merged into the hidden states before the first block, so no block sees them.

    Returns:
        (predicted class (B,), exit layer (B,), probabilities (B, C) of the answering chip).
    """
    batch = input_ids.shape[0]
    norm = get_final_norm(model) if mode == "normed" else None
    by_layer = {e.layer: e for e in exits}
    last_exit = exits[-1].layer
    state = {"rows": torch.arange(batch), "last": last_token_index(attention_mask).cpu()}
    prediction = np.full(batch, -1, dtype=np.int64)
    exit_layer = np.zeros(batch, dtype=np.int64)
    probabilities: list[np.ndarray | None] = [None] * batch

    def at_exit(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        rows, last = state["rows"], state["last"]
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
        state["rows"], state["last"] = rows[keep], last[keep]
        return hidden.index_select(0, keep.to(hidden.device))

    def before_block(args, kwargs):
        rows = state["rows"]
        if len(rows) == batch:
            return None
        hidden = hidden_from_args(args, kwargs)  # already cut by the previous exit
        args = tuple(a if a is hidden else _cut(a, rows, batch) for a in args)
        kwargs = {k: (v if v is hidden else _cut(v, rows, batch)) for k, v in kwargs.items()}
        return args, kwargs

    # Blocks after the first exit get their batch-shaped inputs cut to the rows still running.
    with capture_layers(model, by_layer, at_exit), rewrite_block_calls(model, range(exits[0].layer, last_exit),
                                                                        before_block):
        run_backbone(model, input_ids, attention_mask, **extra)
    if (prediction < 0).any():
        raise RuntimeError("the cascade left an example without an answer; this is a bug, please report it")
    return prediction, exit_layer, np.stack(probabilities)


__all__ = ["Exit", "run_cascade"]
