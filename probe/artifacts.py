"""Chips directories: what ``chiptuning probe train`` writes and every later stage reads.

A chips directory holds::

    chips.json            # sorted, indented config: chiptuning_version, chip type and params,
                          # layers, label names, training config, cache fingerprints + meta,
                          # validation rows, model_stats
    chips.safetensors     # torch chips: stacked tensors, leading axis = position in "layers"
    chips.joblib          # logreg chips: {layer: LogRegChip}, a pickle (load only trusted files)
    metrics.csv / .json   # per layer: train / val / eval accuracy and loss, epochs
    eval_predictions.csv  # example_id, label, layer_<l> (predicted class index) per layer
    layer_accuracy.png    # accuracy against layer
    selection.json        # after `chiptuning select`
    report.md             # after `chiptuning select`

A single-chip directory (``ChipSet.save_layer``) holds ``chip.json`` and ``chip.safetensors`` or
``chip.joblib``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning import __version__
from chiptuning.errors import ChipTuningError

log = logging.getLogger(__name__)

CHIPS_FORMAT = "chiptuning-chips"
CHIP_FORMAT = "chiptuning-chip"
CONFIG = "chips.json"
TORCH_WEIGHTS = "chips.safetensors"
SKLEARN_WEIGHTS = "chips.joblib"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PREDICTIONS = "eval_predictions.csv"
PLOT = "layer_accuracy.png"
SELECTION = "selection.json"
REPORT = "report.md"

#: chips.json keys this version knows; others are kept but warned about on load.
KNOWN_KEYS = {
    "chiptuning_version", "format", "chip", "params", "train", "layers", "label_names",
    "n_classes", "hidden_size", "train_cache", "eval_cache", "validation", "model_stats",
    "weights", "metrics_summary", "majority_baseline",
}
METRIC_COLUMNS = (
    "layer", "chip", "train_accuracy", "train_loss", "val_accuracy", "val_loss",
    "eval_accuracy", "eval_loss", "best_epoch", "epochs_run", "n_train", "n_val", "n_eval",
)


def write_json(path: Path, obj: Any) -> None:
    """Sorted, indented JSON, written to a temporary name and renamed (never half-written)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise ChipTuningError(f"{path.parent} is not a {what} directory ({path.name} is missing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChipTuningError(f"{path} is corrupt ({err}); train the chips again") from None


def _chip_params(config: dict) -> dict:
    """Estimator params from a config, dropping (with a warning) any this version does not take."""
    from chiptuning.probe.chips import make_chip

    params = dict(config.get("params") or {})
    accepted = make_chip(config["chip"]).get_params()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        log.warning("ignoring unknown chip params %s (written by chiptuning %s)", unknown,
                    config.get("chiptuning_version"))
    params = {k: v for k, v in params.items() if k in accepted}
    if "betas" in params and params["betas"] is not None:
        params["betas"] = tuple(params["betas"])
    return params


class ChipSet:
    """The chips of every layer, their metrics and provenance (a loaded chips directory).

    Attributes:
        config: the chips.json content (chip type, params, caches, validation rows, ...).
        layers: layers with a chip, ascending.
        label_names: class names, in class-index order.
        metrics: per-layer metric rows (dicts with the keys of ``METRIC_COLUMNS``).
        selection: contents of selection.json, or None.
        path: the directory it was loaded from / saved to, or None.
    """

    def __init__(self, config: dict, *, tensors: dict[str, np.ndarray] | None = None,
                 sklearn_chips: dict[int, Any] | None = None, metrics: list[dict] | None = None,
                 eval_predictions: dict | None = None, selection: dict | None = None,
                 path: Path | None = None) -> None:
        self.config = config
        self.layers: list[int] = [int(layer) for layer in config["layers"]]
        self.label_names: list[str] = list(config.get("label_names") or [])
        self.metrics: list[dict] = metrics or []
        self.selection = selection
        self.path = path
        self.eval_predictions = eval_predictions
        self._tensors = tensors  # name -> (n_layers, ...) for torch chips
        self._sklearn = sklearn_chips
        self._cache: dict[int, Any] = {}

    @property
    def kind(self) -> str:
        return self.config["chip"]

    @property
    def n_classes(self) -> int:
        return int(self.config["n_classes"])

    def metrics_at(self, layer: int) -> dict:
        """The metric row of ``layer`` ({} if none)."""
        return next((dict(m) for m in self.metrics if int(m["layer"]) == int(layer)), {})

    def _position(self, layer: int) -> int:
        if int(layer) not in self.layers:
            raise ChipTuningError(
                f"no chip at layer {layer}; the chips cover layers {self.layers[0]}..{self.layers[-1]}"
            )
        return self.layers.index(int(layer))

    def layer_state(self, layer: int) -> dict[str, np.ndarray]:
        """Arrays of the torch chip at ``layer`` (batched layout without the chip axis)."""
        i = self._position(layer)
        return {name: value[i] for name, value in self._tensors.items()}

    def chip(self, layer: int):
        """The fitted chip at ``layer`` (predict / predict_proba / decision_function, class_mask=)."""
        i = self._position(layer)
        if layer not in self._cache:
            if self._sklearn is not None:
                self._cache[layer] = self._sklearn[self.layers[i]]
            else:
                from chiptuning.probe.chips import make_chip

                chip = make_chip(self.kind, **_chip_params(self.config))
                self._cache[layer] = chip.load_state(self.layer_state(layer), np.arange(self.n_classes))
        return self._cache[layer]

    # -- saving ----------------------------------------------------------------------------------

    def save(self, out: str | Path) -> Path:
        """Write the whole chips directory (config, weights, metrics, predictions, plot)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config = dict(self.config, chiptuning_version=__version__, format=CHIPS_FORMAT)
        if self._tensors is not None:
            from safetensors.numpy import save_file

            config["weights"] = TORCH_WEIGHTS
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self._tensors.items()},
                      str(out / TORCH_WEIGHTS), metadata={"format": CHIPS_FORMAT, "chip": self.kind})
        else:
            import joblib

            config["weights"] = SKLEARN_WEIGHTS
            joblib.dump(self._sklearn, out / SKLEARN_WEIGHTS)
        write_metrics(out, self.metrics, self.kind)
        if self.eval_predictions is not None:
            write_predictions(out / PREDICTIONS, self.eval_predictions)
        part, baseline = pick_baseline(self.config.get("majority_baseline"))
        plot_layer_accuracy({self.kind: self.metrics}, out / PLOT, n_classes=self.n_classes,
                            baseline=baseline, baseline_label=f"majority class ({part})")
        write_json(out / CONFIG, config)  # last: a directory with chips.json is complete
        self.config, self.path = config, out
        log.info("wrote chips of %d layers to %s", len(self.layers), out)
        return out

    def save_layer(self, layer: int, out_dir: str | Path) -> Path:
        """Write the chip at ``layer`` as a single-chip directory (``chip.json`` + weights).

        The config keeps the chip type, params, label names, layer and the training provenance;
        :func:`load_chip` reads it back.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._position(layer)
        config = {k: v for k, v in self.config.items() if k not in ("layers", "validation", "weights")}
        config.update(format=CHIP_FORMAT, chiptuning_version=__version__, layer=int(layer),
                      metrics=self.metrics_at(layer), selection=self.selection)
        if self._tensors is not None:
            from safetensors.numpy import save_file

            config["weights"] = "chip.safetensors"
            state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.layer_state(layer).items()}
            save_file(state, str(out / "chip.safetensors"), metadata={"format": CHIP_FORMAT})
        else:
            import joblib

            config["weights"] = "chip.joblib"
            joblib.dump(self.chip(layer), out / "chip.joblib")
        write_json(out / "chip.json", config)
        return out

    def __repr__(self) -> str:
        return f"ChipSet(chip={self.kind!r}, layers={self.layers[0]}..{self.layers[-1]}, classes={self.n_classes})"


def write_metrics(out: Path, rows: Sequence[dict], kind: str) -> None:
    """metrics.csv (one row per layer) and metrics.json ({"chip", "layers": rows})."""
    with open(out / METRICS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    write_json(out / METRICS_JSON, {"chip": kind, "layers": list(rows)})


def write_predictions(path: Path, predictions: dict) -> None:
    """eval_predictions.csv: example_id, label, layer_<l> per layer (predicted class index)."""
    layers = predictions["layers"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example_id", "label"] + [f"layer_{layer}" for layer in layers])
        preds = predictions["predictions"]  # (n_layers, N)
        for i, (example_id, label) in enumerate(zip(predictions["example_ids"], predictions["labels"])):
            writer.writerow([example_id, int(label)] + [int(preds[j][i]) for j in range(len(layers))])


def majority_baselines(**labels) -> dict[str, float]:
    """Accuracy of always predicting the most frequent class, per labelled part
    (``majority_baselines(eval=y_eval, val=y_val)``); parts with no labels are left out."""
    out = {}
    for part, y in labels.items():
        y = np.asarray(y if y is not None else [], dtype=np.int64)
        if len(y):
            out[part] = float(np.bincount(y).max() / len(y))
    return out


def pick_baseline(baselines: dict | None) -> tuple[str | None, float | None]:
    """(part, accuracy) of the majority-class baseline to draw: the eval labels', else the
    validation labels'; (None, None) when neither was recorded."""
    for part in ("eval", "val"):
        if baselines and baselines.get(part) is not None:
            return part, float(baselines[part])
    return None, None


def plot_layer_accuracy(series: dict[str, Sequence[dict]], path: Path, n_classes: int | None = None,
                        title: str | None = None, baseline: float | None = None,
                        baseline_label: str = "majority class") -> Path:
    """Accuracy against layer (like the paper's Figures 2 and 5), one colour per chip type.

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def load_chips(path: str | Path) -> ChipSet:
    """Load a chips directory written by ``chiptuning probe train``.

    Unknown config keys are kept and warned about; torch weights load through safetensors.
    ``chips.joblib`` (the scikit-learn backend) is a pickle: load only directories you trust.

    Raises:
        ChipTuningError: not a chips directory, or a corrupt one.
    """
    path = Path(path)
    if not path.is_dir():
        raise ChipTuningError(f"no chips directory at {path}; run `chiptuning probe train` first")
    if not (path / CONFIG).exists() and (path / "sweep.json").exists():
        try:
            command = json.loads((path / "sweep.json").read_text())["best_command"]
        except (OSError, ValueError, KeyError, TypeError):
            command = "chiptuning probe train CACHE --out CHIPS_DIR with the setting in sweep.csv"
        raise ChipTuningError(f"{path} is a sweep directory (metrics, no chips); train the chosen setting's "
                              f"chips first: {command}")
    config = _read_json(path / CONFIG, "chips")
    for key in ("chip", "layers", "n_classes"):
        if key not in config:
            raise ChipTuningError(f"{path / CONFIG} has no {key!r}; it was not written by `chiptuning probe train`")
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        log.warning("%s: unknown config keys %s (written by chiptuning %s); ignoring them",
                    path / CONFIG, unknown, config.get("chiptuning_version"))
    tensors = sklearn_chips = None
    weights = path / config.get("weights", TORCH_WEIGHTS if config["chip"] != "logreg" else SKLEARN_WEIGHTS)
    if not weights.exists():
        raise ChipTuningError(f"chip weights {weights} are missing; train the chips again")
    if weights.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(weights))
    else:
        import joblib

        sklearn_chips = {int(k): v for k, v in joblib.load(weights).items()}
    metrics = None
    if (path / METRICS_JSON).exists():
        metrics = json.loads((path / METRICS_JSON).read_text()).get("layers")
    selection = json.loads((path / SELECTION).read_text()) if (path / SELECTION).exists() else None
    return ChipSet(config, tensors=tensors, sklearn_chips=sklearn_chips, metrics=metrics,
                   selection=selection, path=path)


def load_chip(path: str | Path):
    """Load a single-chip directory written by :meth:`ChipSet.save_layer`: the fitted chip.

    The chip carries ``chip_config_`` (the chip.json content: layer, label names, provenance).
    """
    from chiptuning.probe.chips import make_chip

    path = Path(path)
    config = _read_json(path / "chip.json", "chip")
    weights = path / config.get("weights", "chip.safetensors")
    if not weights.exists():
        raise ChipTuningError(f"chip weights {weights} are missing")
    if weights.suffix == ".safetensors":
        from safetensors.numpy import load_file

        chip = make_chip(config["chip"], **_chip_params(config))
        chip.load_state(load_file(str(weights)), np.arange(int(config["n_classes"])))
    else:
        import joblib

        chip = joblib.load(weights)
    chip.chip_config_ = config
    return chip
