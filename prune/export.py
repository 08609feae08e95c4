"""Export a pruned model + linear chip as a plain ``*ForSequenceClassification`` checkpoint: a decoder's
computes a bias-free ``score(final_norm(h_l))`` at the last non-pad token, on a model cut to l blocks exactly
a bias-free linear chip on the *normed* feature(l), which folds into ``score.weight``.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from chiptuning.errors import ChipTuningError
from chiptuning.registry import base_model, get_spec

EXPORT_FORMATS = ("sequence-classification",)


def linear_chip_weights(chip, n_classes: int) -> np.ndarray:
    """The (C, H) weights of a bias-free linear chip (``linear_weights()``, or scikit-learn's ``coef_``
    and ``intercept_``) as logits of all C classes: a binary chip's single row w becomes [0, w], the
    same softmax. ChipTuningError for any other chip, or one with a non-zero bias."""
    if hasattr(chip, "linear_weights"):  # a chip that exposes its (W, b) itself
        weight, bias = chip.linear_weights()
    elif hasattr(chip, "coef_"):
        weight, bias = chip.coef_, getattr(chip, "intercept_", None)
    else:
        raise ChipTuningError(f"--export sequence-classification needs a linear chip; {type(chip).__name__} is not "
                              "one (train with --chip linear or logreg)")
    weight = np.asarray(weight, dtype=np.float64)
    if bias is not None and np.any(np.asarray(bias) != 0):
        raise ChipTuningError("--export sequence-classification needs a bias-free linear chip (a *ForSequence"
                              "Classification score layer has no bias); train the chip without intercept/bias")
    if weight.shape[0] == 1 and n_classes == 2:
        weight = np.concatenate([np.zeros_like(weight), weight])
    if weight.shape[0] != n_classes:
        raise ChipTuningError(f"the chip has {weight.shape[0]} output rows for {n_classes} classes")
    return weight  # (C, H)


def to_sequence_classification(model, tokenizer, chip, label_names: list[str], feature_mode: str):
    """A ``*ForSequenceClassification`` model: the truncated ``model``'s backbone, ``chip`` as its ``score``
    head, ``label_names`` as ``id2label``, the tokenizer's pad token id in the config (batched pooling).
    ChipTuningError for raw features, an encoder, a model type without that class, a chip that does not fold."""
    if feature_mode != "normed":
        raise ChipTuningError("--export sequence-classification needs chips on normed features (extract with "
                              "--feature-mode normed): the classifier head reads the final-normed state")
    if not get_spec(model).decoder:
        raise ChipTuningError(f"--export sequence-classification supports decoder models; {model.config.model_type} "
                              "classifies from its pooled first token, not the last token the chip reads")
    weight = linear_chip_weights(chip, len(label_names))
    backbone = base_model(model)
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.pad_token_id = tokenizer.pad_token_id
    last_id = tokenizer("x", add_special_tokens=True)["input_ids"][-1]
    if last_id == tokenizer.pad_token_id:
        raise ChipTuningError("the tokenizer ends every prompt with its pad token, which *ForSequenceClassification "
                              "pooling skips; set a distinct pad token before exporting")
    try:
        seq = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise ChipTuningError(f"transformers has no sequence-classification class for {config.model_type}; "
                              "leave out --export") from None
    score = getattr(seq, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise ChipTuningError(f"{type(seq).__name__} has no bias-free `score` head; leave out --export")
    # Features are defined from input ids and mask alone; a tokenizer that also returns
    # token_type_ids (GPT-2 adds their embeddings) would make served logits differ from the chip's.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # saved with it
    seq.base_model.load_state_dict(backbone.state_dict())
    dtype = next(backbone.parameters()).dtype
    with torch.no_grad():
        score.weight.copy_(torch.from_numpy(weight).to(dtype))
    return seq.to(dtype).eval()
