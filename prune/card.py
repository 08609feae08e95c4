"""The model card (``README.md``) of a pruned checkpoint, rendered from its provenance record."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from chiptuning import __version__
from chiptuning.probe import MetricRow, describe_exits, is_pickle
from chiptuning.prune.provenance import CascadeEntry, CheckpointRecord, TaskRecord

PICKLE_WARNING = """## WARNING: this checkpoint holds a pickle

The chip of task(s) {tasks} is stored as a Python pickle (`chip.joblib`), saved with `--allow-pickle`. \
Loading a pickle runs whatever code it contains. `ChipModel.from_pretrained` refuses it unless called with \
`allow_pickle=True`: do that only if you trust whoever made this checkpoint. The checksums in `chiptuning.json` \
do not protect you here: anyone who edits a file can re-hash it.
"""

EXPORTED_USAGE = """Without chip-tuning installed, the chip is folded into a standard classification head:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("path/to/this/checkpoint")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/checkpoint")
label = model.config.id2label[model(**tokenizer("some text", return_tensors="pt")).logits.argmax(-1).item()]
```

"""

USAGE = """## How to load

```python
from chiptuning import ChipModel

clf = ChipModel.from_pretrained("path/to/this/checkpoint")
{example}
```

{several}{exported}The backbone alone (no chip) loads without chip-tuning:

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("path/to/this/checkpoint")
```

Note: `AutoModel` applies the final norm to block {layer}'s output; the chip reads the raw (pre-norm) stream, \
which `ChipModel` takes with hooks. `chiptuning.json` records provenance and a sha256 of every file; `ChipModel` \
refuses edited files.
"""


def _ticked(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _accuracy(metrics: MetricRow | None) -> str:
    for key in ("eval_accuracy", "val_accuracy", "train_accuracy"):
        if (value := getattr(metrics, key, None)) is not None:
            return f"{100 * value:.2f}% ({key.replace('_', ' ')})"
    return "not recorded"


def _summary(record: CheckpointRecord, reads_images: bool, pickled: list[str]) -> list[str]:
    """Title, what the checkpoint is, the pickle warning if any, the pruning table and what was kept."""
    base, params, layer, n = record.base_model, record.params, record.layer, len(record.tasks)
    chips = "a small classifier (a *chip*) that reads" if n == 1 else \
        f"{n} small classifiers (*chips*), one per task, that read"
    kept = (", LM head" if record.keep_lm_head else "") + \
        ("; the vision tower and projector whole, and the processor" if reads_images else "")
    src = base.source
    return [
        f"# {Path(str(base.id)).name} pruned to {layer} of {record.num_blocks} blocks (chip-tuning)", "",
        f"This checkpoint keeps blocks 1..{layer} of `{base.id}` and classifies with {chips} the "
        f"{'raw' if record.feature_mode == 'raw' else 'final-normed'} hidden state of a block at the last prompt "
        f"token. It was made with chip-tuning {__version__}.", "",
        *([PICKLE_WARNING.format(tasks=_ticked(pickled))] if pickled else []),
        "## Pruning", "", "| | parameters |", "|---|---:|",
        f"| before (full model) | {params.before['total'] / 1e6:,.2f}M |",
        f"| after | {params.after['total'] / 1e6:,.2f}M |",
        f"| removed: blocks {layer + 1}..{record.num_blocks} | {params.removed['blocks'] / 1e6:,.2f}M |",
        f"| removed: LM head | {params.removed['lm_head'] / 1e6:,.2f}M |",
        f"| **pruning ratio** | **{100 * params.pruning_ratio:.1f}%** |", "",
        f"- Base model: `{base.id}` (weights `{base.hash}`" + (f", adapter `{base.adapter}` merged)" if base.adapter
                                                               else ")"),
        *([f"- Source file: `{src['file']}` (GGUF, {src['quantization']}, architecture `{src['architecture']}`, "
           f"sha256 `{src['sha256']}`), dequantized to float32 before pruning"] if src else []),
        f"- Kept: embeddings, blocks 1..{layer}, final norm (unused by the chip, kept so the checkpoint loads "
        f"cleanly){kept}",
        f"- Saved as `{record.architecture}` in {record.dtype}; feature mode `{record.feature_mode}`", "",
    ]


def _task(name: str, task: TaskRecord) -> list[str]:
    source = task.task
    prompt = f"template `{task.template!r}`" if task.template else f"text column `{task.text_column}`"
    if source.get("image_column"):
        prompt += " asked about each image, in the processor's chat template"
    return [f"## Task `{name}`", "",
            f"- Layer {task.layer} (strategy `{task.strategy}`), feature mode `{task.feature_mode}`",
            f"- Labels: {_ticked(task.label_names)}",
            f"- Prompt: {prompt}",
            f"- Trained on: {(source.get('source') or {}).get('file', source.get('name', '?'))} "
            f"(split `{source.get('split', '?')}`, {source.get('n_examples', '?')} examples), "
            f"cache `{task.cache_fingerprint}`",
            f"- Chip: `{task.chips.chip if task.chips is not None else '?'}`, "
            f"accuracy at layer {task.layer}: {_accuracy(task.chip_metrics)}",
            *_cascade(task.cascade), ""]


def _cascade(cascade: CascadeEntry | None) -> list[str]:
    if cascade is None:
        return []
    lines = ["- Early exit: each input stops at the first confident chip: "
             f"{describe_exits([(e.layer, e.threshold) for e in cascade.exits])}."]
    sim, reference = cascade.simulated, cascade.reference_layer
    if sim is not None and reference is not None:
        part = "eval" if sim.eval_accuracy is not None else "val"
        depth = getattr(sim, f"{part}_mean_depth")
        lines.append(f"- Operating point (chosen on validation, delta {cascade.delta}): {part} accuracy "
                     f"{100 * getattr(sim, f'{part}_accuracy'):.2f}% against "
                     f"{100 * getattr(sim, f'reference_{part}_accuracy'):.2f}% for the chip at layer {reference} "
                     f"alone, {depth:.2f} blocks on average ({reference / depth:.2f}x fewer); "
                     "`ChipModel.predict_with_exits` reports each input's exit layer.")
    return lines


def render_model_card(record: CheckpointRecord, pickled: list[str] = ()) -> str:
    """The Markdown model card, with hub metadata; a warning first when ``pickled`` tasks hold pickles."""
    reads_images = any(task.task.get("image_column") for task in record.tasks.values())
    data = ModelCardData(library_name="transformers", base_model=record.base_model.id,
                         tags=["chip-tuning", "pruned", "image-classification" if reads_images else "text-classification"])
    lines = _summary(record, reads_images, pickled) + [line for name, t in record.tasks.items() for line in _task(name, t)]
    for figure in record.figures:
        what = "accuracy against mean depth (early exit)" if figure.startswith("cascade") else "accuracy against layer"
        lines += [f"![{what}]({figure})", ""]
    several = f"With several tasks: `clf.predict(texts, task=...)` (tasks: {_ticked(record.tasks)}).\n\n"
    usage = USAGE.format(
        example='clf.predict(["photo.jpg"])  # paths, PIL images or arrays' if reads_images else
        'clf.predict(["some text to classify"])', several=several if len(record.tasks) > 1 else "",
        exported=EXPORTED_USAGE if record.export == "sequence-classification" else "", layer=record.layer)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n" + usage))


def write_model_card(root: Path, record: CheckpointRecord) -> Path:
    """Write ``README.md`` into ``root``, after the chips: it warns about the tasks with a chip directory
    (their own or a cascade exit's) that holds a pickle."""
    def holds_pickle(folder: Path) -> bool:
        return folder.is_dir() and any(is_pickle(p) for p in folder.iterdir())

    root = Path(root)
    pickled = [name for name, task in record.tasks.items() if any(holds_pickle(root / d) for d in task.chip_dirs())]
    path = root / "README.md"
    path.write_text(render_model_card(record, pickled), encoding="utf-8")
    return path
