"""Early exit through a cascade of chips, calibrated from the cache alone (no model run).

A cascade reads the chips of a few *exit layers* in order; an example stops at the first one whose
chip is confident enough (its top probability reaches the layer's threshold), and the last exit
answers whatever is left: easy examples stop early, hard ones go deep.

:func:`calibrate_cascade` works on the validation rows the chips were trained without. The last exit
is the best fixed chip by validation accuracy (layer L*), so the cascade never needs a block that
chip does not; one threshold, shared by every exit layer 1..L*, is the grid's with the fewest
expected blocks among those within DELTA of L*'s accuracy (ties: the stricter); when none is, the
cascade is L*'s chip alone. One shared threshold, not one per layer: per-layer thresholds fit the
noise of the few hundred validation rows a cache usually has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.probe.chipset import ChipSet
from chiptuning.probe.data import cache_class_mask
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
    cache's class masks applied, as the chips apply them in use); every row when ``rows`` is None."""
    mask = cache_class_mask(cache, chips.n_classes, rows)
    return np.stack([np.asarray(chips.chip(layer).predict_proba(cache.layer(layer, rows=rows), class_mask=mask),
                                dtype=np.float64) for layer in layers])


class Exits:
    """Stored probabilities (n_exits, N, C) reduced to what a cascade reads: each exit layer's
    confidence and answer, for running many thresholds."""

    def __init__(self, probabilities: np.ndarray, layers: list[int]) -> None:
        self.confidence = probabilities.max(axis=2)  # (n_exits, N)
        self.answer = probabilities.argmax(axis=2)  # (n_exits, N)
        self.layers = np.asarray(layers)

    def run(self, thresholds: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class (N,), exit layer (N,)); a threshold None never stops, the last exit
        answers whatever is left."""
        limits = np.asarray([np.inf if t is None else t for t in thresholds], dtype=np.float64)
        stops = self.confidence >= limits[:, None]  # (n_exits, N)
        stops[-1] = True
        first = stops.argmax(axis=0)  # the first exit layer each row stops at
        return self.answer[first, np.arange(stops.shape[1])], self.layers[first]

    def score(self, thresholds: list[float | None], labels: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean exit layer)."""
        prediction, exit_layer = self.run(thresholds)
        return float((prediction == labels).mean()), float(exit_layer.mean())


def simulate(probabilities: np.ndarray, layers: list[int], thresholds: list[float | None]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Run a cascade on stored probabilities (n_exits, N, C), one slice per exit layer: (predicted
    class (N,), exit layer (N,))."""
    return Exits(probabilities, layers).run(thresholds)


def shared_threshold(threshold: float, n_exits: int) -> list[float]:
    """One threshold at every exit layer but the last, which answers every input left."""
    return [threshold] * (n_exits - 1) + [0.0]


def _reference(chips: ChipSet, val_rows: np.ndarray) -> tuple[int, float]:
    """The best fixed chip by validation accuracy (ties: the shallowest), layer >= 1."""
    rows = [m for m in chips.metrics if int(m["layer"]) >= 1 and m.get("val_accuracy") not in (None, "")]
    if not len(val_rows) or not rows:
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
        (the cascade, the material for its report: {"layers", "val": (probabilities, labels),
        "eval": the same or None}).

    Raises:
        ChipTuningError: chips trained without validation rows, or caches that moved or changed.
    """
    train, val_rows, evals = _caches(chips)
    reference, reference_val = _reference(chips, val_rows)
    layers = [layer for layer in chips.layers if 1 <= layer <= reference]
    val_p = exit_probabilities(chips, train, layers, val_rows)
    y_val = np.asarray(train.labels)[val_rows]
    exits = Exits(val_p, layers)
    thresholds: list[float | None] = [None] * (len(layers) - 1) + [0.0]
    accuracy, depth = exits.score(thresholds, y_val)
    for t in grid:  # strict to loose: a tie in depth keeps the stricter threshold
        trial = shared_threshold(t, len(layers))
        acc, d = exits.score(trial, y_val)
        if acc >= reference_val - delta - 1e-12 and d < depth:
            thresholds, accuracy, depth = trial, acc, d
    fallback = all(t is None for t in thresholds[:-1])
    if fallback:
        log.warning("no early exit keeps validation accuracy within %g of the best fixed chip (layer %d); "
                    "the cascade is that chip alone", delta, reference)
    simulated = Simulated(val_accuracy=accuracy, val_mean_depth=depth, reference_val_accuracy=reference_val,
                          n_val=int(len(y_val)))
    material = {"layers": layers, "val": (val_p, y_val), "eval": None}
    if evals is not None:
        eval_p, y_eval = exit_probabilities(chips, evals, layers), np.asarray(evals.labels)
        simulated.eval_accuracy, simulated.eval_mean_depth = Exits(eval_p, layers).score(thresholds, y_eval)
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
    """Accuracy against mean depth as one shared threshold sweeps the grid, at the cascade's
    operating point, and of every fixed-layer chip: rows {"kind": "threshold" | "operating point" |
    "fixed", "threshold", "layer", "val_accuracy", "val_mean_depth", "eval_accuracy", "eval_mean_depth"}."""
    layers = material["layers"]
    parts = {part: (Exits(material[part][0], layers), material[part][1])
             for part in ("val", "eval") if material.get(part) is not None}

    def point(kind: str, thresholds: list[float | None], threshold: float | None) -> dict[str, Any]:
        row = {"kind": kind, "threshold": threshold}
        for part, (exits, labels) in parts.items():
            row[f"{part}_accuracy"], row[f"{part}_mean_depth"] = exits.score(thresholds, labels)
        return row

    rows = [point("threshold", shared_threshold(t, len(layers)), t) for t in grid]
    rows.append(point("operating point", cascade.thresholds, None))
    for m in sorted(chips.metrics, key=lambda m: int(m["layer"])):
        if int(m["layer"]) >= 1:
            rows.append({"kind": "fixed", "layer": int(m["layer"]), "val_accuracy": m.get("val_accuracy"),
                         "val_mean_depth": int(m["layer"]), "eval_accuracy": m.get("eval_accuracy"),
                         "eval_mean_depth": int(m["layer"])})
    return rows

