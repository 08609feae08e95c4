"""Chips directories: what ``chiptuning probe train`` writes and every later stage reads.

A chips directory holds::

    chips.json            # the chips record (probe/records.py): chip type and params, layers,
                          # label names, training config, cache fingerprints + meta, validation
                          # rows, model_stats, and every file below with its sha256
    chips.safetensors     # every chip kind: stacked arrays, leading axis = position in "layers"
                          # (chips.STATE_KEYS: linear / MLP weights, logreg coefficients)
    chips.joblib          # only for another scikit-learn estimator, saved with allow_pickle=True:
                          # a pickle, loaded only with allow_pickle=True (--allow-pickle)
    metrics.csv / .json   # per layer: train / val / eval accuracy and loss, epochs
    eval_predictions.csv  # example_id, label, layer_<l> (predicted class index) per layer
    layer_accuracy.png    # accuracy against layer
    selection.json        # after `chiptuning select` (it lists report.md and any cascade files)
    report.md             # after `chiptuning select`

A single-chip directory (``ChipSet.save_layer``) holds ``chip.json`` and ``chip.safetensors``
(``chip.joblib`` only for an opted-in pickle).

Nothing executable is ever loaded by default: weights are read with safetensors, a weights file
named in a record must be a plain file name inside the directory, and a pickle is refused unless
the caller passes ``allow_pickle=True``. What is loaded is checked: the records through their
codec, every file ``probe train`` wrote against its sha256 in chips.json, every array's shape
against the record (width = the cache's hidden size, one chip per layer, the classes), every value
finite, and the metric rows against the record's layers; :func:`check_chips_on_cache` recomputes a
chip's accuracy on the eval cache it records.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from chiptuning import __version__
from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.outputs import CHIPS, is_unchanged, write_output, written_files
from chiptuning.probe.chips import STATE_KEYS, make_chip
from chiptuning.probe.data import optional_class_mask
from chiptuning.probe.plots import plot_layer_accuracy
from chiptuning.probe.records import (
    CHIP_FORMAT,
    CHIPS_FORMAT,
    PICKLE_SUFFIXES,
    ChipRecord,
    ChipsBase,
    ChipsRecord,
    MetricRow,
    Metrics,
    Selection,
)
from chiptuning.records import read_json

log = logging.getLogger(__name__)

CONFIG = "chips.json"
CHIP_CONFIG = "chip.json"
WEIGHTS = "chips.safetensors"  # every chip kind's weights (linear, MLP and logistic chips)
SKLEARN_WEIGHTS = "chips.joblib"  # a pickle: other scikit-learn estimators, opted in
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


class ChipSet:
    """The chips of every layer, their metrics and provenance (a loaded chips directory).

    Attributes:
        record: the chips record (chip type, params, caches, validation rows, ...).
        layers: layers with a chip, ascending.
        label_names: class names, in class-index order.
        metrics: per-layer metric rows (dicts with the keys of ``METRIC_COLUMNS``).
        selection: the selection (``selection.json``), or None.
        path: the directory it was loaded from / saved to, or None.
    """

    def __init__(self, record: ChipsRecord | dict, *, tensors: dict[str, np.ndarray] | None = None,
                 sklearn_chips: dict[int, Any] | None = None, metrics: list[dict] | None = None,
                 eval_predictions: dict | None = None, selection: Selection | None = None,
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
        """Arrays of the torch chip at ``layer`` (bank layout without the chip axis)."""
        i = self._position(layer)
        return {name: value[i] for name, value in self._tensors.items()}

    def chip(self, layer: int):
        """The fitted chip at ``layer`` (predict / predict_proba / decision_function, class_mask=)."""
        i = self._position(layer)
        if layer not in self._cache:
            if self._sklearn is not None:
                self._cache[layer] = self._sklearn[self.layers[i]]
            else:
                chip = make_chip(self.kind, **estimator_params(self.record))
                self._cache[layer] = chip.load_state(self.layer_state(layer), np.arange(self.n_classes))
        return self._cache[layer]

    def _stacked_state(self) -> dict[str, np.ndarray] | None:
        """Every chip's arrays (:data:`~chiptuning.probe.chips.STATE_KEYS`) stacked on a leading
        layer axis: what ``chips.safetensors`` holds. None when a chip is not one of chip-tuning's
        own kind (another scikit-learn estimator, which only a pickle can hold)."""
        if self._tensors is not None:
            return self._tensors
        own = type(make_chip(self.kind))
        chips = [self._sklearn[layer] for layer in self.layers]
        if not all(type(chip) is own for chip in chips):
            return None
        states = [chip.state_tensors() for chip in chips]
        try:
            return {key: np.stack([state[key] for state in states]) for key in STATE_KEYS[self.kind]}
        except ValueError:  # arrays of different shapes at different layers
            return None

    def _foreign_estimators(self) -> str:
        own = type(make_chip(self.kind))
        kinds = sorted({type(c).__name__ for c in (self._sklearn or {}).values() if type(c) is not own})
        return ", ".join(kinds) or f"{self.kind} chips of different shapes"

    # -- saving ----------------------------------------------------------------------------------

    def save(self, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False) -> Path:
        """Write the whole chips directory (config, weights, metrics, predictions, plot).

        Written beside ``out`` and renamed into place (:func:`chiptuning.outputs.write_output`):
        an existing chips directory is replaced only with ``overwrite``, anything else is refused.

        Args:
            out: the chips directory.
            overwrite: replace an existing chips directory (its selection goes with it).
            allow_pickle: allow saving chips that are not chip-tuning's own (other scikit-learn
                estimators) as a pickle, ``chips.joblib``, which loads only with ``allow_pickle``.

        Raises:
            ChipTuningError: ``out`` is in the way, or a chip needs a pickle and ``allow_pickle``
                is False.
        """
        out = Path(out)
        state = self._stacked_state()
        if state is None and not allow_pickle:
            raise ChipTuningError(f"the chips ({self._foreign_estimators()}) can only be saved as a pickle, which "
                                  "runs code when loaded; pass allow_pickle=True (--allow-pickle) to save them so")
        with write_output(out, CHIPS, overwrite=overwrite) as tmp:
            if state is not None:
                weights = WEIGHTS
                save_file(contiguous(state, self.kind), str(tmp / WEIGHTS),
                          metadata={"format": CHIPS_FORMAT, "chip": self.kind})
            else:
                weights = SKLEARN_WEIGHTS
                log.warning("saving the chips as a pickle (%s): it loads only with allow_pickle", SKLEARN_WEIGHTS)
                joblib.dump(self._sklearn, tmp / SKLEARN_WEIGHTS)
            write_metrics(tmp, self.metrics, self.kind)
            if self.eval_predictions is not None:
                write_predictions(tmp / PREDICTIONS, self.eval_predictions)
            part, baseline = pick_baseline(self.record.majority_baseline)
            plot_layer_accuracy({self.kind: self.metrics}, tmp / PLOT, n_classes=self.n_classes,
                                baseline=baseline, baseline_label=f"majority class ({part})")
            record = dataclasses.replace(self.record, chiptuning_version=__version__, weights=weights,
                                         files=written_files(tmp, CONFIG))
            record.write(tmp / CONFIG)  # last: a directory with chips.json is complete
        self.record, self.path, self.selection = record, out, None
        log.info("wrote chips of %d layers to %s", len(self.layers), out)
        return out

    def save_layer(self, layer: int, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
        """Write the chip at ``layer`` as a single-chip directory (``chip.json`` + weights).

        The record keeps the chip type, params, label names, layer and the training provenance;
        :func:`load_chip` reads it back. The weights are safetensors; a chip that is not
        chip-tuning's own needs ``allow_pickle`` (then ``chip.joblib``).
        """
        out = Path(out_dir)
        self._position(layer)
        common = {f.name: getattr(self.record, f.name) for f in dataclasses.fields(ChipsBase) if f.name != "weights"}
        metrics = self.metrics_at(layer)
        chip = self.chip(layer)
        state = self.layer_state(layer) if self._tensors is not None else (
            chip.state_tensors() if type(chip) is type(make_chip(self.kind)) else None)
        if state is None and not allow_pickle:
            raise ChipTuningError(f"the chip at layer {layer} ({type(chip).__name__}) can only be saved as a pickle, "
                                  "which runs code when loaded; pass allow_pickle=True (--allow-pickle) to save it so")
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            weights = "chip.safetensors"
            save_file(contiguous(state, self.kind), str(out / weights), metadata={"format": CHIP_FORMAT})
        else:
            weights = "chip.joblib"
            joblib.dump(chip, out / weights)
        record = ChipRecord(**dict(common, chiptuning_version=__version__), weights=weights, layer=int(layer),
                            metrics=MetricRow.from_dict(metrics, "metrics") if metrics else None,
                            selection=self.selection)
        record.write(out / CHIP_CONFIG)
        return out

    def __repr__(self) -> str:
        return f"ChipSet(chip={self.kind!r}, layers={self.layers[0]}..{self.layers[-1]}, classes={self.n_classes})"


def _fits(value: Any, default: Any) -> bool:
    """Whether a recorded param value has the kind of the estimator's default for it."""
    if value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and (default is None or isinstance(default, bool))
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(default)
    return not isinstance(value, dict)  # a default of None: a number, text or list


def estimator_params(record: ChipsBase, where: str = "the chips record") -> dict[str, Any]:
    """The record's ``params`` as the estimator takes them: unknown ones dropped (with a warning),
    each known one of the kind the estimator's default has (else one error line naming ``where``),
    on the CPU (chips read features as numpy arrays)."""
    accepted = make_chip(record.chip).get_params()
    unknown = sorted(set(record.params) - set(accepted))
    if unknown:
        log.warning("ignoring unknown chip params %s (written by chiptuning %s)", unknown, record.chiptuning_version)
    params = {k: v for k, v in record.params.items() if k in accepted}
    bad = [k for k, v in params.items() if not _fits(v, accepted[k])]
    if bad:
        raise ChipTuningError(f"{where}: params {', '.join(f'{k}={params[k]!r}' for k in bad)} are not what a "
                              f"{record.chip} chip takes; train the chips again")
    if isinstance(params.get("betas"), list):
        params["betas"] = tuple(params["betas"])
    if "device" in params:
        params["device"] = "cpu"
    return params


def contiguous(state: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """Arrays as safetensors stores them: contiguous; float32 for the torch chips (as trained),
    the logistic chip's in their own dtypes (so it predicts bit for bit as fitted)."""
    if kind == "logreg":
        return {k: np.ascontiguousarray(v) for k, v in state.items()}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def is_pickle(name: str | Path) -> bool:
    """Whether a weights file name is a pickle (``.joblib`` / ``.pkl`` / ``.pickle``)."""
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


def expected_shapes(record: ChipsBase, n_layers: int | None) -> dict[str, tuple[int | None, ...]]:
    """The shape of every array a record's chips hold (None: any size), with the leading layer
    axis when ``n_layers`` is given."""
    H, C = record.hidden_size, record.n_classes
    if record.chip == "linear":
        shapes = {"weight": (C, H), "bias": (C,)}
    elif record.chip == "mlp":
        hidden = record.params.get("hidden") if isinstance(record.params.get("hidden"), int) else None
        shapes = {"weight_hidden": (hidden, H), "bias_hidden": (hidden,), "weight": (C, hidden), "bias": (C,)}
    else:  # logistic regression: one row of coefficients for two classes seen, else one per class seen
        shapes = {"coef": (None, H), "intercept": (None,), "seen": (None,), "n_iter": (1,)}
    shapes.update(mean=(H,), scale=(H,))
    return {k: ((n_layers,) if n_layers is not None else ()) + v for k, v in shapes.items()}


def check_weights(path: Path, tensors: dict[str, np.ndarray], record: ChipsBase, n_layers: int | None) -> None:
    """Refuse arrays that do not fit the record: missing, of another shape (a chip of another width
    than the cache's hidden size, another number of layers or classes), or not finite.

    Raises:
        ChipTuningError: naming the file and the array.
    """
    def refuse(detail: str) -> None:
        raise ChipTuningError(f"{path} does not hold the {record.chip} chips its record describes ({detail}); "
                              "train the chips again")

    shapes = expected_shapes(record, n_layers)
    missing = [k for k in STATE_KEYS[record.chip] if k not in tensors]
    if missing:
        refuse(f"missing {', '.join(missing)}")
    for name, shape in shapes.items():
        value = tensors[name]
        if value.ndim != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape)):
            refuse(f"{name} has shape {tuple(value.shape)}, expected {tuple('*' if s is None else s for s in shape)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            refuse(f"{name} holds values that are not finite")
    if record.chip == "logreg":
        seen = tensors["seen"]
        if seen.size and (seen.min() < 0 or seen.max() >= record.n_classes):
            refuse(f"classes seen outside 0..{record.n_classes - 1}")


def read_weights(path: Path, record: ChipsBase, *, allow_pickle: bool = False, n_layers: int | None = None):
    """The weights a record names: safetensors arrays (checked by :func:`check_weights`, with
    ``n_layers`` on the leading axis when given), or, only with ``allow_pickle``, the unpickled
    object.

    Raises:
        ChipTuningError: a missing, unreadable or unexpected file; a pickle without ``allow_pickle``.
    """
    if path.is_symlink() or not path.is_file():
        raise ChipTuningError(f"chip weights {path} are missing; train the chips again")
    if is_pickle(path):
        if not allow_pickle:
            raise ChipTuningError(
                f"{path} is a pickle, which can run any code when loaded; chip-tuning loads one only when asked "
                "(--allow-pickle / allow_pickle=True), so do that only for files you made yourself. Chips of "
                "every kind are now stored without pickle: re-train them with `chiptuning probe train`")
        log.warning("loading the pickle %s (allow_pickle=True): it can run any code", path)
        try:
            return joblib.load(path)
        except Exception as err:  # unpickling raises anything
            raise ChipTuningError(f"cannot unpickle {path} ({type(err).__name__}: {err}); train the chips again") from None
    if path.suffix != ".safetensors":
        raise ChipTuningError(f"chip weights {path}: unknown format {path.suffix!r} (expected .safetensors)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ChipTuningError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                              "it was replaced or damaged: train the chips again") from None
    check_weights(path, tensors, record, n_layers)
    return tensors


def write_metrics(out: Path, rows: Sequence[dict], kind: str) -> None:
    """metrics.csv (one row per layer) and metrics.json (the :class:`Metrics` record)."""
    with open(out / METRICS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    Metrics(chip=kind, layers=[MetricRow.from_dict(row, "metrics") for row in rows]).write(out / METRICS_JSON)


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


def load_chips(path: str | Path, *, allow_pickle: bool = False) -> ChipSet:
    """Load a chips directory written by ``chiptuning probe train``.

    Unknown record keys are kept and warned about; weights load through safetensors and are checked
    against the record. A pickled ``chips.joblib`` (another scikit-learn estimator, or the logistic
    chips of an earlier version) runs code when loaded: it is refused unless ``allow_pickle=True``.

    Raises:
        ChipTuningError: not a chips directory, a corrupt or inconsistent one, or a pickle without
            ``allow_pickle``.
    """
    path = Path(path)
    if not path.is_dir():
        raise ChipTuningError(f"no chips directory at {path}; run `chiptuning probe train` first")
    if not (path / CONFIG).exists():
        if (path / "sweep.json").exists():
            raise ChipTuningError(f"{path} is a sweep directory (metrics, no chips); train the chosen setting's "
                                  f"chips first: {sweep_command(path / 'sweep.json')}")
        raise ChipTuningError(f"{path} is not a chips directory ({CONFIG} is missing); run `chiptuning probe train`")
    record = ChipsRecord.read(path / CONFIG)
    estimator_params(record, str(path / CONFIG))  # refused now, not when a chip is first used
    metrics = None
    if (path / METRICS_JSON).exists():
        table = Metrics.read(path / METRICS_JSON)
        if table.chip != record.chip or [row.layer for row in table.layers] != list(record.layers):
            raise ChipTuningError(f"{path / METRICS_JSON}: its {table.chip} chips at layers "
                                  f"{[row.layer for row in table.layers][:6]}... are not the chips of {CONFIG} "
                                  f"({record.chip} at layers {record.layers[:6]}...); train the chips again")
        metrics = [row.to_dict() for row in table.layers]
    selection = Selection.read(path / SELECTION) if (path / SELECTION).exists() else None
    if selection is not None and selection.layer not in record.layers:
        raise ChipTuningError(f"{path / SELECTION}: layer {selection.layer} has no chip in {CONFIG}; run "
                              "`chiptuning select` again")
    changed = [name for name, digest in record.files.items()
               if (path / name).exists() and not is_unchanged(path, name, digest)]
    if changed:
        raise ChipTuningError(f"{path}: {', '.join(changed)} changed since `chiptuning probe train` wrote "
                              f"{'it' if len(changed) == 1 else 'them'} (its sha256 in {CONFIG} differs); train the "
                              "chips again")
    # the weights last: every record was checked before a file that could be a pickle is opened
    weights_name = record.weights or (SKLEARN_WEIGHTS if record.chip == "logreg" else WEIGHTS)
    weights = read_weights(path / weights_name, record, allow_pickle=allow_pickle, n_layers=len(record.layers))
    tensors = sklearn_chips = None
    if isinstance(weights, dict) and all(isinstance(v, np.ndarray) for v in weights.values()):
        tensors = weights
    else:
        try:
            sklearn_chips = {int(k): v for k, v in weights.items()}
        except (AttributeError, TypeError, ValueError):
            raise ChipTuningError(f"{path / weights_name} does not hold chips by layer; train the chips again") from None
    return ChipSet(record, tensors=tensors, sklearn_chips=sklearn_chips, metrics=metrics,
                   selection=selection, path=path)


def sweep_command(path: Path) -> str:
    """The ``probe train`` command a sweep record names for its best setting (read as JSON only
    through the record reader; a placeholder when the record cannot tell)."""
    try:
        command = read_json(path).get("best_command")
    except (ChipTuningError, AttributeError):
        command = None
    return command if isinstance(command, str) and command.startswith("chiptuning probe train ") else \
        "chiptuning probe train CACHE --out CHIPS_DIR with the setting in sweep.csv"


def load_chip(path: str | Path, *, allow_pickle: bool = False):
    """Load a single-chip directory written by :meth:`ChipSet.save_layer`: the fitted chip.

    The chip carries ``chip_record_`` (the :class:`ChipRecord`: layer, label names, provenance)
    and ``chip_config_`` (the same as JSON). A pickled ``chip.joblib`` is refused unless
    ``allow_pickle=True``.
    """
    path = Path(path)
    if not (path / CHIP_CONFIG).is_file():
        raise ChipTuningError(f"{path} is not a chip directory ({CHIP_CONFIG} is missing)")
    record = ChipRecord.read(path / CHIP_CONFIG)
    params = estimator_params(record, str(path / CHIP_CONFIG))
    weights_name = record.weights or ("chip.joblib" if record.chip == "logreg" else "chip.safetensors")
    weights = read_weights(path / weights_name, record, allow_pickle=allow_pickle)
    if is_pickle(weights_name):
        chip = weights
    else:
        chip = make_chip(record.chip, **params)
        chip.load_state(weights, np.arange(record.n_classes))
    chip.chip_record_ = record
    chip.chip_config_ = record.to_dict()
    return chip


def check_chips_on_cache(chips: ChipSet, layers: Sequence[int]) -> None:
    """Recompute the eval accuracy of the chips at ``layers`` on the eval cache the chips record,
    when it is at hand (the recorded path holds the recorded fingerprint), and refuse chips that
    no longer score what their metrics say: chips moved to another layer, or edited.

    Raises:
        ChipTuningError: naming the layer, the recorded and the recomputed accuracy.
    """
    ref = chips.record.eval_cache
    if ref is None or not ref.path or not chips.metrics or not Path(ref.path, "manifest.json").is_file():
        return
    try:
        cache = CacheReader(ref.path)
    except ChipTuningError:
        return
    if cache.fingerprint != ref.fingerprint:
        return
    with cache:
        mask = optional_class_mask(np.asarray(cache.n_choices), chips.n_classes)
        for layer in layers:
            recorded = chips.metrics_at(layer).get("eval_accuracy")
            if recorded is None or layer not in cache.layers:
                continue
            predicted = np.asarray(chips.chip(layer).predict(cache.layer(layer), class_mask=mask))
            accuracy = float((predicted == np.asarray(cache.labels)).mean())
            if abs(accuracy - recorded) > 1e-9:  # the same features, the same chip: the same answers
                raise ChipTuningError(
                    f"the chip at layer {layer} scores {accuracy:.4f} on the eval cache {ref.path}, its record says "
                    f"{recorded:.4f}: the chips were edited or moved to another layer; train them again")


__all__ = ["CHIP_CONFIG", "CONFIG", "METRIC_COLUMNS", "PLOT", "PREDICTIONS", "REPORT", "SELECTION", "SKLEARN_WEIGHTS",
           "WEIGHTS", "ChipSet", "check_chips_on_cache", "check_weights", "contiguous", "estimator_params",
           "expected_shapes", "is_pickle", "load_chip", "load_chips", "majority_baselines", "pick_baseline",
           "read_weights", "write_metrics", "write_predictions", "write_rows"]
