"""Chips directories: what ``chiptuning probe train`` writes and every later stage reads.

A chips directory holds::

    chips.json            # the chips record (probe/records.py), listing every file below with its sha256
    chips.safetensors     # every chip kind's arrays (chips.STATE_KEYS), leading axis = position in "layers"
    chips.joblib          # instead, only for another scikit-learn estimator saved with allow_pickle
    metrics.csv / .json   # per layer: train / val / eval accuracy and loss, epochs
    eval_predictions.csv  # example_id, label, layer_<l> (predicted class index) per layer
    layer_accuracy.png    # accuracy against layer
    selection.json        # after `chiptuning select` (it lists report.md and any cascade files)

A single-chip directory (``ChipSet.save_layer``) holds ``chip.json`` and ``chip.safetensors``
(``chip.joblib`` only for an opted-in pickle). Loading checks everything it reads (the records,
every listed file's sha256, the weights' shapes and values) and never unpickles without
``allow_pickle=True``; :func:`check_chips_on_cache` recomputes a chip's accuracy on its eval cache.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
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
from chiptuning.probe.bank import TORCH_KINDS, param_shapes
from chiptuning.probe.chips import CHIP_CLASSES, STATE_KEYS, make_chip
from chiptuning.probe.data import cache_class_mask
from chiptuning.probe.plots import plot_layer_accuracy
from chiptuning.probe.records import ChipsBase, ChipsRecord, LayerChipRecord, MetricRow, Metrics, Selection
from chiptuning.records import read_json

log = logging.getLogger(__name__)

CONFIG = "chips.json"
CHIP_CONFIG = "chip.json"
WEIGHTS = "chips.safetensors"
SKLEARN_WEIGHTS = "chips.joblib"  # a pickle: other scikit-learn estimators, opted in
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PREDICTIONS = "eval_predictions.csv"
PLOT = "layer_accuracy.png"
SELECTION = "selection.json"
REPORT = "report.md"
#: The columns of metrics.csv: the fields of a metric row.
METRIC_COLUMNS = tuple(f.name for f in dataclasses.fields(MetricRow) if f.name != "extra")
#: Suffixes of pickled weights: loaded only with ``allow_pickle=True``.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


class ChipSet:
    """The chips of every layer, their metrics and provenance (a loaded chips directory)."""

    def __init__(self, record: ChipsRecord | dict, *, tensors: dict[str, np.ndarray] | None = None,
                 sklearn_chips: dict[int, Any] | None = None, metrics: list[dict] | None = None,
                 eval_predictions: dict | None = None, selection: Selection | None = None,
                 path: Path | None = None) -> None:
        self.record = record if isinstance(record, ChipsRecord) else ChipsRecord.from_dict(record, "chips record")
        self.layers: list[int] = list(self.record.layers)  # ascending
        self.label_names: list[str] = list(self.record.label_names)  # in class-index order
        self.metrics: list[dict] = metrics or []  # per layer, the keys of METRIC_COLUMNS
        self.selection = selection  # selection.json, or None
        self.path = path  # the directory it was loaded from or saved to, or None
        self.eval_predictions = eval_predictions
        self._tensors = tensors  # name -> (n_layers, ...), the layout of chips.safetensors
        self._sklearn = sklearn_chips  # layer -> fitted chip, where there are no tensors
        self._chips: dict[int, Any] = {}

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
            first, last = self.layers[0], self.layers[-1]
            raise ChipTuningError(f"no chip at layer {layer}; the chips cover layers {first}..{last}")
        return self.layers.index(int(layer))

    def layer_state(self, layer: int) -> dict[str, np.ndarray] | None:
        """Arrays of the chip at ``layer`` (the weights file's layout without the layer axis); None
        for a chip only a pickle holds (another estimator)."""
        i = self._position(layer)
        if self._tensors is None:
            chip = self._sklearn[self.layers[i]]
            return chip.state_tensors() if type(chip) is CHIP_CLASSES[self.kind] else None
        return {name: value[i] for name, value in self._tensors.items()}

    def chip(self, layer: int):
        """The fitted chip at ``layer`` (predict / predict_proba / decision_function, class_mask=)."""
        i = self._position(layer)
        if self._sklearn is not None:
            return self._sklearn[self.layers[i]]
        if layer not in self._chips:
            chip = make_chip(self.kind, **self._estimator_params)
            self._chips[layer] = chip.load_state(self.layer_state(layer), np.arange(self.n_classes))
        return self._chips[layer]

    @functools.cached_property
    def _estimator_params(self) -> dict[str, Any]:
        """The record's params as every layer's estimator takes them (checked, and warned about, once)."""
        return estimator_params(self.record)

    def save(self, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False) -> Path:
        """Write the whole chips directory (record, weights, metrics, predictions, plot), beside
        ``out`` and renamed into place (:func:`chiptuning.outputs.write_output`): an existing chips
        directory is replaced (its selection with it) only with ``overwrite``. Chips that are not
        chip-tuning's own (other scikit-learn estimators) are saved only with ``allow_pickle``,
        as ``chips.joblib``."""
        out = Path(out)
        state = self._tensors
        if state is None:
            state = stacked_state([self.layer_state(layer) for layer in self.layers])
        if state is None and not allow_pickle:
            own = CHIP_CLASSES[self.kind]
            foreign = sorted({type(c).__name__ for c in self._sklearn.values() if type(c) is not own})
            refuse_pickle(f"the chips ({', '.join(foreign) or f'{self.kind} chips of different shapes'})")
        with write_output(out, CHIPS, overwrite=overwrite) as tmp:
            weights = SKLEARN_WEIGHTS if state is None else WEIGHTS
            write_weights(tmp / weights, self._sklearn if state is None else state, self.kind,
                          {"format": ChipsRecord.FORMAT, "chip": self.kind})
            write_rows(tmp / METRICS_CSV, self.metrics, METRIC_COLUMNS)
            table = Metrics(chip=self.kind, layers=[MetricRow.from_dict(row, "metrics") for row in self.metrics])
            table.write(tmp / METRICS_JSON)
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
        """Write the chip at ``layer`` as a single-chip directory (``chip.json`` + weights), which
        :func:`load_chip` reads; a chip that is not chip-tuning's own needs ``allow_pickle``."""
        out = Path(out_dir)
        chip, state = self.chip(layer), self.layer_state(layer)
        if state is None and not allow_pickle:
            refuse_pickle(f"the chip at layer {layer} ({type(chip).__name__})")
        out.mkdir(parents=True, exist_ok=True)
        weights = "chip.joblib" if state is None else "chip.safetensors"
        write_weights(out / weights, chip if state is None else state, self.kind, {"format": LayerChipRecord.FORMAT})
        common = {f.name: getattr(self.record, f.name) for f in dataclasses.fields(ChipsBase)}
        metrics = self.metrics_at(layer)
        record = LayerChipRecord(**dict(common, chiptuning_version=__version__, weights=weights), layer=int(layer),
                            metrics=MetricRow.from_dict(metrics, "metrics") if metrics else None,
                            selection=self.selection)
        record.write(out / CHIP_CONFIG)
        return out

    def __repr__(self) -> str:
        return f"ChipSet(chip={self.kind!r}, layers={self.layers[0]}..{self.layers[-1]}, classes={self.n_classes})"


# -- weights ----------------------------------------------------------------------------------------

def stacked_state(states: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    """Per-layer arrays (:meth:`ChipSet.layer_state`) stacked on a leading layer axis; None for
    chips only a pickle holds (another estimator, or arrays of different shapes)."""
    if any(state is None for state in states):
        return None
    try:
        return {key: np.stack([state[key] for state in states]) for key in states[0]}
    except ValueError:
        return None


def refuse_pickle(what: str) -> None:
    raise ChipTuningError(f"{what} can only be saved as a pickle, which runs code when loaded; pass "
                          "allow_pickle=True (--allow-pickle) to save it so")


def write_weights(path: Path, content: Any, kind: str, metadata: dict[str, str]) -> None:
    """Arrays to a safetensors file: float32 for the torch chips (as trained), the logistic chip's
    in their own dtypes (so it predicts bit for bit as fitted). To a pickle name (``.joblib``),
    any object, with a warning."""
    if is_pickle(path):
        log.warning("saving the chips as a pickle (%s): it loads only with allow_pickle", path.name)
        joblib.dump(content, path)
        return
    dtype = None if kind == "logreg" else np.float32
    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in content.items()}, str(path), metadata=metadata)


def is_pickle(name: str | Path) -> bool:
    """Whether a weights file name is a pickle (``.joblib`` / ``.pkl`` / ``.pickle``)."""
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


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


def check_weights(path: Path, tensors: dict[str, np.ndarray], record: ChipsBase, n_layers: int | None) -> None:
    """Refuse arrays that do not fit the record, naming the file and the array: missing, of another
    shape (another width than the cache's hidden size, number of layers or classes; ``n_layers`` on
    the leading axis when given), not finite."""
    def refuse(detail: str) -> None:
        raise ChipTuningError(f"{path} does not hold the {record.chip} chips its record describes ({detail}); "
                              "train the chips again")

    missing = [k for k in STATE_KEYS[record.chip] if k not in tensors]
    if missing:
        refuse(f"missing {', '.join(missing)}")
    H, C = record.hidden_size, record.n_classes
    if record.chip in TORCH_KINDS:
        hidden = record.params.get("hidden") if isinstance(record.params.get("hidden"), int) else None
        shapes = dict(param_shapes(record.chip, H, C, hidden))
    else:  # logistic regression: one row of coefficients for two classes seen, else one per class seen
        shapes = {"coef": (None, H), "intercept": (None,), "seen": (None,), "n_iter": (1,)}
    shapes.update(mean=(H,), scale=(H,))
    for name, shape in shapes.items():  # None: any size
        shape = ((n_layers,) if n_layers is not None else ()) + shape
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
    object; else ChipTuningError (a missing, unreadable or unexpected file, a refused pickle)."""
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


# -- the tables -------------------------------------------------------------------------------------

def write_rows(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """A CSV of dict rows (blank for a missing value); the columns default to the rows' keys in
    first-seen order."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in columns} for row in rows)
    return Path(path)


def write_predictions(path: Path, predictions: dict) -> None:
    """eval_predictions.csv: example_id, label, layer_<l> per layer (predicted class index)."""
    layers, preds = predictions["layers"], predictions["predictions"]  # preds: (n_layers, N)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example_id", "label"] + [f"layer_{layer}" for layer in layers])
        for i, (example_id, label) in enumerate(zip(predictions["example_ids"], predictions["labels"])):
            writer.writerow([example_id, int(label)] + [int(preds[j][i]) for j in range(len(layers))])


def majority_baselines(**labels) -> dict[str, float]:
    """Accuracy of always predicting the most frequent class, per labelled part
    (``majority_baselines(eval=y_eval, val=y_val)``); parts with no labels are left out."""
    return {part: float(np.bincount(np.asarray(y, dtype=np.int64)).max() / len(y))
            for part, y in labels.items() if y is not None and len(y)}


def pick_baseline(baselines: dict | None) -> tuple[str | None, float | None]:
    """(part, accuracy) of the majority-class baseline to draw: the eval labels', else the
    validation labels'; (None, None) when neither was recorded."""
    for part in ("eval", "val"):
        if baselines and baselines.get(part) is not None:
            return part, float(baselines[part])
    return None, None


# -- loading ----------------------------------------------------------------------------------------

def load_chips(path: str | Path, *, allow_pickle: bool = False) -> ChipSet:
    """Load a chips directory written by ``chiptuning probe train``, every record and file checked
    (see the module docstring) before the weights are opened. A pickled ``chips.joblib`` (another
    scikit-learn estimator, or the logistic chips of an earlier version) runs code when loaded: it
    is refused unless ``allow_pickle=True``. Else ChipTuningError, naming the file."""
    path = Path(path)
    record = read_chips_record(path)
    metrics = read_metrics(path, record)
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
    name = record.weights or (SKLEARN_WEIGHTS if record.chip == "logreg" else WEIGHTS)
    weights = read_weights(path / name, record, allow_pickle=allow_pickle, n_layers=len(record.layers))
    if not is_pickle(name):
        return ChipSet(record, tensors=weights, metrics=metrics, selection=selection, path=path)
    try:
        chips = {int(k): v for k, v in weights.items()}
    except (AttributeError, TypeError, ValueError):
        raise ChipTuningError(f"{path / name} does not hold chips by layer; train the chips again") from None
    return ChipSet(record, sklearn_chips=chips, metrics=metrics, selection=selection, path=path)


def read_chips_record(path: Path) -> ChipsRecord:
    """chips.json of a chips directory, its params checked now (not when a chip is first used)."""
    if not path.is_dir():
        raise ChipTuningError(f"no chips directory at {path}; run `chiptuning probe train` first")
    if not (path / CONFIG).exists():
        if (path / "sweep.json").exists():
            raise ChipTuningError(f"{path} is a sweep directory (metrics, no chips); train the chosen setting's "
                                  f"chips first: {sweep_command(path / 'sweep.json')}")
        raise ChipTuningError(f"{path} is not a chips directory ({CONFIG} is missing); run `chiptuning probe train`")
    record = ChipsRecord.read(path / CONFIG)
    estimator_params(record, str(path / CONFIG))
    return record


def read_metrics(path: Path, record: ChipsRecord) -> list[dict] | None:
    """The rows of metrics.json, which must be of the record's chips (kind and layers); None without it."""
    if not (path / METRICS_JSON).exists():
        return None
    table = Metrics.read(path / METRICS_JSON)
    layers = [row.layer for row in table.layers]
    if table.chip != record.chip or layers != list(record.layers):
        raise ChipTuningError(f"{path / METRICS_JSON}: its {table.chip} chips at layers {layers[:6]}... are not the "
                              f"chips of {CONFIG} ({record.chip} at layers {record.layers[:6]}...); train the chips "
                              "again")
    return [row.to_dict() for row in table.layers]


def sweep_command(path: Path) -> str:
    """The ``probe train`` command a sweep record names for its best setting (a placeholder when
    the record cannot tell)."""
    try:
        command = read_json(path).get("best_command")
    except (ChipTuningError, AttributeError):
        command = None
    if isinstance(command, str) and command.startswith("chiptuning probe train "):
        return command
    return "chiptuning probe train CACHE --out CHIPS_DIR with the setting in sweep.csv"


def load_chip(path: str | Path, *, allow_pickle: bool = False):
    """Load a single-chip directory written by :meth:`ChipSet.save_layer`: the fitted chip, with
    ``chip_record_`` (its :class:`LayerChipRecord`) and ``chip_config_`` (the same as JSON). A pickled
    ``chip.joblib`` is refused unless ``allow_pickle=True``."""
    path = Path(path)
    if not (path / CHIP_CONFIG).is_file():
        raise ChipTuningError(f"{path} is not a chip directory ({CHIP_CONFIG} is missing)")
    record = LayerChipRecord.read(path / CHIP_CONFIG)
    params = estimator_params(record, str(path / CHIP_CONFIG))
    name = record.weights or ("chip.joblib" if record.chip == "logreg" else "chip.safetensors")
    chip = read_weights(path / name, record, allow_pickle=allow_pickle)
    if not is_pickle(name):  # the arrays of a chip
        chip = make_chip(record.chip, **params).load_state(chip, np.arange(record.n_classes))
    chip.chip_record_ = record
    chip.chip_config_ = record.to_dict()
    return chip


def check_chips_on_cache(chips: ChipSet, layers: Sequence[int]) -> None:
    """Recompute the eval accuracy of the chips at ``layers`` on the eval cache the chips record,
    when it is at hand (the recorded path holds the recorded fingerprint), and refuse chips that
    no longer score what their metrics say (edited, or moved to another layer), naming the layer."""
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
        mask = cache_class_mask(cache, chips.n_classes)
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

