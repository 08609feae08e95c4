"""Export a pruned model + linear chip as a plain ``*ForSequenceClassification`` checkpoint.

Decoder ``*ForSequenceClassification`` classes compute ``score(final_norm(h_l))`` at the last
non-pad token, with a bias-free ``score`` layer. On a model truncated to l blocks that is exactly a
bias-free linear chip applied to the *normed* feature(l) (``--feature-mode normed``), so such a chip
folds into ``score.weight`` and the checkpoint serves without chip-tuning installed, with the same
predictions. Raw-mode chips cannot be folded (the final norm sits between them and ``score``), nor
can chips with a bias (``score`` has none).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from chiptuning.errors import ChipTuningError
from chiptuning.registry import base_model, get_spec

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("sequence-classification",)


def linear_chip_weights(chip, n_classes: int) -> np.ndarray:
    """The (C, H) weight matrix of a bias-free linear chip, as logits of all C classes.

    Reads the scikit-learn convention (``coef_``, ``intercept_``); a binary chip with one row of
    coefficients (the logit of class 1) becomes the rows [0, w], which gives the same softmax.

    Raises:
        ChipTuningError: not a linear chip, or one with a non-zero bias.
    """
    if hasattr(chip, "linear_weights"):  # a chip that exposes its (W, b) itself
        weight, bias = chip.linear_weights()
    elif hasattr(chip, "coef_"):
        weight, bias = chip.coef_, getattr(chip, "intercept_", None)
    else:
        raise ChipTuningError(
            f"--export sequence-classification needs a linear chip; {type(chip).__name__} is not one "
            "(train with --chip linear or logreg)"
        )
    weight = np.asarray(weight, dtype=np.float64)
    if bias is not None and np.any(np.asarray(bias) != 0):
        raise ChipTuningError(
            "--export sequence-classification needs a bias-free linear chip (a *ForSequenceClassification "
            "score layer has no bias); train the chip without intercept/bias"
        )
    if weight.shape[0] == 1 and n_classes == 2:
        weight = np.concatenate([np.zeros_like(weight), weight])
    if weight.shape[0] != n_classes:
        raise ChipTuningError(f"the chip has {weight.shape[0]} output rows for {n_classes} classes")
    return weight  # (C, H)


def to_sequence_classification(model, tokenizer, chip, label_names: list[str], feature_mode: str):
    """A ``*ForSequenceClassification`` model holding ``model``'s (truncated) backbone and the chip.

    Args:
        model: the truncated model (base or with a head); its backbone weights are copied.
        tokenizer: its tokenizer (the pad token id goes into the config for batched pooling).
        chip: a fitted bias-free linear chip on feature(l).
        label_names: class names, in class order (become ``id2label``).
        feature_mode: must be "normed".

    Raises:
        ChipTuningError: raw features, an encoder, a model type without that class, a chip that
            does not fold.
    """
    spec = get_spec(model)
    if feature_mode != "normed":
        raise ChipTuningError(
            "--export sequence-classification needs chips on normed features "
            "(extract with --feature-mode normed): the classifier head reads the final-normed state"
        )
    if not spec.decoder:
        raise ChipTuningError(
            f"--export sequence-classification supports decoder models; {model.config.model_type} "
            "classifies from its pooled first token, not the last token the chip reads"
        )
    weight = linear_chip_weights(chip, len(label_names))
    backbone = base_model(model)
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.pad_token_id = tokenizer.pad_token_id
    last_id = tokenizer("x", add_special_tokens=True)["input_ids"][-1]
    if last_id == tokenizer.pad_token_id:
        raise ChipTuningError(
            "the tokenizer ends every prompt with its pad token, which *ForSequenceClassification "
            "pooling skips; set a distinct pad token before exporting"
        )
    try:
        seq = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise ChipTuningError(
            f"transformers has no sequence-classification class for {config.model_type}; "
            "leave out --export"
        ) from None
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
