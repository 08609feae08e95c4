"""Early exit through a cascade of chips, calibrated from the cache alone (no model run).

A cascade reads the chips of a few *exit layers* in order; an example stops at the first exit
layer whose chip is confident enough (its top probability reaches that layer's threshold), and
the last exit layer answers whatever is left. Easy examples stop early, hard ones go deep: the
expected number of blocks falls below the best fixed layer's, at (almost) its accuracy.

Calibration (:func:`calibrate_cascade`), on the validation rows the chips were trained without:

1. the reference is the best single chip by validation accuracy (the ``validate`` selection,
   layer L*); the cascade's last exit is L*, so it never needs a block the fixed chip does not;
2. one confidence threshold, shared by every exit layer (layers 1..L*), is chosen on a grid: the
   one with the fewest expected blocks on the validation rows among those whose validation
   accuracy stays within DELTA of the reference (ties: the stricter threshold);
3. when no threshold meets DELTA, the cascade *is* the best fixed chip, and says so.

One shared threshold, not one per layer: a per-layer search has as many knobs as exit layers and,
on the few hundred validation rows a cache usually has, fits their noise. On SmolLM2-135M and the
demo topic task (90 validation rows) a greedy per-layer search kept validation accuracy at 100%
and lost 4 points on the evaluation part; the shared threshold lost none at 2x fewer blocks.
Probabilities are not recalibrated per layer (e.g. by a temperature fitted on the same rows),
which would bring back a knob per layer.

:func:`simulate` runs a cascade on stored features; :func:`cascade_curve` sweeps one threshold
for every exit layer to draw accuracy against mean depth, beside every fixed-layer chip.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.probe.chipset import ChipSet
from chiptuning.probe.data import optional_class_mask
from chiptuning.probe.records import Cascade, Simulated

log = logging.getLogger(__name__)

#: Confidence thresholds the search tries, from strict to loose (the top probability of a chip).
GRID = (0.999, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8,
        0.77, 0.74, 0.7, 0.65, 0.6, 0.55, 0.5)


def describe_exits(exits: list[tuple[int, float]]) -> str:
    """The exits in words: "layers 1-11 when the chip's top probability is >= 0.97, else layer 12"
    (one shared threshold), or layer by layer when thresholds differ."""
    *early, (last, _) = exits
    if not early:
        return f"layer {last} for every input"
    levels = {t for _, t in early}
    if len(levels) == 1:
        span = f"layer {early[0][0]}" if len(early) == 1 else f"layers {early[0][0]}-{early[-1][0]}"
        return f"{span} when the chip's top probability is >= {levels.pop():.3g}, else layer {last}"
    return ", ".join(f"layer {layer} if its chip is >= {t:.3g} sure" for layer, t in early) + f", else layer {last}"


def exit_probabilities(chips: ChipSet, cache, layers: list[int], rows: np.ndarray | None = None) -> np.ndarray:
    """(n_layers, N, C) class probabilities of the chips at ``layers`` on a cache's rows (the
    cache's class masks applied, as the chips apply them in use)."""
    rows = np.arange(cache.n_rows) if rows is None else np.asarray(rows)
    mask = optional_class_mask(np.asarray(cache.n_choices)[rows], chips.n_classes)
    return np.stack([np.asarray(chips.chip(layer).predict_proba(cache.layer(layer, rows=rows), class_mask=mask),
                                dtype=np.float64) for layer in layers])


def simulate(probabilities: np.ndarray, layers: list[int], thresholds: list[float | None]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Run a cascade on stored probabilities.

    Args:
        probabilities: (n_exits, N, C), one slice per exit layer, in the order of ``layers``.
        layers, thresholds: the cascade (None: never stop there; the last threshold is ignored:
            the last layer answers).

    Returns:
        (predicted class (N,), exit layer (N,)).
    """
    return _Stored(probabilities, layers).run(thresholds)


class _Stored:
    """Probabilities reduced to what a cascade reads: each layer's confidence and answer."""

    def __init__(self, probabilities: np.ndarray, layers: list[int]) -> None:
        self.confidence = probabilities.max(axis=2)  # (n_exits, N)
        self.answer = probabilities.argmax(axis=2)  # (n_exits, N)
        self.layers = np.asarray(layers)

    def run(self, thresholds: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
        limits = np.asarray([np.inf if t is None else t for t in thresholds], dtype=np.float64)
        stops = self.confidence >= limits[:, None]  # (n_exits, N)
        stops[-1] = True  # the last exit answers whatever is left
        first = stops.argmax(axis=0)  # the first exit layer each row stops at
        rows = np.arange(stops.shape[1])
        return self.answer[first, rows], self.layers[first]

    def score(self, thresholds: list[float | None], labels: np.ndarray) -> tuple[float, float]:
        prediction, exit_layer = self.run(thresholds)
        return float((prediction == labels).mean()), float(exit_layer.mean())


def _score(probabilities, layers, thresholds, labels) -> tuple[float, float]:
    return _Stored(probabilities, layers).score(thresholds, labels)


def _reference(chips: ChipSet) -> tuple[int, float]:
    """The best fixed chip by validation accuracy (ties: the shallowest), layer >= 1."""
    rows = [m for m in chips.metrics if int(m["layer"]) >= 1 and m.get("val_accuracy") not in (None, "")]
    if not rows:
        raise ChipTuningError("a cascade is calibrated on validation rows; the chips were trained with --val-size 0 "
                              "(train them with validation rows)")
    best = min(rows, key=lambda m: (-float(m["val_accuracy"]), int(m["layer"])))
    return int(best["layer"]), float(best["val_accuracy"])


def _caches(chips: ChipSet):
    """(train cache, its validation rows, eval cache or None), from the chips record's paths."""
    record = chips.record
    if record.train_cache is None or not record.train_cache.path:
        raise ChipTuningError("the chips record no training cache path; a cascade is calibrated on its validation rows")
    train = CacheReader(record.train_cache.path)
    if train.fingerprint != record.train_cache.fingerprint:
        raise ChipTuningError(f"the training cache at {record.train_cache.path} is not the one the chips were trained on "
                              f"(fingerprint {train.fingerprint}, chips say {record.train_cache.fingerprint})")
    val_rows = np.asarray(record.validation.rows if record.validation is not None else [], dtype=np.int64)
    evals = None
    if record.eval_cache is not None and record.eval_cache.path and Path(record.eval_cache.path).exists():
        evals = CacheReader(record.eval_cache.path)
        if evals.fingerprint != record.eval_cache.fingerprint:
            raise ChipTuningError(f"the eval cache at {record.eval_cache.path} changed since the chips were trained")
    return train, val_rows, evals


def calibrate_cascade(chips: ChipSet, delta: float, grid: tuple[float, ...] = GRID) -> tuple[Cascade, dict[str, Any]]:
    """Choose exit layers and thresholds on the validation rows (see the module docstring).

    Returns:
        (the cascade, the material for its report: probabilities, labels and layers of the
        validation and eval parts).

    Raises:
        ChipTuningError: chips trained without validation rows, or caches that moved or changed.
    """
    train, val_rows, evals = _caches(chips)
    if not len(val_rows):
        raise ChipTuningError("a cascade is calibrated on validation rows; the chips were trained with --val-size 0")
    reference, reference_val = _reference(chips)
    layers = [layer for layer in chips.layers if 1 <= layer <= reference]
    val_p = exit_probabilities(chips, train, layers, val_rows)
    y_val = np.asarray(train.labels)[val_rows]
    target = reference_val - delta - 1e-12
    stored = _Stored(val_p, layers)
    thresholds: list[float | None] = [None] * (len(layers) - 1) + [0.0]
    accuracy, depth = stored.score(thresholds, y_val)
    best = None
    for t in grid:  # strict to loose: a tie in depth keeps the stricter threshold
        trial = [t] * (len(layers) - 1) + [0.0]
        acc, d = stored.score(trial, y_val)
        if acc >= target and d < depth and (best is None or d < best[2]):
            best = (trial, acc, d)
    if best is not None:
        thresholds, accuracy, depth = best
    fallback = all(t is None for t in thresholds[:-1])
    if fallback:
        log.warning("no early exit keeps validation accuracy within %g of the best fixed chip (layer %d); "
                    "the cascade is that chip alone", delta, reference)
    material = {"layers": layers, "val": (val_p, y_val), "eval": None}
    simulated = Simulated(val_accuracy=accuracy, val_mean_depth=depth, reference_val_accuracy=reference_val,
                          n_val=int(len(y_val)))
    if evals is not None:
        eval_p = exit_probabilities(chips, evals, layers)
        y_eval = np.asarray(evals.labels)
        simulated.eval_accuracy, simulated.eval_mean_depth = _score(eval_p, layers, thresholds, y_eval)
        simulated.reference_eval_accuracy = float((eval_p[layers.index(reference)].argmax(axis=1) == y_eval).mean())
        simulated.n_eval = int(len(y_eval))
        material["eval"] = (eval_p, y_eval)
    d = simulated.eval_mean_depth if simulated.eval_mean_depth is not None else simulated.val_mean_depth
    simulated.block_ratio = reference / d if d else None
    cascade = Cascade(layers=layers, thresholds=thresholds, delta=float(delta), reference_layer=reference,
                      fallback=fallback, simulated=simulated)
    return cascade, material


def cascade_curve(cascade: Cascade, material: dict[str, Any], chips: ChipSet,
                  grid: tuple[float, ...] = GRID) -> list[dict[str, Any]]:
    """Accuracy against mean depth as one threshold, shared by every exit layer, sweeps the grid
    (the cascade's operating point marked), and every fixed-layer chip as a point.

    Returns:
        Rows {"kind": "threshold" | "operating point" | "fixed", "threshold", "layer",
        "val_accuracy", "val_mean_depth", "eval_accuracy", "eval_mean_depth"}.
    """
    layers = material["layers"]
    rows = []

    def point(kind: str, thresholds: list[float], **extra) -> dict[str, Any]:
        row = {"kind": kind, **extra}
        for part in ("val", "eval"):
            if material.get(part) is not None:
                p, y = material[part]
                row[f"{part}_accuracy"], row[f"{part}_mean_depth"] = _score(p, layers, thresholds, y)
        return row

    for t in grid:
        rows.append(point("threshold", [t] * (len(layers) - 1) + [0.0], threshold=t))
    rows.append(point("operating point", cascade.thresholds, threshold=None))
    for m in sorted(chips.metrics, key=lambda m: int(m["layer"])):
        if int(m["layer"]) >= 1:
            rows.append({"kind": "fixed", "layer": int(m["layer"]), "val_accuracy": m.get("val_accuracy"),
                         "val_mean_depth": int(m["layer"]), "eval_accuracy": m.get("eval_accuracy"),
                         "eval_mean_depth": int(m["layer"])})
    return rows


__all__ = ["GRID", "calibrate_cascade", "cascade_curve", "describe_exits", "exit_probabilities", "simulate"]
