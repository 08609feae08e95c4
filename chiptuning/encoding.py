"""Prompt text -> padded token ids: the one encoder of every stage.

Extraction, ``ChipModel``, the checkpoint's parity check, the baselines' calibration text and the
zero-shot baseline all turn prompts into token ids here, so a prompt means the same tokens
everywhere:

* special tokens are added as the tokenizer adds them;
* a prompt longer than ``max_length`` tokens loses its *beginning* (left truncation): the end,
  where the chip reads ("Answer:"), is always kept;
* batches are padded on the tokenizer's side (or the one asked for), with its pad token; the last
  real token of each row is :func:`chiptuning.features.last_token_index` of the mask.

Batches come either in input order (fixed size) or, with a token budget, sorted by length so that
little compute goes to padding (:func:`plan_batches`; the budget itself from
:func:`auto_token_budget`); each batch says which inputs it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from chiptuning.registry import text_config

log = logging.getLogger(__name__)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (special tokens added, left-truncated to ``max_length``)."""
    before = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the end of the prompt, where the chip reads
    try:
        return tokenizer(list(prompts), add_special_tokens=True, truncation=max_length is not None,
                         max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = before


def pad_token_lists(token_lists: Sequence[Sequence[int]], pad_id: int, side: str = "right"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T) int64, T the longest list; pads on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be left or right, got {side!r}")
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(token_lists), T), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        span = slice(0, len(tokens)) if side == "right" else slice(T - len(tokens), T)
        ids[row, span] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask  # (B, T) each


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Group input positions into batches.

    ``max_tokens == 0``: consecutive groups of ``batch_size`` in input order. Otherwise inputs
    sorted by length, longest first (an out-of-memory shows up on the first batch), each batch as
    large as fits ``rows * longest <= max_tokens`` and at most ``batch_size`` rows.
    """
    n = len(lengths)
    if not max_tokens:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


#: Activation elements alive per token while one block runs (residual, norm, q/k/v, attention
#: output, MLP in/gate/act/out) in units of hidden and intermediate size; doubled for the
#: allocator's slack and the last-token gathers.
_ELEMENTS_PER_TOKEN = (8, 3)
CPU_TOKEN_BUDGET = 8192


def auto_token_budget(model, device: torch.device, fraction: float = 0.5) -> int:
    """A token budget per batch that fits ``fraction`` of the free memory of ``device``.

    On CUDA: free memory (after the weights are loaded) / the activation bytes of one token in
    one block; on CPU a fixed :data:`CPU_TOKEN_BUDGET` (bigger batches do not run faster there).
    Clamped to [512, 262144]. An out-of-memory batch is still split and retried.
    """
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    cfg = text_config(model.config)
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    per_token = 2 * (_ELEMENTS_PER_TOKEN[0] * hidden + _ELEMENTS_PER_TOKEN[1] * inter)
    per_token *= next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(262144, max(512, fraction * free / per_token)))


def resolve_token_budget(max_tokens: int | str, model, device: torch.device) -> int:
    """A ``--max-tokens-per-batch`` value as a number: "auto" -> :func:`auto_token_budget`."""
    if max_tokens != "auto":
        return int(max_tokens)
    budget = auto_token_budget(model, torch.device(device))
    log.info("token budget per batch: %d (--max-tokens-per-batch auto on %s)", budget, torch.device(device).type)
    return budget


@dataclass
class Batch:
    """One padded batch: ``rows`` are the positions of its inputs in the prompt list."""

    rows: list[int]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)


def batches_of_tokens(token_lists: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16,
                      max_tokens: int = 0, side: str = "right", device=None) -> Iterator[Batch]:
    """Padded batches of already tokenized inputs (see :func:`plan_batches` for the grouping)."""
    for rows in plan_batches([len(t) for t in token_lists], batch_size, max_tokens):
        ids, mask = pad_token_lists([token_lists[i] for i in rows], pad_id, side)
        yield Batch(rows, ids.to(device) if device is not None else ids,
                    mask.to(device) if device is not None else mask)


def encode_batches(tokenizer, prompts: Sequence[str], *, max_length: int | None = None, batch_size: int = 16,
                   max_tokens: int = 0, side: str | None = None, device=None) -> Iterator[Batch]:
    """Tokenize ``prompts`` (:func:`tokenize_prompts`) and yield padded batches.

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token.
        prompts: finished prompt texts.
        max_length: longest prompt in tokens (left truncation), or None.
        batch_size: most rows per batch.
        max_tokens: token budget per batch over length-sorted inputs; 0 keeps input order.
        side: padding side (default the tokenizer's).
        device: where the tensors go.
    """
    token_lists = tokenize_prompts(tokenizer, prompts, max_length)
    yield from batches_of_tokens(token_lists, tokenizer.pad_token_id, batch_size=batch_size,
                                 max_tokens=max_tokens, side=side or tokenizer.padding_side, device=device)


__all__ = ["CPU_TOKEN_BUDGET", "Batch", "auto_token_budget", "batches_of_tokens", "encode_batches", "pad_token_lists",
           "plan_batches", "resolve_token_budget", "tokenize_prompts"]
