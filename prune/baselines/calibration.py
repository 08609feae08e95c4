"""Calibration text and the similarity statistics the baselines score blocks by: over the text
(:func:`layer_stats`, :class:`OutputSimilarity`) or at the last token, from a feature cache."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from chiptuning.cache import CacheReader
from chiptuning.encoding import encode_batches, tokenize_prompts
from chiptuning.errors import ChipTuningError
from chiptuning.features import capture_layers, last_token_index, run_backbone
from chiptuning.models import model_device
from chiptuning.registry import get_blocks, num_blocks, set_blocks


@dataclass
class Calibration:
    """Calibration prompts and where they came from (recorded in ``pruning.json``)."""

    prompts: list[str]
    source: dict[str, Any]
    max_length: int | None = 256
    batch_size: int = 8

    def batches(self, tokenizer, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) batches in prompt order, each (B, T)."""
        for batch in encode_batches(tokenizer, self.prompts, max_length=self.max_length, batch_size=self.batch_size,
                                    device=device):
            yield batch.input_ids, batch.attention_mask


def calibration_from_task(task, tokenizer=None, n_examples: int | None = 128, max_length: int | None = 256,
                          batch_size: int = 8, seed: int = 0) -> Calibration:
    """``n_examples`` prompts of a loaded task (a seeded draw, in order; None: all of them)."""
    prompts, _ = task.build_prompts(tokenizer, max_length)
    order = np.arange(len(prompts))
    if n_examples is not None and n_examples < len(prompts):
        order = np.sort(np.random.default_rng(seed).permutation(len(prompts))[:n_examples])
    chosen = [prompts[i] for i in order]
    if not chosen:
        raise ChipTuningError("the calibration data holds no examples")
    n_tokens = None
    if tokenizer is not None:
        n_tokens = int(sum(len(ids) for ids in tokenize_prompts(tokenizer, chosen, max_length)))
    digest = hashlib.sha256("\x00".join(chosen).encode()).hexdigest()[:16]
    source = {"task": task.describe(), "n_examples": len(chosen), "n_tokens": n_tokens, "seed": seed,
              "max_length": max_length, "prompts_sha256": digest}
    return Calibration(chosen, source, max_length=max_length, batch_size=batch_size)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each token's vectors, (..., H) -> (...), in float32, clamped to [-1, 1]."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)


@dataclass
class LayerStats:
    """Similarities of every block and span on calibration text.

    Attributes:
        block_influence: (L,) mean 1 - cos(input, output) of blocks 1..L over all real tokens.
        span_cosine: {n: (L-n+1,) mean cos(x_l, x_{l+n}) over all real tokens, l = 0..L-n}.
        span_angular_last: {n: (L-n+1,) mean arccos(cos(x_l, x_{l+n}))/pi at the last token}.
    """

    block_influence: np.ndarray
    span_cosine: dict[int, np.ndarray]
    span_angular_last: dict[int, np.ndarray]
    n_tokens: int
    n_examples: int


def _accumulate_stats(model, ids, mask, spans, bi, cos_all, ang_last) -> None:
    """Add one batch's sums to ``bi``, ``cos_all`` and ``ang_last``, keeping the states of only the
    last max(spans) layers."""
    real, rows, last = mask.bool(), torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)
    reach = max([1, *spans])
    states: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        states[layer] = hidden.detach()
        if layer >= 1:
            bi[layer - 1] += (1 - token_cosine(states[layer - 1], hidden))[real].sum().double().cpu()
        for n in spans:
            if layer - n >= 0:
                c = token_cosine(states[layer - n], hidden)  # (B, T)
                cos_all[n][layer - n] += c[real].sum().double().cpu()
                ang_last[n][layer - n] += (torch.arccos(c[rows, last]) / math.pi).sum().double().cpu()
        states.pop(layer - reach, None)

    with capture_layers(model, range(len(get_blocks(model)) + 1), keep):
        run_backbone(model, ids, mask)


def layer_stats(model, tokenizer, calibration: Calibration, spans: Sequence[int] = ()) -> LayerStats:
    """One pass over the calibration text: Block Influence and the similarities of spans of the
    given sizes."""
    L = num_blocks(model)
    spans = sorted({int(n) for n in spans})
    if any(not 1 <= n <= L for n in spans):
        raise ChipTuningError(f"span sizes {spans} must be in 1..{L}")
    bi = torch.zeros(L, dtype=torch.float64)
    cos_all = {n: torch.zeros(L - n + 1, dtype=torch.float64) for n in spans}
    ang_last = {n: torch.zeros(L - n + 1, dtype=torch.float64) for n in spans}
    n_tokens = n_examples = 0
    for ids, mask in calibration.batches(tokenizer, model_device(model)):
        _accumulate_stats(model, ids, mask, spans, bi, cos_all, ang_last)
        n_tokens += int(mask.sum())
        n_examples += int(ids.shape[0])
    return LayerStats(
        block_influence=(bi / n_tokens).numpy(),
        span_cosine={n: (v / n_tokens).numpy() for n, v in cos_all.items()},
        span_angular_last={n: (v / n_examples).numpy() for n, v in ang_last.items()},
        n_tokens=n_tokens, n_examples=n_examples,
    )


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two (N, H) arrays, in float64, clamped to [-1, 1]."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-12)
    return np.clip(num / den, -1.0, 1.0)


def _cached_cosines(cache, n: int) -> Iterator[np.ndarray]:
    """For l = 0..L-n, each cached example's cos(x_l, x_{l+n}); holds n + 1 layers at a time.
    ``cache``: a cache directory or an open reader."""
    reader = CacheReader(cache) if isinstance(cache, (str, Path)) else cache
    L = int(reader.num_blocks)
    if not 1 <= n <= L:
        raise ChipTuningError(f"cannot remove {n} of {L} blocks")
    layers = {}
    for layer in range(L + 1):
        layers[layer] = reader.layer(layer)
        if layer >= n:
            yield row_cosine(layers.pop(layer - n), layers[layer])


def block_influence_from_cache(cache) -> np.ndarray:
    """ShortGPT's Block Influence at the last token, from a cache: (L,) for blocks 1..L."""
    return np.array([float(np.mean(1 - c)) for c in _cached_cosines(cache, 1)])


def angular_distances_from_cache(cache, n: int) -> np.ndarray:
    """Gromov et al.'s d(l, n) = mean arccos(cos(x_l, x_{l+n}))/pi at the last token, l = 0..L-n."""
    return np.array([float(np.mean(np.arccos(c) / math.pi)) for c in _cached_cosines(cache, n)])


class OutputSimilarity:
    """Mean cosine, over real calibration tokens, between the last block's output of the original
    model and of the model with a candidate block list; counts its calls in ``evaluations``."""

    def __init__(self, model, tokenizer, calibration: Calibration):
        self.model, self.batches = model, list(calibration.batches(tokenizer, model_device(model)))
        self.reference = [self._final(ids, mask) for ids, mask in self.batches]
        self.evaluations = 0

    def _final(self, ids, mask) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}
        with capture_layers(self.model, [len(get_blocks(self.model))], lambda _l, h: out.__setitem__("h", h.detach())):
            run_backbone(self.model, ids, mask)
        return out["h"]  # (B, T, H)

    def __call__(self, candidate: Sequence[nn.Module]) -> float:
        original = get_blocks(self.model)
        set_blocks(self.model, nn.ModuleList(candidate))
        total, count = 0.0, 0
        try:
            for (ids, mask), ref in zip(self.batches, self.reference):
                c = token_cosine(self._final(ids, mask), ref)[mask.bool()]
                total += float(c.double().sum())
                count += int(c.numel())
        finally:
            set_blocks(self.model, original)
        self.evaluations += 1
        return total / count
