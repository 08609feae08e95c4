"""Scores of trained chips (accuracy, mean cross-entropy, predictions) on the training,
validation and eval rows: torch chips as banks, a fitted scikit-learn chip by :func:`score_logreg`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from chiptuning.probe.bank import Hyperparams, mask_logits, predict_bank
from chiptuning.probe.chips import LogRegChip
from chiptuning.probe.data import cache_class_mask, read_standardized

PARTS = ("train", "val", "eval")


def score_specs(specs: list[Hyperparams], results: list[dict], x: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None, dtype: torch.dtype = torch.float32, rows: np.ndarray | None = None):
    """(accuracy (G,), mean loss (G,), predictions (G, N)) of each spec's G chips.

    Specs of the same chip type are scored together (one product per row chunk for all).
    ``rows`` scores only these rows of ``x`` (``y`` and ``mask`` are theirs).
    """
    out: list = [None] * len(specs)
    kinds: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        kinds.setdefault((spec.kind, spec.hidden), []).append(i)
    for (kind, _), members in kinds.items():
        params = {name: torch.stack([results[i]["params"][name] for i in members], dim=1)
                  for name in results[members[0]]["params"]}
        if rows is None:
            logits = predict_bank(kind, params, x, mask, dtype=dtype)  # (G, S, N, C)
        else:
            logits = mask_logits(predict_bank(kind, params, x, dtype=dtype)[:, :, torch.from_numpy(rows)], mask)
        G, S, N, C = logits.shape
        pred = logits.argmax(dim=3)
        acc = (pred == y.view(1, 1, -1)).double().mean(dim=2)
        loss = F.cross_entropy(logits.reshape(-1, C), y.repeat(G * S), reduction="none").view(G, S, N).mean(dim=2)
        for s, i in enumerate(members):
            out[i] = (acc[:, s].numpy(), loss[:, s].numpy(), pred[:, s].numpy())
    return out


def score_eval(evals, layers, stats, specs, results, n_classes: int, stream: bool) -> list[tuple]:
    """Eval scores of every spec (as :func:`score_specs`), one layer at a time: an eval cache as
    large as the training cache costs one float32 layer of memory, not the group's layers."""
    m = cache_class_mask(evals, n_classes)
    y = torch.from_numpy(np.asarray(evals.labels, dtype=np.int64))
    mask = None if m is None else torch.from_numpy(m)
    per_layer = []
    x = torch.empty((1, evals.n_rows, int(evals.hidden_size)), dtype=torch.float32)  # reused by every layer
    for j, layer in enumerate(layers):
        read_standardized(evals, [layer], np.arange(evals.n_rows), [stats[j]], stream=stream, out=x)
        one = [dict(r, params={k: v[j:j + 1] for k, v in r["params"].items()}) for r in results]
        per_layer.append(score_specs(specs, one, x, y, mask, torch.float32))
    return [tuple(np.concatenate([scored[i][k] for scored in per_layer]) for k in range(3))
            for i in range(len(specs))]


def chip_metrics(scored: dict, j: int, losses: tuple[str, ...] = PARTS) -> dict:
    """{"<part>_accuracy", "<part>_loss"} of the j-th chip of a bank for train, val and eval (in
    that order), from its spec's scores {"train" | "val" | "eval": (accuracy (G,), loss (G,),
    predictions (G, N))}: None for a part not scored or a loss not finite (a diverged chip); a loss
    only for the parts in ``losses``."""
    row: dict = {}
    for name in PARTS:
        acc, loss, _ = scored.get(name, (None, None, None))
        row[f"{name}_accuracy"] = None if acc is None else float(acc[j])
        if name in losses:
            row[f"{name}_loss"] = None if loss is None or not np.isfinite(loss[j]) else float(loss[j])
    return row


def score_logreg(chip: LogRegChip, parts: dict[str, tuple]) -> tuple[dict, np.ndarray | None]:
    """({"<part>_accuracy", "<part>_loss"} for train, val and eval, in that order; the eval
    predictions (N_eval,) or None) of a fitted scikit-learn chip on ``parts`` {"train" | "val" |
    "eval": (x (N, H), y (N,), class_mask (N, C) | None)}; a missing part scores None."""
    scored = {}
    for name, (xs, ys, mask) in parts.items():
        proba = chip.predict_proba(xs, class_mask=mask)
        pred = proba.argmax(axis=1)
        loss = -np.log(np.clip(proba[np.arange(len(ys)), ys], 1e-12, None)).mean()
        scored[name] = ([(pred == ys).mean()], [loss], pred)
    return chip_metrics(scored, 0), (scored["eval"][2] if "eval" in scored else None)
