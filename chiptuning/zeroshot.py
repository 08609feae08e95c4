"""The model's own answer: label-word scores from the LM head, at the last layer or at any layer.

A decoder answers a classification prompt with the next word it would write. Its zero-shot
prediction is the label whose word gets the most probability from the LM head at the last prompt
token. A label word can be spelled several ways as a next token ("True", " True", " true", ...),
so each label is scored by the probability mass of all its spellings: the log-sum-exp of their
logits (:class:`LabelWords`). Applying the final norm and the LM head to feature(l) of an earlier
layer gives the same scores "at layer l" (a logit lens): how early the model itself knows.

* :func:`label_words` finds each label's tokens, or says that the label set cannot be verbalized;
* :func:`lens_logits` computes the logits of those tokens from features of any layers;
* :func:`label_scores` turns them into one score per label; :func:`calibrated_scores` divides out
  the label prior the model shows on the training part (the usual contextual calibration).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from chiptuning.errors import CacheError
from chiptuning.records import Invalid, Record, rule
from chiptuning.registry import get_final_norm

log = logging.getLogger(__name__)


def spellings(label: str) -> list[str]:
    """The spellings of a label word as a next token: as given, lower case, capitalized, each with
    and without a leading space (no duplicates, in that order)."""
    word = str(label).strip()
    forms = [word, word.lower(), word[:1].upper() + word[1:].lower()]
    out: list[str] = []
    for form in forms:
        for text in (form, " " + form):
            if form and text not in out:
                out.append(text)
    return out


@dataclass
class LabelWords(Record):
    """The tokens whose logits stand for each label (a cache's ``meta.lens``).

    Attributes:
        token_ids: per label, the first token of each of its spellings (no token shared by two labels).
        tokens: the same tokens as text (for people reading a record).
    """

    ERROR = CacheError

    token_ids: list[list[int]] = rule(ge=0)
    tokens: list[list[str]] = field(default_factory=list)

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
        out, start = [], 0
        for ids in self.token_ids:
            out.append(np.arange(start, start + len(ids)))
            start += len(ids)
        return out



def label_words(tokenizer, label_names: Sequence[str]) -> LabelWords | None:
    """Each label's next-token spellings (:func:`spellings`), first token of each.

    A token that two labels share (" A" of "A" and "Apple") says nothing about either and is left
    out of both. Returns None, with a warning, when a label is left with no token: the label set
    cannot be verbalized (e.g. labels "1" and "10").
    """
    claims: dict[int, set[int]] = {}
    per_label: list[list[int]] = []
    for c, name in enumerate(label_names):
        ids = []
        for text in spellings(name):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        per_label.append(ids)
        for t in ids:
            claims.setdefault(t, set()).add(c)
    token_ids = [[t for t in ids if len(claims[t]) == 1] for ids in per_label]
    if any(not ids for ids in token_ids):
        bad = [name for name, ids in zip(label_names, token_ids) if not ids]
        log.warning("labels %s cannot be told apart by their first tokens; no zero-shot answer or logit lens", bad)
        return None
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in token_ids]
    return LabelWords(token_ids=token_ids, tokens=tokens)


@torch.no_grad()
def lens_logits(model, feats: torch.Tensor, words: LabelWords, normed: bool = False) -> torch.Tensor:
    """Logits of the label tokens from features of any layers: final norm, then the LM head.

    Args:
        model: the ``*ForCausalLM`` (its output embeddings are the head).
        feats: (..., H) features (feature(l) of :mod:`chiptuning.features`), raw or already normed.
        words: the label tokens.
        normed: ``feats`` already went through the final norm.

    Returns:
        (..., K) float32 logits of the K tokens of ``words.flat``; at layer L exactly what the
        ``*ForCausalLM`` computes for those tokens at that position.
    """
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


def _log_softmax(scores: np.ndarray, class_mask: np.ndarray | None) -> np.ndarray:
    x = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if class_mask is not None:
        x = x.masked_fill(~torch.as_tensor(class_mask), float("-inf"))
    return torch.log_softmax(x, dim=-1).numpy()


def calibrated_scores(scores: np.ndarray, prior_scores: np.ndarray, class_mask: np.ndarray | None = None,
                      prior_mask: np.ndarray | None = None) -> np.ndarray:
    """Scores with the model's label prior divided out: log p(c|x) - log mean_x' p(c|x').

    The prior is the mean of the label distributions (over the labels only) the model gives the
    ``prior_scores`` rows, e.g. the training part: a model that says "True" to everything loses
    that bias (contextual calibration, estimated on real inputs).
    """
    prior = np.exp(_log_softmax(prior_scores, prior_mask)).mean(axis=0)
    with np.errstate(divide="ignore"):
        return _log_softmax(scores, class_mask) - np.log(np.maximum(prior, 1e-30))


def predict_from_scores(scores: np.ndarray | torch.Tensor, class_mask: np.ndarray | None = None) -> np.ndarray:
    """Arg-max class of each row, never a class outside the row's options (``class_mask`` (N, C))."""
    scores = torch.as_tensor(np.asarray(scores)).double()
    if class_mask is not None:
        scores = scores.masked_fill(~torch.as_tensor(class_mask), float("-inf"))
    return scores.argmax(-1).numpy().astype(np.int64)


__all__ = ["LabelWords", "calibrated_scores", "label_scores", "label_words", "lens_logits", "predict_from_scores",
           "spellings"]
