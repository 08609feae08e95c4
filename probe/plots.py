"""The probe stage's pictures: accuracy against layer (chips, sweeps, the logit lens) and the
early-exit curve (accuracy against mean depth).

The object API with an Agg canvas: no global backend switch, safe in any process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_layer_accuracy(series: dict[str, Sequence[dict]], path: Path, n_classes: int | None = None,
                        title: str | None = None, baseline: float | None = None,
                        baseline_label: str = "majority class") -> Path:
    """Accuracy against layer (like the paper's Figures 2 and 5), one colour per chip type, and the
    model's own answer by layer (the logit lens, from the rows' ``lens_accuracy``) when recorded.

    Args:
        series: name (chip type) -> per-layer metric rows.
        path: PNG to write.
        n_classes: draws the chance level 1/C when given (uniform guessing).
        title: figure title.
        baseline: accuracy of always predicting the most frequent class of the eval (or
            validation) labels, the level a chip must beat on an unbalanced task; drawn when given.
        baseline_label: its legend label.
    """
    # The object API with an Agg canvas: no global backend switch, safe in any process.
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"eval_accuracy": "-", "val_accuracy": "--", "train_accuracy": ":"}
    for i, (name, rows) in enumerate(series.items()):
        color = f"C{i}"
        layers = [int(r["layer"]) for r in rows]
        for column, style in styles.items():
            values = [r.get(column) for r in rows]
            if all(v is None or v == "" for v in values):
                continue
            ys = [np.nan if v is None or v == "" else float(v) for v in values]
            ax.plot(layers, ys, style, color=color, marker="o" if column == "eval_accuracy" else None,
                    markersize=3, label=f"{name} {column.split('_')[0]}")
    lens_rows = next(iter(series.values()), [])
    for column, style, label in (("lens_accuracy", ":", "model's own answer (logit lens)"),
                                 ("lens_calibrated_accuracy", "-.", "own answer, prior-calibrated")):
        values = [r.get(column) for r in lens_rows]
        if any(v is not None and v != "" for v in values):
            ax.plot([int(r["layer"]) for r in lens_rows], [np.nan if v is None or v == "" else float(v) for v in values],
                    style, color="C3", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=1.0, ls="--", label=f"{baseline_label}: {baseline:.3f}")
    if n_classes:
        ax.axhline(1.0 / n_classes, color="grey", lw=0.8, ls="-.", label=f"chance (1/{n_classes})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "chip accuracy by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


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


__all__ = ["plot_cascade_curve", "plot_layer_accuracy"]
