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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.probe.artifacts import ChipSet
from chiptuning.probe.chips import optional_class_mask

log = logging.getLogger(__name__)

#: Confidence thresholds the search tries, from strict to loose (the top probability of a chip).
GRID = (0.999, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8,
        0.77, 0.74, 0.7, 0.65, 0.6, 0.55, 0.5)
NEVER = float("inf")


@dataclass
class Cascade:
    """Exit layers and the confidence each needs; the last exit always answers.

    Attributes:
        layers: exit layers, ascending (the last one is the deepest block the cascade needs).
        thresholds: per exit layer, the top probability at which an example stops there
            (``inf``: never; the last is 0: always).
        delta: the allowed validation accuracy loss against the best fixed chip.
        reference_layer: the best fixed chip's layer (by validation accuracy).
        fallback: True when no threshold met DELTA and the cascade is the best fixed chip.
        simulated: validation and eval accuracy and mean depth, the fixed chip's, the ratio.
    """

    layers: list[int]
    thresholds: list[float]
    delta: float
    reference_layer: int
    fallback: bool = False
    simulated: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.thresholds) or not self.layers:
            raise ChipTuningError("a cascade needs one threshold per exit layer")
        if list(self.layers) != sorted(set(self.layers)):
            raise ChipTuningError(f"cascade exit layers must be distinct and ascending, got {self.layers}")

    @property
    def exits(self) -> list[tuple[int, float]]:
        """(layer, threshold) of the layers where an example can stop, the last one included."""
        return [(layer, t) for layer, t in zip(self.layers, self.thresholds) if t != NEVER]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "thresholds": [None if t == NEVER else float(t) for t in self.thresholds],
                "delta": self.delta, "reference_layer": self.reference_layer, "fallback": self.fallback,
                "simulated": self.simulated}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cascade:
        try:
            return cls(layers=[int(x) for x in data["layers"]],
                       thresholds=[NEVER if t is None else float(t) for t in data["thresholds"]],
                       delta=float(data.get("delta", 0.0)), reference_layer=int(data["reference_layer"]),
                       fallback=bool(data.get("fallback", False)), simulated=dict(data.get("simulated") or {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ChipTuningError(f"malformed cascade record ({err!r}); run `chiptuning select --strategy cascade:DELTA` "
                                  "again") from None


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


def simulate(probabilities: np.ndarray, layers: list[int], thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Run a cascade on stored probabilities.

    Args:
        probabilities: (n_exits, N, C), one slice per exit layer, in the order of ``layers``.
        layers, thresholds: the cascade (the last threshold is ignored: the last layer answers).

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

    def run(self, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
        stops = self.confidence >= np.asarray(thresholds, dtype=np.float64)[:, None]  # (n_exits, N)
        stops[-1] = True  # the last exit answers whatever is left
        first = stops.argmax(axis=0)  # the first exit layer each row stops at
        rows = np.arange(stops.shape[1])
        return self.answer[first, rows], self.layers[first]

    def score(self, thresholds: list[float], labels: np.ndarray) -> tuple[float, float]:
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
    val_rows = np.asarray((record.validation or {}).get("rows") or [], dtype=np.int64)
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
    thresholds = [NEVER] * (len(layers) - 1) + [0.0]
    accuracy, depth = stored.score(thresholds, y_val)
    best = None
    for t in grid:  # strict to loose: a tie in depth keeps the stricter threshold
        trial = [t] * (len(layers) - 1) + [0.0]
        acc, d = stored.score(trial, y_val)
        if acc >= target and d < depth and (best is None or d < best[2]):
            best = (trial, acc, d)
    if best is not None:
        thresholds, accuracy, depth = best
    fallback = all(t == NEVER for t in thresholds[:-1])
    if fallback:
        log.warning("no early exit keeps validation accuracy within %g of the best fixed chip (layer %d); "
                    "the cascade is that chip alone", delta, reference)
    cascade = Cascade(layers=layers, thresholds=thresholds, delta=float(delta), reference_layer=reference,
                      fallback=fallback)
    material = {"layers": layers, "val": (val_p, y_val), "eval": None}
    simulated = {"val_accuracy": accuracy, "val_mean_depth": depth, "reference_val_accuracy": reference_val,
                 "n_val": int(len(y_val))}
    if evals is not None:
        eval_p = exit_probabilities(chips, evals, layers)
        y_eval = np.asarray(evals.labels)
        acc, d = _score(eval_p, layers, thresholds, y_eval)
        fixed = float((eval_p[layers.index(reference)].argmax(axis=1) == y_eval).mean())
        simulated.update(eval_accuracy=acc, eval_mean_depth=d, reference_eval_accuracy=fixed, n_eval=int(len(y_eval)))
        material["eval"] = (eval_p, y_eval)
    d = simulated.get("eval_mean_depth", simulated["val_mean_depth"])
    simulated["block_ratio"] = reference / d if d else None
    cascade.simulated = simulated
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


def plot_cascade_curve(rows: list[dict[str, Any]], path: Path, title: str = "early exit: accuracy against depth") -> Path:
    """The curve of :func:`cascade_curve` (eval part where recorded, else validation)."""
    part = "eval" if any(r.get("eval_accuracy") is not None for r in rows) else "val"
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sweep = [r for r in rows if r["kind"] == "threshold"]
    ax.plot([r[f"{part}_mean_depth"] for r in sweep], [r[f"{part}_accuracy"] for r in sweep], "-o", markersize=3,
            label="cascade, one threshold swept")
    fixed = [r for r in rows if r["kind"] == "fixed"]
    ax.plot([r[f"{part}_mean_depth"] for r in fixed], [float(r[f"{part}_accuracy"]) for r in fixed], "s", color="0.5",
            markersize=4, label="fixed-layer chips")
    for r in rows:
        if r["kind"] == "operating point":
            ax.plot([r[f"{part}_mean_depth"]], [r[f"{part}_accuracy"]], "*", color="C3", markersize=14,
                    label="chosen cascade")
    ax.set_xlabel("mean number of blocks run")
    ax.set_ylabel(f"{part} accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


__all__ = ["GRID", "NEVER", "Cascade", "calibrate_cascade", "cascade_curve", "describe_exits", "exit_probabilities", "plot_cascade_curve",
           "simulate"]
