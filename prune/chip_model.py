"""``ChipModel``: a pruned checkpoint as a classifier that predicts from raw text (or raw images).

Loading verifies the checkpoint first (every recorded file's sha256, the config against the
provenance record), then reads feature(l) of the pruned backbone through the one shared layer
convention (:func:`chiptuning.features.last_token_features`) and hands it to the chip. Prompts are
built and tokenized exactly as extraction built those of the cache: same template, same special
tokens, same truncation side and max length (:mod:`chiptuning.encoding`). A vision-language
checkpoint classifies images (paths, PIL images or arrays) through its saved processor, with the
prompt it was trained with (:class:`chiptuning.vision.ImageInputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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
from chiptuning.prune.provenance import CheckpointRecord, TaskEntry, load_record
from chiptuning.registry import get_spec, num_blocks, text_config
from chiptuning.tasks import Example, TaskData, template_fields
from chiptuning.tasks.images import as_image_input
from chiptuning.vision import ImageInputs, check_modality

log = logging.getLogger(__name__)

#: One raw input of a text checkpoint: a text, or a record (a mapping of fields) for the saved template.
RawInput = str | Mapping[str, Any]


def check_config(path: Path, record: CheckpointRecord):
    """The checkpoint's config, which must describe the model its provenance record describes.

    Raises:
        ProvenanceError: model type, depth, width or a task's source weights that disagree.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    base = record.base_model
    text = text_config(config)
    problems = []
    if config.model_type != base.model_type:
        problems.append(f"model_type {config.model_type!r}, provenance says {base.model_type!r}")
    if num_blocks(config) != record.layer:
        problems.append(f"{num_blocks(config)} blocks, provenance says layer {record.layer}")
    if base.hidden_size is not None and int(text.hidden_size) != int(base.hidden_size):
        problems.append(f"hidden size {text.hidden_size}, provenance says {base.hidden_size}")
    for name, task in record.tasks.items():
        then, now = task.cache_meta.model_hash, base.hash
        if then and now and then.split(":")[0] == now.split(":")[0] and then != now:
            problems.append(f"task {name!r} chip comes from weights {then}, base model is {now}")
        if task.cache_meta.model_type not in (None, config.model_type):
            problems.append(f"task {name!r} chip comes from a {task.cache_meta.model_type!r} model")
    if problems:
        raise ProvenanceError(
            f"{path}: the base model does not match its provenance ({'; '.join(problems)}); "
            "re-run `chiptuning prune` on the right model"
        )
    return config


def describe_value(value: Any) -> str:
    """``value`` named for a message: its type, and its start for short values."""
    if value is None:
        return "None"
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__} ({len(value)} bytes)"
    return f"a {type(value).__name__}" + (f" ({value!r})" if isinstance(value, (int, float)) else "")


def as_input_list(inputs: Any) -> list[Any]:
    """The inputs of a text checkpoint as a list: one text or record is a batch of one.

    Raises:
        DataError: nothing to classify, or something that is neither a text, a record nor a list
            of them (None, a number, bytes).
    """
    if isinstance(inputs, (str, Mapping)):
        return [inputs]
    if inputs is None or isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise DataError(f"inputs are {describe_value(inputs)}; give a str, a dict of fields, or a list of them")
    records = list(inputs)
    if not records:
        raise DataError("no inputs to classify")
    return records


def check_chips_fit(path: Path, record: CheckpointRecord, config, chips: dict[str, Any],
                    cascades: dict[str, list[Exit]]) -> None:
    """Every chip must be the one its task entry names: trained on features of the model's width,
    at the layer the entry (or its cascade exit) says, with the entry's labels.

    Raises:
        ProvenanceError: naming the task and what differs.
    """
    width = int(text_config(config).hidden_size)
    for name, task in record.tasks.items():
        exits = cascades.get(name) or [Exit(task.layer, chips[name], 0.0)]
        for exit_ in exits:
            chip_record = getattr(exit_.chip, "chip_record_", None)
            if chip_record is None:  # an opted-in pickle: only its width can be checked
                problems = [] if getattr(exit_.chip, "n_features_in_", width) == width else ["width"]
            else:
                problems = [what for what, bad in (
                    (f"layer {chip_record.layer}", chip_record.layer != exit_.layer),
                    (f"width {chip_record.hidden_size}", chip_record.hidden_size not in (None, width)),
                    (f"labels {chip_record.label_names}", list(chip_record.label_names) != list(task.label_names)),
                ) if bad]
            if problems:
                raise ProvenanceError(f"{path}: the chip of task {name!r} at layer {exit_.layer} has "
                                      f"{', '.join(problems)}, not the task's (layer {exit_.layer}, width {width}, "
                                      f"labels {task.label_names}); re-run `chiptuning prune`")


def saved_task_data(entry: TaskEntry, name: str) -> TaskData:
    """A :class:`~chiptuning.tasks.TaskData` (no examples) holding a task's saved prompt format."""
    description = dict(entry.task)
    # The saved prompt format wins over anything the cache description lacked.
    description.update(name=name, split="predict", label_names=list(entry.label_names),
                       template=entry.template, text_column=entry.text_column)
    if description["template"] is None and description["text_column"] is None:
        description["text_column"] = "text"
    return TaskData.from_description(description)


class ChipModel:
    """A pruned backbone plus its chip(s): a text (or image) classifier.

    Build it with :meth:`from_pretrained`. Attributes: ``model`` (the pruned ``AutoModel``),
    ``tokenizer``, ``processor`` (a vision-language checkpoint's processor, else None), ``chips``
    (task name -> fitted chip), ``cascades`` (task name -> the exits of its early-exit cascade, for
    tasks that have one), ``record`` (the
    :class:`~chiptuning.prune.provenance.CheckpointRecord`), ``path``.
    """

    def __init__(self, model, tokenizer, chips: dict[str, Any], record: CheckpointRecord,
                 path: Path | None = None, cascades: dict[str, list[Exit]] | None = None, processor=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chips = chips
        self.record = record
        self.path = path
        self.cascades = cascades or {}
        self.processor = processor

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        allow_pickle: bool = False) -> ChipModel:
        """Load and verify a pruned checkpoint written by ``chiptuning prune``.

        Nothing executable is loaded: weights through safetensors only, no remote code, and a
        chip stored as a pickle is refused unless ``allow_pickle=True`` (only for checkpoints you
        made yourself: the checksums in ``chiptuning.json`` catch accidents, not an attacker,
        who can re-hash what they edit).

        Args:
            path: the checkpoint directory.
            device: cpu, cuda, cuda:N or auto.
            dtype: override the saved dtype (fp32, bf16, fp16); predictions are only guaranteed
                to equal the chip's on the cache in the dtype the cache was extracted in.
            allow_pickle: load a chip saved as a pickle (``chip.joblib``), which can run any code.

        Raises:
            ProvenanceError: not a checkpoint, edited or missing files, a config or weights that
                do not match the provenance record.
            ChipTuningError: a pickled chip without ``allow_pickle``.
        """
        path = Path(path)
        record = load_record(path)
        config = check_config(path, record)
        get_spec(config)
        # the chips first: a refused pickle stops here, before the weights are loaded
        chips = {name: load_chip(path / task.chip_dir, allow_pickle=allow_pickle) for name, task in record.tasks.items()}
        cascades = {name: [Exit(e.layer, chips[name] if e.chip_dir == task.chip_dir
                                else load_chip(path / e.chip_dir, allow_pickle=allow_pickle), e.threshold)
                           for e in task.cascade.exits]
                    for name, task in record.tasks.items() if task.cascade is not None}
        check_chips_fit(path, record, config, chips, cascades)
        hf_logging.disable_progress_bar()
        torch_dtype = resolve_dtype(dtype) if dtype else getattr(torch, record.dtype)
        model, info = AutoModel.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                                use_safetensors=True, trust_remote_code=False)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise ProvenanceError(
                f"{path}: weights do not fit the config (missing {info.get('missing_keys')[:5]}, "
                f"mismatched {info.get('mismatched_keys')[:5]}); re-run `chiptuning prune`"
            )
        model = model.to(resolve_device(device)).eval()
        processor = load_processor(str(path), padding_side=record.padding_side) if get_spec(config).images else None
        tokenizer = processor.tokenizer if processor is not None else load_tokenizer(
            str(path), padding_side=record.padding_side)
        log.debug("loaded %s: %s pruned to %d blocks, tasks %s", path, record.base_model.id,
                 record.layer, sorted(chips))
        return cls(model, tokenizer, chips, record, path, cascades, processor=processor)

    # -- facts ------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks this checkpoint classifies."""
        return list(self.record.tasks)

    def task(self, task: str | None = None) -> tuple[str, TaskEntry]:
        """(name, entry) of ``task`` (the default task when None).

        Raises:
            DataError: no such task (the message lists the checkpoint's tasks).
        """
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

    # -- prompts and features ---------------------------------------------------------------------

    def task_data(self, task: str | None = None) -> TaskData:
        """A :class:`chiptuning.tasks.TaskData` (no examples) holding the saved prompt format."""
        name, entry = self.task(task)
        return saved_task_data(entry, name)

    def data_options(self, task: str | None = None, **options: Any) -> dict[str, Any]:
        """Data options (as :func:`chiptuning.tasks.load_task` takes them) with the checkpoint's own
        prompt format filled in: its template or text column when the user gave neither, its label
        names when none were given, its trailing-space and chat-template settings.

        The one place where "the checkpoint's prompt format wins" is decided (``chiptuning eval``
        and :func:`~chiptuning.prune.evaluation.evaluate` both use it).
        """
        saved = self.task_data(task)
        out = dict(options)
        if out.get("template") is None and out.get("text_column") is None:
            out["template"], out["text_column"] = saved.template, saved.text_column
        if not out.get("labels"):
            out["labels"] = list(saved.label_names)
        out["strip_trailing_space"] = bool(out.get("strip_trailing_space")) or saved.strip_trailing_space
        out["chat_template"] = bool(out.get("chat_template")) or saved.chat_template
        if saved.image_column is not None and out.get("image_column") is None and out.get("text_column") is None:
            out["image_column"] = saved.image_column  # image data: the images are where training found them
        return out

    @property
    def images(self) -> bool:
        """True for a vision-language checkpoint (it classifies images)."""
        return self.processor is not None

    def prompts(self, inputs: RawInput | Iterable[RawInput], task: str | None = None) -> list[str]:
        """The prompt text of each input, as extraction built it.

        A ``str`` is the text itself (text-column tasks) or the value of a one-field template; a
        mapping is a record whose fields the saved template formats. For images: the chat-templated
        prompt, with the image placeholder the processor expands.
        """
        return self._prepare(inputs, task)[0]

    def class_mask(self, inputs: RawInput | Iterable[RawInput], task: str | None = None) -> np.ndarray | None:
        """(N, C) bool, True where a class is one of the input's options (None: all valid).

        A record whose options list has fewer entries than the task has labels (a C3 question
        with 2 or 3 options) can only be answered with its own options.
        """
        return self._prepare(inputs, task)[1]

    def _prepare(self, inputs, task) -> tuple[list[str], np.ndarray | None]:
        if self.images:
            return self._prepare_images(inputs, task)[0], None  # every class is an option for an image
        data = self.task_data(task)
        records = as_input_list(inputs)
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
            else:
                names = template_fields(data.template)
                if len(names) != 1:
                    raise DataError(
                        f"the task's template needs fields {sorted(names)}; pass dicts, not strings"
                    )
                fields = {next(iter(names)): record}
            if not data.format(fields).strip():
                raise DataError(f"input {i} makes an empty prompt; there is nothing to classify")
            examples.append(Example(id=str(i), fields=fields, label=0, n_choices=data.n_choices(fields)))
        data.examples = examples
        prompts, _ = data.build_prompts(self.tokenizer, self.record.max_length)
        return prompts, optional_class_mask([ex.n_choices for ex in examples], len(data.label_names))

    def _prepare_images(self, inputs, task) -> tuple[list[str], list[Any]]:
        """(prompts, images) of image inputs: one image (a path, a PIL image, a 2-D or 3-D array, or
        a record holding one in the task's image column), or a list of them (or a 4-D array)."""
        data = self.task_data(task)
        if data.image_column is None:
            raise DataError(f"task {data.name!r} of this vision-language checkpoint has no image column")
        if isinstance(inputs, np.ndarray):
            items = list(inputs) if inputs.ndim == 4 else [inputs]
        elif isinstance(inputs, (str, Path, Mapping, bytes, bytearray)) or not isinstance(inputs, Iterable):
            items = [inputs]
        else:
            items = list(inputs)
        if not items:
            raise DataError("no images to classify")
        examples, images = [], []
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                if data.image_column not in item:
                    raise DataError(f"input {i} has no image in {data.image_column!r} (keys: {sorted(item)})")
                fields = dict(item)
                fields[data.image_column] = as_image_input(item[data.image_column], i)
            else:
                fields = {data.image_column: as_image_input(item, i)}
            images.append(fields[data.image_column])
            examples.append(Example(id=str(i), fields=fields, label=0, n_choices=len(data.label_names)))
        data.examples = examples
        prompts, _ = data.build_prompts(self.processor)
        return prompts, images

    def encode(self, inputs: RawInput | Iterable[RawInput], task: str | None = None) -> tuple[EncodedInputs, np.ndarray | None]:
        """Raw inputs (texts, records, or images for a vision-language checkpoint) as the model's
        encoded inputs, and their class mask."""
        if self.images:
            prompts, images = self._prepare_images(inputs, task)
            return ImageInputs(self.processor, prompts, images), None
        prompts, mask = self._prepare(inputs, task)
        return TextInputs(self.tokenizer, prompts, self.record.max_length), mask

    def encode_task(self, data: TaskData) -> EncodedInputs:
        """A task's examples as the model's encoded inputs, built as extraction built them.

        Raises:
            DataError: image data for a text checkpoint, or text data for a vision-language one.
        """
        check_modality(self.model, data, str(self.path or self.record.base_model.id))
        if self.images:
            prompts, _ = data.build_prompts(self.processor)
            return ImageInputs(self.processor, prompts, data.images())
        prompts, _ = data.build_prompts(self.tokenizer, self.record.max_length)
        return TextInputs(self.tokenizer, prompts, self.record.max_length)

    def features(self, inputs: RawInput | Iterable[RawInput], task: str | None = None, batch_size: int | None = None,
                 max_tokens_per_batch: int | str = "auto") -> np.ndarray:
        """feature(l) of each input at ``task``'s layer: float32 (N, H), what the chip reads."""
        return self.features_of_inputs(self.encode(inputs, task)[0], task, batch_size, max_tokens_per_batch)

    @torch.no_grad()
    def features_of_prompts(self, prompts: list[str], task: str | None = None, batch_size: int | None = None,
                            max_tokens_per_batch: int | str = "auto", progress: bool = False) -> np.ndarray:
        """feature(l) of finished prompt texts (no template applied): float32 (N, H), in input order.

        Batched as extraction batches: prompts sorted by length and packed up to a token budget
        ("auto": sized from free GPU memory, 8192 tokens on CPU; 0: fixed batches of
        ``batch_size`` in input order), so little compute goes to padding.
        """
        return self.features_of_inputs(TextInputs(self.tokenizer, prompts, self.record.max_length), task,
                                       batch_size, max_tokens_per_batch, progress)

    @torch.no_grad()
    def features_of_inputs(self, inputs: EncodedInputs, task: str | None = None, batch_size: int | None = None,
                           max_tokens_per_batch: int | str = "auto", progress: bool = False) -> np.ndarray:
        """feature(l) of encoded inputs (:meth:`encode`, :meth:`encode_task`): float32 (N, H), in
        input order, batched as :meth:`features_of_prompts` batches."""
        _, entry = self.task(task)
        device = model_device(self.model)
        budget = resolve_token_budget(max_tokens_per_batch, self.model, device)
        out = np.empty((len(inputs), int(text_config(self.model.config).hidden_size)), dtype=np.float32)
        bar = progress_bar(len(inputs), "pruned model", enabled=progress)
        for batch in inputs.batches(batch_size or (1024 if budget else 16), budget, device):
            feats = batch_features(self.model, batch, layers=[entry.layer], mode=entry.feature_mode)  # (B, 1, H)
            out[batch.rows] = feats[:, 0].float().cpu().numpy()
            bar.update(len(batch.rows))
        bar.close()
        return out  # (N, H)

    @torch.no_grad()
    def cascade_of_prompts(self, prompts: list[str], task: str | None = None, class_mask: np.ndarray | None = None,
                           batch_size: int | None = None, max_tokens_per_batch: int | str = "auto",
                           progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Early exit through ``task``'s cascade on finished prompts (:mod:`chiptuning.prune.cascade`),
        batched as :meth:`features_of_prompts`; exited rows leave their batch.

        Returns:
            (class index (N,), exit layer (N,), probabilities (N, C)), in input order.
        """
        return self.cascade_of_inputs(TextInputs(self.tokenizer, prompts, self.record.max_length), task, class_mask,
                                      batch_size, max_tokens_per_batch, progress)

    @torch.no_grad()
    def cascade_of_inputs(self, inputs: EncodedInputs, task: str | None = None, class_mask: np.ndarray | None = None,
                          batch_size: int | None = None, max_tokens_per_batch: int | str = "auto",
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`cascade_of_prompts` on encoded inputs (:meth:`encode`, :meth:`encode_task`: text,
        or images for a vision-language checkpoint)."""
        name, entry = self.task(task)
        exits = self.cascades[name]
        device = model_device(self.model)
        budget = resolve_token_budget(max_tokens_per_batch, self.model, device)
        n, C = len(inputs), len(entry.label_names)
        prediction, exit_layer = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        proba = np.empty((n, C), dtype=np.float64)
        bar = progress_bar(n, "cascade", enabled=progress)
        for batch in inputs.batches(batch_size or (1024 if budget else 16), budget, device):
            mask = None if class_mask is None else class_mask[batch.rows]
            pred, layers, p = run_cascade(self.model, batch.input_ids, batch.attention_mask, exits,
                                          entry.feature_mode, mask, **batch.extra)
            prediction[batch.rows], exit_layer[batch.rows], proba[batch.rows] = pred, layers, p
            bar.update(len(batch.rows))
        bar.close()
        return prediction, exit_layer, proba

    # -- predictions ------------------------------------------------------------------------------

    def predict_index(self, inputs: RawInput | Iterable[RawInput], task: str | None = None,
                      batch_size: int | None = None) -> np.ndarray:
        """Class index of each input, int64 (N,); never a class outside the input's options.
        A task with a cascade answers by early exit (see :meth:`predict_with_exits`)."""
        return self._answers(inputs, task, batch_size)[0]

    def predict_with_exits(self, inputs: RawInput | Iterable[RawInput], task: str | None = None,
                           batch_size: int | None = None) -> tuple[list[str], np.ndarray]:
        """(label of each input, the layer it was answered at): a cascade's exit layer, or the
        chip's layer for a single chip."""
        index, layers, _ = self._answers(inputs, task, batch_size)
        names = self.label_names(task)
        return [names[i] for i in index], layers

    def _answers(self, inputs, task, batch_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name, entry = self.task(task)
        encoded, mask = self.encode(inputs, task)
        if name in self.cascades:
            return self.cascade_of_inputs(encoded, name, mask, batch_size)
        features = self.features_of_inputs(encoded, task, batch_size)
        proba = np.asarray(self.chips[name].predict_proba(features, class_mask=mask))
        index = np.asarray(self.chips[name].predict(features, class_mask=mask)).astype(np.int64)
        return index, np.full(len(index), entry.layer, dtype=np.int64), proba

    def predict(self, inputs: RawInput | Iterable[RawInput], task: str | None = None,
                batch_size: int | None = None) -> list[str]:
        """Label name of each input (a single str or dict is a batch of one).

        Args:
            inputs: raw texts, or records (dicts of fields) formatted by the saved template; for a
                vision-language checkpoint images (paths, PIL images, (H, W[, C]) arrays, a 4-D
                array of several, or records holding one in the task's image column).
            task: which task's chip to use (default: the checkpoint's default task).
            batch_size: most examples per forward pass (default: as many as the token budget takes).
        """
        names = self.label_names(task)
        return [names[i] for i in self.predict_index(inputs, task, batch_size)]

    def predict_proba(self, inputs: RawInput | Iterable[RawInput], task: str | None = None,
                      batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of each input, (N, C), columns in ``label_names(task)`` order
        (0 for a class that is not one of the input's options)."""
        return self._answers(inputs, task, batch_size)[2]

    def __repr__(self) -> str:
        return (f"ChipModel({self.record.base_model.id!r} pruned to {self.layer}/{self.record.num_blocks} "
                f"blocks, tasks={self.tasks})")


__all__ = ["ChipModel", "RawInput", "as_input_list", "check_chips_fit", "check_config", "describe_value",
           "saved_task_data"]
