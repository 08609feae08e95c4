"""The probe stage's pictures: accuracy against layer (chips, sweeps, the logit lens) and the
early-exit curve (accuracy against mean depth). Drawn on an Agg canvas with the object API: no
global backend switch, safe in any process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: The line style of each part's accuracy.
STYLES = {"eval_accuracy": "-", "val_accuracy": "--", "train_accuracy": ":"}


def plot_layer_accuracy(series: dict[str, Sequence[dict]], path: Path, n_classes: int | None = None,
                        title: str | None = None, baseline: float | None = None,
                        baseline_label: str = "majority class") -> Path:
    """Accuracy against layer (like the paper's Figures 2 and 5) as a PNG: one colour per chip type
    of ``series`` (name -> per-layer metric rows), the model's own answer by layer (the logit lens,
    the rows' ``lens_accuracy``) when recorded; when given, the chance level 1/``n_classes`` and
    ``baseline``, the accuracy of always answering the most frequent class (the level a chip must
    beat on an unbalanced task)."""
    fig, ax = _figure((7, 4))
    lines = [(rows, column, style, dict(color=f"C{i}", marker="o" if column == "eval_accuracy" else None,
                                        markersize=3, label=f"{name} {column.split('_')[0]}"))
             for i, (name, rows) in enumerate(series.items()) for column, style in STYLES.items()]
    lens_rows = next(iter(series.values()), [])
    lines += [(lens_rows, "lens_accuracy", ":", dict(color="C3", label="model's own answer (logit lens)")),
              (lens_rows, "lens_calibrated_accuracy", "-.", dict(color="C3", label="own answer, prior-calibrated"))]
    for rows, column, style, kwargs in lines:
        values = [np.nan if r.get(column) is None or r.get(column) == "" else float(r[column]) for r in rows]
        if not np.isnan(values).all():  # a column nobody recorded is not drawn
            ax.plot([int(r["layer"]) for r in rows], values, style, **kwargs)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=1.0, ls="--", label=f"{baseline_label}: {baseline:.3f}")
    if n_classes:
        ax.axhline(1.0 / n_classes, color="grey", lw=0.8, ls="-.", label=f"chance (1/{n_classes})")
    return _save(fig, ax, path, "layer (0 = embeddings)", "accuracy", title or "chip accuracy by layer", ncol=2)


def plot_cascade_curve(rows: list[dict[str, Any]], path: Path, title: str = "early exit: accuracy against depth") -> Path:
    """The curve of :func:`~chiptuning.probe.cascade.cascade_curve` (eval part where recorded, else validation)."""
    part = "eval" if any(r.get("eval_accuracy") is not None for r in rows) else "val"
    fig, ax = _figure((6, 4))
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
    return _save(fig, ax, path, "mean number of blocks run", f"{part} accuracy", title)


def _figure(size: tuple[int, int]):
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, ncol: int = 1) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
