"""LLM-Streamline: replace the most similar span of consecutive blocks by one trained block.

On a streamed model (:func:`chiptuning.models.load_model` with ``offload="stream"``) the span's
inputs and targets come from streamed forward passes, and only the first removed block is read into
memory, as the copy the replacement starts from (:func:`~chiptuning.models.materialized_copy`).
"""

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


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level attention submodules of a block (``self_attn``, ``attn``, ``attention``)."""
    return [(name, m) for name, m in block.named_children() if "attn" in name or "attention" in name]


def capture_span(model, tokenizer, calibration: Calibration, start: int, stop: int) -> list[dict]:
    """For each calibration batch: the call (args, kwargs) of block ``start+1`` (its input is
    feature(start)), the target feature(stop) and the real-token mask. Full (B, T, H) states."""
    device = model_device(model)
    return [_capture_batch(model, ids, mask, start, stop) for ids, mask in calibration.batches(tokenizer, device)]


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
    """Token-weighted MSE of ``block`` (None: identity, i.e. dropping the span) on ``records``."""
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
    """Fit ``block`` in place to map each record's input to its target (MSE over real tokens).

    Keeps the weights of the epoch (0 = the initial block) with the lowest held-out MSE.

    Returns:
        Training metrics: held-out MSE of dropping the span, of the initial and of the fitted block.
    """
    torch.manual_seed(seed)
    params = [p for p in (trainable if trainable is not None else block.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    score_set = held_out or train
    drop = mse_over(score_set, None)
    best = initial = mse_over(score_set, block)
    best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    best_epoch, history = 0, [initial]
    rng = np.random.default_rng(seed)
    was_training = block.training
    block.train()
    for epoch in range(1, epochs + 1):
        for i in rng.permutation(len(train)):
            rec = train[int(i)]
            optimizer.zero_grad(set_to_none=True)
            pred = hidden_from_output(block(*rec["args"], **rec["kwargs"]))
            loss = _masked_mse(pred, rec["target"], rec["mask"])
            loss.backward()
            optimizer.step()
        block.eval()
        current = mse_over(score_set, block)
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
    check_n(n, L, "streamline")
    if replacement not in ("layer", "mlp"):
        raise ChipTuningError(f"streamline replacement must be 'layer' or 'mlp', got {replacement!r}")
    span = n + 1
    cos = layer_stats(model, tokenizer, calibration, spans=[span]).span_cosine[span]
    start = int(np.argmax(cos))  # replace blocks start+1..start+span (feature(start) -> feature(start+span))
    removed_span = list(range(start + 1, start + span + 1))
    records = capture_span(model, tokenizer, calibration, start, start + span)
    n_held = int(round(len(records) * holdout)) if len(records) > 1 else 0
    n_held = min(max(n_held, 1 if holdout > 0 and len(records) > 1 else 0), len(records) - 1)
    train, held_out = records[: len(records) - n_held], records[len(records) - n_held:]
    blocks = list(get_blocks(model))
    new_block = materialized_copy(blocks[start])  # the model's own block stays as it is (and streamed, if it is)
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
