"""The dense (unpruned) model on the same data: speed, the chip on it, and the zero-shot baseline.

``chiptuning eval --dense`` runs the base model recorded in the checkpoint over the same prompts,
batches and hardware as the pruned one. One full-depth pass gives three things:

* the time a dense model takes (every block runs), for the speedup against the pruned model;
* feature(l) of the dense model, on which the chip must predict what it predicts on the pruned
  model (a live parity check);
* for decoder models, the paper's dense zero-shot baseline: the LM head's scores of each label's
  first token at the last prompt token, taken from the final-normed state of the last block (the
  same numbers ``*ForCausalLM`` computes there, without the (B, T, vocab) logits of every token).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from chiptuning.prune.chip_model import encode_batches

from chiptuning.errors import ProvenanceError
from chiptuning.features import last_token_features
from chiptuning.models import weights_hash
from chiptuning.registry import get_final_norm, get_spec, num_blocks

log = logging.getLogger(__name__)


def load_dense(record: dict[str, Any], dense_model: str | None = None, device: str = "cpu"):
    """The base model a checkpoint was pruned from (``*ForCausalLM`` for decoders), checked.

    Raises:
        ProvenanceError: its weights are not the ones the checkpoint records.
    """
    from chiptuning.prune.checkpoint import _load_model

    base = record["base_model"]
    path = dense_model or base["id"]
    decoder = get_spec_from_type(base["model_type"]).decoder
    model = _load_model(path, record["dtype"], device, base.get("adapter"), causal_lm=decoder)
    found = weights_hash(path, model)
    recorded = base.get("hash")
    if recorded and found.split(":")[0] == recorded.split(":")[0] and found != recorded:
        raise ProvenanceError(
            f"dense model {path!r} has weights {found}, but the checkpoint was pruned from {recorded}; "
            "give the base model with --dense-model"
        )
    if num_blocks(model) != record["num_blocks"]:
        raise ProvenanceError(
            f"dense model {path!r} has {num_blocks(model)} blocks, the checkpoint's base had {record['num_blocks']}"
        )
    return model


def get_spec_from_type(model_type: str):
    from types import SimpleNamespace

    return get_spec(SimpleNamespace(model_type=model_type))


def choice_token_ids(tokenizer, label_names: list[str], prompt: str) -> list[int] | None:
    """First token of each label as the continuation of ``prompt`` (None if two labels share it).

    After a prompt ending in whitespace the label follows directly ("Answer: " + "A"); otherwise
    it follows a space ("Answer:" + " A").
    """
    prefix = "" if prompt[-1:].isspace() else " "
    ids = [tokenizer(prefix + name, add_special_tokens=False)["input_ids"][0] for name in label_names]
    return ids if len(set(ids)) == len(ids) else None


@torch.no_grad()
def dense_pass(model, tokenizer, prompts: list[str], layer: int, mode: str, chip, label_names: list[str],
               max_length: int | None, batch_size: int = 16, class_mask: np.ndarray | None = None) -> dict[str, Any]:
    """Run the dense model over ``prompts``: chip predictions at ``layer``, zero-shot, timing.

    ``class_mask`` (N, C) bool limits both predictions to each prompt's options (None: all valid).

    Returns:
        {"chip_predictions" (N,), "zero_shot_predictions" (N,) or None, "elapsed_s"}.
    """
    L = num_blocks(model)
    device = next(model.parameters()).device
    head = model.get_output_embeddings() if get_spec(model).decoder else None
    norm = get_final_norm(model)
    choices = [choice_token_ids(tokenizer, label_names, p) for p in prompts] if head is not None else None
    if choices is not None and any(c is None for c in choices):
        log.warning("two labels of %s start with the same token; no zero-shot baseline", label_names)
        choices = None
    feats_l, zero_shot = [], []
    started = time.perf_counter()
    for k, (ids, mask) in enumerate(encode_batches(tokenizer, prompts, max_length, batch_size, device)):
        feats = last_token_features(model, ids, mask, layers=[layer, L], mode=mode)  # (B, 2, H), all blocks run
        feats_l.append(feats[:, 0].float().cpu().numpy())
        if choices is not None:
            last = feats[:, 1] if mode == "normed" or norm is None else norm(feats[:, 1])  # (B, H)
            logits = head(last).float()  # (B, V)
            rows = choices[k * batch_size:(k + 1) * batch_size]
            picked = logits.gather(1, torch.tensor(rows, device=logits.device))  # (B, C)
            if class_mask is not None:
                valid = torch.as_tensor(class_mask[k * batch_size:(k + 1) * batch_size], device=picked.device)
                picked = picked.masked_fill(~valid, float("-inf"))
            zero_shot.append(picked.argmax(-1).cpu().numpy())
    elapsed = time.perf_counter() - started
    return {
        "chip_predictions": np.asarray(chip.predict(np.concatenate(feats_l), class_mask=class_mask)).astype(np.int64),
        "zero_shot_predictions": np.concatenate(zero_shot).astype(np.int64) if choices is not None else None,
        "elapsed_s": elapsed,
    }
