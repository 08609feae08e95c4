"""``ChipModel``: a verified pruned checkpoint as a classifier of raw text (or images), with prompts built
and tokenized as extraction built the cache's."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from chiptuning.encoding import EncodedInputs, TextInputs, resolve_token_budget
from chiptuning.errors import DataError, ProvenanceError
from chiptuning.features import batch_features
from chiptuning.models import load_processor, load_tokenizer, model_device, resolve_device, resolve_dtype
from chiptuning.probe import load_chip, optional_class_mask
from chiptuning.progress import progress_bar
from chiptuning.prune.cascade import Exit, run_cascade
from chiptuning.prune.provenance import CheckpointRecord, TaskRecord, load_record, other_weights
from chiptuning.registry import get_spec, num_blocks, text_config
from chiptuning.tasks import Example, TaskData, template_fields
from chiptuning.tasks.images import as_image_input
from chiptuning.vision import ImageInputs, check_modality

log = logging.getLogger(__name__)

#: One raw input of a text checkpoint: a text, or a record (a mapping of fields) for the saved template.
RawInput = str | Mapping[str, Any]
Inputs = RawInput | Iterable[RawInput]


def model_batches(model, inputs: EncodedInputs, batch_size: int | None, max_tokens_per_batch: int | str, what: str,
                  progress: bool):
    """Batches of ``inputs`` on ``model``'s device as extraction makes them: sorted by length and packed up to a
    token budget ("auto": from free GPU memory, 8192 tokens on CPU; 0: ``batch_size`` in input order)."""
    device = model_device(model)
    budget = resolve_token_budget(max_tokens_per_batch, model, device)
    bar = progress_bar(len(inputs), what, enabled=progress)
    for batch in inputs.batches(batch_size or (1024 if budget else 16), budget, device):
        yield batch
        bar.update(len(batch.rows))
    bar.close()


def check_config(path: Path, record: CheckpointRecord):
    """The checkpoint's config; ProvenanceError where it, or a task's source model, disagrees with the record."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    base, kind = record.base_model, config.model_type
    width, depth = int(text_config(config).hidden_size), num_blocks(config)
    problems = [what for what, bad in (
        (f"model_type {kind!r}, provenance says {base.model_type!r}", kind != base.model_type),
        (f"{depth} blocks, provenance says layer {record.layer}", depth != record.layer),
        (f"hidden size {width}, provenance says {base.hidden_size}", base.hidden_size not in (None, width))) if bad]
    for name, task in record.tasks.items():
        then, now = task.cache_meta.model_hash, base.hash
        if other_weights(then, now):
            problems.append(f"task {name!r} chip comes from weights {then}, base model is {now}")
        if task.cache_meta.model_type not in (None, kind):
            problems.append(f"task {name!r} chip comes from a {task.cache_meta.model_type!r} model")
    if problems:
        raise ProvenanceError(f"{path}: the base model does not match its provenance ({'; '.join(problems)}); "
                              "re-run `chiptuning prune` on the right model")
    return config


def check_chips_fit(path: Path, record: CheckpointRecord, config, chips: dict[str, Any],
                    cascades: dict[str, list[Exit]]) -> None:
    """ProvenanceError unless every chip (and cascade exit) has its entry's layer and labels, the model's width."""
    width = int(text_config(config).hidden_size)
    for name, task in record.tasks.items():
        for exit_ in cascades.get(name) or [Exit(task.layer, chips[name], 0.0)]:
            chip = getattr(exit_.chip, "chip_record_", None)
            if chip is None:  # an opted-in pickle: only its width can be checked
                problems = [] if getattr(exit_.chip, "n_features_in_", width) == width else ["width"]
            else:
                problems = [what for what, bad in (
                    (f"layer {chip.layer}", chip.layer != exit_.layer),
                    (f"width {chip.hidden_size}", chip.hidden_size not in (None, width)),
                    (f"labels {chip.label_names}", list(chip.label_names) != list(task.label_names))) if bad]
            if problems:
                raise ProvenanceError(f"{path}: the chip of task {name!r} at layer {exit_.layer} has "
                                      f"{', '.join(problems)}, not the task's (layer {exit_.layer}, width {width}, "
                                      f"labels {task.label_names}); re-run `chiptuning prune`")


def describe_value(value: Any) -> str:
    """``value`` named for a message: its type, and its value for a number."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return "None" if value is None else f"{type(value).__name__} ({len(value)} bytes)"
    return f"a {type(value).__name__}" + (f" ({value!r})" if isinstance(value, (int, float)) else "")


def text_examples(data: TaskData, inputs: Inputs) -> list[Example]:
    """``inputs`` (a text, a record, or a list of them) as examples of the saved task ``data``, each
    checked; DataError for nothing to classify, None, a number, bytes, an empty text or prompt."""
    if inputs is None or isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise DataError(f"inputs are {describe_value(inputs)}; give a str, a dict of fields, or a list of them")
    records = [inputs] if isinstance(inputs, (str, Mapping)) else list(inputs)
    if not records:
        raise DataError("no inputs to classify")
    examples = []
    for i, record in enumerate(records):
        if isinstance(record, Mapping):
            fields = dict(record)
        elif not isinstance(record, str):
            raise DataError(f"input {i} is {describe_value(record)}; give a str or a dict of fields")
        elif not record.strip():
            raise DataError(f"input {i} is an empty text; there is nothing to classify")
        elif data.template is None:
            fields = {data.text_column: record}
        elif len(names := template_fields(data.template)) != 1:
            raise DataError(f"the task's template needs fields {sorted(names)}; pass dicts, not strings")
        else:
            fields = {next(iter(names)): record}
        if not data.format(fields).strip():
            raise DataError(f"input {i} makes an empty prompt; there is nothing to classify")
        examples.append(Example(id=str(i), fields=fields, label=0, n_choices=data.n_choices(fields)))
    return examples


def image_examples(data: TaskData, inputs: Any) -> list[Example]:
    """One image (a path, a PIL image, a 2-D or 3-D array, or a record holding one in the task's
    image column), or a list of them (or a 4-D array), as examples; every class is an option."""
    column = data.image_column
    if column is None:
        raise DataError(f"task {data.name!r} of this vision-language checkpoint has no image column")
    one = inputs.ndim != 4 if isinstance(inputs, np.ndarray) else \
        isinstance(inputs, (str, Path, Mapping, bytes, bytearray)) or not isinstance(inputs, Iterable)
    items = [inputs] if one else list(inputs)
    if not items:
        raise DataError("no images to classify")
    examples = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping) and column not in item:
            raise DataError(f"input {i} has no image in {column!r} (keys: {sorted(item)})")
        fields = dict(item) if isinstance(item, Mapping) else {column: item}
        fields[column] = as_image_input(fields[column], i)
        examples.append(Example(id=str(i), fields=fields, label=0, n_choices=len(data.label_names)))
    return examples


@dataclass(eq=False, repr=False)
class ChipModel:
    """A pruned backbone plus its chip(s), a text (or image) classifier: build it with :meth:`from_pretrained`."""

    model: Any  # the pruned AutoModel
    tokenizer: Any
    chips: dict[str, Any]  # task -> fitted chip
    record: CheckpointRecord
    path: Path | None = None
    cascades: dict[str, list[Exit]] = field(default_factory=dict)  # task -> its early exits, if it has them
    processor: Any = None  # a vision-language checkpoint's processor

    def __post_init__(self) -> None:
        self.cascades = self.cascades or {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        allow_pickle: bool = False) -> ChipModel:
        """Load and verify a checkpoint written by ``chiptuning prune``, on ``device`` (cpu, cuda, cuda:N,
        auto), in ``dtype`` (fp32, bf16, fp16; default: the saved one, whose predictions equal the chip's on
        the cache). Nothing executable is loaded: safetensors weights, no remote code, a pickled chip only
        with ``allow_pickle`` (for your own checkpoints: an attacker can re-hash what they edit). Raises
        ProvenanceError for files, config or chips that are not what the record describes."""
        path = Path(path)
        record = load_record(path)
        config = check_config(path, record)
        spec = get_spec(config)
        # the chips first: a refused pickle stops here, before the weights are loaded
        chips = {name: load_chip(path / t.chip_dir, allow_pickle=allow_pickle) for name, t in record.tasks.items()}
        cascades = {name: [Exit(e.layer, chips[name] if e.chip_dir == task.chip_dir
                                else load_chip(path / e.chip_dir, allow_pickle=allow_pickle), e.threshold)
                           for e in task.cascade.exits]
                    for name, task in record.tasks.items() if task.cascade is not None}
        check_chips_fit(path, record, config, chips, cascades)
        hf_logging.disable_progress_bar()
        dtype = resolve_dtype(dtype) if dtype else getattr(torch, record.dtype)
        model, info = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True, use_safetensors=True,
                                                trust_remote_code=False)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise ProvenanceError(f"{path}: weights do not fit the config (missing {info.get('missing_keys')[:5]}, "
                                  f"mismatched {info.get('mismatched_keys')[:5]}); re-run `chiptuning prune`")
        model = model.to(resolve_device(device)).eval()
        processor = load_processor(str(path), padding_side=record.padding_side) if spec.reads_images else None
        tokenizer = processor.tokenizer if processor is not None else load_tokenizer(
            str(path), padding_side=record.padding_side)
        log.debug("loaded %s: %s pruned to %d blocks, tasks %s", path, record.base_model.id, record.layer, list(chips))
        return cls(model, tokenizer, chips, record, path, cascades, processor=processor)

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks this checkpoint classifies."""
        return list(self.record.tasks)

    def task(self, task: str | None = None) -> tuple[str, TaskRecord]:
        """(name, entry) of ``task`` (the default task when None); DataError naming the tasks if unknown."""
        name = task or self.record.default_task
        if name not in self.record.tasks:
            raise DataError(f"unknown task {name!r}; this checkpoint has tasks {self.tasks}")
        return name, self.record.tasks[name]

    def label_names(self, task: str | None = None) -> list[str]:
        """Class names of ``task`` (default task when None), in class-index order."""
        return list(self.task(task)[1].label_names)

    @property
    def layer(self) -> int:
        """Depth of the pruned backbone (the deepest chip's layer)."""
        return self.record.layer

    @property
    def reads_images(self) -> bool:
        """True for a vision-language checkpoint (it classifies images)."""
        return self.processor is not None

    @property
    def images(self) -> bool:
        warnings.warn("ChipModel.images is now ChipModel.reads_images", DeprecationWarning, stacklevel=2)
        return self.reads_images

    def task_data(self, task: str | None = None) -> TaskData:
        """A :class:`~chiptuning.tasks.TaskData` (no examples) with the saved prompt format, which wins."""
        name, entry = self.task(task)
        text_column = "text" if entry.template is None and entry.text_column is None else entry.text_column
        return TaskData.from_description(dict(entry.task, name=name, split="predict", template=entry.template,
                                              label_names=list(entry.label_names), text_column=text_column))

    def data_options(self, task: str | None = None, **options: Any) -> dict[str, Any]:
        """Data options (as :func:`chiptuning.tasks.load_task` takes them) with the saved prompt format
        (template or text column, labels, image column, trailing space, chat template) where none was given."""
        saved = self.task_data(task)
        out = dict(options)
        if out.get("template") is None and out.get("text_column") is None:
            out["template"], out["text_column"] = saved.template, saved.text_column
        if not out.get("labels"):
            out["labels"] = list(saved.label_names)
        out["strip_trailing_space"] = bool(out.get("strip_trailing_space")) or saved.strip_trailing_space
        out["chat_template"] = bool(out.get("chat_template")) or saved.chat_template
        if saved.image_column is not None and out.get("image_column") is None and out.get("text_column") is None:
            out["image_column"] = saved.image_column
        return out

    def prompts(self, inputs: Inputs, task: str | None = None) -> list[str]:
        """The prompt text of each input, as extraction built it."""
        return self._prepare(inputs, task)[1]

    def class_mask(self, inputs: Inputs, task: str | None = None) -> np.ndarray | None:
        """(N, C) bool, True where a class is one of the input's options (None: all are)."""
        return self._prepare(inputs, task)[2]

    def encode(self, inputs: Inputs, task: str | None = None) -> tuple[EncodedInputs, np.ndarray | None]:
        """Raw inputs (texts, records, or images) as the model's encoded inputs, and their class mask."""
        data, prompts, mask = self._prepare(inputs, task)
        return self._encoded(data, prompts), mask

    def encode_task(self, data: TaskData) -> EncodedInputs:
        """A task's examples as the model's encoded inputs; DataError for data of the other modality."""
        check_modality(self.model, data, str(self.path or self.record.base_model.id))
        return self._encoded(data, self._prompts(data))

    def _prepare(self, inputs, task) -> tuple[TaskData, list[str], np.ndarray | None]:
        """The saved task holding ``inputs`` as its examples (each checked), their prompts and class mask."""
        data = self.task_data(task)
        data.examples = image_examples(data, inputs) if self.reads_images else text_examples(data, inputs)
        mask = optional_class_mask([ex.n_choices for ex in data.examples], len(data.label_names))
        return data, self._prompts(data), mask

    def _prompts(self, data: TaskData) -> list[str]:
        return data.build_prompts(self.processor if self.reads_images else self.tokenizer, self.record.max_length)[0]

    def _encoded(self, data: TaskData, prompts: list[str]) -> EncodedInputs:
        if self.reads_images:
            return ImageInputs(self.processor, prompts, data.images())
        return TextInputs(self.tokenizer, prompts, self.record.max_length)

    def features(self, inputs: Inputs, task: str | None = None, **batching: Any) -> np.ndarray:
        """feature(l) of each input at ``task``'s layer: float32 (N, H), what the chip reads."""
        return self.features_of_inputs(self.encode(inputs, task)[0], task, **batching)

    def features_of_prompts(self, prompts: list[str], task: str | None = None, **batching: Any) -> np.ndarray:
        """:meth:`features_of_inputs` of finished prompt texts (no template applied)."""
        return self.features_of_inputs(TextInputs(self.tokenizer, prompts, self.record.max_length), task, **batching)

    @torch.no_grad()
    def features_of_inputs(self, inputs: EncodedInputs, task: str | None = None, batch_size: int | None = None,
                           max_tokens_per_batch: int | str = "auto", progress: bool = False) -> np.ndarray:
        """feature(l) of encoded inputs (:meth:`encode`, :meth:`encode_task`): float32 (N, H), in input order."""
        _, entry = self.task(task)
        out = np.empty((len(inputs), int(text_config(self.model.config).hidden_size)), dtype=np.float32)
        for batch in model_batches(self.model, inputs, batch_size, max_tokens_per_batch, "pruned model", progress):
            feats = batch_features(self.model, batch, layers=[entry.layer], mode=entry.feature_mode)  # (B, 1, H)
            out[batch.rows] = feats[:, 0].float().cpu().numpy()
        return out

    def cascade_of_prompts(self, prompts: list[str], task: str | None = None, class_mask: np.ndarray | None = None,
                           **batching: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`cascade_of_inputs` of finished prompt texts (no template applied)."""
        inputs = TextInputs(self.tokenizer, prompts, self.record.max_length)
        return self.cascade_of_inputs(inputs, task, class_mask, **batching)

    @torch.no_grad()
    def cascade_of_inputs(self, inputs: EncodedInputs, task: str | None = None, class_mask: np.ndarray | None = None,
                          batch_size: int | None = None, max_tokens_per_batch: int | str = "auto",
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class index (N,), exit layer (N,), probabilities (N, C)) of encoded inputs, in input order, by
        early exit through ``task``'s cascade."""
        name, entry = self.task(task)
        exits, n = self.cascades[name], len(inputs)
        prediction, exit_layer = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        proba = np.empty((n, len(entry.label_names)), dtype=np.float64)
        for batch in model_batches(self.model, inputs, batch_size, max_tokens_per_batch, "cascade", progress):
            mask = None if class_mask is None else class_mask[batch.rows]
            prediction[batch.rows], exit_layer[batch.rows], proba[batch.rows] = run_cascade(
                self.model, batch.input_ids, batch.attention_mask, exits, entry.feature_mode, mask, **batch.other_inputs)
        return prediction, exit_layer, proba

    def _answers(self, inputs, task, batch_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class index (N,), layer answered at (N,), probabilities (N, C)) of raw inputs."""
        name, entry = self.task(task)
        encoded, mask = self.encode(inputs, task)
        if name in self.cascades:
            return self.cascade_of_inputs(encoded, name, mask, batch_size)
        features = self.features_of_inputs(encoded, task, batch_size)
        proba = np.asarray(self.chips[name].predict_proba(features, class_mask=mask))
        index = np.asarray(self.chips[name].predict(features, class_mask=mask)).astype(np.int64)
        return index, np.full(len(index), entry.layer, dtype=np.int64), proba

    def predict(self, inputs: Inputs, task: str | None = None, batch_size: int | None = None) -> list[str]:
        """Label name of each input: texts, or records (dicts of fields) for the saved template; images
        for a vision-language checkpoint (paths, PIL images, (H, W[, C]) arrays, a 4-D array of several,
        or records holding one). ``task``: the default task when None."""
        names = self.label_names(task)
        return [names[i] for i in self.predict_index(inputs, task, batch_size)]

    def predict_index(self, inputs: Inputs, task: str | None = None, batch_size: int | None = None) -> np.ndarray:
        """Class index of each input, int64 (N,), never one outside its options; a cascade exits early."""
        return self._answers(inputs, task, batch_size)[0]

    def predict_proba(self, inputs: Inputs, task: str | None = None, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of each input, (N, C) in ``label_names(task)`` order, 0 outside its options."""
        return self._answers(inputs, task, batch_size)[2]

    def predict_with_exits(self, inputs: Inputs, task: str | None = None,
                           batch_size: int | None = None) -> tuple[list[str], np.ndarray]:
        """(label of each input, the layer it was answered at: its cascade exit, or the chip's layer)."""
        index, layers, _ = self._answers(inputs, task, batch_size)
        names = self.label_names(task)
        return [names[i] for i in index], layers

    def __repr__(self) -> str:
        base, depth = self.record.base_model.id, self.record.num_blocks
        return f"ChipModel({base!r} pruned to {self.layer}/{depth} blocks, tasks={self.tasks})"


__all__ = ["ChipModel", "Inputs", "RawInput", "check_chips_fit", "check_config", "describe_value", "image_examples",
           "text_examples"]
