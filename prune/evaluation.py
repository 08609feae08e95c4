"""Run a pruned checkpoint end to end, from raw text, on a labelled file (``chiptuning eval``)."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chiptuning import __version__
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
    """The dense base model on the same data and hardware: its speed, the chip on its feature, and
    its own zero-shot answer (decoders)."""

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
    """``metrics.json`` of ``chiptuning eval``: the pruned checkpoint's accuracy from raw inputs,
    its speed, and (with ``--dense``) the dense model's; ``files`` lists predictions.csv."""

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


def evaluate(
    pruned_dir: str | Path,
    data: str | Path | TaskData,
    *,
    out_dir: str | Path | None = None,
    text_column: str | None = None,
    template: str | None = None,
    label_column: str = "label",
    labels: list[str] | None = None,
    limit: int | None = None,
    seed: int = 42,
    split: str | None = None,
    task: str | None = None,
    batch_size: int | None = None,
    max_tokens_per_batch: int | str = "auto",
    device: str = "cpu",
    model: ChipModel | None = None,
    dense: bool | str = False,
    repeats: int = 1,
    progress: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Accuracy of a pruned checkpoint on a labelled file, predicting from raw text (or raw images,
    for a vision-language checkpoint).

    The file is read with :func:`chiptuning.tasks.load_task` and the same options as
    ``chiptuning extract``; the prompt template (or text column) and the label names default to
    the ones saved in the checkpoint (:meth:`ChipModel.data_options`), so the label indices mean
    what the chip learned.

    Args:
        pruned_dir: checkpoint written by ``chiptuning prune``.
        data: labelled JSONL / JSON / CSV / TSV file, or an already-loaded TaskData.
        out_dir: where to write ``metrics.json`` and ``predictions.csv`` (nothing written if None).
        text_column, template, label_column, labels, limit, seed, split: as ``load_task``.
        task: which of the checkpoint's tasks to evaluate (default: its default task).
        batch_size: most examples per forward pass (default: what the token budget takes).
        max_tokens_per_batch: token budget per batch of length-sorted prompts ("auto", or 0 for
            fixed batches in input order), as in extraction; predictions come in input order.
        device: cpu, cuda, cuda:N or auto.
        model: an already-loaded :class:`~chiptuning.prune.ChipModel` (skips loading).
        dense: also run the dense base model (True: the one recorded in the checkpoint; a str:
            that model) on the same data and hardware: its speed, the chip on its feature, and
            for decoders the zero-shot baseline from the LM head's scores of the label tokens.
        repeats: timed passes per model; the fastest one is reported (a shared machine's noise
            only ever slows a pass down). Every pass is recorded in ``timed_passes_s``.
        progress: show progress bars.
        overwrite: replace the results of an earlier eval in ``out_dir`` (anything else there is
            refused before running the model).
        allow_pickle: load a checkpoint whose chip is a pickle (see :meth:`ChipModel.from_pretrained`).

    Returns:
        The metrics (also written to ``metrics.json``).

    Raises:
        DataError: bad data, or labels that differ from the checkpoint's.
    """
    if repeats < 1:
        raise DataError(f"repeats must be at least 1, got {repeats}")
    if out_dir is not None:
        check_output(out_dir, EVAL, overwrite=overwrite)  # refused now, not after running the model
    clf = model if model is not None else ChipModel.from_pretrained(pruned_dir, device=device,
                                                                    allow_pickle=allow_pickle)
    name, entry = clf.task(task)
    saved_labels = list(entry.label_names)
    if labels is not None and [str(x) for x in labels] != saved_labels:
        raise DataError(
            f"--labels {list(labels)} differ from the checkpoint's label names {saved_labels}; "
            "the chip's classes are fixed, leave --labels out or give them in that order"
        )
    if isinstance(data, TaskData):
        data_task = data
        if data_task.label_names != saved_labels:
            raise DataError(f"the data's labels {data_task.label_names} differ from the checkpoint's "
                            f"{saved_labels}; pass --labels {','.join(saved_labels)}")
    else:
        options = clf.data_options(name, text_column=text_column, template=template, labels=labels)
        data_task = load_task(data, split=split, label_column=label_column, limit=limit, seed=seed, **options)
    if (data_task.template, data_task.text_column) != (entry.template, entry.text_column):
        log.warning("evaluating with another prompt format than the chip was trained with "
                    "(template %r, text column %r)", data_task.template, data_task.text_column)
    # The same prompt builder as extraction (text, or images through the processor), so the chip
    # sees what it saw on the cache.
    inputs = clf.encode_task(data_task)
    y_true = np.array([ex.label for ex in data_task.examples], dtype=np.int64)

    batching = dict(batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch)
    # Untimed warm-up. With `dense` both models first run every input once: CPU kernels built per
    # matrix shape (oneDNN's bf16 matmuls on AMX) make the first pass over a set of batch shapes up
    # to 20% slower, and that cost would land on whichever model is timed first.
    warm = inputs if dense else inputs.subset(range(min(8, len(inputs))))
    mask = optional_class_mask([ex.n_choices for ex in data_task.examples], len(saved_labels))
    cascade = name in clf.cascades
    timings = []
    if cascade:  # early exit: each example stops at its cascade's first confident chip
        clf.cascade_of_inputs(warm, name, None if mask is None else mask[:len(warm)], **batching)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            y_pred, exit_layer, _ = clf.cascade_of_inputs(inputs, name, mask, progress=progress, **batching)
            timings.append(time.perf_counter() - started)
    else:
        clf.features_of_inputs(warm, task=name, **batching)  # warm-up, untimed
        for _ in range(repeats):
            started = time.perf_counter()
            features = clf.features_of_inputs(inputs, task=name, progress=progress, **batching)  # (N, H)
            y_pred = np.asarray(clf.chips[name].predict(features, class_mask=mask)).astype(np.int64)
            timings.append(time.perf_counter() - started)
        exit_layer = None
    elapsed = min(timings)
    n = len(y_true)
    metrics = EvalMetrics(
        accuracy=float((y_pred == y_true).mean()), n_examples=n, task=name, layer=entry.layer,
        num_blocks=clf.record.num_blocks, checkpoint=str(pruned_dir), checkpoint_sha256=clf.record.record_sha256,
        data=data_task.describe(), batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
        device=str(model_device(clf.model)), elapsed_s=elapsed, timed_passes_s=timings,
        examples_per_s=n / elapsed if elapsed > 0 else None, latency_ms_per_example=1000 * elapsed / n,
    )
    if cascade:
        layers, counts = np.unique(exit_layer, return_counts=True)
        metrics.cascade = ExitStats(mean_exit_layer=float(exit_layer.mean()),
                                    exits={str(lay): int(c) for lay, c in zip(layers, counts)},
                                    block_ratio=entry.layer / float(exit_layer.mean()))
    log.info("pruned model: accuracy %.1f%% on %d examples, %.1f examples/s", 100 * metrics.accuracy, n,
             metrics.examples_per_s or 0)
    dense_pred = zero_shot = None
    if dense:
        dense_net = load_dense(clf.record, dense if isinstance(dense, str) else None, device=device)
        run = dict(tokenizer=clf.tokenizer, layer=entry.layer, mode=entry.feature_mode, chip=clf.chips[name],
                   label_names=saved_labels, max_length=clf.record.max_length, **batching)
        warm_mask = mask[:len(warm)] if mask is not None else None
        dense_pass(dense_net, prompts=None, inputs=warm, class_mask=warm_mask, **run)  # warm-up, untimed
        passes = [dense_pass(dense_net, prompts=None, inputs=inputs, class_mask=mask, progress=progress, **run)
                  for _ in range(repeats)]
        result = min(passes, key=lambda p: p["elapsed_s"])
        del dense_net
        dense_pred, zero_shot = result["chip_predictions"], result["zero_shot_predictions"]
        if not cascade and not np.array_equal(dense_pred, y_pred):
            log.warning("the chip predicts differently on %d of %d examples on the dense model's feature",
                        int((dense_pred != y_pred).sum()), n)
        metrics.dense = DenseRun(
            model=clf.record.base_model.id if not isinstance(dense, str) else dense,
            num_blocks=clf.record.num_blocks, elapsed_s=result["elapsed_s"],
            timed_passes_s=[p["elapsed_s"] for p in passes], examples_per_s=n / result["elapsed_s"],
            latency_ms_per_example=1000 * result["elapsed_s"] / n, chip_accuracy=float((dense_pred == y_true).mean()),
            chip_agreement_with_pruned=float((dense_pred == y_pred).mean()),
            zero_shot_accuracy=float((zero_shot == y_true).mean()) if zero_shot is not None else None,
        )
        metrics.speedup = result["elapsed_s"] / elapsed
        metrics.ideal_speedup = clf.record.num_blocks / (float(exit_layer.mean()) if cascade else entry.layer)
        zero_shot_text = ("" if metrics.dense.zero_shot_accuracy is None
                          else f", its own zero-shot answer {100 * metrics.dense.zero_shot_accuracy:.1f}%")
        log.info("dense model: %.1f examples/s%s; the pruned one is %.2fx faster (block ratio %.2fx)",
                 metrics.dense.examples_per_s, zero_shot_text, metrics.speedup, metrics.ideal_speedup)
    if out_dir is not None:
        with write_output(out_dir, EVAL, overwrite=overwrite) as out:
            with open(out / PREDICTIONS, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                header = ["example_id", "label", "prediction", "label_name", "prediction_name"]
                extra = {"exit_layer": exit_layer, "dense_prediction": dense_pred, "dense_zero_shot": zero_shot}
                extra = {key: values for key, values in extra.items() if values is not None}
                writer.writerow(header + list(extra))
                for i, (ex, truth, pred) in enumerate(zip(data_task.examples, y_true, y_pred)):
                    writer.writerow([ex.id, int(truth), int(pred), saved_labels[truth], saved_labels[pred]]
                                    + [int(values[i]) for values in extra.values()])
            metrics.files = written_files(out, METRICS)
            metrics.write(out / METRICS)
    return metrics.to_dict()
