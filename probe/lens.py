"""The model's own answer at every layer, from a cache (no model run).

A decoder's cache stores, for every layer, the LM head's logits of the label words applied to that
layer's feature (:mod:`chiptuning.zeroshot`, extraction's ``--lens``): the accuracy of that answer
at each layer is the *logit-lens curve* ``probe train`` draws beside the chips'; at the last layer
it is the dense model's *zero-shot* answer, plain and prior-calibrated on the training cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chiptuning.errors import CacheError
from chiptuning.probe.data import cache_class_mask
from chiptuning.probe.records import ZeroShot
from chiptuning.zeroshot import LabelWords, calibrated_scores, label_scores, predict_from_scores


def lens_label_scores(cache) -> np.ndarray:
    """(N, n_layers, C) label scores of every row and layer (log-sum-exp over each label's tokens);
    CacheError when the cache stores no lens."""
    if not getattr(cache, "has_lens", False):
        raise CacheError(f"cache {getattr(cache, 'path', '')} stores no label-word logits (a decoder "
                         "extracted with --lens has them)")
    return label_scores(cache.lens(), LabelWords.from_dict(cache.meta.lens))


def lens_curve(eval_cache, prior_cache=None) -> list[dict[str, Any]]:
    """[{"layer", "lens_accuracy", "lens_calibrated_accuracy"}] for every layer of ``eval_cache``:
    the accuracy of the model's own answer, and with ``prior_cache`` (the training cache, same
    prompts) the prior-calibrated one."""
    scores = lens_label_scores(eval_cache)  # (N, n_layers, C)
    C = scores.shape[2]
    y = np.asarray(eval_cache.labels)
    mask = cache_class_mask(eval_cache, C)
    prior = prior_mask = None
    if prior_cache is not None:
        if prior_cache.meta.lens != eval_cache.meta.lens:
            raise CacheError("the prior cache scores other label tokens than the eval cache; extract both with "
                             "the same model and labels")
        prior, prior_mask = lens_label_scores(prior_cache), cache_class_mask(prior_cache, C)
    rows = []
    for j, layer in enumerate(eval_cache.layers):
        row = {"layer": int(layer),
               "lens_accuracy": float((predict_from_scores(scores[:, j], mask) == y).mean())}
        if prior is not None:
            calibrated = calibrated_scores(scores[:, j], prior[:, j], mask, prior_mask)
            row["lens_calibrated_accuracy"] = float((predict_from_scores(calibrated, mask) == y).mean())
        rows.append(row)
    return rows


def zero_shot_report(eval_cache, prior_cache=None) -> ZeroShot:
    """The dense model's zero-shot answer on ``eval_cache`` (the lens at the last layer): plain and
    (with a prior cache) prior-calibrated accuracy, the layer, the prompt kind, the label tokens,
    and how often it gives each label."""
    last = lens_curve(eval_cache, prior_cache)[-1]
    scores = lens_label_scores(eval_cache)[:, -1]
    predictions = predict_from_scores(scores, cache_class_mask(eval_cache, scores.shape[1]))
    share = np.bincount(predictions, minlength=scores.shape[1]) / max(len(predictions), 1)
    return ZeroShot(
        accuracy=last["lens_accuracy"], calibrated_accuracy=last.get("lens_calibrated_accuracy"), layer=last["layer"],
        n_examples=int(eval_cache.n_rows),
        prompt="chat template" if eval_cache.meta.task.get("chat_template") else "plain",
        label_tokens=LabelWords.from_dict(eval_cache.meta.lens, "cache meta lens").tokens,
        prediction_share={name: float(x) for name, x in zip(eval_cache.label_names, share)},
    )

