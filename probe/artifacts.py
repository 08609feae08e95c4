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
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.numpy import load_file, save_file

from chiptuning import __version__
from chiptuning.cache import CacheMeta
from chiptuning.errors import ChipTuningError
from chiptuning.io import write_json_atomic
from chiptuning.probe.chips import CHIP_KINDS, make_chip

log = logging.getLogger(__name__)

CHIPS_FORMAT = "chiptuning-chips"
CHIP_FORMAT = "chiptuning-chip"
CONFIG = "chips.json"
CHIP_CONFIG = "chip.json"
TORCH_WEIGHTS = "chips.safetensors"
SKLEARN_WEIGHTS = "chips.joblib"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PREDICTIONS = "eval_predictions.csv"
PLOT = "layer_accuracy.png"
SELECTION = "selection.json"
REPORT = "report.md"

METRIC_COLUMNS = (
    "layer", "chip", "train_accuracy", "train_loss", "val_accuracy", "val_loss",
    "eval_accuracy", "eval_loss", "best_epoch", "epochs_run", "n_train", "n_val", "n_eval",
    "lens_accuracy", "lens_calibrated_accuracy",
)


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise ChipTuningError(f"{path.parent} is not a {what} directory ({path.name} is missing)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ChipTuningError(f"{path} is corrupt ({err}); train the chips again") from None
    if not isinstance(data, dict):
        raise ChipTuningError(f"{path} is not a {what} record (a JSON object); train the chips again")
    return data


@dataclass
class CacheRef:
    """A cache that chips were trained or scored on.

    Attributes:
        path: where it was (as given).
        fingerprint: its fingerprint.
        n_rows: its rows.
        meta: its content-determining settings (recorded for the training cache).
        model, split: a summary (recorded for the eval cache).
    """

    path: str
    fingerprint: str
    n_rows: int
    meta: CacheMeta | None = None
    model: str | None = None
    split: str | None = None

    @classmethod
    def of(cls, cache, with_meta: bool = True) -> CacheRef:
        """The reference to a cache reader (meta in full, or only model and split)."""
        meta = cache.meta
        return cls(path=str(getattr(cache, "path", "")), fingerprint=cache.fingerprint, n_rows=int(cache.n_rows),
                   meta=meta if with_meta else None,
                   model=None if with_meta else meta.model, split=None if with_meta else meta.split)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "fingerprint": self.fingerprint, "n_rows": self.n_rows}
        if self.meta is not None:
            out["meta"] = self.meta.to_dict()
        else:
            out.update(model=self.model, split=self.split)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str) -> CacheRef | None:
        if data is None:
            return None
        if not isinstance(data, dict) or "fingerprint" not in data:
            raise ChipTuningError(f"{where}: a cache reference is malformed (no fingerprint); train the chips again")
        meta = data.get("meta")
        return cls(path=str(data.get("path", "")), fingerprint=str(data["fingerprint"]),
                   n_rows=int(data.get("n_rows", 0)),
                   meta=None if meta is None else CacheMeta.from_dict(meta, where),
                   model=data.get("model"), split=data.get("split"))


def _weights_name(value: Any, where: str, default: str) -> str:
    """A weights file named in a record: a plain file name inside the directory, never a path."""
    name = default if value is None else value
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ChipTuningError(f"{where}: weights {name!r} is not a file name inside the directory; "
                              "refusing to follow it")
    return name


@dataclass
class ChipsRecord:
    """``chips.json``: what a chips directory holds and where it came from.

    Attributes:
        chip: "linear", "mlp" or "logreg".
        layers: layers with a chip, ascending.
        n_classes: number of classes.
        label_names: class names, in class-index order.
        params: the estimator's parameters (what :func:`~chiptuning.probe.chips.make_chip` takes).
        train: the resolved training settings (``TrainConfig.to_dict()``).
        hidden_size: feature width.
        train_cache: the training cache (with its meta: model, task, ...).
        eval_cache: the eval cache (summary), or None.
        validation: the validation rows carved from the training cache ({"size", "seed", "rows",
            "source", "n_train_rows"}).
        model_stats: parameter counts of the model (from the cache).
        majority_baseline: accuracy of always answering the most frequent class, per part.
        zero_shot: the model's own answer on the eval cache (decoders with a stored lens): plain and
            prior-calibrated accuracy at the last layer (:func:`chiptuning.probe.lens.zero_shot_report`).
        weights: the weights file in the directory.
        chiptuning_version: the version that wrote it.
        extra: keys this version does not know (kept, warned about on load).
    """

    chip: str
    layers: list[int]
    n_classes: int
    label_names: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    hidden_size: int | None = None
    train_cache: CacheRef | None = None
    eval_cache: CacheRef | None = None
    validation: dict[str, Any] | None = None
    model_stats: dict[str, Any] = field(default_factory=dict)
    majority_baseline: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, Any] | None = None
    weights: str | None = None
    chiptuning_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    FORMAT = CHIPS_FORMAT

    @property
    def cache_meta(self) -> CacheMeta:
        """The training cache's meta (model, task, feature mode, ...)."""
        if self.train_cache is None or self.train_cache.meta is None:
            raise ChipTuningError("the chips record no training-cache meta (model, task); they cannot be checked "
                                  "against the model: re-train them with `chiptuning probe train`")
        return self.train_cache.meta

    @property
    def num_blocks(self) -> int:
        """L of the model the chips were trained on."""
        if self.model_stats.get("blocks"):
            return len(self.model_stats["blocks"])
        meta = self.train_cache.meta if self.train_cache is not None else None
        return int((meta.num_blocks if meta is not None else None) or max(self.layers))

    def estimator_params(self) -> dict[str, Any]:
        """``params`` as the estimator takes them, dropping (with a warning) any it does not know."""
        params = dict(self.params)
        accepted = make_chip(self.chip).get_params()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            log.warning("ignoring unknown chip params %s (written by chiptuning %s)", unknown, self.chiptuning_version)
        params = {k: v for k, v in params.items() if k in accepted}
        if params.get("betas") is not None:
            params["betas"] = tuple(params["betas"])
        return params

    def _fields(self) -> dict[str, Any]:
        return {
            "chip": self.chip,
            "n_classes": self.n_classes,
            "label_names": list(self.label_names),
            "params": self.params,
            "train": self.train,
            "hidden_size": self.hidden_size,
            "train_cache": None if self.train_cache is None else self.train_cache.to_dict(),
            "eval_cache": None if self.eval_cache is None else self.eval_cache.to_dict(),
            "model_stats": self.model_stats,
            "majority_baseline": self.majority_baseline,
            "zero_shot": self.zero_shot,
            "weights": self.weights,
            "chiptuning_version": self.chiptuning_version,
            "format": self.FORMAT,
            **self.extra,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self._fields(), "layers": list(self.layers), "validation": self.validation}

    @classmethod
    def _common(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ChipTuningError(f"{where} is not a chips record")
        for key in ("chip", "n_classes"):
            if key not in data:
                raise ChipTuningError(f"{where} has no {key!r}; it was not written by `chiptuning probe train`")
        if data["chip"] not in CHIP_KINDS:
            raise ChipTuningError(f"{where}: unknown chip type {data['chip']!r} (known: {', '.join(CHIP_KINDS)})")
        try:
            n_classes = int(data["n_classes"])
        except (TypeError, ValueError):
            raise ChipTuningError(f"{where}: n_classes must be an integer, got {data['n_classes']!r}") from None
        return dict(
            chip=data["chip"], n_classes=n_classes, label_names=[str(x) for x in data.get("label_names") or []],
            params=dict(data.get("params") or {}), train=dict(data.get("train") or {}),
            hidden_size=data.get("hidden_size"),
            train_cache=CacheRef.from_dict(data.get("train_cache"), where),
            eval_cache=CacheRef.from_dict(data.get("eval_cache"), where),
            model_stats=dict(data.get("model_stats") or {}),
            majority_baseline=dict(data.get("majority_baseline") or {}),
            zero_shot=data.get("zero_shot"),
            chiptuning_version=str(data.get("chiptuning_version", "")),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG) -> ChipsRecord:
        """Read and validate a chips record; unknown keys are kept and warned about.

        Raises:
            ChipTuningError: a missing or malformed field, or a weights path outside the directory.
        """
        common = cls._common(data, where)
        if "layers" not in data:
            raise ChipTuningError(f"{where} has no 'layers'; it was not written by `chiptuning probe train`")
        try:
            layers = [int(x) for x in data["layers"]]
        except (TypeError, ValueError):
            raise ChipTuningError(f"{where}: layers must be a list of integers") from None
        default = SKLEARN_WEIGHTS if common["chip"] == "logreg" else TORCH_WEIGHTS
        known = {f.name for f in dataclasses.fields(cls)} | {"format"}
        return cls(**common, layers=layers, validation=data.get("validation"),
                   weights=_weights_name(data.get("weights"), where, default),
                   extra=_unknown(data, known, where))


@dataclass
class ChipRecord(ChipsRecord):
    """``chip.json`` of a single-chip directory (inside a pruned checkpoint): the chips record of
    one layer, with that layer's metrics and the selection that chose it.

    Attributes:
        layer: the chip's layer.
        metrics: its metric row.
        selection: the selection.json content when the chip was saved, or None.
    """

    layer: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] | None = None

    FORMAT = CHIP_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {**self._fields(), "layer": self.layer, "metrics": self.metrics, "selection": self.selection}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CHIP_CONFIG) -> ChipRecord:
        common = cls._common(data, where)
        if not isinstance(data.get("layer"), int):
            raise ChipTuningError(f"{where}: 'layer' must be an integer, got {data.get('layer')!r}")
        default = "chip.joblib" if common["chip"] == "logreg" else "chip.safetensors"
        known = {f.name for f in dataclasses.fields(cls)} | {"format"}
        return cls(**common, layers=[data["layer"]], layer=data["layer"], metrics=dict(data.get("metrics") or {}),
                   selection=data.get("selection"), weights=_weights_name(data.get("weights"), where, default),
                   extra=_unknown(data, known - {"layers", "validation"}, where))


def _unknown(data: dict[str, Any], known: set[str], where: str) -> dict[str, Any]:
    unknown = {k: v for k, v in data.items() if k not in known}
    if unknown:
        log.warning("%s: unknown keys %s (written by chiptuning %s); keeping them", where, sorted(unknown),
                    data.get("chiptuning_version"))
    return unknown


class ChipSet:
    """The chips of every layer, their metrics and provenance (a loaded chips directory).

    Attributes:
        record: the chips record (chip type, params, caches, validation rows, ...).
        layers: layers with a chip, ascending.
        label_names: class names, in class-index order.
        metrics: per-layer metric rows (dicts with the keys of ``METRIC_COLUMNS``).
        selection: contents of selection.json, or None.
        path: the directory it was loaded from / saved to, or None.
    """

    def __init__(self, record: ChipsRecord | dict, *, tensors: dict[str, np.ndarray] | None = None,
                 sklearn_chips: dict[int, Any] | None = None, metrics: list[dict] | None = None,
                 eval_predictions: dict | None = None, selection: dict | None = None,
                 path: Path | None = None) -> None:
        self.record = record if isinstance(record, ChipsRecord) else ChipsRecord.from_dict(record, "chips record")
        self.layers: list[int] = list(self.record.layers)
        self.label_names: list[str] = list(self.record.label_names)
        self.metrics: list[dict] = metrics or []
        self.selection = selection
        self.path = path
        self.eval_predictions = eval_predictions
        self._tensors = tensors  # name -> (n_layers, ...) for torch chips
        self._sklearn = sklearn_chips
        self._cache: dict[int, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The record as JSON (what chips.json holds)."""
        return self.record.to_dict()

    @property
    def kind(self) -> str:
        return self.record.chip

    @property
    def n_classes(self) -> int:
        return self.record.n_classes

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
                chip = make_chip(self.kind, **self.record.estimator_params())
                self._cache[layer] = chip.load_state(self.layer_state(layer), np.arange(self.n_classes))
        return self._cache[layer]

    # -- saving ----------------------------------------------------------------------------------

    def save(self, out: str | Path) -> Path:
        """Write the whole chips directory (config, weights, metrics, predictions, plot)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        record = dataclasses.replace(self.record, chiptuning_version=__version__)
        if self._tensors is not None:
            record.weights = TORCH_WEIGHTS
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self._tensors.items()},
                      str(out / TORCH_WEIGHTS), metadata={"format": CHIPS_FORMAT, "chip": self.kind})
        else:
            record.weights = SKLEARN_WEIGHTS
            joblib.dump(self._sklearn, out / SKLEARN_WEIGHTS)
        write_metrics(out, self.metrics, self.kind)
        if self.eval_predictions is not None:
            write_predictions(out / PREDICTIONS, self.eval_predictions)
        part, baseline = pick_baseline(record.majority_baseline)
        plot_layer_accuracy({self.kind: self.metrics}, out / PLOT, n_classes=self.n_classes,
                            baseline=baseline, baseline_label=f"majority class ({part})")
        write_json_atomic(out / CONFIG, record.to_dict())  # last: a directory with chips.json is complete
        self.record, self.path = record, out
        log.info("wrote chips of %d layers to %s", len(self.layers), out)
        return out

    def save_layer(self, layer: int, out_dir: str | Path) -> Path:
        """Write the chip at ``layer`` as a single-chip directory (``chip.json`` + weights).

        The record keeps the chip type, params, label names, layer and the training provenance;
        :func:`load_chip` reads it back.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._position(layer)
        common = {f.name: getattr(self.record, f.name) for f in dataclasses.fields(ChipsRecord)
                  if f.name not in ("layers", "validation", "weights")}
        record = ChipRecord(**common, layers=[int(layer)], layer=int(layer), metrics=self.metrics_at(layer),
                            selection=self.selection)
        record.chiptuning_version = __version__
        if self._tensors is not None:
            record.weights = "chip.safetensors"
            state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.layer_state(layer).items()}
            save_file(state, str(out / record.weights), metadata={"format": CHIP_FORMAT})
        else:
            record.weights = "chip.joblib"
            joblib.dump(self.chip(layer), out / record.weights)
        write_json_atomic(out / CHIP_CONFIG, record.to_dict())
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
    write_json_atomic(out / METRICS_JSON, {"chip": kind, "layers": list(rows)})


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    """A CSV of dict rows, the columns in first-seen order (blank for a missing value)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in columns} for row in rows)
    return Path(path)


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


def load_chips(path: str | Path) -> ChipSet:
    """Load a chips directory written by ``chiptuning probe train``.

    Unknown record keys are kept and warned about; torch weights load through safetensors.
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
    record = ChipsRecord.from_dict(_read_json(path / CONFIG, "chips"), str(path / CONFIG))
    weights = path / record.weights
    if not weights.is_file():
        raise ChipTuningError(f"chip weights {weights} are missing; train the chips again")
    tensors = sklearn_chips = None
    if weights.suffix == ".safetensors":
        tensors = load_file(str(weights))
    else:
        sklearn_chips = {int(k): v for k, v in joblib.load(weights).items()}
    metrics = None
    if (path / METRICS_JSON).exists():
        metrics = json.loads((path / METRICS_JSON).read_text()).get("layers")
    selection = json.loads((path / SELECTION).read_text()) if (path / SELECTION).exists() else None
    return ChipSet(record, tensors=tensors, sklearn_chips=sklearn_chips, metrics=metrics,
                   selection=selection, path=path)


def load_chip(path: str | Path):
    """Load a single-chip directory written by :meth:`ChipSet.save_layer`: the fitted chip.

    The chip carries ``chip_record_`` (the :class:`ChipRecord`: layer, label names, provenance)
    and ``chip_config_`` (the same as JSON).
    """
    path = Path(path)
    raw = _read_json(path / CHIP_CONFIG, "chip")
    record = ChipRecord.from_dict(raw, str(path / CHIP_CONFIG))
    weights = path / record.weights
    if not weights.is_file():
        raise ChipTuningError(f"chip weights {weights} are missing")
    if weights.suffix == ".safetensors":
        chip = make_chip(record.chip, **record.estimator_params())
        chip.load_state(load_file(str(weights)), np.arange(record.n_classes))
    else:
        chip = joblib.load(weights)
    chip.chip_record_ = record
    chip.chip_config_ = raw
    return chip
