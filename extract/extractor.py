"""One pass over a task: feature(l) at the last real token of every prompt, every layer, to a cache.

Tokenize everything once, plan batches (dataset order, or sorted by length under a token budget),
run the backbone with hooks that keep only each layer's last-token row, and hand those (B, L+1, H)
rows to a writer thread, so the device never waits for the disk; an out-of-memory batch is split
in two. Image data goes to a vision-language model the same way, through its processor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from chiptuning.cache import CacheMeta, CacheWriter, merge_rank_manifests
from chiptuning.encoding import EncodedInputs, TextInputs, plan_batches, resolve_token_budget
from chiptuning.errors import ChipTuningError
from chiptuning.features import FEATURE_MODES, last_token_features
from chiptuning.models import (
    load_config,
    load_model,
    load_preprocessor,
    model_device,
    model_source,
    param_stats,
    weights_hash,
)
from chiptuning.outputs import CACHE, check_output
from chiptuning.progress import progress_bar
from chiptuning.registry import get_spec, num_blocks, text_config
from chiptuning.tasks import TaskData
from chiptuning.vision import ImageInputs, check_images, check_modality, processor_identity
from chiptuning.zeroshot import LabelWords, label_words, lens_logits

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Settings of one extraction: the options of ``chiptuning extract``, by name."""

    out: str
    model: str
    dtype: str = "fp32"
    device: str = "auto"  # not part of the fingerprint, nor is batch_size
    batch_size: int | None = 16  # None: 16 for fixed batches, 1024 under a token budget (which then limits a batch)
    max_tokens_per_batch: int | str = 0  # length-sorted batches; 0: fixed ones; "auto": by free GPU memory, 8192 on CPU
    max_length: int | None = None  # None: the model's limit; image prompts are never cut
    padding_side: str = "right"  # positions come from the attention mask either way
    storage_dtype: str = "float32"  # bfloat16 stores bf16 features exactly; float16 is checked for overflow
    feature_mode: str = "raw"  # raw: the layer convention; normed: with the final norm applied
    shard_size: int = 1024
    device_map: str | None = None  # "auto" spreads a model larger than one GPU
    offload: str = "auto"  # stream the blocks when the weights do not fit the device (load_model); same features
    adapter: str | None = None  # a PEFT adapter merged into the model first
    lens: bool = True  # decoders: also store the LM head's logits of the label words at every layer
    progress: bool = False
    model_hash: str | None = None  # identity of the weights, when known (else weights_hash)

    def validate(self) -> None:
        """ChipTuningError naming the first setting out of its range."""
        budget = self.max_tokens_per_batch
        for ok, rule, value in (
            (budget == "auto" or (isinstance(budget, int) and budget >= 0), "--max-tokens-per-batch must be 'auto' "
             "or an integer >= 0", budget),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1", self.batch_size),
            (self.padding_side in ("left", "right"), "--padding-side must be left or right", self.padding_side),
            (self.feature_mode in FEATURE_MODES, f"--feature-mode must be one of {FEATURE_MODES}", self.feature_mode),
            (self.shard_size >= 1, "--shard-size must be >= 1", self.shard_size),
            (self.max_length is None or self.max_length >= 1, "--max-length must be >= 1 token", self.max_length),
        ):
            if not ok:
                raise ChipTuningError(f"{rule}, got {value!r}")


def features_for_batch(model, inputs: EncodedInputs, rows: list[int], device, mode, words: LabelWords | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Features of the inputs at ``rows`` as one batch, (B, L+1, H) float32, and with ``words`` the
    label-word logits of every layer, (B, L+1, K) (else None); out of memory, the batch is split."""
    try:
        batch = inputs.batch(rows, device)
        feats = last_token_features(model, batch.input_ids, batch.attention_mask, mode=mode, **batch.other_inputs)
        lens = None if words is None else lens_logits(model, feats, words, normed=mode == "normed").cpu().numpy()
        return feats.float().cpu().numpy(), lens
    except (torch.OutOfMemoryError, RuntimeError) as err:
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        if not oom or len(rows) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", len(rows), half, len(rows) - half)
        first = features_for_batch(model, inputs, rows[:half], device, mode, words)
        second = features_for_batch(model, inputs, rows[half:], device, mode, words)
        return np.concatenate([first[0], second[0]]), None if words is None else np.concatenate([first[1], second[1]])


def _prompts_hash(prompts: list[str], examples: list) -> str:
    digest = hashlib.sha256()
    for prompt, example in zip(prompts, examples):
        digest.update(prompt.encode())
        digest.update(b"\x00%d\x00" % example.label)
    return digest.hexdigest()[:16]


def default_max_length(tokenizer, model) -> int | None:
    """The model's context limit where one is known (tokenizers often report 1e30)."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min((int(x) for x in limits if x), default=None)


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under ``torchrun`` / ``accelerate launch``, the default process
    group initialised (NCCL on GPUs, gloo on CPU); (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


@dataclass
class Prepared:
    """A task ready to run: its encoded inputs, the lens' label words (or None), the cache's meta, the
    number of prompts cut, the last tokens of the first prompts (the cache's report)."""

    inputs: EncodedInputs
    words: LabelWords | None
    meta: CacheMeta
    n_long: int
    preview: list[dict]


def extract(config: ExtractConfig, task: TaskData, model=None, tokenizer=None) -> Path:
    """Extract the last-token feature of every layer for every example of ``task`` (text, or images
    for a vision-language model) into the cache ``config.out`` and return its path.

    ``model`` and ``tokenizer`` (a vision-language model's processor) are loaded from
    ``config.model`` unless given. Re-running the same call resumes after the last complete shard;
    a cache of other settings is refused. Under ``torchrun`` each rank takes every world_size-th
    batch and writes its own shards and manifest part; rank 0 joins the parts at the end.
    """
    config.validate()
    rank, world_size, local_rank = distributed_context()
    check_output(config.out, CACHE)  # before anything is loaded: a foreign --out is refused at once
    _barrier(world_size)  # every rank checks before any rank writes
    if world_size > 1 and config.device in ("auto", "cuda") and torch.cuda.is_available():
        config.device = f"cuda:{local_rank}"
    model, tokenizer, images = load(config, task, model, tokenizer)
    run = prepare(config, task, model, tokenizer, images)
    device = model_device(model)
    budget = resolve_token_budget(config.max_tokens_per_batch, model, device)
    batches = plan_batches(run.inputs.lengths, config.batch_size or (1024 if budget else 16), budget)[rank::world_size]
    writer = CacheWriter(
        config.out, run.meta, n_rows=len(task.examples), layers=run.meta.layers, hidden_size=run.meta.hidden_size,
        storage_dtype=config.storage_dtype, shard_size=config.shard_size, rank=rank, world_size=world_size,
        extra={"model_stats": param_stats(model), "n_shortened": run.n_long, "preview": run.preview},
    )
    with writer:  # the cache's lock, released however this ends
        complete = writer.complete
        if complete:
            log.info("cache %s is already complete (fingerprint %s)", config.out, writer.fingerprint)
        else:
            write_features(writer, model, run, task, batches, config, progress=config.progress and rank == 0)
            writer.close(expected_rows=sum(len(b) for b in batches) if world_size > 1 else None)
    _barrier(world_size)
    if rank == 0 and world_size > 1 and not (complete and (Path(config.out) / "manifest.json").exists()):
        merge_rank_manifests(config.out, world_size)
    _barrier(world_size)
    return Path(config.out)


def load(config: ExtractConfig, task: TaskData, model, tokenizer) -> tuple[Any, Any, tuple | None]:
    """(model, tokenizer or processor, for image data (the images' sha256, sizes) else None), loaded
    where not given; the modality and every image are checked before the weights load."""
    model_config = model.config if model is not None else load_config(config.model)
    check_modality(model_config, task, config.model)
    if tokenizer is None:
        tokenizer = load_preprocessor(config.model, padding_side=config.padding_side)
    images = check_images(task.images()) if get_spec(model_config).reads_images else None
    if model is None:
        # A decoder comes with its LM head: the lens applies it to every layer's feature.
        model = load_model(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                           offload=config.offload, adapter=config.adapter,
                           causal_lm=config.lens and get_spec(model_config).decoder)
    return model, tokenizer, images


def prepare(config: ExtractConfig, task: TaskData, model, tokenizer, images: tuple | None) -> Prepared:
    """Build and encode the prompts of ``task`` (text cut on the left under the model's limit; images
    whole) and describe the cache they make."""
    text_tokenizer = tokenizer.tokenizer if images else tokenizer
    if images:
        if config.max_length:
            log.warning("--max-length %d is ignored: image prompts are never cut (the image tokens must stay whole)",
                        config.max_length)
        max_length = None
        prompts, n_long = task.build_prompts(tokenizer)
        inputs: EncodedInputs = ImageInputs(tokenizer, prompts, task.images(), images[1])
    else:
        limit = default_max_length(tokenizer, model)
        if config.max_length is not None and limit is not None and config.max_length > limit:
            raise ChipTuningError(f"--max-length {config.max_length} is more than {config.model} can read ({limit} "
                                  "tokens); give at most that, or leave --max-length out")
        max_length = config.max_length or limit
        prompts, n_long = task.build_prompts(tokenizer, max_length)
        inputs = TextInputs(tokenizer, prompts, max_length, config.padding_side)  # left truncation keeps "Answer:"
    has_head = get_spec(model).decoder and model.get_output_embeddings() is not None
    words = label_words(text_tokenizer, task.label_names) if config.lens and has_head else None
    L = num_blocks(model)
    meta = CacheMeta(
        model=config.model, model_hash=config.model_hash or weights_hash(config.model, model),
        model_type=model.config.model_type, adapter=config.adapter,
        tokenizer=getattr(text_tokenizer, "name_or_path", None), task=task.describe(),
        label_names=list(task.label_names), prompts_sha256=_prompts_hash(prompts, task.examples), max_length=max_length,
        pooling="last_token", feature_mode=config.feature_mode,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), storage_dtype=config.storage_dtype,
        layers=list(range(L + 1)), num_blocks=L, hidden_size=int(text_config(model.config).hidden_size),
        model_source=model_source(config.model), lens=None if words is None else words.to_dict(),
        processor=processor_identity(tokenizer) if images else None, images_sha256=images[0] if images else None,
    )
    tokens = [text_tokenizer.convert_ids_to_tokens(inputs.token_ids(i)[-6:]) for i in range(min(3, len(prompts)))]
    preview = [{"id": ex.id, "last_tokens": last, "chip_reads": last[-1]} for ex, last in zip(task.examples, tokens)]
    return Prepared(inputs, words, meta, n_long, preview)


def write_features(writer: CacheWriter, model, run: Prepared, task: TaskData, batches: list[list[int]],
                   config: ExtractConfig, progress: bool) -> None:
    """Run ``model`` over the batches the cache lacks; a thread writes their rows (two batches wait at most)."""
    done = writer.done_indices()
    # Whole batches are recomputed unless all their rows are stored, so a resumed run computes
    # exactly the batches an uninterrupted one would (bit-identical features).
    todo = [b for b in batches if not all(i in done for i in b)]
    device, lengths = model_device(model), run.inputs.lengths
    log.info("extracting %d examples (%d to go) from %s: %d layers x %d, %d batch%s on %s", len(task.examples),
             sum(len(b) for b in todo), config.model, len(run.meta.layers), run.meta.hidden_size, len(todo),
             "" if len(todo) == 1 else "es", device)
    if run.n_long:
        log.warning("%d prompts were longer than max_length=%d tokens", run.n_long, run.meta.max_length)
    started = time.perf_counter()
    bar = progress_bar(sum(len(b) for b in todo), "extract", enabled=progress)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for batch in todo:
            feats, lens = features_for_batch(model, run.inputs, batch, device, config.feature_mode, run.words)
            keep = [k for k, i in enumerate(batch) if i not in done]
            rows = [batch[k] for k in keep]
            pending.append(pool.submit(
                writer.write, np.array(rows), feats[keep], np.array([task.examples[i].label for i in rows]),
                [task.examples[i].id for i in rows], np.array([lengths[i] for i in rows]),
                np.array([task.examples[i].n_choices for i in rows]), None if lens is None else lens[keep],
            ))
            if len(pending) > 2:
                pending.pop(0).result()
            bar.update(len(batch))
        for future in pending:
            future.result()
    bar.close()
    log.info("extraction finished in %.1fs: %s", time.perf_counter() - started, config.out)
