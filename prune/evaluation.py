"""Run a pruned checkpoint end to end, from raw inputs, on labelled data (``chiptuning eval``)."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chiptuning import __version__
from chiptuning.encoding import EncodedInputs
from chiptuning.errors import DataError
from chiptuning.models import model_device
from chiptuning.outputs import EVAL, check_output, write_output, written_files
from chiptuning.probe import optional_class_mask
from chiptuning.prune.chip_model import ChipModel
from chiptuning.prune.dense import dense_pass, load_dense
from chiptuning.records import Record, rule
from chiptuning.tasks import TaskData, load_task

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"


@dataclass
class ExitStats(Record):
    """Where an early-exit cascade stopped: mean exit layer, examples per exit layer, block ratio."""

    mean_exit_layer: float = rule(ge=0)
    exits: dict[str, int] = rule(default_factory=dict, ge=0)
    block_ratio: float = rule(0.0, ge=0)


@dataclass
class DenseRun(Record):
    """The dense base model on the same data and hardware: its speed, the chip on its feature, its own
    zero-shot answer (decoders)."""

    model: str
    num_blocks: int = rule(ge=1)
    elapsed_s: float = rule(ge=0)
    timed_passes_s: list[float] = rule(default_factory=list, ge=0)
    examples_per_s: float = rule(0.0, ge=0)
    latency_ms_per_example: float = rule(0.0, ge=0)
    chip_accuracy: float = rule(0.0, ge=0, le=1)
    chip_agreement_with_pruned: float = rule(0.0, ge=0, le=1)
    zero_shot_accuracy: float | None = rule(None, ge=0, le=1)


@dataclass
class EvalMetrics(Record):
    """``metrics.json`` of ``chiptuning eval``: the pruned checkpoint's accuracy from raw inputs, its speed,
    and (with ``--dense``) the dense model's; ``files`` lists predictions.csv."""

    FORMAT = "chiptuning-eval"
    LEGACY = True

    accuracy: float = rule(ge=0, le=1)
    n_examples: int = rule(ge=1)
    task: str = ""
    layer: int = rule(1, ge=1)
    num_blocks: int = rule(1, ge=1)
    checkpoint: str = ""
    checkpoint_sha256: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = rule(None, ge=1)
    max_tokens_per_batch: int | Literal["auto"] = "auto"
    device: str = "cpu"
    elapsed_s: float = rule(0.0, ge=0)
    timed_passes_s: list[float] = rule(default_factory=list, ge=0)
    examples_per_s: float | None = rule(None, ge=0)
    latency_ms_per_example: float = rule(0.0, ge=0)
    cascade: ExitStats | None = rule(None, omit_none=True)
    dense: DenseRun | None = rule(None, omit_none=True)
    speedup: float | None = rule(None, ge=0, omit_none=True)
    ideal_speedup: float | None = rule(None, ge=0, omit_none=True)
    files: dict[str, str] = field(default_factory=dict)
    chiptuning_version: str = __version__


@dataclass
class EvalConfig:
    """Settings of :func:`evaluate` (``chiptuning eval``); a data file is read as ``load_task`` reads it, in
    the checkpoint's own prompt format and label names by default."""

    text_column: str | None = None
    template: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    limit: int | None = None
    seed: int = 42
    split: str | None = None
    task: str | None = None  # which of the checkpoint's tasks (default: its default task)
    batch_size: int | None = None  # None: what the token budget takes
    max_tokens_per_batch: int | str = "auto"  # budget of length-sorted batches; 0: fixed batches in input order
    device: str = "cpu"
    dense: bool | str = False  # also run the dense model: True the checkpoint's base model, a str that model
    repeats: int = 1  # timed passes per model, the fastest reported (noise only ever slows a pass down)
    progress: bool = False
    overwrite: bool = False  # replace the results of an earlier eval in out_dir
    allow_pickle: bool = False  # load a checkpoint whose chip is a pickle


def time_dense(model, inputs: EncodedInputs, repeats: int = 1, progress: bool = False, **run) -> list[dict]:
    """The timed passes (:func:`~chiptuning.prune.dense.dense_pass` results; ``run``: its other arguments)
    of ``model`` over ``inputs``, after one untimed pass."""
    dense_pass(model, prompts=None, inputs=inputs, **run)  # warm-up, untimed
    return [dense_pass(model, prompts=None, inputs=inputs, progress=progress, **run) for _ in range(repeats)]


def evaluate(pruned_dir: str | Path, data: str | Path | TaskData, config: EvalConfig | None = None, *,
             out_dir: str | Path | None = None, model: ChipModel | None = None,
             dense_passes: list[dict] | None = None, **settings) -> dict[str, Any]:
    """The metrics (as ``metrics.json`` holds them) of the checkpoint ``pruned_dir`` on labelled
    ``data`` (a file or a TaskData), predicting from raw text, or images, with prompts built as
    extraction built the cache's. DataError for bad data or labels other than the checkpoint's.

    Args:
        config, settings: the settings (:class:`EvalConfig`); ``settings`` override its fields by name.
        out_dir: where to write ``metrics.json`` and ``predictions.csv`` (None: nothing written);
            anything else there is refused before the model runs.
        model: the checkpoint, already loaded (a ChipModel).
        dense_passes: the dense model's timed passes over the same inputs (:func:`time_dense`), measured
            already (``chiptuning run`` times the full model before it is pruned); implies ``dense``.
    """
    cfg = replace(config or EvalConfig(), **settings)
    if cfg.repeats < 1:
        raise DataError(f"repeats must be at least 1, got {cfg.repeats}")
    if out_dir is not None:
        check_output(out_dir, EVAL, overwrite=cfg.overwrite)  # refused now, not after running the model
    clf = model if model is not None else ChipModel.from_pretrained(pruned_dir, device=cfg.device,
                                                                    allow_pickle=cfg.allow_pickle)
    name, entry = clf.task(cfg.task)
    data_task = eval_data(clf, name, data, cfg)
    inputs = clf.encode_task(data_task)
    y_true = np.array([ex.label for ex in data_task.examples], dtype=np.int64)
    mask = optional_class_mask([ex.n_choices for ex in data_task.examples], len(entry.label_names))
    dense = dense_passes is not None or bool(cfg.dense)
    y_pred, exit_layer, timings = time_pruned(clf, name, inputs, mask, cfg, warm_all=dense)
    elapsed, n = min(timings), len(y_true)
    metrics = EvalMetrics(
        accuracy=float((y_pred == y_true).mean()), n_examples=n, task=name, layer=entry.layer,
        num_blocks=clf.record.num_blocks, checkpoint=str(pruned_dir), checkpoint_sha256=clf.record.record_sha256,
        data=data_task.describe(), batch_size=cfg.batch_size, max_tokens_per_batch=cfg.max_tokens_per_batch,
        device=str(model_device(clf.model)), elapsed_s=elapsed, timed_passes_s=timings,
        examples_per_s=n / elapsed if elapsed > 0 else None, latency_ms_per_example=1000 * elapsed / n,
    )
    if exit_layer is not None:
        layers, counts = np.unique(exit_layer, return_counts=True)
        metrics.cascade = ExitStats(mean_exit_layer=float(exit_layer.mean()),
                                    exits={str(lay): int(c) for lay, c in zip(layers, counts)},
                                    block_ratio=entry.layer / float(exit_layer.mean()))
    log.info("pruned model: accuracy %.1f%% on %d examples, %.1f examples/s", 100 * metrics.accuracy, n,
             metrics.examples_per_s or 0)
    columns = {"exit_layer": exit_layer}
    if dense:
        if dense_passes is None:
            dense_net = load_dense(clf.record, cfg.dense if isinstance(cfg.dense, str) else None, device=cfg.device)
            dense_passes = time_dense(
                dense_net, inputs, cfg.repeats, cfg.progress, tokenizer=clf.tokenizer, layer=entry.layer,
                mode=entry.feature_mode, chip=clf.chips[name], label_names=list(entry.label_names),
                max_length=clf.record.max_length, class_mask=mask, batch_size=cfg.batch_size,
                max_tokens_per_batch=cfg.max_tokens_per_batch)
            del dense_net
        model_name = cfg.dense if isinstance(cfg.dense, str) else clf.record.base_model.id
        best = add_dense(metrics, model_name, dense_passes, y_true, y_pred, exit_layer)
        columns.update(dense_prediction=best["chip_predictions"], dense_zero_shot=best["zero_shot_predictions"])
    if out_dir is not None:
        write_eval(out_dir, metrics, data_task, y_pred, columns, list(entry.label_names), cfg.overwrite)
    return metrics.to_dict()


def eval_data(clf: ChipModel, name: str, data: str | Path | TaskData, cfg: EvalConfig) -> TaskData:
    """``data`` as a TaskData with task ``name``'s labels: itself, or the file read with the checkpoint's
    own prompt format where ``cfg`` leaves it open."""
    _, entry = clf.task(name)
    saved = list(entry.label_names)
    if cfg.labels is not None and [str(x) for x in cfg.labels] != saved:
        raise DataError(f"--labels {list(cfg.labels)} differ from the checkpoint's label names {saved}; "
                        "the chip's classes are fixed, leave --labels out or give them in that order")
    if isinstance(data, TaskData):
        if data.label_names != saved:
            raise DataError(f"the data's labels {data.label_names} differ from the checkpoint's "
                            f"{saved}; pass --labels {','.join(saved)}")
    else:
        options = clf.data_options(name, text_column=cfg.text_column, template=cfg.template, labels=cfg.labels)
        data = load_task(data, split=cfg.split, label_column=cfg.label_column, limit=cfg.limit, seed=cfg.seed,
                         **options)
    if (data.template, data.text_column) != (entry.template, entry.text_column):
        log.warning("evaluating with another prompt format than the chip was trained with "
                    "(template %r, text column %r)", data.template, data.text_column)
    return data


def time_pruned(clf: ChipModel, name: str, inputs: EncodedInputs, mask: np.ndarray | None, cfg: EvalConfig,
                warm_all: bool) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """(predictions, a cascade's exit layers or None, seconds of each timed pass) of the pruned model, after
    an untimed warm-up: on every input when the dense model is timed too, as CPU kernels built per batch
    shape (oneDNN's bf16 matmuls) would otherwise slow whichever model is timed first."""
    batching = dict(batch_size=cfg.batch_size, max_tokens_per_batch=cfg.max_tokens_per_batch)

    def predict(rows: EncodedInputs, rows_mask, progress=False):
        if name in clf.cascades:  # early exit: each example stops at its cascade's first confident chip
            pred, exit_layer, _ = clf.cascade_of_inputs(rows, name, rows_mask, progress=progress, **batching)
            return pred, exit_layer
        features = clf.features_of_inputs(rows, task=name, progress=progress, **batching)  # (N, H)
        return np.asarray(clf.chips[name].predict(features, class_mask=rows_mask)).astype(np.int64), None

    warm = inputs if warm_all else inputs.subset(range(min(8, len(inputs))))
    predict(warm, None if mask is None else mask[:len(warm)])
    timings = []
    for _ in range(cfg.repeats):
        started = time.perf_counter()
        y_pred, exit_layer = predict(inputs, mask, cfg.progress)
        timings.append(time.perf_counter() - started)
    return y_pred, exit_layer, timings


def add_dense(metrics: EvalMetrics, model: str, passes: list[dict], y_true: np.ndarray, y_pred: np.ndarray,
              exit_layer: np.ndarray | None) -> dict:
    """Record the dense model's fastest pass in ``metrics`` (its speed, the chip on its feature, its own
    zero-shot answer, the pruned model's speedup and block ratio) and return it."""
    best = min(passes, key=lambda p: p["elapsed_s"])
    elapsed, chip, zero_shot = best["elapsed_s"], best["chip_predictions"], best["zero_shot_predictions"]
    n = len(y_true)
    if exit_layer is None and not np.array_equal(chip, y_pred):
        log.warning("the chip predicts differently on %d of %d examples on the dense model's feature",
                    int((chip != y_pred).sum()), n)
    metrics.dense = DenseRun(
        model=model, num_blocks=metrics.num_blocks, elapsed_s=elapsed, timed_passes_s=[p["elapsed_s"] for p in passes],
        examples_per_s=n / elapsed, latency_ms_per_example=1000 * elapsed / n,
        chip_accuracy=float((chip == y_true).mean()), chip_agreement_with_pruned=float((chip == y_pred).mean()),
        zero_shot_accuracy=None if zero_shot is None else float((zero_shot == y_true).mean()),
    )
    metrics.speedup = elapsed / metrics.elapsed_s
    metrics.ideal_speedup = metrics.num_blocks / (metrics.layer if exit_layer is None else float(exit_layer.mean()))
    said = "" if zero_shot is None else f", its own zero-shot answer {100 * metrics.dense.zero_shot_accuracy:.1f}%"
    log.info("dense model: %.1f examples/s%s; the pruned one is %.2fx faster (block ratio %.2fx)",
             metrics.dense.examples_per_s, said, metrics.speedup, metrics.ideal_speedup)
    return best


def write_eval(out_dir: str | Path, metrics: EvalMetrics, data: TaskData, y_pred: np.ndarray,
               columns: dict[str, np.ndarray | None], labels: list[str], overwrite: bool) -> None:
    """Write ``predictions.csv`` (a row per example, with the ``columns`` that are not None) and
    ``metrics.json`` listing it, replacing an earlier eval's only with ``overwrite``."""
    columns = {key: values for key, values in columns.items() if values is not None}
    with write_output(out_dir, EVAL, overwrite=overwrite) as out:
        with open(out / PREDICTIONS, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["example_id", "label", "prediction", "label_name", "prediction_name", *columns])
            for i, (ex, pred) in enumerate(zip(data.examples, y_pred)):
                writer.writerow([ex.id, ex.label, int(pred), labels[ex.label], labels[pred],
                                 *(int(values[i]) for values in columns.values())])
        metrics.files = written_files(out, METRICS)
        metrics.write(out / METRICS)
