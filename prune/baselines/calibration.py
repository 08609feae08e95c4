"""Calibration text and the similarity statistics the baselines score blocks by.

* :class:`Calibration`: prompts (from a task) and where they came from, batched by the shared
  encoder (:func:`chiptuning.encoding.encode_batches`);
* :func:`layer_stats`: one pass over the calibration text with hooks on every block
  (:func:`chiptuning.features.capture_layers`): Block Influence and span similarities;
* :func:`block_influence_from_cache`, :func:`angular_distances_from_cache`: the last-token
  versions, straight from a feature cache;
* :class:`OutputSimilarity`: how close a model with candidate blocks stays to the original output.

Block numbers follow the layer convention of :mod:`chiptuning.features`: block i (1..L) turns
feature(i-1) into feature(i).
"""

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
    """Calibration prompts and where they came from (recorded in the checkpoint's provenance)."""

    prompts: list[str]
    source: dict[str, Any]
    max_length: int | None = 256
    batch_size: int = 8

    def batches(self, tokenizer, device, prompts: Sequence[str] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) batches in prompt order, each (B, T), from the shared encoder."""
        prompts = list(self.prompts if prompts is None else prompts)
        for batch in encode_batches(tokenizer, prompts, max_length=self.max_length, batch_size=self.batch_size,
                                    device=device):
            yield batch.input_ids, batch.attention_mask


def calibration_from_task(task, tokenizer=None, n_examples: int | None = 128, max_length: int | None = 256,
                          batch_size: int = 8, seed: int = 0) -> Calibration:
    """Calibration prompts from a loaded task (``chiptuning.tasks.load_task``), ``n_examples`` drawn
    by a seeded shuffle (all of them when None), formatted with the task's prompt template."""
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
    """Similarity statistics of every block and span on calibration text.

    Attributes:
        block_influence: (L,) BI of blocks 1..L over all real tokens.
        span_cosine: {n: (L-n+1,) mean cos(x_l, x_{l+n}) over all real tokens, l = 0..L-n}.
        span_angular_last: {n: (L-n+1,) mean arccos(cos(x_l, x_{l+n}))/pi at the last token}.
        n_tokens, n_examples: how much text the statistics cover.
    """

    block_influence: np.ndarray
    span_cosine: dict[int, np.ndarray]
    span_angular_last: dict[int, np.ndarray]
    n_tokens: int
    n_examples: int


def _accumulate_stats(model, ids, mask, spans, reach, bi, cos_all, ang_last) -> None:
    """Add one batch's Block Influence and span similarities to the running sums (in place)."""
    L = len(get_blocks(model))
    real = mask.bool()
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = last_token_index(mask)
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
        for old in [k for k in states if k < layer - reach]:
            del states[old]

    with capture_layers(model, range(L + 1), keep):
        run_backbone(model, ids, mask)


def layer_stats(model, tokenizer, calibration: Calibration, spans: Sequence[int] = ()) -> LayerStats:
    """One pass over the calibration text: Block Influence and span similarities of the given sizes.

    Keeps only the states of the last max(spans) layers at any time (a ring buffer in the hooks).
    """
    L = num_blocks(model)
    spans = sorted({int(n) for n in spans})
    if any(not 1 <= n <= L for n in spans):
        raise ChipTuningError(f"span sizes {spans} must be in 1..{L}")
    reach = max([1, *spans])
    device = model_device(model)
    bi = torch.zeros(L, dtype=torch.float64)
    cos_all = {n: torch.zeros(L - n + 1, dtype=torch.float64) for n in spans}
    ang_last = {n: torch.zeros(L - n + 1, dtype=torch.float64) for n in spans}
    n_tokens = n_examples = 0
    for ids, mask in calibration.batches(tokenizer, device):
        _accumulate_stats(model, ids, mask, spans, reach, bi, cos_all, ang_last)
        n_tokens += int(mask.sum())
        n_examples += int(ids.shape[0])
    return LayerStats(
        block_influence=(bi / n_tokens).numpy(),
        span_cosine={n: (v / n_tokens).numpy() for n, v in cos_all.items()},
        span_angular_last={n: (v / n_examples).numpy() for n, v in ang_last.items()},
        n_tokens=n_tokens, n_examples=n_examples,
    )


def open_cache_layers(cache) -> tuple[Any, int]:
    """(reader, L) of a cache directory or an already open reader."""
    if isinstance(cache, (str, Path)):
        cache = CacheReader(cache)
    return cache, int(cache.num_blocks)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two (N, H) arrays, in float64, clamped to [-1, 1]."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-12)
    return np.clip(num / den, -1.0, 1.0)


def block_influence_from_cache(cache) -> np.ndarray:
    """ShortGPT's Block Influence at the last token only, from a cache: (L,) for blocks 1..L."""
    reader, L = open_cache_layers(cache)
    previous = reader.layer(0)
    out = np.empty(L)
    for layer in range(1, L + 1):
        current = reader.layer(layer)
        out[layer - 1] = float(np.mean(1 - row_cosine(previous, current)))
        previous = current
    return out


def angular_distances_from_cache(cache, n: int) -> np.ndarray:
    """Gromov et al.'s d(l, n) = mean arccos(cos(x_l, x_{l+n}))/pi at the last token, l = 0..L-n."""
    reader, L = open_cache_layers(cache)
    if not 1 <= n <= L:
        raise ChipTuningError(f"cannot remove {n} of {L} blocks")
    layers = {layer: reader.layer(layer) for layer in range(L + 1)}
    return np.array([float(np.mean(np.arccos(row_cosine(layers[start], layers[start + n])) / math.pi))
                     for start in range(L - n + 1)])


class OutputSimilarity:
    """Mean cosine, over real calibration tokens, between the original model's last raw block output
    and the same output of the model with a candidate block list."""

    def __init__(self, model, tokenizer, calibration: Calibration):
        self.model, self.batches = model, list(calibration.batches(tokenizer, model_device(model)))
        self.reference = [self._final(ids, mask) for ids, mask in self.batches]
        self.evaluations = 0

    def _final(self, ids, mask) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}
        with capture_layers(self.model, [len(get_blocks(self.model))], lambda _l, h: out.__setitem__("h", h.detach())):
            run_backbone(self.model, ids, mask)
        return out["h"]  # (B, T, H): the output of the last block

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
