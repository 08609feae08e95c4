"""The model card (``README.md``) of a pruned checkpoint, rendered from its provenance record."""

from __future__ import annotations

from pathlib import Path

from chiptuning import __version__
from chiptuning.probe import MetricRow, describe_exits, is_pickle
from chiptuning.prune.provenance import CascadeEntry, CheckpointRecord


def _millions(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def _accuracy(metrics: MetricRow | None) -> str:
    for key in ("eval_accuracy", "val_accuracy", "train_accuracy"):
        value = getattr(metrics, key, None)
        if value is not None:
            return f"{100 * value:.2f}% ({key.replace('_', ' ')})"
    return "not recorded"


def _pickle_warning(pickled: list[str]) -> list[str]:
    """The card's warning, right under its title, when the chips of the ``pickled`` tasks are pickles."""
    if not pickled:
        return []
    return [
        "## WARNING: this checkpoint holds a pickle",
        "",
        f"The chip of task(s) {', '.join(f'`{n}`' for n in pickled)} is stored as a Python pickle "
        "(`chip.joblib`), saved with `--allow-pickle`. Loading a pickle runs whatever code it contains. "
        "`ChipModel.from_pretrained` refuses it unless called with `allow_pickle=True`: do that only if you "
        "trust whoever made this checkpoint. The checksums in `chiptuning.json` do not protect you here: "
        "anyone who edits a file can re-hash it.",
        "",
    ]


def render_model_card(record: CheckpointRecord, pickled: list[str] = ()) -> str:
    """Markdown model card: base model, task(s), layer, strategy, pruning ratio, accuracy, usage;
    a warning first when the chips of the ``pickled`` tasks are stored as pickles."""
    base = record.base_model
    params = record.params
    before, after, removed = params.before, params.after, params.removed
    L, layer = record.num_blocks, record.layer
    tasks = record.tasks
    images = any(task.task.get("image_column") for task in tasks.values())
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base.id}",
        "tags:",
        "- chip-tuning",
        "- pruned",
        "- image-classification" if images else "- text-classification",
        "---",
        "",
        f"# {Path(str(base.id)).name} pruned to {layer} of {L} blocks (chip-tuning)",
        "",
        f"This checkpoint keeps blocks 1..{layer} of `{base.id}` and classifies with "
        + ("a small classifier (a *chip*)" if len(tasks) == 1 else f"{len(tasks)} small classifiers (*chips*), one per task,")
        + " that read"
        + ("s" if len(tasks) == 1 else "")
        + f" the {'raw' if record.feature_mode == 'raw' else 'final-normed'} hidden state of a block at "
        f"the last prompt token. It was made with chip-tuning {__version__}.",
        "",
        *_pickle_warning(pickled),
        "## Pruning",
        "",
        "| | parameters |",
        "|---|---:|",
        f"| before (full model) | {_millions(before['total'])} |",
        f"| after | {_millions(after['total'])} |",
        f"| removed: blocks {layer + 1}..{L} | {_millions(removed['blocks'])} |",
        f"| removed: LM head | {_millions(removed['lm_head'])} |",
        f"| **pruning ratio** | **{100 * params.pruning_ratio:.1f}%** |",
        "",
        f"- Base model: `{base.id}` (weights `{base.hash}`"
        + (f", adapter `{base.adapter}` merged" if base.adapter else "") + ")",
        *([f"- Source file: `{base.source['file']}` (GGUF, {base.source['quantization']}, architecture "
           f"`{base.source['architecture']}`, sha256 `{base.source['sha256']}`), dequantized to float32 "
           "before pruning"] if base.source else []),
        f"- Kept: embeddings, blocks 1..{layer}, final norm (unused by the chip, kept so the "
        "checkpoint loads cleanly)" + (", LM head" if record.keep_lm_head else "")
        + ("; the vision tower and projector whole, and the processor" if images else ""),
        f"- Saved as `{record.architecture}` in {record.dtype}; feature mode `{record.feature_mode}`",
        "",
    ]
    for name, task in tasks.items():
        source = task.task
        lines += [
            f"## Task `{name}`",
            "",
            f"- Layer {task.layer} (strategy `{task.strategy}`), feature mode `{task.feature_mode}`",
            f"- Labels: {', '.join(f'`{n}`' for n in task.label_names)}",
            "- Prompt: " + (f"template `{task.template!r}`" if task.template
                             else f"text column `{task.text_column}`")
            + (" asked about each image, in the processor's chat template" if task.task.get("image_column") else ""),
            f"- Trained on: {(source.get('source') or {}).get('file', source.get('name', '?'))} "
            f"(split `{source.get('split', '?')}`, {source.get('n_examples', '?')} examples), "
            f"cache `{task.cache_fingerprint}`",
            f"- Chip: `{task.chips.chip if task.chips is not None else '?'}`, "
            f"accuracy at layer {task.layer}: {_accuracy(task.chip_metrics)}",
            *_cascade_lines(task.cascade),
            "",
        ]
    for image in record.images:
        what = "accuracy against mean depth (early exit)" if image.startswith("cascade") else "accuracy against layer"
        lines += [f"![{what}]({image})", ""]
    lines += [
        "## How to load",
        "",
        "```python",
        "from chiptuning import ChipModel",
        "",
        'clf = ChipModel.from_pretrained("path/to/this/checkpoint")',
        'clf.predict(["photo.jpg"])  # paths, PIL images or arrays' if images else 'clf.predict(["some text to classify"])',
        "```",
        "",
        *([f"With several tasks: `clf.predict(texts, task=...)` (tasks: {', '.join(f'`{n}`' for n in tasks)}).", ""]
          if len(tasks) > 1 else []),
        *(["Without chip-tuning installed, the chip is folded into a standard classification head:", "",
           "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
           'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/checkpoint")',
           'tokenizer = AutoTokenizer.from_pretrained("path/to/this/checkpoint")',
           'label = model.config.id2label[model(**tokenizer("some text", return_tensors="pt")).logits.argmax(-1).item()]',
           "```", ""] if record.export == "sequence-classification" else []),
        "The backbone alone (no chip) loads without chip-tuning:",
        "",
        "```python",
        "from transformers import AutoModel",
        "",
        'model = AutoModel.from_pretrained("path/to/this/checkpoint")',
        "```",
        "",
        f"Note: `AutoModel` applies the final norm to block {layer}'s output; the chip reads the "
        "raw (pre-norm) stream, which `ChipModel` takes with hooks. `chiptuning.json` records "
        "provenance and a sha256 of every file; `ChipModel` refuses edited files.",
        "",
    ]
    return "\n".join(lines)


def _cascade_lines(cascade: CascadeEntry | None) -> list[str]:
    """The early-exit cascade of a task, for the card (nothing for a single chip)."""
    if cascade is None:
        return []
    exits = describe_exits([(e.layer, e.threshold) for e in cascade.exits])
    sim = cascade.simulated
    lines = [f"- Early exit: each input stops at the first confident chip: {exits}."]
    if sim is not None and cascade.reference_layer is not None:
        part = "eval" if sim.eval_accuracy is not None else "val"
        depth = getattr(sim, f"{part}_mean_depth")
        lines.append(f"- Operating point (chosen on validation, delta {cascade.delta}): {part} accuracy "
                     f"{100 * getattr(sim, f'{part}_accuracy'):.2f}% against "
                     f"{100 * getattr(sim, f'reference_{part}_accuracy'):.2f}% for the chip at layer "
                     f"{cascade.reference_layer} alone, {depth:.2f} blocks on average "
                     f"({cascade.reference_layer / depth:.2f}x fewer); `ChipModel.predict_with_exits` reports each "
                     "input's exit layer.")
    return lines


def pickled_tasks(root: Path, record: CheckpointRecord) -> list[str]:
    """Tasks with a chip directory in ``root`` (its own or a cascade exit's) that holds a pickle
    (saved with ``--allow-pickle``)."""
    def holds_pickle(folder: Path) -> bool:
        return folder.is_dir() and any(is_pickle(p) for p in folder.iterdir())

    return [name for name, task in record.tasks.items()
            if any(holds_pickle(Path(root) / chip_dir) for chip_dir in task.chip_dirs())]


def write_model_card(root: Path, record: CheckpointRecord) -> Path:
    """Write ``README.md`` into ``root`` (after the chips: the card warns about a pickled one)."""
    path = Path(root) / "README.md"
    path.write_text(render_model_card(record, pickled_tasks(root, record)), encoding="utf-8")
    return path
