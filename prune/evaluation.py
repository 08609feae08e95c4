"""Run a pruned checkpoint end to end, from raw text, on a labelled file (``chiptuning eval``)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from chiptuning.cache import write_json_atomic

from chiptuning import __version__
from chiptuning.errors import DataError

if TYPE_CHECKING:
    from chiptuning.tasks import TaskData

log = logging.getLogger(__name__)


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
    batch_size: int = 16,
    device: str = "cpu",
    model=None,
    dense: bool | str = False,
) -> dict[str, Any]:
    """Accuracy of a pruned checkpoint on a labelled file, predicting from raw text.

    The file is read with :func:`chiptuning.tasks.load_task` and the same options as
    ``chiptuning extract``; the prompt template (or text column) and the label names default to
    the ones saved in the checkpoint, so the label indices mean what the chip learned.

    Args:
        pruned_dir: checkpoint written by ``chiptuning prune``.
        data: labelled JSONL / JSON / CSV / TSV file, or an already-loaded TaskData.
        out_dir: where to write ``metrics.json`` and ``predictions.csv`` (nothing written if None).
        text_column, template, label_column, labels, limit, seed, split: as ``load_task``.
        task: which of the checkpoint's tasks to evaluate (default: its default task).
        batch_size: examples per forward pass.
        device: cpu, cuda, cuda:N or auto.
        model: an already-loaded :class:`~chiptuning.prune.ChipModel` (skips loading).
        dense: also run the dense base model (True: the one recorded in the checkpoint; a str:
            that model) on the same data and hardware: its speed, the chip on its feature, and
            for decoders the zero-shot baseline from the LM head's scores of the label tokens.

    Returns:
        The metrics (also written to ``metrics.json``).

    Raises:
        DataError: bad data, or labels that differ from the checkpoint's.
    """
    from chiptuning.probe.chips import optional_class_mask
    from chiptuning.prune.chip_model import ChipModel

    from chiptuning.tasks import TaskData, load_task

    clf = model if model is not None else ChipModel.from_pretrained(pruned_dir, device=device)
    name, entry = clf._task(task)
    saved_labels = list(entry["label_names"])
    if labels is not None and [str(x) for x in labels] != saved_labels:
        raise DataError(
            f"--labels {list(labels)} differ from the checkpoint's label names {saved_labels}; "
            "the chip's classes are fixed, leave --labels out or give them in that order"
        )
    if text_column is None and template is None:
        template, text_column = entry.get("template"), entry.get("text_column")
    if isinstance(data, TaskData):
        data_task = data
        if data_task.label_names != saved_labels:
            raise DataError(f"the data's labels {data_task.label_names} differ from the checkpoint's "
                            f"{saved_labels}; pass --labels {','.join(saved_labels)}")
    else:
        data_task = load_task(data, split=split, text_column=text_column, template=template,
                              label_column=label_column, labels=saved_labels, limit=limit, seed=seed)
    if (data_task.template, data_task.text_column) != (entry.get("template"), entry.get("text_column")):
        log.warning("evaluating with another prompt format than the chip was trained with "
                    "(template %r, text column %r)", data_task.template, data_task.text_column)
    # The same prompt builder as extraction, so the chip sees what it saw on the cache.
    prompts, _ = data_task.build_prompts(clf.tokenizer, clf.record["tokenizer"].get("max_length"))
    y_true = np.array([ex.label for ex in data_task.examples], dtype=np.int64)

    clf.features_of_prompts(prompts[:batch_size], task=name, batch_size=batch_size)  # warm-up, untimed
    started = time.perf_counter()
    features = clf.features_of_prompts(prompts, task=name, batch_size=batch_size)  # (N, H)
    mask = optional_class_mask([ex.n_choices for ex in data_task.examples], len(saved_labels))
    y_pred = np.asarray(clf.chips[name].predict(features, class_mask=mask)).astype(np.int64)
    elapsed = time.perf_counter() - started
    n = len(y_true)
    metrics = {
        "accuracy": float((y_pred == y_true).mean()),
        "n_examples": n,
        "task": name,
        "layer": int(entry["layer"]),
        "num_blocks": int(clf.record["num_blocks"]),
        "checkpoint": str(pruned_dir),
        "data": data_task.describe(),
        "batch_size": batch_size,
        "device": str(next(clf.model.parameters()).device),
        "elapsed_s": elapsed,
        "examples_per_s": n / elapsed if elapsed > 0 else None,
        "latency_ms_per_example": 1000 * elapsed / n,
        "chiptuning_version": __version__,
    }
    log.info("accuracy %.4f on %d examples (%.1f examples/s)", metrics["accuracy"], n,
             metrics["examples_per_s"] or 0)
    dense_pred = zero_shot = None
    if dense:
        from chiptuning.prune.dense import dense_pass, load_dense

        dense_net = load_dense(clf.record, dense if isinstance(dense, str) else None, device=device)
        run = dict(tokenizer=clf.tokenizer, layer=int(entry["layer"]),
                   mode=entry.get("feature_mode", clf.record["feature_mode"]), chip=clf.chips[name],
                   label_names=saved_labels, max_length=clf.record["tokenizer"].get("max_length"),
                   batch_size=batch_size)
        warm_mask = mask[:batch_size] if mask is not None else None
        dense_pass(dense_net, prompts=prompts[:batch_size], class_mask=warm_mask, **run)  # warm-up, untimed
        result = dense_pass(dense_net, prompts=prompts, class_mask=mask, **run)
        del dense_net
        dense_pred, zero_shot = result["chip_predictions"], result["zero_shot_predictions"]
        if not np.array_equal(dense_pred, y_pred):
            log.warning("the chip predicts differently on %d of %d examples on the dense model's feature",
                        int((dense_pred != y_pred).sum()), n)
        metrics["dense"] = {
            "model": clf.record["base_model"]["id"] if not isinstance(dense, str) else dense,
            "num_blocks": int(clf.record["num_blocks"]),
            "elapsed_s": result["elapsed_s"],
            "examples_per_s": n / result["elapsed_s"],
            "latency_ms_per_example": 1000 * result["elapsed_s"] / n,
            "chip_accuracy": float((dense_pred == y_true).mean()),
            "chip_agreement_with_pruned": float((dense_pred == y_pred).mean()),
            "zero_shot_accuracy": float((zero_shot == y_true).mean()) if zero_shot is not None else None,
        }
        metrics["speedup"] = result["elapsed_s"] / elapsed
        metrics["ideal_speedup"] = clf.record["num_blocks"] / int(entry["layer"])
        log.info("dense: %.1f examples/s, zero-shot accuracy %s; speedup %.2fx (ideal %.2fx)",
                 metrics["dense"]["examples_per_s"], metrics["dense"]["zero_shot_accuracy"],
                 metrics["speedup"], metrics["ideal_speedup"])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            header = ["example_id", "label", "prediction", "label_name", "prediction_name"]
            extra = {"dense_prediction": dense_pred, "dense_zero_shot": zero_shot}
            extra = {key: values for key, values in extra.items() if values is not None}
            writer.writerow(header + list(extra))
            for i, (ex, truth, pred) in enumerate(zip(data_task.examples, y_true, y_pred)):
                writer.writerow([ex.id, int(truth), int(pred), saved_labels[truth], saved_labels[pred]]
                                + [int(values[i]) for values in extra.values()])
        write_json_atomic(out / "metrics.json", metrics)
    return metrics
