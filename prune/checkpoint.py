"""Write a pruned checkpoint (``chiptuning prune``): the model cut after the chips' layer, its tokenizer
(or processor), chips, provenance and model card, in a directory that reloads with ``AutoModel`` and
gives the full model's feature(l) and chip predictions (checked on reload before it is renamed into place).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
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
    TaskRecord,
    TokenizerSettings,
    check_model_matches_cache,
    write_provenance,
)
from chiptuning.prune.truncate import check_layer, truncate_
from chiptuning.registry import base_model, get_blocks, get_spec, num_blocks, text_config
from chiptuning.tasks import DEFAULT_IMAGE_PROMPT, image_chat_prompt
from chiptuning.vision import ImageInputs

log = logging.getLogger(__name__)

CHIP_DIR = "chip"
#: Prompts of the post-save parity check: any text exercises every kept block.
CHECK_PROMPTS = ("The quick brown fox jumps over the lazy dog.",
                 "Chip-tuning keeps the blocks up to the chip's layer and removes the rest. Answer:")
#: Sizes (width, height) of the parity check's images: two, so that resizing, tiling and padding take part.
CHECK_IMAGE_SIZES = ((40, 48), (56, 32))
CHECK_ATOL_FP32 = 1e-5
#: Largest weight file of a pruned checkpoint: saving holds one file's bytes in memory.
SHARD_SIZE = "2GB"


def parity_inputs(model, tokenizer) -> EncodedInputs:
    """What the parity check feeds the model: :data:`CHECK_PROMPTS`, or for a vision-language model
    (``tokenizer``: its processor) seeded noise images of :data:`CHECK_IMAGE_SIZES` with the paper's question."""
    if not get_spec(model).reads_images:
        return TextInputs(tokenizer, CHECK_PROMPTS)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in CHECK_IMAGE_SIZES]
    return ImageInputs(tokenizer, [image_chat_prompt(tokenizer, DEFAULT_IMAGE_PROMPT)] * len(images), images)


# -- the chips of each task -----------------------------------------------------------------------

def resolve_layer(chips: ChipSet, layer: int | None) -> tuple[int, str]:
    """(layer, how it was chosen): ``layer`` (``--layer``), else the chips' selection; ChipTuningError
    when there is neither, or no chip at that layer."""
    if layer is None:
        if chips.selection is None:
            raise ChipTuningError("no layer to prune at: pass --layer L, or run `chiptuning select CHIPS_DIR` first")
        layer, strategy = chips.selection.layer, chips.selection.strategy or "selected"
    else:
        strategy = f"fixed:{layer}"
    if layer not in list(chips.layers):
        raise ChipTuningError(f"no chip at layer {layer}; the chips cover layers "
                              f"{min(chips.layers)}..{max(chips.layers)}")
    return layer, strategy


@dataclass
class PrunedTask:
    """One task of a checkpoint: its chips, its chip's layer and how it was chosen, the chips' directory
    (their plots are copied), its name (``predict(..., task=name)``), its cascade."""

    chips: ChipSet
    layer: int
    strategy: str
    chips_dir: Path | None = None
    name: str = "default"
    cascade: Cascade | None = None

    @property
    def exit_layers(self) -> list[tuple[int, float]]:
        """(layer, threshold) of the cascade's exits, this task's layer last; [(layer, 0)] for one chip."""
        return [(self.layer, 0.0)] if self.cascade is None else self.cascade.exits

    @property
    def cache_meta(self) -> CacheMeta:  # of the cache the chips were trained on
        return self.chips.record.cache_meta

    @property
    def feature_mode(self) -> str:
        return self.cache_meta.feature_mode or "raw"

    @property
    def label_names(self) -> list[str]:
        return list(self.cache_meta.label_names or self.cache_meta.task.get("label_names") or self.chips.label_names)


def _parse_chips_arg(entry: str | Path) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR``."""
    text = str(entry)
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def load_task_chips(chips_dirs: Sequence[str | Path | ChipSet], layer: int | None = None,
                    allow_pickle: bool = False) -> list[PrunedTask]:
    """The :class:`PrunedTask` of chips directories (``DIR`` or ``NAME=DIR``; their chips must score on
    their eval cache what they record) or ChipSets, named: NAME, else the task's own name when it is unique
    and not "custom", else the directory's name. ChipTuningError for ``layer`` with several chips, or names
    that are not unique."""
    if not chips_dirs:
        raise ChipTuningError("give at least one --chips directory")
    if layer is not None and len(chips_dirs) > 1:
        raise ChipTuningError("--layer applies to one --chips directory; with several, each uses its selection.json")
    tasks = []
    for entry in chips_dirs:
        given, path = (None, entry.path) if isinstance(entry, ChipSet) else _parse_chips_arg(entry)
        chips = entry if isinstance(entry, ChipSet) else load_chips(path, allow_pickle=allow_pickle)
        chosen, strategy = resolve_layer(chips, layer)
        cascade = chips.selection.cascade if layer is None and chips.selection is not None else None
        task = PrunedTask(chips, chosen, strategy, path, name=given or "", cascade=cascade)
        task.cache_meta  # noqa: B018 -- fails early, naming the fix, when the chips record no cache meta
        if not isinstance(entry, ChipSet):
            check_chips_on_cache(chips, [lay for lay, _ in task.exit_layers])
        tasks.append(task)
    own = [t.cache_meta.task_name or "default" for t in tasks]
    for task, name in zip(tasks, own):
        if not task.name:  # several generic "custom" tasks are told apart by their chips directory
            unique = len(tasks) == 1 or (name != "custom" and own.count(name) == 1)
            task.name = name if unique else Path(task.chips_dir).resolve().name
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ChipTuningError(f"task names {names} are not unique; name them with --chips NAME=DIR")
    return tasks


def check_options(tasks: list[PrunedTask], keep_lm_head: bool, export: str | None) -> None:
    """Refuse option combinations no checkpoint can honour (named by their flags)."""
    lengths = {t.cache_meta.max_length for t in tasks}
    for refused, why in (
        (export not in (None, *EXPORT_FORMATS), f"--export must be one of {EXPORT_FORMATS}, got {export!r}"),
        (export and keep_lm_head, "--export sequence-classification replaces the LM head; drop --keep-lm-head"),
        (export and len(tasks) > 1, "--export sequence-classification holds one task; give one --chips directory"),
        (export and any(t.cascade for t in tasks), "--export sequence-classification holds one chip; an early-exit "
         "cascade needs chiptuning's ChipModel (select another strategy to export)"),
        (len(lengths) > 1, f"the tasks' caches were extracted with different max_length {sorted(lengths, key=str)}; "
         "re-extract them with the same settings to pack them in one checkpoint"),
    ):
        if refused:
            raise ChipTuningError(why)


# -- the library functions ------------------------------------------------------------------------

def prune(model_name_or_path: str, chips_dir: str | Path | ChipSet | Sequence[str | Path | ChipSet],
          out_dir: str | Path, layer: int | None = None, keep_lm_head: bool = False, dtype: str | None = None,
          adapter: str | None = None, device: str = "cpu", model_hash: str | None = None, export: str | None = None,
          overwrite: bool = False, allow_pickle: bool = False, offload: str = "auto", *, model=None,
          tokenizer=None) -> Path:
    """Prune ``model_name_or_path`` after the chips' selected layer and save a checkpoint at ``out_dir``.

    Only what is kept is read: the blocks after the layer never leave the model's files, and with
    ``offload`` the kept ones are streamed too (a model larger than memory is pruned in the memory
    of one checkpoint shard and one block).

    Args:
        model_name_or_path: hub id, directory or GGUF file of the model the chips' cache came from.
        chips_dir: a chips directory or ChipSet; or several (``DIR`` or ``NAME=DIR``), one per task,
            for a multi-task checkpoint cut after the deepest chip.
        layer: the layer to prune at (``--layer``); default the chips' selection.
        keep_lm_head: keep the ``*ForCausalLM`` head (decoders): the checkpoint still generates.
        dtype: fp32, bf16 or fp16 (default: the cache's, so that the checkpoint reproduces its chips).
        adapter: a PEFT adapter merged into the model first (the cache's).
        export: "sequence-classification": a plain ``*ForSequenceClassification`` checkpoint
            (normed features, a bias-free linear chip, one task, decoders).
        allow_pickle: accept pickled chips (the checkpoint then holds a pickle; its card says so).
        offload: the kept blocks in memory ("none"), read from the files ("stream"), or streamed
            when they do not fit ("auto").
        model, tokenizer: the full model and its tokenizer (or processor), already loaded; the
            model is cut in place.

    Raises:
        ProvenanceError: the chips were trained on a cache from another model.
        ChipTuningError: bad layer, output directory in the way, failed parity check.
    """
    check_output(out_dir, PRUNED, overwrite=overwrite)  # refused now, not after loading the model
    tasks = load_task_chips([chips_dir] if isinstance(chips_dir, (str, Path, ChipSet)) else list(chips_dir),
                            layer, allow_pickle)
    check_options(tasks, keep_lm_head, export)
    config = load_config(model_name_or_path)
    for task in tasks:  # the architecture first, from the config: a wrong model fails before its weights load
        check_model_matches_cache(model_name_or_path, "", config, task.cache_meta, adapter)
        check_layer(task.layer, num_blocks(config))
    if keep_lm_head and not get_spec(config).decoder:
        raise ChipTuningError(f"--keep-lm-head is for decoder models; {config.model_type} has no LM head to keep")
    if model is None:
        depth = max(task.layer for task in tasks)
        model = load_model(model_name_or_path, dtype=dtype or tasks[0].cache_meta.dtype or "fp32", device=device,
                           adapter=adapter, causal_lm=keep_lm_head, offload="none" if adapter else offload,
                           keep_blocks=None if adapter else depth)
    model_hash = model_hash or weights_hash(model_name_or_path, model)
    for task in tasks:
        check_model_matches_cache(model_name_or_path, model_hash, config, task.cache_meta, adapter)
    tokenizer = load_preprocessor(model_name_or_path) if tokenizer is None else tokenizer
    base = {"id": str(model_name_or_path), "hash": model_hash, "adapter": adapter,
            "source": model_source(model_name_or_path)}
    handed = [model]  # write_pruned frees the model before reloading the checkpoint: no reference stays here
    del model
    return save_pruned(handed.pop(), tokenizer, tasks, out_dir, base=base, keep_lm_head=keep_lm_head, export=export,
                       overwrite=overwrite, allow_pickle=allow_pickle)


def save_pruned(model, tokenizer, tasks: Sequence[PrunedTask], out_dir: str | Path, **options) -> Path:
    """:func:`write_pruned` (``options``: its keywords), returning ``out_dir``."""
    handed = [model]  # write_pruned frees the model before reloading the checkpoint: no reference stays here
    del model
    write_pruned(handed.pop(), tokenizer, tasks, out_dir, **options)
    return Path(out_dir)


def write_pruned(model, tokenizer, tasks: Sequence[PrunedTask], out_dir: str | Path, *, base: dict[str, Any],
                 keep_lm_head: bool = False, export: str | None = None, overwrite: bool = False,
                 allow_pickle: bool = False) -> CheckpointRecord:
    """Cut ``model`` (``AutoModel``, or ``*ForCausalLM``) in place after the deepest task's layer, write
    the checkpoint, check its parity with the full model and return its record. ``tokenizer``: the model's
    (or processor); ``tasks``: the first is the default; ``base``: ``{"id", "hash", "adapter", "source"}``
    of the base model; the options as :func:`prune`. The model is released before the reload (a caller
    that holds it holds the pruned model)."""
    tasks = list(tasks)
    check_model(model, tasks, keep_lm_head, export)
    depth = max(task.layer for task in tasks)
    with write_output(out_dir, PRUNED, overwrite=overwrite) as tmp:
        base_record = BaseModel(id=str(base["id"]), hash=base.get("hash"), adapter=base.get("adapter"),
                                model_type=model.config.model_type, num_blocks=num_blocks(model),
                                hidden_size=int(text_config(model.config).hidden_size), source=base.get("source"))
        dtype, device, before = next(model.parameters()).dtype, model_device(model), param_stats(model)
        references = parity_references(model, tokenizer, tasks)
        truncate_(model, depth)
        if not is_streamed(model):  # only never-read blocks were offloaded, and they are gone: an ordinary model
            settle_(model)
        elif export:
            raise ChipTuningError("--export sequence-classification folds the chip into weights in memory; the kept "
                                  "blocks are streamed here: use --offload none (they must fit in memory)")
        to_save, cls = model_to_save(model, tokenizer, tasks[0], keep_lm_head, export)
        streamed = is_streamed(to_save)
        save_weights(to_save, tmp)
        tokenizer.save_pretrained(tmp)
        after, architecture = pruned_stats(to_save, keep_lm_head, export), type(to_save).__name__
        del model, to_save  # free the full model before reloading the pruned one
        entries, figures = save_chips(tmp, tasks, allow_pickle)
        record = CheckpointRecord(
            base_model=base_record, layer=depth, num_blocks=base_record.num_blocks, architecture=architecture,
            keep_lm_head=keep_lm_head, export=export, dtype=str(dtype).replace("torch.", ""),
            feature_mode=tasks[0].feature_mode,
            tokenizer=TokenizerSettings(padding_side="right", max_length=tasks[0].cache_meta.max_length),
            default_task=tasks[0].name, tasks=entries, figures=figures,
            params=PruneParams(before=before, after=after, pruning_ratio=1 - after["total"] / before["total"],
                               removed={"blocks": int(sum(before["blocks"][depth:])),
                                        "lm_head": 0 if keep_lm_head else int(before["lm_head"])}),
        )
        write_model_card(tmp, record)
        record = write_provenance(tmp, record)
        verify_checkpoint(tmp, tasks, references, depth, dtype, device, cls, stream=streamed)
    log.info("pruned checkpoint at layer %d of %d written to %s (%.1f%% of parameters removed)",
             depth, record.num_blocks, out_dir, 100 * record.params.pruning_ratio)
    return record


# -- the steps of write_pruned --------------------------------------------------------------------

def check_model(model, tasks: list[PrunedTask], keep_lm_head: bool, export: str | None) -> None:
    """Refuse what ``model`` cannot be pruned into: the options, each task's layer, a missing head."""
    check_options(tasks, keep_lm_head, export)
    for task in tasks:
        check_layer(task.layer, num_blocks(model))
    if keep_lm_head and model.get_output_embeddings() is None:
        raise ChipTuningError(f"keep_lm_head needs the model with its head (*ForCausalLM), got {type(model).__name__}")
    if export and get_spec(model).reads_images:
        raise ChipTuningError(f"--export sequence-classification is for text models; {model.config.model_type} "
                              "reads images: leave --export out (ChipModel serves the checkpoint)")


def inputs_features(model, inputs: EncodedInputs, layer: int, mode: str = "raw") -> np.ndarray:
    """feature(layer) of encoded inputs (text or images) as one batch, float32 (B, H)."""
    feats = batch_features(model, inputs.batch(range(len(inputs)), model_device(model)), layers=[layer], mode=mode)
    return feats[:, 0].float().cpu().numpy()


def parity_references(model, tokenizer, tasks: list[PrunedTask]) -> dict[tuple[str, int], np.ndarray]:
    """The full model's feature at each task's exit layers on :func:`parity_inputs`: (task, layer) -> (B, H)."""
    inputs = parity_inputs(model, tokenizer)
    return {(t.name, lay): inputs_features(model, inputs, lay, t.feature_mode)
            for t in tasks for lay, _ in t.exit_layers}


def model_to_save(model, tokenizer, task: PrunedTask, keep_lm_head: bool, export: str | None):
    """(the module to save, the class that reloads it): the backbone, the model with its head, or
    the ``*ForSequenceClassification`` model holding the chip."""
    if export:
        chip = task.chips.chip(task.layer)
        return (to_sequence_classification(model, tokenizer, chip, task.label_names, task.feature_mode),
                AutoModelForSequenceClassification)
    if keep_lm_head:
        return model, head_model_class(model)
    return base_model(model), AutoModel


def pruned_stats(saved, keep_lm_head: bool, export: str | None) -> dict:
    """:func:`~chiptuning.models.param_stats` of the saved model: a head only when one ships; an exported
    score head counts with the chip."""
    stats = param_stats(saved)
    if not keep_lm_head:  # the config still describes a head (param_stats counts it); none ships
        stats["total"] -= stats["lm_head"]
        stats["lm_head"] = 0
    if export:
        stats["other"] -= saved.score.weight.numel()
        stats["total"] -= saved.score.weight.numel()
    return stats


def save_chips(root: Path, tasks: list[PrunedTask], allow_pickle: bool) -> tuple[dict[str, TaskRecord], list[str]]:
    """Save each task's chip (and a cascade's earlier exits) and plots into ``root``: (the record's
    task entries, the plots' file names)."""
    entries, figures = {}, []
    for task in tasks:
        chip_dir = CHIP_DIR if len(tasks) == 1 else f"chips/{task.name}"
        task.chips.save_layer(task.layer, root / chip_dir, allow_pickle=allow_pickle)
        for lay, _ in task.exit_layers[:-1]:
            task.chips.save_layer(lay, root / chip_dir / "exits" / f"layer-{lay}", allow_pickle=allow_pickle)
        entries[task.name] = task_entry(task, chip_dir)
        for plot in ("layer_accuracy.png", "cascade.png"):
            source = Path(task.chips_dir) / plot if task.chips_dir is not None else None
            if source is not None and source.is_file() and (plot != "cascade.png" or task.cascade):
                name = plot if len(tasks) == 1 else f"{Path(plot).stem}-{task.name}.png"
                shutil.copy2(source, root / name)
                figures.append(name)
    return entries, figures


def task_entry(task: PrunedTask, chip_dir: str) -> TaskRecord:
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
    return TaskRecord(
        chip_dir=chip_dir, layer=task.layer, strategy=task.strategy, feature_mode=task.feature_mode,
        task=source, template=source.get("template"), text_column=source.get("text_column"),
        label_names=task.label_names, cache_meta=task.cache_meta,
        cache_fingerprint=task.chips.record.train_cache.fingerprint if task.chips.record.train_cache else None,
        chips=task.chips.record, chip_metrics=MetricRow.from_dict(metrics, "metrics") if metrics else None,
        cascade=cascade,
    )


def save_weights(model, directory: Path) -> None:
    """``model.save_pretrained`` in shards of at most :data:`SHARD_SIZE`; a streamed model's weights are
    read from their files one shard at a time, into the shards an in-memory save fills."""
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


def _check_close(reference: np.ndarray, pruned: np.ndarray, dtype: torch.dtype, what: str) -> None:
    tolerance = (CHECK_ATOL_FP32 if dtype == torch.float32 else 1e-2) * max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(reference - pruned).max())
    if not err <= tolerance:
        raise ChipTuningError(f"parity check failed: the pruned checkpoint's {what} differs from the full model's by "
                              f"{err:.3g} (tolerance {tolerance:.3g}); this is a bug, please report it")


def reload_pruned(path: Path, cls, depth: int, unclean: Callable[[dict], str], *, stream: bool = False,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Reload the pruned checkpoint ``path`` with ``cls`` (``stream``: its blocks streamed, the rest on
    ``device``; else in memory on the CPU), in eval mode; ChipTuningError (``unclean(bad)``) for
    missing, unexpected or mismatched weights, or when it has another depth than ``depth``."""
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if stream:
        skeleton = empty_model(AutoConfig.from_pretrained(path), cls is not AutoModel)
        # weights transformers converts on load (fused experts) are written there, for the model's lifetime
        scratch = tempfile.TemporaryDirectory(prefix="chiptuning-offload-")
        kwargs.update(device_map=stream_device_map(skeleton, torch.device(device), range(depth)),
                      offload_folder=scratch.name)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ChipTuningError(unclean(bad))
    if num_blocks(model) != depth or len(get_blocks(model)) != depth:
        raise ChipTuningError(f"the reloaded checkpoint has {len(get_blocks(model))} blocks, expected {depth}")
    if stream:
        model.chiptuning_offload_dir = scratch  # removed with the model
    return model.eval()


def verify_checkpoint(path: Path, tasks: Sequence[PrunedTask], references: dict[tuple[str, int], np.ndarray],
                      depth: int, dtype: torch.dtype, device, cls, stream: bool = False) -> None:
    """Reload ``path`` as users will (streamed, when the pruned model was) and compare every task's feature
    and chip predictions with the full model's ``references``; ChipTuningError for unclean weights or a
    feature that differs."""
    model = reload_pruned(path, cls, depth, lambda bad: f"the pruned checkpoint does not reload cleanly: {bad}; "
                          "this is a bug, please report it", stream=stream, device=device, dtype=dtype)
    model = model if stream else model.to(device)
    tokenizer = load_preprocessor(str(path))
    check_inputs = parity_inputs(model, tokenizer)
    for task in tasks:
        for lay, _ in task.exit_layers:
            reference = references[(task.name, lay)]
            pruned = inputs_features(model, check_inputs, lay, task.feature_mode)
            _check_close(reference, pruned, dtype, f"feature({lay})")
            chip = task.chips.chip(lay)
            if dtype == torch.float32 and not np.array_equal(chip.predict(reference), chip.predict(pruned)):
                raise ChipTuningError("parity check failed: the chip predicts differently on the pruned model's "
                                      "feature")
        if cls is AutoModelForSequenceClassification:
            with torch.no_grad():  # one prompt at a time: HF pooling, no padding involved
                probs = torch.cat([model(**tokenizer(p, return_tensors="pt").to(device)).logits
                                   for p in CHECK_PROMPTS]).float().softmax(-1).cpu().numpy()  # (B, C)
            expected = task.chips.chip(task.layer).predict_proba(references[(task.name, task.layer)])
            _check_close(np.asarray(expected), probs, dtype, "sequence-classification probabilities")


__all__ = ["PrunedTask", "load_task_chips", "prune", "resolve_layer", "save_pruned", "save_weights", "write_pruned"]
