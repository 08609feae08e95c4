"""LLM-Streamline: replace the most similar span of consecutive blocks by one trained block (on a streamed
model only the first removed block, the replacement's start, is read into memory)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from chiptuning.errors import ChipTuningError
from chiptuning.features import StopForward, capture_block_call, capture_layers, hidden_from_output, run_backbone
from chiptuning.models import materialized_copy, model_device
from chiptuning.prune.baselines.calibration import Calibration, layer_stats
from chiptuning.prune.baselines.plan import Plan, check_n
from chiptuning.registry import get_blocks, num_blocks

log = logging.getLogger(__name__)


def attention_output_projections(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention output projection(s) of a block (o_proj, attn.c_proj, attention.output.dense, ...)."""
    found = []
    for name, module in block.named_modules():
        parts = name.split(".")
        in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
        if in_attention and parts[-1] in ("o_proj", "out_proj", "c_proj", "dense") and hasattr(module, "weight"):
            found.append((name, module))
    return found


def capture_span(model, tokenizer, calibration: Calibration, start: int, stop: int) -> list[dict]:
    """Per calibration batch: the call (``args``, ``kwargs``) of block ``start + 1``, whose input is
    feature(start), the ``target`` feature(stop) and the real-token ``mask``; full (B, T, H) states."""
    return [_capture_batch(model, ids, mask, start, stop)
            for ids, mask in calibration.batches(tokenizer, model_device(model))]


def _capture_batch(model, ids, mask, start: int, stop: int) -> dict:
    rec: dict[str, Any] = {"mask": mask.bool()}
    L = len(get_blocks(model))

    def keep(_layer: int, hidden: torch.Tensor) -> None:
        rec["target"] = hidden.detach()
        if stop < L:
            raise StopForward

    with capture_block_call(model, start, rec), capture_layers(model, [stop], keep):
        run_backbone(model, ids, mask)
    if not rec["args"]:  # hidden states passed by keyword
        rec["args"] = (rec["kwargs"].pop("hidden_states"),)
    return rec


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2)[mask].mean()


def mse_over(records: Sequence[dict], block: nn.Module | None) -> float:
    """Token-weighted MSE of ``block`` (None: the identity, i.e. dropping the span) on ``records``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            x = rec["args"][0]
            pred = x if block is None else hidden_from_output(block(*rec["args"], **rec["kwargs"]))
            n = int(rec["mask"].sum())
            total += float(_masked_mse(pred, rec["target"], rec["mask"])) * n
            count += n
    return total / max(count, 1)


def train_replacement(block: nn.Module, train: Sequence[dict], held_out: Sequence[dict], epochs: int, lr: float,
                      seed: int = 0, trainable: Sequence[nn.Parameter] | None = None) -> dict[str, Any]:
    """Fit ``block`` in place (AdamW on the MSE over real tokens) to map each record's input to its
    target; keep the epoch's weights (0: the initial block) of lowest held-out MSE, and return
    the training metrics."""
    torch.manual_seed(seed)
    params = [p for p in (trainable if trainable is not None else block.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    score_set = held_out or train
    drop = mse_over(score_set, None)
    best = initial = mse_over(score_set, block)
    best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    best_epoch, history = 0, [initial]
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        block.train()
        for i in rng.permutation(len(train)):
            rec = train[int(i)]
            optimizer.zero_grad(set_to_none=True)
            pred = hidden_from_output(block(*rec["args"], **rec["kwargs"]))
            _masked_mse(pred, rec["target"], rec["mask"]).backward()
            optimizer.step()
        block.eval()
        history.append(mse_over(score_set, block))
        if history[-1] < best:
            best, best_epoch = history[-1], epoch
            best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    block.load_state_dict(best_state)
    block.eval()
    return {"held_out_mse_drop": drop, "held_out_mse_initial": initial, "held_out_mse_replacement": best,
            "best_epoch": best_epoch, "held_out_mse_history": history, "n_train_batches": len(train),
            "n_held_out_batches": len(held_out), "scored_on": "held-out" if held_out else "train"}


def _mlp_only_(block: nn.Module) -> list[nn.Parameter]:
    """Zero the attention output of ``block`` in place; its parameters outside attention (to train)."""
    projections = attention_output_projections(block)
    if not projections:
        raise ChipTuningError(f"streamline mlp: no attention output projection found in {type(block).__name__}")
    with torch.no_grad():
        for _, proj in projections:
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()
    frozen = {id(p) for name, m in block.named_children() if "attn" in name or "attention" in name
              for p in m.parameters()}
    return [p for p in block.parameters() if id(p) not in frozen]


def plan_streamline(model, n: int, tokenizer, calibration: Calibration, replacement: str = "layer",
                    epochs: int = 10, lr: float = 5e-4, holdout: float = 0.2, seed: int = 0) -> Plan:
    """Replace the ``n + 1`` most similar consecutive blocks (cosine over all real tokens) by one
    trained block, so the model loses ``n`` blocks.

    Args:
        replacement: "layer" (a copy of the first removed block, all of it trained) or "mlp" (that
            copy with its attention output zeroed and frozen: x + MLP(norm(x)) in pre-norm models).
        epochs, lr: AdamW training of the replacement on calibration hidden states.
        holdout: fraction of the calibration batches held out to score (and pick) the replacement.
    """
    L = num_blocks(model)
    check_n(n, L, "streamline")
    if replacement not in ("layer", "mlp"):
        raise ChipTuningError(f"streamline replacement must be 'layer' or 'mlp', got {replacement!r}")
    span = n + 1
    cos = layer_stats(model, tokenizer, calibration, spans=[span]).span_cosine[span]
    start = int(np.argmax(cos))  # replace blocks start+1..start+span (feature(start) -> feature(start+span))
    replaced = list(range(start + 1, start + span + 1))
    records = capture_span(model, tokenizer, calibration, start, start + span)
    n_held = int(round(len(records) * holdout)) if len(records) > 1 else 0
    n_held = min(max(n_held, 1 if holdout > 0 and len(records) > 1 else 0), len(records) - 1)
    train, held_out = records[: len(records) - n_held], records[len(records) - n_held:]
    blocks = list(get_blocks(model))
    new_block = materialized_copy(blocks[start])  # the model's own block stays as it is (and streamed, if it is)
    trainable = _mlp_only_(new_block) if replacement == "mlp" else None
    new_block.requires_grad_(True)
    with torch.enable_grad():
        metrics = train_replacement(new_block, train, held_out, epochs, lr, seed=seed, trainable=trainable)
    new_block.requires_grad_(False)
    groups = [[i] for i in range(1, start + 1)] + [replaced] + [[i] for i in range(start + span + 1, L + 1)]
    details = {"span_cosine": [float(x) for x in cos], "start_layer": start, "replaced_blocks": replaced,
               "replacement": replacement, "epochs": epochs, "lr": lr, "holdout": holdout, "seed": seed,
               "training": metrics}
    log.info("streamline: blocks %s -> one %s block; held-out MSE %.4g (drop %.4g)", replaced, replacement,
             metrics["held_out_mse_replacement"], metrics["held_out_mse_drop"])
    return Plan("streamline", groups, replaced, details, blocks=blocks[:start] + [new_block] + blocks[start + span:])
