"""Prompt text -> padded token ids: the one encoder of every stage, so a prompt means the same
tokens everywhere. A prompt longer than ``max_length`` loses its *beginning* (the end, where the
chip reads, is kept); batches are padded on the tokenizer's side with its pad token, in input
order or, under a token budget, sorted by length (:func:`plan_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chiptuning.models import available_memory, is_streamed
from chiptuning.registry import get_blocks, text_config

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
    """Input positions grouped into batches: with ``max_tokens == 0`` groups of ``batch_size`` in
    input order, else sorted longest first (an out-of-memory shows on the first batch), each batch
    at most ``batch_size`` rows with ``rows * longest <= max_tokens``."""
    n = len(lengths)
    if not max_tokens:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    batches: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (len(last) + 1) * lengths[last[0]] <= max_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


#: Activation elements alive per token in one block (residual, norm, q/k/v, attention, MLP), in
#: hidden and intermediate sizes; doubled for the allocator's slack and the last-token gathers.
_ELEMENTS_PER_TOKEN = (8, 3)
CPU_TOKEN_BUDGET = 8192
#: (budget, device type) pairs already logged at INFO by :func:`resolve_token_budget`.
_BUDGETS_SAID: set[tuple[int, str]] = set()


def _activation_elements(cfg) -> int:
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "embed_dim", None))
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                or (getattr(cfg, "mlp_ratio", None) or 4) * hidden)
    return 2 * (_ELEMENTS_PER_TOKEN[0] * hidden + _ELEMENTS_PER_TOKEN[1] * inter)


def auto_token_budget(model, device: torch.device, fraction: float = 0.5) -> int:
    """Tokens per batch that fit ``fraction`` of the free memory of ``device`` (free memory / the
    activation bytes of one token in one block, vision tower included), in [512, 262144]. On CPU
    :data:`CPU_TOKEN_BUDGET` (bigger batches are no faster there), except for a streamed model,
    which reads every block once per batch (its largest block's memory is kept free)."""
    streamed = is_streamed(model)
    if device.type != "cuda" and not streamed:
        return CPU_TOKEN_BUDGET
    per_token = _activation_elements(text_config(model.config))
    vision = getattr(model.config, "vision_config", None)
    if vision is not None:
        patches = int(getattr(model.config, "scale_factor", None) or getattr(vision, "spatial_merge_size", None) or 1) ** 2
        per_token += patches * _activation_elements(vision)
    element = max(p.element_size() for p in model.parameters())
    per_token *= element
    free = available_memory(device)
    if streamed:
        free -= max(sum(p.numel() for p in block.parameters()) for block in get_blocks(model)) * element
    return int(min(262144, max(512, fraction * free / per_token)))


def resolve_token_budget(max_tokens: int | str, model, device: torch.device) -> int:
    """A ``--max-tokens-per-batch`` value as a number: "auto" -> :func:`auto_token_budget`."""
    if max_tokens != "auto":
        return int(max_tokens)
    budget = auto_token_budget(model, torch.device(device))
    said = (budget, torch.device(device).type)
    # said once per process at INFO (a run resolves it for every pass over the data)
    log.log(logging.DEBUG if said in _BUDGETS_SAID else logging.INFO,
            "token budget per batch: %d (--max-tokens-per-batch auto on %s)", *said)
    _BUDGETS_SAID.add(said)
    return budget


@dataclass
class Batch:
    """One padded batch: ``rows`` are the positions of its inputs in the prompt list;
    ``other_inputs``: the model's other inputs (a vision-language model's ``pixel_values`` and friends)."""

    rows: list[int]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    other_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class EncodedInputs:
    """Inputs encoded once: their lengths in tokens, and any subset of them as one padded batch.
    Subclasses set :attr:`lengths` and implement :meth:`batch` and :meth:`token_ids`."""

    lengths: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int], device=None) -> Batch:
        """The inputs at ``rows`` (positions in the input list) as one padded batch."""
        raise NotImplementedError

    def token_ids(self, i: int) -> list[int]:
        """The token ids of input ``i`` as the model reads them."""
        raise NotImplementedError

    def batches(self, batch_size: int = 16, max_tokens: int = 0, device=None) -> Iterator[Batch]:
        """Padded batches of all inputs (see :func:`plan_batches` for the grouping)."""
        for rows in plan_batches(self.lengths, batch_size, max_tokens):
            yield self.batch(rows, device)

    def subset(self, rows: Sequence[int]) -> EncodedInputs:
        """The inputs at ``rows``, as inputs of their own."""
        return SubsetInputs(self, rows)


class SubsetInputs(EncodedInputs):
    """Some of another :class:`EncodedInputs`' inputs, as inputs of their own."""

    def __init__(self, parent: EncodedInputs, rows: Sequence[int]) -> None:
        self.parent = parent
        self.rows = list(rows)
        self.lengths = [parent.lengths[i] for i in self.rows]

    def batch(self, rows: Sequence[int], device=None) -> Batch:
        batch = self.parent.batch([self.rows[r] for r in rows], device)
        batch.rows = list(rows)
        return batch

    def token_ids(self, i: int) -> list[int]:
        return self.parent.token_ids(self.rows[i])


class TextInputs(EncodedInputs):
    """Prompt texts tokenized once (:func:`tokenize_prompts`: left truncation to ``max_length``),
    padded per batch on ``side`` (default the tokenizer's) with the tokenizer's pad token."""

    def __init__(self, tokenizer, prompts: Sequence[str], max_length: int | None = None, side: str | None = None):
        self.token_lists = tokenize_prompts(tokenizer, prompts, max_length)
        self.lengths = [len(t) for t in self.token_lists]
        self.pad_id = tokenizer.pad_token_id
        self.side = side or tokenizer.padding_side

    def batch(self, rows: Sequence[int], device=None) -> Batch:
        ids, mask = pad_token_lists([self.token_lists[i] for i in rows], self.pad_id, self.side)
        return Batch(list(rows), ids.to(device), mask.to(device))

    def token_ids(self, i: int) -> list[int]:
        return list(self.token_lists[i])


def encode_batches(tokenizer, prompts: Sequence[str], *, max_length: int | None = None, batch_size: int = 16,
                   max_tokens: int = 0, side: str | None = None, device=None) -> Iterator[Batch]:
    """Padded batches of ``prompts``: :class:`TextInputs` batched by :func:`plan_batches`."""
    yield from TextInputs(tokenizer, prompts, max_length, side).batches(batch_size, max_tokens, device)


__all__ = ["CPU_TOKEN_BUDGET", "Batch", "EncodedInputs", "SubsetInputs", "TextInputs", "auto_token_budget",
           "encode_batches", "pad_token_lists", "plan_batches", "resolve_token_budget", "tokenize_prompts"]
