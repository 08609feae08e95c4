"""The dense (unpruned) model on the pruned one's inputs, batches and hardware (``eval --dense``, ``run``):
one full-depth pass gives its time (for the speedup), its feature(l), on which the chip must predict what
it predicts on the pruned model (a live parity check), and for decoders the paper's zero-shot baseline
(:mod:`chiptuning.zeroshot`): the LM head's scores of each label's first token at the last prompt token.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from chiptuning.encoding import EncodedInputs, TextInputs
from chiptuning.errors import ProvenanceError
from chiptuning.features import batch_features
from chiptuning.models import load_model, weights_hash
from chiptuning.prune.chip_model import model_batches
from chiptuning.prune.provenance import CheckpointRecord, other_weights
from chiptuning.registry import get_spec, num_blocks, text_config
from chiptuning.zeroshot import label_scores, label_words, lens_logits, predict_from_scores


def load_dense(record: CheckpointRecord, dense_model: str | None = None, device: str = "cpu"):
    """The base model a checkpoint was pruned from (``*ForCausalLM`` for decoders), or
    ``dense_model``; ProvenanceError when its weights or depth are not the ones the record names."""
    base = record.base_model
    path = dense_model or base.id
    model = load_model(path, dtype=record.dtype, device=device, adapter=base.adapter,
                       causal_lm=get_spec(base.model_type).decoder)
    found = weights_hash(path, model)
    if other_weights(base.hash, found):
        raise ProvenanceError(f"dense model {path!r} has weights {found}, but the checkpoint was pruned from "
                              f"{base.hash}; give the base model with --dense-model")
    if num_blocks(model) != record.num_blocks:
        raise ProvenanceError(f"dense model {path!r} has {num_blocks(model)} blocks, the checkpoint's base had "
                              f"{record.num_blocks}")
    return model


@torch.no_grad()
def dense_pass(model, tokenizer, prompts: list[str] | None, layer: int, mode: str, chip, label_names: list[str],
               max_length: int | None, batch_size: int | None = None, class_mask: np.ndarray | None = None,
               max_tokens_per_batch: int | str = "auto", progress: bool = False,
               inputs: EncodedInputs | None = None) -> dict[str, Any]:
    """Run the dense model over ``prompts`` (or encoded ``inputs``; ``tokenizer`` is the text tokenizer,
    for the label words): ``{"chip_predictions" (N,), "zero_shot_predictions" (N,) or None, "elapsed_s"}``.

    Batched as the pruned model is (:func:`~chiptuning.prune.chip_model.model_batches`), so the
    timings compare the models, not their batching. ``class_mask`` (N, C) bool limits both
    predictions to each prompt's options (None: all valid).
    """
    words = label_words(tokenizer, label_names) if get_spec(model).decoder else None
    inputs = inputs if inputs is not None else TextInputs(tokenizer, prompts, max_length)
    feats_l = np.empty((len(inputs), int(text_config(model.config).hidden_size)), dtype=np.float32)
    scores = np.empty((len(inputs), len(label_names)), dtype=np.float32)
    started = time.perf_counter()
    for batch in model_batches(model, inputs, batch_size, max_tokens_per_batch, "dense model", progress):
        feats = batch_features(model, batch, layers=[layer, num_blocks(model)], mode=mode)
        feats_l[batch.rows] = feats[:, 0].float().cpu().numpy()  # (B, H)
        if words is not None:
            logits = lens_logits(model, feats[:, 1], words, normed=mode == "normed")  # (B, K)
            scores[batch.rows] = label_scores(logits.cpu().numpy(), words)
    elapsed = time.perf_counter() - started
    return {
        "chip_predictions": np.asarray(chip.predict(feats_l, class_mask=class_mask)).astype(np.int64),
        "zero_shot_predictions": predict_from_scores(scores, class_mask) if words is not None else None,
        "elapsed_s": elapsed,
    }
