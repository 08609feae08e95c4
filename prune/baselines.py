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

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chiptuning.prune.truncate import model_configs, per_layer_keys, truncate_
from torch import nn
from torch.nn import functional as F

from chiptuning import __version__
from chiptuning.errors import ChipTuningError
from chiptuning.features import (
    _hidden_from_args,
    _hidden_from_output,
    _StopForward,
    last_token_index,
    model_inputs,
)
from chiptuning.registry import base_model, get_blocks, get_spec, num_blocks, set_blocks

log = logging.getLogger(__name__)

METHODS = ("tail", "shortgpt", "angular", "streamline", "slm", "laco")
RECORD_FILE = "pruning.json"
RECORD_FORMAT = "chiptuning-depth-pruned"
#: Defaults of the method options (each documented on its ``plan_*`` function).
DEFAULTS: dict[str, dict[str, Any]] = {
    "streamline": {"replacement": "layer", "epochs": 10, "lr": 5e-4, "holdout": 0.2, "seed": 0},
    "slm": {"threshold": 0.9},
    "laco": {"threshold": 0.9, "merge_layers": 4, "interval": 2},
}
GENERATION_CHECK_PROMPT = "The quick brown fox"


# -- calibration text -----------------------------------------------------------------------------

@dataclass
class Calibration:
    """Calibration prompts and where they came from (recorded in the checkpoint's provenance)."""

    prompts: list[str]
    source: dict[str, Any]
    max_length: int | None = 256
    batch_size: int = 8

    def batches(self, tokenizer, device, prompts: Sequence[str] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded (input_ids, attention_mask) batches, each (B, T)."""
        prompts = list(self.prompts if prompts is None else prompts)
        for start in range(0, len(prompts), self.batch_size):
            enc = tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=self.max_length is not None,
                            max_length=self.max_length, return_tensors="pt")
            yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


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
        n_tokens = int(sum(len(ids) for ids in tokenizer(chosen, truncation=max_length is not None,
                                                           max_length=max_length)["input_ids"]))
    digest = hashlib.sha256("\x00".join(chosen).encode()).hexdigest()[:16]
    source = {"task": task.describe(), "n_examples": len(chosen), "n_tokens": n_tokens, "seed": seed,
              "max_length": max_length, "prompts_sha256": digest}
    return Calibration(chosen, source, max_length=max_length, batch_size=batch_size)


# -- block surgery --------------------------------------------------------------------------------

def rebuild_blocks_(model, plan: Sequence[tuple[nn.Module, int]]) -> nn.Module:
    """Make ``model``'s blocks exactly ``plan`` (in order), with the config made to agree.

    Args:
        plan: (block module, original 0-based index whose per-layer config entries it takes) for
            each block of the result; modules may be original blocks, merged or new ones.

    The original blocks are reordered so the result comes first, per-layer config lists are
    permuted the same way, and :func:`truncate_` cuts the rest (depth, lists, ``layer_idx``).
    """
    blocks = list(get_blocks(model))
    L = len(blocks)
    if not 1 <= len(plan) <= L:
        raise ChipTuningError(f"cannot rebuild a model of {L} blocks into {len(plan)} blocks")
    used = {id(module) for module, _ in plan}
    leftovers = [(b, i) for i, b in enumerate(blocks) if id(b) not in used]
    order = list(plan) + leftovers[: L - len(plan)]
    for config in model_configs(model):
        for key in per_layer_keys(config, L):
            value = getattr(config, key)
            setattr(config, key, type(value)(value[src] for _, src in order))
    set_blocks(model, nn.ModuleList([module for module, _ in order]))
    return truncate_(model, len(plan))


def remove_blocks_(model, remove: Sequence[int]) -> nn.Module:
    """Delete blocks ``remove`` (1-based, any subset, not all) in place, config and layer ids updated."""
    blocks = list(get_blocks(model))
    bad = sorted(set(int(i) for i in remove) - set(range(1, len(blocks) + 1)))
    if bad:
        raise ChipTuningError(f"blocks {bad} do not exist (the model has blocks 1..{len(blocks)})")
    gone = set(int(i) for i in remove)
    return rebuild_blocks_(model, [(b, i) for i, b in enumerate(blocks) if i + 1 not in gone])


def merge_blocks(blocks: Sequence[nn.Module]) -> nn.Module:
    """One block from consecutive blocks: theta = theta_base + sum_j (theta_j - theta_base).

    The base is the first (lowest) block; every floating-point parameter is merged, buffers are
    the base's. A single block is returned as a copy.
    """
    merged = copy.deepcopy(blocks[0])
    params = [dict(b.named_parameters()) for b in blocks]
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if not param.is_floating_point():
                continue
            base = params[0][name].detach()
            total = base.float().clone()
            for other in params[1:]:
                total += other[name].detach().float() - base.float()
            param.copy_(total.to(param.dtype))
    return merged


def attention_output_projections(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention output projection(s) of a block (o_proj, attn.c_proj, attention.output.dense, ...)."""
    found = []
    for name, module in block.named_modules():
        parts = name.split(".")
        in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
        if in_attention and parts[-1] in ("o_proj", "out_proj", "c_proj", "dense") and hasattr(module, "weight"):
            found.append((name, module))
    return found


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level attention submodules of a block (``self_attn``, ``attn``, ``attention``)."""
    return [(name, m) for name, m in block.named_children() if "attn" in name or "attention" in name]


# -- hidden states --------------------------------------------------------------------------------

def _run(model, ids, mask) -> None:
    try:
        with torch.no_grad():
            base_model(model)(**model_inputs(model, ids, mask))
    except _StopForward:
        pass


def _attach(model, wanted: Sequence[int], keep) -> list:
    """Hooks calling ``keep(layer, hidden (B, T, H))`` for each wanted layer (0 = embedding output)."""
    blocks = get_blocks(model)
    handles = []
    if 0 in wanted:
        handles.append(blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: keep(0, _hidden_from_args(args, kwargs)), with_kwargs=True))
    for layer in wanted:
        if layer >= 1:
            handles.append(blocks[layer - 1].register_forward_hook(
                lambda _m, _a, out, layer=layer: keep(layer, _hidden_from_output(out))))
    return handles


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
            bi[layer - 1] += (1 - _cos(states[layer - 1], hidden))[real].sum().double().cpu()
        for n in spans:
            if layer - n >= 0:
                c = _cos(states[layer - n], hidden)  # (B, T)
                cos_all[n][layer - n] += c[real].sum().double().cpu()
                ang_last[n][layer - n] += (torch.arccos(c[rows, last]) / math.pi).sum().double().cpu()
        for old in [k for k in states if k < layer - reach]:
            del states[old]

    handles = _attach(model, range(L + 1), keep)
    try:
        _run(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()


def layer_stats(model, tokenizer, calibration: Calibration, spans: Sequence[int] = ()) -> LayerStats:
    """One pass over the calibration text: Block Influence and span similarities of the given sizes.

    Keeps only the states of the last max(spans) layers at any time (a ring buffer in the hooks).
    """
    L = num_blocks(model)
    spans = sorted({int(n) for n in spans})
    if any(not 1 <= n <= L for n in spans):
        raise ChipTuningError(f"span sizes {spans} must be in 1..{L}")
    reach = max([1, *spans])
    device = next(model.parameters()).device
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


def _cache_layers(cache) -> tuple[Any, int]:
    if isinstance(cache, (str, Path)):
        from chiptuning.cache import CacheReader

        cache = CacheReader(cache)
    return cache, int(cache.num_blocks)


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-12)
    return np.clip(num / den, -1.0, 1.0)


def block_influence_from_cache(cache) -> np.ndarray:
    """ShortGPT's Block Influence at the last token only, from a cache: (L,) for blocks 1..L."""
    reader, L = _cache_layers(cache)
    previous = reader.layer(0)
    out = np.empty(L)
    for layer in range(1, L + 1):
        current = reader.layer(layer)
        out[layer - 1] = float(np.mean(1 - _row_cos(previous, current)))
        previous = current
    return out


def angular_distances_from_cache(cache, n: int) -> np.ndarray:
    """Gromov et al.'s d(l, n) = mean arccos(cos(x_l, x_{l+n}))/pi at the last token, l = 0..L-n."""
    reader, L = _cache_layers(cache)
    if not 1 <= n <= L:
        raise ChipTuningError(f"cannot remove {n} of {L} blocks")
    layers = {layer: reader.layer(layer) for layer in range(L + 1)}
    return np.array([float(np.mean(np.arccos(_row_cos(layers[start], layers[start + n])) / math.pi))
                     for start in range(L - n + 1)])


# -- plans: what each method removes --------------------------------------------------------------

@dataclass
class Plan:
    """What a method does to the model.

    Attributes:
        method: the method name.
        groups: for each block of the result, the original blocks (1-based) it stands for: one
            block kept as is, several merged, or a span replaced by a trained block.
        removed: original blocks that no longer exist as they were: deleted, merged into another
            block, or replaced by a trained block (the depth drops by ``L - len(groups)``).
        details: scores, thresholds and training metrics, for provenance.
        blocks: the result's block modules, in order (None: keep original blocks per ``groups``).
    """

    method: str
    groups: list[list[int]]
    removed: list[int]
    details: dict[str, Any] = field(default_factory=dict)
    blocks: list[nn.Module] | None = None


def _check_n(n: int, L: int, method: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not minimum <= n <= L - 1:
        raise ChipTuningError(f"{method}: cannot remove {n!r} of {L} blocks (choose {minimum}..{L - 1})")
    return int(n)


def _kept_groups(L: int, removed: Sequence[int]) -> list[list[int]]:
    gone = set(removed)
    return [[i] for i in range(1, L + 1) if i not in gone]


def plan_tail(model, n: int) -> Plan:
    """Drop the last ``n`` blocks."""
    L = num_blocks(model)
    _check_n(n, L, "tail")
    removed = list(range(L - n + 1, L + 1))
    return Plan("tail", _kept_groups(L, removed), removed)


def select_lowest(scores: np.ndarray, n: int) -> list[int]:
    """1-based indices of the ``n`` lowest scores (ties: the lower block first)."""
    return sorted(int(i) + 1 for i in np.argsort(np.asarray(scores), kind="stable")[:n])


def plan_shortgpt(model, n: int, tokenizer=None, calibration: Calibration | None = None, cache=None) -> Plan:
    """Remove the ``n`` blocks of lowest Block Influence: over all real tokens of ``calibration``,
    or, with ``cache``, its last-token approximation straight from the cache."""
    L = num_blocks(model)
    _check_n(n, L, "shortgpt")
    if cache is not None:
        bi, source = block_influence_from_cache(cache), "cache (last token)"
    elif calibration is not None:
        bi, source = layer_stats(model, tokenizer, calibration).block_influence, "calibration (all tokens)"
    else:
        raise ChipTuningError("shortgpt needs calibration text or a cache")
    removed = select_lowest(bi, n)
    return Plan("shortgpt", _kept_groups(L, removed), removed,
                {"block_influence": [float(x) for x in bi], "scores_from": source})


def plan_angular(model, n: int, tokenizer=None, calibration: Calibration | None = None, cache=None) -> Plan:
    """Remove the contiguous ``n`` blocks l+1..l+n of smallest last-token angular distance
    d(x_l, x_{l+n}): exactly from ``cache``, or from the last tokens of ``calibration``."""
    L = num_blocks(model)
    _check_n(n, L, "angular")
    if cache is not None:
        d, source = angular_distances_from_cache(cache, n), "cache (last token)"
    elif calibration is not None:
        d, source = layer_stats(model, tokenizer, calibration, spans=[n]).span_angular_last[n], "calibration (last token)"
    else:
        raise ChipTuningError("angular needs calibration text or a cache")
    start = int(np.argmin(d))
    removed = list(range(start + 1, start + n + 1))
    return Plan("angular", _kept_groups(L, removed), removed,
                {"angular_distance": [float(x) for x in d], "start_layer": start, "scores_from": source})


# -- streamline -----------------------------------------------------------------------------------

def _capture_span(model, tokenizer, calibration: Calibration, start: int, stop: int) -> list[dict]:
    """For each calibration batch: the call (args, kwargs) of block ``start+1`` (its input is
    feature(start)), the target feature(stop) and the real-token mask. Full (B, T, H) states."""
    blocks = get_blocks(model)
    device = next(model.parameters()).device
    return [_capture_batch(blocks, model, ids, mask, start, stop) for ids, mask in calibration.batches(tokenizer, device)]


def _capture_batch(blocks, model, ids, mask, start: int, stop: int) -> dict:
    rec: dict[str, Any] = {"mask": mask.bool()}

    def pre(_m, args, kwargs):
        rec["args"] = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        rec["kwargs"] = dict(kwargs)

    def post(_m, _a, out):
        rec["target"] = _hidden_from_output(out).detach()
        if stop < len(blocks):
            raise _StopForward

    handles = [blocks[start].register_forward_pre_hook(pre, with_kwargs=True),
               blocks[stop - 1].register_forward_hook(post)]
    try:
        _run(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    if not rec["args"]:  # hidden states passed by keyword
        rec["args"] = (rec["kwargs"].pop("hidden_states"),)
    return rec


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2)[mask].mean()


def _mse_over(records: Sequence[dict], block: nn.Module | None) -> float:
    """Token-weighted MSE of ``block`` (None: identity, i.e. dropping the span) on ``records``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            x = rec["args"][0]
            pred = x if block is None else _hidden_from_output(block(*rec["args"], **rec["kwargs"]))
            n = int(rec["mask"].sum())
            total += float(_masked_mse(pred, rec["target"], rec["mask"])) * n
            count += n
    return total / max(count, 1)


def train_replacement(block: nn.Module, train: Sequence[dict], held_out: Sequence[dict], epochs: int, lr: float,
                      seed: int = 0, trainable: Sequence[nn.Parameter] | None = None) -> dict[str, Any]:
    """Fit ``block`` in place to map each record's input to its target (MSE over real tokens).

    Keeps the weights of the epoch (0 = the initial block) with the lowest held-out MSE.

    Returns:
        Training metrics: held-out MSE of dropping the span, of the initial and of the fitted block.
    """
    torch.manual_seed(seed)
    params = [p for p in (trainable if trainable is not None else block.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    score_set = held_out or train
    drop = _mse_over(score_set, None)
    best = initial = _mse_over(score_set, block)
    best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    best_epoch, history = 0, [initial]
    rng = np.random.default_rng(seed)
    was_training = block.training
    block.train()
    for epoch in range(1, epochs + 1):
        for i in rng.permutation(len(train)):
            rec = train[int(i)]
            optimizer.zero_grad(set_to_none=True)
            pred = _hidden_from_output(block(*rec["args"], **rec["kwargs"]))
            loss = _masked_mse(pred, rec["target"], rec["mask"])
            loss.backward()
            optimizer.step()
        block.eval()
        current = _mse_over(score_set, block)
        block.train()
        history.append(current)
        if current < best:
            best, best_epoch = current, epoch
            best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    block.load_state_dict(best_state)
    block.train(was_training)
    block.eval()
    return {"held_out_mse_drop": drop, "held_out_mse_initial": initial, "held_out_mse_replacement": best,
            "best_epoch": best_epoch, "held_out_mse_history": history, "n_train_batches": len(train),
            "n_held_out_batches": len(held_out), "scored_on": "held-out" if held_out else "train"}


def plan_streamline(model, n: int, tokenizer, calibration: Calibration, replacement: str = "layer",
                    epochs: int = 10, lr: float = 5e-4, holdout: float = 0.2, seed: int = 0) -> Plan:
    """LLM-Streamline: replace the ``n + 1`` most similar consecutive blocks by one trained block,
    so the model loses ``n`` blocks.

    Args:
        replacement: "layer" (a block initialised from the first removed one, all of it trained)
            or "mlp" (that block with its attention output zeroed and frozen: x + MLP(norm(x))).
        epochs, lr: AdamW training of the replacement on calibration hidden states.
        holdout: fraction of the calibration batches held out to score (and pick) the replacement.
    """
    L = num_blocks(model)
    _check_n(n, L, "streamline")
    if replacement not in ("layer", "mlp"):
        raise ChipTuningError(f"streamline replacement must be 'layer' or 'mlp', got {replacement!r}")
    span = n + 1
    cos = layer_stats(model, tokenizer, calibration, spans=[span]).span_cosine[span]
    start = int(np.argmax(cos))  # replace blocks start+1..start+span (feature(start) -> feature(start+span))
    removed_span = list(range(start + 1, start + span + 1))
    records = _capture_span(model, tokenizer, calibration, start, start + span)
    n_held = int(round(len(records) * holdout)) if len(records) > 1 else 0
    n_held = min(max(n_held, 1 if holdout > 0 and len(records) > 1 else 0), len(records) - 1)
    train, held_out = records[: len(records) - n_held], records[len(records) - n_held:]
    blocks = list(get_blocks(model))
    new_block = copy.deepcopy(blocks[start])
    trainable = None
    if replacement == "mlp":
        projections = attention_output_projections(new_block)
        if not projections:
            raise ChipTuningError(f"streamline mlp: no attention output projection found in {type(new_block).__name__}")
        with torch.no_grad():
            for _, proj in projections:
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
        frozen = {id(p) for _, m in attention_modules(new_block) for p in m.parameters()}
        trainable = [p for p in new_block.parameters() if id(p) not in frozen]
    for p in new_block.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        metrics = train_replacement(new_block, train, held_out, epochs, lr, seed=seed, trainable=trainable)
    for p in new_block.parameters():
        p.requires_grad_(False)
    plan_blocks = blocks[:start] + [new_block] + blocks[start + span:]
    groups = [[i] for i in range(1, start + 1)] + [removed_span] + [[i] for i in range(start + span + 1, L + 1)]
    details = {"span_cosine": [float(x) for x in cos], "start_layer": start, "replaced_blocks": removed_span,
               "replacement": replacement, "epochs": epochs, "lr": lr, "holdout": holdout, "seed": seed,
               "training": metrics}
    log.info("streamline: blocks %s -> one %s block; held-out MSE %.4g (drop %.4g)", removed_span, replacement,
             metrics["held_out_mse_replacement"], metrics["held_out_mse_drop"])
    return Plan("streamline", groups, removed_span, details, blocks=plan_blocks)


# -- merging (slm, laco) --------------------------------------------------------------------------

class _OutputSimilarity:
    """Mean cosine, over real calibration tokens, between the original model's last raw block output
    and the same output of the model with a candidate block list."""

    def __init__(self, model, tokenizer, calibration: Calibration):
        self.model, self.batches = model, list(calibration.batches(tokenizer, next(model.parameters()).device))
        self.reference = [self._final(ids, mask) for ids, mask in self.batches]
        self.evaluations = 0

    def _final(self, ids, mask) -> torch.Tensor:
        blocks = get_blocks(self.model)
        out: dict[str, torch.Tensor] = {}
        handle = blocks[len(blocks) - 1].register_forward_hook(
            lambda _m, _a, o: out.__setitem__("h", _hidden_from_output(o).detach()))
        try:
            _run(self.model, ids, mask)
        finally:
            handle.remove()
        return out["h"]

    def __call__(self, candidate: Sequence[nn.Module]) -> float:
        original = get_blocks(self.model)
        set_blocks(self.model, nn.ModuleList(candidate))
        total, count = 0.0, 0
        try:
            for (ids, mask), ref in zip(self.batches, self.reference):
                c = _cos(self._final(ids, mask), ref)[mask.bool()]
                total += float(c.double().sum())
                count += int(c.numel())
        finally:
            set_blocks(self.model, original)
        self.evaluations += 1
        return total / count


def _merge_start(model, n: int | None, tokenizer, calibration: Calibration, method: str):
    """Shared start of the merging methods: (L, output similarity, [(block, [layer])], target depth)."""
    L = num_blocks(model)
    if n is not None:
        _check_n(n, L, method)
    similarity = _OutputSimilarity(model, tokenizer, calibration)
    current = [(b, [i + 1]) for i, b in enumerate(get_blocks(model))]
    return L, similarity, current, (L - n if n is not None else 1)


def _merge_plan(method: str, current: list[tuple[nn.Module, list[int]]], L: int, details: dict) -> Plan:
    groups = [g for _, g in current]
    removed = sorted(i for g in groups if len(g) > 1 for i in g)
    return Plan(method, groups, removed, details, blocks=[m for m, _ in current])


def _window(current, low, high) -> tuple[nn.Module, list[int]]:
    members = current[low:high + 1]
    return merge_blocks([m for m, _ in members]), [i for _, g in members for i in g]


def plan_slm(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
             max_sweeps: int = 100) -> Plan:
    """Sliding layer merging, from the top down (see the module docstring).

    Args:
        n: blocks to lose (the target), or None to make one sweep at ``threshold`` and stop.
        threshold: cosine similarity to the original output that a merged window must keep.
    """
    L, similarity, current, target = _merge_start(model, n, tokenizer, calibration, "slm")
    sweeps, t = [], float(threshold)
    while len(current) > target and len(sweeps) < max_sweeps:
        best_rejected, merges = -math.inf, []
        high = len(current) - 1
        while high > 0 and len(current) > target:
            accepted, low = None, high - 1
            while low >= 0 and (high - low) <= len(current) - target:
                candidate = _window(current, low, high)
                sim = similarity([m for m, _ in current[:low]] + [candidate[0]] + [m for m, _ in current[high + 1:]])
                if sim >= t:
                    accepted, low = (low, candidate, sim), low - 1
                else:
                    best_rejected = max(best_rejected, sim)
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
        if not math.isfinite(best_rejected):
            break
        t = best_rejected  # the next sweep accepts at least the most similar rejected window
        log.info("slm: %d blocks after a sweep, target %d; threshold lowered to %.6f", len(current), target, t)
    details = {"threshold": threshold, "sweeps": sweeps, "similarity_evaluations": similarity.evaluations,
               "similarity": "mean cosine of the last block's output over real calibration tokens"}
    return _merge_plan("slm", current, L, details)


def plan_laco(model, n: int | None, tokenizer, calibration: Calibration, threshold: float = 0.9,
              merge_layers: int = 4, interval: int = 2, max_sweeps: int = 100) -> Plan:
    """LaCo: from the top down, collapse ``merge_layers`` consecutive layers into the lowest one
    (base + sum of differences) when the output similarity stays >= ``threshold``; after a merge
    step down ``interval`` layers, else one. Merges never overshoot the target ``n``."""
    if merge_layers < 2 or interval < 1:
        raise ChipTuningError(f"laco needs merge_layers >= 2 and interval >= 1, got {merge_layers}, {interval}")
    L, similarity, current, target = _merge_start(model, n, tokenizer, calibration, "laco")
    sweeps, t = [], float(threshold)
    while len(current) > target and len(sweeps) < max_sweeps:
        best_rejected, merges = -math.inf, []
        size = min(merge_layers, len(current) - target + 1)
        low = len(current) - size
        while low >= 0 and len(current) > target:
            size = min(merge_layers, len(current) - target + 1, len(current) - low)
            if size < 2:
                low -= 1
                continue
            candidate = _window(current, low, low + size - 1)
            sim = similarity([m for m, _ in current[:low]] + [candidate[0]] + [m for m, _ in current[low + size:]])
            if sim >= t:
                current = current[:low] + [candidate] + current[low + size:]
                merges.append({"blocks": candidate[1], "similarity": sim})
                low -= interval
            else:
                best_rejected = max(best_rejected, sim)
                low -= 1
        sweeps.append({"threshold": t, "merges": merges})
        if n is None or len(current) <= target or not math.isfinite(best_rejected):
            break
        t = best_rejected
        log.info("laco: %d blocks after a sweep, target %d; threshold lowered to %.6f", len(current), target, t)
    details = {"threshold": threshold, "merge_layers": merge_layers, "interval": interval, "sweeps": sweeps,
               "similarity_evaluations": similarity.evaluations,
               "similarity": "mean cosine of the last block's output over real calibration tokens"}
    return _merge_plan("laco", current, L, details)


# -- applying a plan ------------------------------------------------------------------------------

def plan_method(model, method: str, n: int, tokenizer=None, calibration: Calibration | None = None,
                cache=None, **options) -> Plan:
    """The :class:`Plan` of ``method`` removing ``n`` blocks (options: see each ``plan_*``)."""
    if method not in METHODS:
        raise ChipTuningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - set(DEFAULTS.get(method, {}))
    if unknown:
        raise ChipTuningError(f"{method} does not take the option(s) {sorted(unknown)}")
    opts = {**DEFAULTS.get(method, {}), **options}
    needs_text = method in ("streamline", "slm", "laco") or (method in ("shortgpt", "angular") and cache is None)
    if needs_text and (calibration is None or tokenizer is None):
        raise ChipTuningError(f"{method} needs calibration text (and the tokenizer)")
    if method == "tail":
        return plan_tail(model, n)
    if method == "shortgpt":
        return plan_shortgpt(model, n, tokenizer, calibration, cache=cache)
    if method == "angular":
        return plan_angular(model, n, tokenizer, calibration, cache=cache)
    if method == "streamline":
        return plan_streamline(model, n, tokenizer, calibration, **opts)
    if method == "slm":
        return plan_slm(model, n, tokenizer, calibration, **opts)
    return plan_laco(model, n, tokenizer, calibration, **opts)


def apply_plan_(model, plan: Plan) -> nn.Module:
    """Cut ``model`` in place to the plan's blocks (config depth, per-layer lists, layer ids)."""
    originals = list(get_blocks(model))
    modules = plan.blocks if plan.blocks is not None else [originals[g[0] - 1] for g in plan.groups]
    if len(modules) != len(plan.groups):
        raise ChipTuningError("plan has a different number of blocks and groups; this is a bug")
    return rebuild_blocks_(model, [(m, g[0] - 1) for m, g in zip(modules, plan.groups)])


# -- saving ---------------------------------------------------------------------------------------

def n_from_ratio(ratio: float, n_blocks: int) -> int:
    """Blocks to remove for a target ratio of blocks (rounded, at least 1, at most L-1)."""
    if not 0 < ratio < 1:
        raise ChipTuningError(f"--ratio must be between 0 and 1 (a fraction of the blocks), got {ratio}")
    return int(min(max(round(ratio * n_blocks), 1), n_blocks - 1))


def _count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def check_reload(path: Path, cls, depth: int):
    """Reload ``path`` with ``cls`` and refuse missing, unexpected, mismatched or new weights."""
    model, info = cls.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ChipTuningError(f"the pruned checkpoint {path} does not reload cleanly: {bad}")
    if num_blocks(model) != depth or len(get_blocks(model)) != depth:
        raise ChipTuningError(f"the reloaded checkpoint has {len(get_blocks(model))} blocks, expected {depth}")
    return model.eval()


def generation_check(model, tokenizer, max_new_tokens: int = 4) -> dict[str, Any]:
    """Greedy generation with and without the KV cache must give the same tokens."""
    device = next(model.parameters()).device
    enc = tokenizer(GENERATION_CHECK_PROMPT, return_tensors="pt")
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**enc, use_cache=True, **kwargs)
        plain = model.generate(**enc, use_cache=False, **kwargs)
    if not torch.equal(cached, plain):
        raise ChipTuningError("generation with a KV cache differs from generation without one on the pruned model")
    return {"prompt": GENERATION_CHECK_PROMPT, "new_tokens": int(cached.shape[1] - enc["input_ids"].shape[1]),
            "kv_cache_matches": True}


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def save_pruned_model(model, tokenizer, out_dir: str | Path, plan: Plan, record: dict[str, Any]) -> Path:
    """Save ``model`` (already cut) + tokenizer + ``pruning.json``, check the reload and (decoders)
    KV-cache generation, atomically (temporary sibling directory renamed at the end)."""
    from chiptuning.prune.provenance import file_checksums, record_hash
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / RECORD_FILE).exists():
        raise ChipTuningError(f"--out {out_dir} exists and is not a depth-pruned checkpoint; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        decoder = get_spec(model).decoder
        has_head = decoder and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        depth = len(plan.groups)
        reloaded = check_reload(tmp, AutoModelForCausalLM if has_head else AutoModel, depth)
        record = dict(record)
        record["reload"] = {"class": type(reloaded).__name__, "clean": True}
        record["generation"] = generation_check(reloaded, tokenizer) if has_head else None
        del reloaded
        record.update(format=RECORD_FORMAT, chiptuning_version=__version__, checksums=file_checksums(tmp, exclude=(RECORD_FILE,)))
        record = _json_safe(record)
        record["record_sha256"] = record_hash(record)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_record(path: str | Path) -> dict[str, Any]:
    """The ``pruning.json`` of a depth-pruned checkpoint."""
    file = Path(path) / RECORD_FILE
    if not file.is_file():
        raise ChipTuningError(f"{path} has no {RECORD_FILE}: not a checkpoint written by `chiptuning prune --method`")
    return json.loads(file.read_text())


def prune_with_method(
    model_name_or_path: str,
    method: str,
    out_dir: str | Path,
    *,
    n_layers: int | None = None,
    ratio: float | None = None,
    calibration_task=None,
    n_calibration: int | None = 128,
    max_length: int | None = 256,
    batch_size: int = 8,
    cache: str | Path | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
    model=None,
    tokenizer=None,
    **options,
) -> Path:
    """Prune ``model_name_or_path`` with a baseline ``method`` and save a standard checkpoint.

    Args:
        method: one of :data:`METHODS`.
        out_dir: the checkpoint directory (HF model + tokenizer + ``pruning.json``).
        n_layers / ratio: blocks to remove, or the fraction of blocks (exactly one).
        calibration_task: a loaded task (``chiptuning.tasks.load_task``) whose prompts are the
            calibration text; not needed by ``tail``, nor by ``shortgpt``/``angular`` with a cache.
        n_calibration: calibration examples drawn from it (seeded); None for all.
        max_length: longest calibration prompt, in tokens.
        cache: a last-token cache of this model (``shortgpt``: last-token BI; ``angular``: exact).
        model, tokenizer: an already-loaded model (``*ForCausalLM`` for decoders, to keep the LM
            head) and tokenizer; loaded from ``model_name_or_path`` when None. The model is cut
            in place.
        **options: method options (:data:`DEFAULTS`).

    Returns:
        ``out_dir``. Its ``pruning.json`` records the method, the blocks removed or merged, the
        scores, the calibration source and size, parameter counts and the reload/generation checks.
    """
    from chiptuning.models import load_model, load_tokenizer, weights_hash

    if method not in METHODS:
        raise ChipTuningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    if model is None:
        from transformers import AutoConfig

        decoder = get_spec(AutoConfig.from_pretrained(model_name_or_path)).decoder
        model = load_model(model_name_or_path, dtype=dtype, device=device, causal_lm=decoder)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name_or_path)
    model.eval()
    L = num_blocks(model)
    n = n_from_ratio(ratio, L) if ratio is not None else int(n_layers)
    calibration = None
    if calibration_task is not None and method != "tail":
        calibration = calibration_from_task(calibration_task, tokenizer, n_calibration, max_length, batch_size, seed)
    params_before = _count_params(model)
    model_hash = weights_hash(model_name_or_path, model)
    plan = plan_method(model, method, n, tokenizer, calibration, cache=cache, **options)
    apply_plan_(model, plan)
    params_after = _count_params(model)
    record = {
        "method": method,
        "options": {**DEFAULTS.get(method, {}), **options},
        "base_model": {"id": str(model_name_or_path), "hash": model_hash, "model_type": model.config.model_type,
                       "num_blocks": L},
        "num_blocks": len(plan.groups),
        "blocks_removed": L - len(plan.groups),
        "block_ratio": (L - len(plan.groups)) / L,
        "groups": plan.groups,
        "removed": plan.removed,
        "details": plan.details,
        "calibration": None if calibration is None else calibration.source,
        "cache": None if cache is None else str(cache),
        "params": {"before": params_before, "after": params_after,
                   "pruning_ratio": 1 - params_after / params_before},
    }
    path = save_pruned_model(model, tokenizer, out_dir, plan, record)
    log.info("%s: %d of %d blocks removed (groups %s) -> %s", method, L - len(plan.groups), L, plan.groups, path)
    return path
