"""The model's own answer: label-word scores from the LM head, at the last layer or at any layer.

A decoder's zero-shot answer is the label whose word the LM head finds likeliest at the last prompt
token; a label's score is the log-sum-exp of the logits of its spellings ("True", " true", ...). The
same scores from feature(l) of an earlier layer (a logit lens) show how early the model knows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from chiptuning.errors import CacheError
from chiptuning.records import Invalid, Record, rule
from chiptuning.registry import get_final_norm

log = logging.getLogger(__name__)


def spellings(label: str) -> list[str]:
    """The spellings of a label word as a next token: as given, lower case, capitalized, each
    without and with a leading space (no duplicates, in that order)."""
    word = str(label).strip()
    forms = [word, word.lower(), word[:1].upper() + word[1:].lower()] if word else []
    return list(dict.fromkeys(text for form in forms for text in (form, " " + form)))


@dataclass
class LabelWords(Record):
    """The tokens whose logits stand for each label (a cache's ``meta.lens``)."""

    ERROR = CacheError

    token_ids: list[list[int]] = rule(ge=0)  # per label, the first token of each spelling no other label has
    tokens: list[list[str]] = field(default_factory=list)  # the same as text, for people reading the record

    def check(self) -> None:
        if any(not ids for ids in self.token_ids):
            raise Invalid("token_ids", "a label has no token")
        if self.tokens and [len(t) for t in self.tokens] != [len(ids) for ids in self.token_ids]:
            raise Invalid("tokens", "do not match token_ids")

    @property
    def flat(self) -> list[int]:
        """Every token id, label after label (the K columns of stored lens logits)."""
        return [t for ids in self.token_ids for t in ids]

    @property
    def groups(self) -> list[np.ndarray]:
        """Per label, the positions of its tokens in :attr:`flat`."""
        return np.split(np.arange(len(self.flat)), np.cumsum([len(ids) for ids in self.token_ids])[:-1])


def label_words(tokenizer, label_names: Sequence[str]) -> LabelWords | None:
    """The first token of each of each label's :func:`spellings`. A token two labels share (" A" of
    "A" and "Apple") is left out of both; None, with a warning, when a label is left with no token
    (labels "1" and "10")."""
    per_label: list[list[int]] = []
    for name in label_names:
        ids = []
        for text in spellings(name):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        per_label.append(ids)
    labels_of = Counter(t for ids in per_label for t in ids)  # a label's ids are distinct
    token_ids = [[t for t in ids if labels_of[t] == 1] for ids in per_label]
    bad = [name for name, ids in zip(label_names, token_ids) if not ids]
    if bad:
        log.warning("labels %s cannot be told apart by their first tokens; no zero-shot answer or logit lens", bad)
        return None
    return LabelWords(token_ids=token_ids, tokens=[tokenizer.convert_ids_to_tokens(ids) for ids in token_ids])


@torch.no_grad()
def lens_logits(model, feats: torch.Tensor, words: LabelWords, normed: bool = False) -> torch.Tensor:
    """(..., K) float32 logits of the K tokens of ``words.flat`` from (..., H) features of any
    layers: the final norm (unless ``normed``), then the ``*ForCausalLM``'s head. At the last layer,
    exactly what the model computes for those tokens."""
    norm = get_final_norm(model)
    head = model.get_output_embeddings()
    h = feats if normed or norm is None else norm(feats)
    ids = torch.tensor(words.flat, device=head.weight.device)
    logits = h.to(head.weight.dtype) @ head.weight[ids].t()  # (..., K)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return logits.float()


def label_scores(logits: np.ndarray | torch.Tensor, words: LabelWords) -> np.ndarray:
    """(..., K) token logits -> (..., C) label scores: the log-sum-exp over each label's tokens
    (the log of its probability mass, up to the shared normalizer)."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return torch.stack([torch.logsumexp(x[..., g], dim=-1) for g in words.groups], dim=-1).numpy()


def _masked(scores: np.ndarray | torch.Tensor, class_mask: np.ndarray | None) -> torch.Tensor:
    """float64 scores, -inf outside each row's options (``class_mask`` (N, C))."""
    x = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    return x if class_mask is None else x.masked_fill(~torch.as_tensor(class_mask), float("-inf"))


def _log_softmax(scores: np.ndarray, class_mask: np.ndarray | None) -> np.ndarray:
    return torch.log_softmax(_masked(scores, class_mask), dim=-1).numpy()


def calibrated_scores(scores: np.ndarray, prior_scores: np.ndarray, class_mask: np.ndarray | None = None,
                      prior_mask: np.ndarray | None = None) -> np.ndarray:
    """Scores with the model's label prior divided out: log p(c|x) - log mean_x' p(c|x'), the prior
    being the mean label distribution over the ``prior_scores`` rows (e.g. the training part): a
    model that says "True" to everything loses that bias (contextual calibration)."""
    prior = np.exp(_log_softmax(prior_scores, prior_mask)).mean(axis=0)
    with np.errstate(divide="ignore"):
        return _log_softmax(scores, class_mask) - np.log(np.maximum(prior, 1e-30))


def predict_from_scores(scores: np.ndarray | torch.Tensor, class_mask: np.ndarray | None = None) -> np.ndarray:
    """Arg-max class of each row, never a class outside the row's options (``class_mask`` (N, C))."""
    return _masked(scores, class_mask).argmax(-1).numpy().astype(np.int64)


__all__ = ["LabelWords", "calibrated_scores", "label_scores", "label_words", "lens_logits", "predict_from_scores",
           "spellings"]
