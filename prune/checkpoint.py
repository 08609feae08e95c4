"""Write a pruned checkpoint: truncated model + tokenizer + chip + provenance + model card.

``prune()`` is the library function behind ``chiptuning prune``. It checks that the chips were
trained on a cache of *this* model, truncates the model after the chosen layer, saves a Hugging
Face directory that reloads with plain ``AutoModel.from_pretrained``, and proves, before handing
the directory over, that the reloaded model gives the full model's feature(l) and the same chip
predictions. Everything is written to a temporary sibling directory and renamed at the end
(:func:`chiptuning.outputs.write_output`), so a failed or interrupted run leaves nothing
half-written; an existing checkpoint is replaced only with ``overwrite``, and never when it holds
files prune did not write.

A vision-language model is cut inside its language model (the vision tower and projector stay),
saved with its processor instead of a tokenizer, reloads with ``AutoModel`` (its own base class,
e.g. ``LlavaModel``; ``AutoModelForImageTextToText`` with ``keep_lm_head``), and its parity check
runs two synthetic images through the processor (:func:`parity_inputs`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

from chiptuning.cache import CacheMeta
from chiptuning.encoding import EncodedInputs, TextInputs
from chiptuning.errors import ChipTuningError
from chiptuning.features import batch_features
from chiptuning.models import (
    empty_model,
    head_model_class,
    is_streamed,
    load_config,
    load_model,
    load_preprocessor,
    model_device,
    model_source,
    param_stats,
    settle_,
    stream_device_map,
    weights_hash,
)
from chiptuning.outputs import PRUNED, check_output, write_output
from chiptuning.probe import Cascade, ChipSet, MetricRow, check_chips_on_cache, load_chips
from chiptuning.prune.card import write_model_card
from chiptuning.prune.export import EXPORT_FORMATS, to_sequence_classification
from chiptuning.prune.provenance import (
    BaseModel,
    CascadeEntry,
    CascadeExit,
    CheckpointRecord,
    PruneParams,
    TaskEntry,
    TokenizerSettings,
    check_model_matches_cache,
    write_provenance,
)
from chiptuning.prune.truncate import check_layer, truncate_
from chiptuning.registry import base_model, get_spec, num_blocks, text_config
from chiptuning.tasks import DEFAULT_IMAGE_PROMPT, image_chat_prompt
from chiptuning.vision import ImageInputs

log = logging.getLogger(__name__)

CHIP_DIR = "chip"
#: Prompts of the post-save parity check: any text exercises every kept block.
CHECK_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Chip-tuning keeps the blocks up to the chip's layer and removes the rest. Answer:",
)
#: Sizes (width, height) of the parity check's synthetic images (vision-language models): two
#: sizes, so resizing, tiling and padding all take part.
CHECK_IMAGE_SIZES = ((40, 48), (56, 32))
CHECK_ATOL_FP32 = 1e-5
#: Largest weight file of a pruned checkpoint: saving holds one file's bytes in memory.
SHARD_SIZE = "2GB"


def parity_images() -> list[Image.Image]:
    """The parity check's images: seeded noise, one per :data:`CHECK_IMAGE_SIZES`."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in CHECK_IMAGE_SIZES]


def parity_inputs(model, tokenizer) -> EncodedInputs:
    """What the post-save parity check feeds the model: :data:`CHECK_PROMPTS`, or for a
    vision-language model (``tokenizer`` is its processor) the synthetic :func:`parity_images` with
    the paper's question in the chat template."""
    if get_spec(model).images:
        prompt = image_chat_prompt(tokenizer, DEFAULT_IMAGE_PROMPT)
        return ImageInputs(tokenizer, [prompt] * len(CHECK_IMAGE_SIZES), parity_images())
    return TextInputs(tokenizer, CHECK_PROMPTS)


# -- reading a chips directory --------------------------------------------------------------------

def resolve_layer(chips: ChipSet, layer: int | None) -> tuple[int, str]:
    """The pruning layer and how it was chosen: ``--layer``, else the chips' ``selection.json``.

    Raises:
        ChipTuningError: no layer given and none selected, or a layer without a chip.
    """
    if layer is None:
        if chips.selection is None:
            raise ChipTuningError(
                "no layer to prune at: pass --layer L, or run `chiptuning select CHIPS_DIR` first"
            )
        layer, strategy = chips.selection.layer, chips.selection.strategy or "selected"
    else:
        strategy = f"fixed:{layer}"
    if layer not in list(chips.layers):
        raise ChipTuningError(
            f"no chip at layer {layer}; the chips cover layers {min(chips.layers)}..{max(chips.layers)}"
        )
    return layer, strategy


@dataclass
class TaskChip:
    """One task of a checkpoint: its chips, the layer its chip reads, and where they came from.

    Attributes:
        chips: the task's chips.
        layer: the layer of the chip this task uses.
        strategy: how that layer was chosen (``fixed:L``, ``validate``, ...).
        chips_dir: where the chips came from (the layer curve image is copied from there).
        name: the task's name in the checkpoint (``predict(..., task=name)``).
        cascade: an early-exit cascade chosen by ``select --strategy cascade:DELTA``, or None.
    """

    chips: ChipSet
    layer: int
    strategy: str
    chips_dir: Path | None = None
    name: str = "default"
    cascade: Cascade | None = None

    @property
    def exit_layers(self) -> list[tuple[int, float]]:
        """(layer, threshold) of the cascade's exits, the last one (this task's layer) included;
        [(layer, 0)] for a single chip."""
        return [(self.layer, 0.0)] if self.cascade is None else self.cascade.exits

    @property
    def cache_meta(self) -> CacheMeta:
        """The meta of the cache the chips were trained on."""
        return self.chips.record.cache_meta

    @property
    def cache_fingerprint(self) -> str | None:
        return self.chips.record.train_cache.fingerprint if self.chips.record.train_cache else None

    @property
    def feature_mode(self) -> str:
        return self.cache_meta.feature_mode or "raw"

    @property
    def label_names(self) -> list[str]:
        return list(self.cache_meta.label_names or self.cache_meta.task.get("label_names")
                    or self.chips.label_names)


def _parse_chips_arg(entry: str | Path) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR``."""
    text = str(entry)
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def load_task_chips(chips_dirs: Sequence[str | Path], layer: int | None = None,
                    allow_pickle: bool = False) -> list[TaskChip]:
    """Read one or more chips directories (``DIR`` or ``NAME=DIR``) into named :class:`TaskChip`.

    Task names: the given NAME, else the task's own name when it is not the generic "custom" and
    is unique, else the chips directory's name.

    ``allow_pickle``: load pickled chips (:func:`~chiptuning.probe.load_chips`).

    Raises:
        ChipTuningError: ``layer`` with several chips directories, or duplicate task names.
    """
    if not chips_dirs:
        raise ChipTuningError("give at least one --chips directory")
    if layer is not None and len(chips_dirs) > 1:
        raise ChipTuningError("--layer applies to one --chips directory; with several, each uses its selection.json")
    tasks = []
    for entry in chips_dirs:
        given, path = _parse_chips_arg(entry)
        chips = load_chips(path, allow_pickle=allow_pickle)
        chosen, strategy = resolve_layer(chips, layer)
        cascade = chips.selection.cascade if layer is None and chips.selection is not None else None
        task = TaskChip(chips, chosen, strategy, path, name=given or "", cascade=cascade)
        task.cache_meta  # noqa: B018 -- fails early, naming the fix, when the chips record no cache meta
        check_chips_on_cache(chips, [lay for lay, _ in task.exit_layers])  # they score what they record
        tasks.append(task)
    own = [t.cache_meta.task_name or "default" for t in tasks]
    for task, name in zip(tasks, own):
        if task.name:
            continue
        if len(tasks) == 1 or (name != "custom" and own.count(name) == 1):
            task.name = name
        else:  # several generic "custom" tasks: tell them apart by their chips directory
            task.name = Path(task.chips_dir).resolve().name
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ChipTuningError(f"task names {names} are not unique; name them with --chips NAME=DIR")
    return tasks


# -- the parity check -----------------------------------------------------------------------------

def inputs_features(model, inputs: EncodedInputs, layer: int, mode: str = "raw") -> np.ndarray:
    """feature(layer) of encoded inputs (text or images) as one batch, float32 (B, H)."""
    device = model_device(model)
    feats = batch_features(model, inputs.batch(range(len(inputs)), device), layers=[layer], mode=mode)
    return feats[:, 0].float().cpu().numpy()


def _check_close(reference: np.ndarray, pruned: np.ndarray, dtype: torch.dtype, what: str) -> None:
    atol = CHECK_ATOL_FP32 if dtype == torch.float32 else 1e-2
    scale = max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(reference - pruned).max())
    if not err <= atol * scale:
        raise ChipTuningError(
            f"parity check failed: the pruned checkpoint's {what} differs from the full model's "
            f"by {err:.3g} (tolerance {atol * scale:.3g}); this is a bug, please report it"
        )


# -- the library function -------------------------------------------------------------------------

def prune(
    model_name_or_path: str,
    chips_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    layer: int | None = None,
    keep_lm_head: bool = False,
    dtype: str | None = None,
    adapter: str | None = None,
    device: str = "cpu",
    model_hash: str | None = None,
    export: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    offload: str = "auto",
) -> Path:
    """Prune ``model_name_or_path`` after the chips' selected layer and save a checkpoint.

    Only what is kept is read: the blocks after the layer never leave the model's files, and with
    ``offload`` the kept blocks are streamed too (read one at a time for the parity check, one
    shard at a time for the save), so a model larger than memory is pruned in the memory of one
    checkpoint shard and one block.

    Args:
        model_name_or_path: hub id or local directory of the full model (the one the chips'
            cache was extracted from).
        chips_dir: directory written by ``chiptuning probe train`` (and ``select``); or several
            (``DIR`` or ``NAME=DIR``), one per task, for a multi-task checkpoint truncated after
            the deepest chip.
        out_dir: the pruned checkpoint directory to write.
        layer: the layer to prune at (``--layer``); default the chips' ``selection.json``.
        keep_lm_head: keep the ``*ForCausalLM`` head (decoder models) so the checkpoint still
            generates; by default only the backbone (``AutoModel``) is saved.
        dtype: weights dtype of the saved checkpoint: fp32, bf16 or fp16 (default: the dtype the
            cache was extracted in, so the checkpoint reproduces its chips).
        adapter: PEFT adapter merged into the model before pruning (must match the cache's).
        device: where to run the parity check.
        model_hash: identity of the weights when it cannot be computed from the path.
        export: "sequence-classification" to save a plain ``*ForSequenceClassification``
            checkpoint (normed features, bias-free linear chip, one task, decoder models).
        overwrite: replace the pruned checkpoint at ``out_dir`` (``--overwrite``).
        allow_pickle: accept pickled chips (``--allow-pickle``); the checkpoint then holds a
            pickle too, and its card says so.
        offload: how the kept blocks are held: "none" (in memory), "stream" (read from the
            model's files as needed), "auto" (stream when they do not fit in memory).

    Returns:
        ``out_dir``.

    Raises:
        ProvenanceError: the chips were trained on a cache from another model.
        ChipTuningError: bad layer, output directory in the way, failed parity check.
    """
    check_output(out_dir, PRUNED, overwrite=overwrite)  # refused now, not after loading the model
    dirs = [chips_dir] if isinstance(chips_dir, (str, Path)) else list(chips_dir)
    tasks = load_task_chips(dirs, layer, allow_pickle)
    check_options(tasks, keep_lm_head, export)
    config = load_config(model_name_or_path)
    # Architecture first, from the config alone: a wrong model fails before loading its weights.
    for task in tasks:
        check_model_matches_cache(model_name_or_path, "", config, task.cache_meta, adapter)
    spec = get_spec(config)
    if keep_lm_head and not spec.decoder:
        raise ChipTuningError(f"--keep-lm-head is for decoder models; {config.model_type} has no LM head to keep")
    for task in tasks:
        check_layer(task.layer, num_blocks(config))
    meta = tasks[0].cache_meta
    depth = max(task.layer for task in tasks)
    model = load_model(model_name_or_path, dtype=meta.dtype or "fp32" if dtype is None else dtype,
                       device=device, adapter=adapter, causal_lm=keep_lm_head,
                       offload="none" if adapter else offload, keep_blocks=None if adapter else depth)
    model_hash = model_hash or weights_hash(model_name_or_path, model)
    for task in tasks:
        check_model_matches_cache(model_name_or_path, model_hash, config, task.cache_meta, adapter)
    tokenizer = load_preprocessor(model_name_or_path)
    base = {"id": str(model_name_or_path), "hash": model_hash, "adapter": adapter,
            "source": model_source(model_name_or_path)}
    # save_pruned frees the model before reloading the pruned checkpoint: no reference may stay here
    handed = [model]
    del model
    return save_pruned(handed.pop(), tokenizer, tasks, out_dir, base=base, keep_lm_head=keep_lm_head, export=export,
                       overwrite=overwrite, allow_pickle=allow_pickle)


def check_options(tasks: list[TaskChip], keep_lm_head: bool, export: str | None) -> None:
    """Refuse option combinations no checkpoint can honour (named by their flags)."""
    if export is not None and export not in EXPORT_FORMATS:
        raise ChipTuningError(f"--export must be one of {EXPORT_FORMATS}, got {export!r}")
    if export and keep_lm_head:
        raise ChipTuningError("--export sequence-classification replaces the LM head; drop --keep-lm-head")
    if export and len(tasks) > 1:
        raise ChipTuningError("--export sequence-classification holds one task; give one --chips directory")
    if export and any(t.cascade for t in tasks):
        raise ChipTuningError("--export sequence-classification holds one chip; an early-exit cascade needs "
                              "chiptuning's ChipModel (select another strategy to export)")
    lengths = {t.cache_meta.max_length for t in tasks}
    if len(lengths) > 1:
        raise ChipTuningError(
            f"the tasks' caches were extracted with different max_length {sorted(lengths, key=str)}; "
            "re-extract them with the same settings to pack them in one checkpoint"
        )


def save_pruned(
    model,
    tokenizer,
    tasks: Sequence[TaskChip],
    out_dir: str | Path,
    *,
    base: dict[str, Any],
    keep_lm_head: bool = False,
    export: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Truncate an already-loaded, already-checked ``model`` and write the checkpoint.

    The part of :func:`prune` that works on objects (notebooks, tests, other pipelines). The
    model keeps blocks up to the deepest task's layer; ``model`` is modified in place and released.

    Args:
        model: the full model (``AutoModel``, or ``*ForCausalLM`` with ``keep_lm_head``).
        tokenizer: its tokenizer (a vision-language model: its processor).
        tasks: the task(s) and their chips (see :class:`TaskChip`); the first is the default.
        out_dir: the checkpoint directory.
        base: ``{"id", "hash", "adapter", "source"}`` of the base model (``source``: a GGUF file's
            record, :func:`chiptuning.models.model_source`).
        keep_lm_head, export, overwrite, allow_pickle: as :func:`prune`.
    """
    tasks = list(tasks)
    check_options(tasks, keep_lm_head, export)
    out_dir = Path(out_dir)
    L = num_blocks(model)
    for task in tasks:
        check_layer(task.layer, L)
    depth = max(task.layer for task in tasks)
    if keep_lm_head and model.get_output_embeddings() is None:
        raise ChipTuningError(f"keep_lm_head needs the model with its head (*ForCausalLM), got {type(model).__name__}")
    if export and get_spec(model).images:
        raise ChipTuningError(f"--export sequence-classification is for text models; {model.config.model_type} "
                              "reads images: leave --export out (ChipModel serves the checkpoint)")
    with write_output(out_dir, PRUNED, overwrite=overwrite) as tmp:
        dtype = next(model.parameters()).dtype
        model_type = model.config.model_type
        hidden_size = int(text_config(model.config).hidden_size)
        stats_before = param_stats(model)
        probe = parity_inputs(model, tokenizer)
        references = {(t.name, lay): inputs_features(model, probe, lay, t.feature_mode)
                      for t in tasks for lay, _ in t.exit_layers}  # (task, layer) -> (B, H)
        truncate_(model, depth)
        if not is_streamed(model):  # only never-read blocks were offloaded, and they are gone
            settle_(model)
        elif export:
            raise ChipTuningError("--export sequence-classification folds the chip into weights in memory; the kept "
                                  "blocks are streamed here: use --offload none (they must fit in memory)")
        if export:
            to_save = to_sequence_classification(model, tokenizer, tasks[0].chips.chip(tasks[0].layer),
                                                 tasks[0].label_names, tasks[0].feature_mode)
            cls = AutoModelForSequenceClassification
        else:
            to_save = model if keep_lm_head else base_model(model)
            cls = head_model_class(model) if keep_lm_head else AutoModel
        streamed = is_streamed(to_save)
        save_weights(to_save, tmp)
        tokenizer.save_pretrained(tmp)
        stats_after = param_stats(to_save)
        if not keep_lm_head:  # the config still describes a head (param_stats counts it); none ships
            stats_after["total"] -= stats_after["lm_head"]
            stats_after["lm_head"] = 0
        if export:  # the score head is the chip, folded in: count it with the chip, not the model
            stats_after["other"] -= to_save.score.weight.numel()
            stats_after["total"] -= to_save.score.weight.numel()
        architecture = type(to_save).__name__
        device = model_device(model)
        del model, to_save  # free the full model before reloading the pruned one

        entries, images = {}, []
        for task in tasks:
            chip_dir = CHIP_DIR if len(tasks) == 1 else f"chips/{task.name}"
            task.chips.save_layer(task.layer, tmp / chip_dir, allow_pickle=allow_pickle)
            for lay, _ in task.exit_layers[:-1]:  # a cascade's earlier exits
                task.chips.save_layer(lay, tmp / chip_dir / "exits" / f"layer-{lay}", allow_pickle=allow_pickle)
            entries[task.name] = task_entry(task, chip_dir)
            for picture in ("layer_accuracy.png", "cascade.png"):
                source = Path(task.chips_dir) / picture if task.chips_dir is not None else None
                if source is not None and source.is_file() and (picture != "cascade.png" or task.cascade):
                    image = picture if len(tasks) == 1 else f"{Path(picture).stem}-{task.name}.png"
                    shutil.copy2(source, tmp / image)
                    images.append(image)
        removed = {
            "blocks": int(sum(stats_before["blocks"][depth:])),
            "lm_head": 0 if keep_lm_head else int(stats_before["lm_head"]),
        }
        meta = tasks[0].cache_meta
        record = CheckpointRecord(
            base_model=BaseModel(id=str(base["id"]), hash=base.get("hash"), adapter=base.get("adapter"),
                                 model_type=model_type, num_blocks=L, hidden_size=hidden_size,
                                 source=base.get("source")),
            layer=depth, num_blocks=L, architecture=architecture, keep_lm_head=keep_lm_head, export=export,
            dtype=str(dtype).replace("torch.", ""), feature_mode=tasks[0].feature_mode,
            tokenizer=TokenizerSettings(padding_side="right", max_length=meta.max_length),
            default_task=tasks[0].name, tasks=entries,
            params=PruneParams(before=stats_before, after=stats_after, removed=removed,
                               pruning_ratio=1 - stats_after["total"] / stats_before["total"]),
            images=images,
        )
        write_model_card(tmp, record)
        record = write_provenance(tmp, record)
        verify_checkpoint(tmp, tasks, references, depth, dtype, device, cls, stream=streamed)
    log.info("pruned checkpoint at layer %d of %d written to %s (%.1f%% of parameters removed)",
             depth, L, out_dir, 100 * record.params.pruning_ratio)
    return out_dir


def task_entry(task: TaskChip, chip_dir: str) -> TaskEntry:
    """The checkpoint's record of one task (its chip, layer and prompt format)."""
    source = dict(task.cache_meta.task)
    cascade = None
    if task.cascade is not None:
        exits = [CascadeExit(layer=lay, threshold=t,
                             chip_dir=chip_dir if lay == task.layer else f"{chip_dir}/exits/layer-{lay}")
                 for lay, t in task.exit_layers]
        cascade = CascadeEntry(exits=exits, delta=task.cascade.delta, fallback=task.cascade.fallback,
                               reference_layer=task.cascade.reference_layer, simulated=task.cascade.simulated)
    metrics = task.chips.metrics_at(task.layer)
    return TaskEntry(
        chip_dir=chip_dir, layer=task.layer, strategy=task.strategy, feature_mode=task.feature_mode,
        task=source, template=source.get("template"), text_column=source.get("text_column"),
        label_names=task.label_names, cache_fingerprint=task.cache_fingerprint, cache_meta=task.cache_meta,
        chips=task.chips.record, chip_metrics=MetricRow.from_dict(metrics, "metrics") if metrics else None,
        cascade=cascade,
    )


def save_weights(model, directory: Path) -> None:
    """``model.save_pretrained`` in shards of at most :data:`SHARD_SIZE` (saving holds one shard's
    bytes in memory at a time); a streamed model's weights are read from their files one shard at a
    time, into the shards an in-memory save fills."""
    state_dict = None
    if is_streamed(model):
        if not getattr(model, "hf_device_map", None):
            model.hf_device_map = {"": "disk"}  # tells save_pretrained to read the offloaded weights back
        # save_pretrained fills an in-memory model's shards in the order reverting its load-time conversions leaves
        # the weights in (sorted by dot_natural_key, for a model that has any), an offloaded model's in module
        # order: give it the in-memory order. The blocks' weights are on the meta device: nothing is read here.
        state_dict = model.state_dict()
        if list(revert_weight_conversion(model, dict(state_dict))) != list(state_dict):
            state_dict = dict(sorted(state_dict.items(), key=lambda item: dot_natural_key(item[0])))
    with warnings.catch_warnings():  # about its default 50 GB shards: ours are SHARD_SIZE
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(directory, max_shard_size=SHARD_SIZE, state_dict=state_dict)


def verify_checkpoint(path: Path, tasks: Sequence[TaskChip], references: dict[str, np.ndarray], depth: int,
                      dtype: torch.dtype, device, cls, stream: bool = False) -> None:
    """Reload ``path`` the way users will (streamed, when the pruned model was) and compare every
    task's feature and chip predictions.

    Raises:
        ChipTuningError: missing / unexpected / re-initialised weights, or a feature that differs.
    """
    kwargs = {}
    if stream:
        skeleton = empty_model(AutoConfig.from_pretrained(path), cls is not AutoModel)
        # Weights transformers converts on load (fused experts) are offloaded to a scratch folder, as in load_model;
        # it lives as long as this function's model.
        scratch = tempfile.TemporaryDirectory(prefix="chiptuning-offload-")
        kwargs = {"device_map": stream_device_map(skeleton, torch.device(device), range(depth)),
                  "offload_folder": scratch.name}
    model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ChipTuningError(f"the pruned checkpoint does not reload cleanly: {bad}; this is a bug, please report it")
    model = (model if stream else model.to(device)).eval()
    tokenizer = load_preprocessor(str(path))
    if num_blocks(model) != depth:
        raise ChipTuningError(f"the reloaded checkpoint has {num_blocks(model)} blocks, expected {depth}")
    probe = parity_inputs(model, tokenizer)
    for task in tasks:
        for lay, _ in task.exit_layers:
            reference = references[(task.name, lay)]
            pruned = inputs_features(model, probe, lay, task.feature_mode)
            _check_close(reference, pruned, dtype, f"feature({lay})")
            chip = task.chips.chip(lay)
            if dtype == torch.float32 and not np.array_equal(chip.predict(reference), chip.predict(pruned)):
                raise ChipTuningError("parity check failed: the chip predicts differently on the pruned model's feature")
        reference = references[(task.name, task.layer)]
        chip = task.chips.chip(task.layer)
        if cls is AutoModelForSequenceClassification:
            with torch.no_grad():  # one prompt at a time: HF pooling, no padding involved
                logits = torch.cat([model(**tokenizer(p, return_tensors="pt").to(device)).logits
                                    for p in CHECK_PROMPTS]).float().cpu().numpy()  # (B, C)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            _check_close(np.asarray(chip.predict_proba(reference)), probs, dtype,
                         "sequence-classification probabilities")


__all__ = ["CHECK_IMAGE_SIZES", "CHECK_PROMPTS", "TaskChip", "parity_images", "parity_inputs", "check_options",
           "inputs_features", "load_task_chips", "prune",
           "resolve_layer", "save_pruned", "task_entry", "verify_checkpoint"]
