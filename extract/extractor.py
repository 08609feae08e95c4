"""One pass over a task: feature(l) at the last real token of every prompt, every layer, to a cache.

The hot loop: tokenize everything once, plan batches (dataset order or sorted by length under a
token budget), run the backbone with hooks that keep only the last-token row of each layer, move
those (B, L+1, H) rows to the CPU, and hand them to a background writer thread so the device
never waits for the disk. An out-of-memory batch is split in two and retried.

Image data goes to a vision-language model the same way: its processor encodes each batch (the
images are decoded one batch at a time), the hooks sit on the language model's blocks, and every
image is read and decoded once up front (:func:`chiptuning.vision.check_images`), so a bad file
stops the run in one line before anything is computed and the fingerprint covers the image bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
    """Settings of one extraction (``chiptuning extract``).

    Attributes:
        out: cache directory (``--out``).
        model: hub id or local directory (``--model``).
        dtype: compute dtype of the model: fp32, bf16 or fp16 (``--dtype``).
        device: cpu, cuda, cuda:N or auto (``--device``); not part of the fingerprint.
        batch_size: most examples per batch (``--batch-size``); not part of the fingerprint. None:
            16 for fixed batches, 1024 under a token budget (the budget is then what limits a batch).
        max_tokens_per_batch: token budget per batch, examples sorted by length (``--max-tokens-per-batch``);
            0 = fixed batches in dataset order; "auto" = sized from free GPU memory on CUDA
            (:func:`chiptuning.encoding.auto_token_budget`), 8192 tokens on CPU.
        max_length: longest prompt in tokens (``--max-length``); default the model's limit. Image
            prompts are never cut.
        padding_side: left or right (``--padding-side``); positions come from the mask either way.
        storage_dtype: float32, bfloat16 (exact bits) or float16 (checked) (``--storage-dtype``).
        feature_mode: raw (layer convention) or normed (final norm applied) (``--feature-mode``).
        shard_size: rows per HDF5 shard (``--shard-size``).
        device_map: "auto" to spread a model larger than one GPU (``--device-map``).
        offload: "auto" (default: stream the blocks when the weights do not fit the device),
            "stream" or "none" (``--offload``): a streamed model reads each block from its files
            once per batch, and the batches are as large as memory allows
            (:func:`chiptuning.models.load_model`); the features are the same.
        adapter: PEFT adapter merged into the model first (``--adapter``).
        lens: for decoders, also store the LM head's logits of the label words at every layer
            (``--lens/--no-lens``; a few numbers per row, see :mod:`chiptuning.zeroshot`): the
            model's own answer at each depth, and at layer L its zero-shot answer.
        progress: show a progress bar.
        model_hash: identity of the weights when ``model`` is not a path or hub id (an in-memory
            model); default computed by :func:`chiptuning.models.weights_hash`.
    """

    out: str
    model: str
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int | None = 16
    max_tokens_per_batch: int | str = 0
    max_length: int | None = None
    padding_side: str = "right"
    storage_dtype: str = "float32"
    feature_mode: str = "raw"
    shard_size: int = 1024
    device_map: str | None = None
    offload: str = "auto"
    adapter: str | None = None
    lens: bool = True
    progress: bool = False
    model_hash: str | None = None

    def validate(self) -> None:
        if self.max_tokens_per_batch != "auto" and (
                not isinstance(self.max_tokens_per_batch, int) or self.max_tokens_per_batch < 0):
            raise ChipTuningError(
                f"--max-tokens-per-batch must be 'auto' or an integer >= 0, got {self.max_tokens_per_batch!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ChipTuningError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.padding_side not in ("left", "right"):
            raise ChipTuningError(f"--padding-side must be left or right, got {self.padding_side!r}")
        if self.feature_mode not in FEATURE_MODES:
            raise ChipTuningError(f"--feature-mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if self.shard_size < 1:
            raise ChipTuningError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ChipTuningError(f"--max-length must be >= 1 token, got {self.max_length}")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def features_for_batch(model, inputs: EncodedInputs, rows: list[int], device, mode, words: LabelWords | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Features of the inputs at ``rows`` as one batch, (B, L+1, H) float32, and with ``words`` the
    label-word logits of every layer, (B, L+1, K) float32 (else None); splits the batch in two on
    out-of-memory."""
    try:
        batch = inputs.batch(rows, device)
        feats = last_token_features(model, batch.input_ids, batch.attention_mask, mode=mode, **batch.extra)  # (B, L+1, H)
        lens = None if words is None else lens_logits(model, feats, words, normed=mode == "normed").cpu().numpy()
        return feats.float().cpu().numpy(), lens
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err) or len(rows) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", len(rows), half, len(rows) - half)
        first = features_for_batch(model, inputs, rows[:half], device, mode, words)
        second = features_for_batch(model, inputs, rows[half:], device, mode, words)
        return (np.concatenate([first[0], second[0]]),
                None if words is None else np.concatenate([first[1], second[1]]))


def _prompts_hash(prompts: list[str], labels: list[int]) -> str:
    digest = hashlib.sha256()
    for prompt, label in zip(prompts, labels):
        digest.update(prompt.encode())
        digest.update(b"\x00%d\x00" % label)
    return digest.hexdigest()[:16]


def default_max_length(tokenizer, model) -> int | None:
    """The model's context limit where one is known (tokenizers often report 1e30)."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limits.append(tok_limit)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under ``torchrun`` / ``accelerate launch``; (0, 1, 0) otherwise.

    Initialises the default process group (NCCL on GPUs, gloo on CPU) when the launcher set
    ``WORLD_SIZE`` > 1 and nobody has yet.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def extract(config: ExtractConfig, task: TaskData, model=None, tokenizer=None) -> Path:
    """Extract the last-token feature of every layer for every example of ``task`` into a cache.

    Args:
        config: the settings (see :class:`ExtractConfig`).
        task: the examples and their prompt template (text, or images for a vision-language model).
        model, tokenizer: already-loaded objects (tests, notebooks); loaded from ``config.model``
            when None. For a vision-language model ``tokenizer`` is its processor.

    Under ``torchrun`` / ``accelerate launch`` each rank takes every world_size-th batch, writes its
    own shards and manifest part, and rank 0 joins the parts into one manifest at the end.

    Returns:
        The cache directory. Re-running the same call resumes after the last complete shard;
        a cache made with other settings is refused.
    """
    config.validate()
    rank, world_size, local_rank = distributed_context()
    check_output(config.out, CACHE)  # before anything is loaded: a foreign --out is refused at once
    _barrier(world_size)  # every rank checks before any rank writes
    if world_size > 1 and config.device in ("auto", "cuda") and torch.cuda.is_available():
        config.device = f"cuda:{local_rank}"
    model_config = model.config if model is not None else load_config(config.model)
    check_modality(model_config, task, config.model)  # before loading weights or reading images
    images = get_spec(model_config).images
    if tokenizer is None:
        tokenizer = load_preprocessor(config.model, padding_side=config.padding_side)
    if images:  # every image read and decoded once, before the weights load: a bad one fails here
        images_sha256, sizes = check_images(task.images())
    if model is None:
        # Decoders come with their LM head (the lens applies it to every layer's feature).
        causal_lm = config.lens and get_spec(model_config).decoder
        model = load_model(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                           offload=config.offload,
                           adapter=config.adapter, causal_lm=causal_lm)
    get_spec(model)
    device = model_device(model)
    L = num_blocks(model)
    layers = list(range(L + 1))
    hidden = int(text_config(model.config).hidden_size)
    text_tokenizer = tokenizer.tokenizer if images else tokenizer

    if images:
        if config.max_length:
            log.warning("--max-length %d is ignored: image prompts are never cut (the image tokens must stay whole)",
                        config.max_length)
        max_length = None  # image prompts are never cut (the image tokens must stay whole)
        prompts, n_long = task.build_prompts(tokenizer)
        inputs: EncodedInputs = ImageInputs(tokenizer, prompts, task.images(), sizes)
    else:
        images_sha256 = None
        limit = default_max_length(tokenizer, model)
        if config.max_length is not None and limit is not None and config.max_length > limit:
            raise ChipTuningError(f"--max-length {config.max_length} is more than {config.model} can read ({limit} "
                                  "tokens); give at most that, or leave --max-length out")
        max_length = config.max_length or limit
        prompts, n_long = task.build_prompts(tokenizer, max_length)
        inputs = TextInputs(tokenizer, prompts, max_length, config.padding_side)  # left truncation keeps "Answer:"
    lengths = inputs.lengths
    labels = [ex.label for ex in task.examples]
    has_head = get_spec(model).decoder and model.get_output_embeddings() is not None
    words = label_words(text_tokenizer, task.label_names) if config.lens and has_head else None
    meta = CacheMeta(
        model=config.model,
        model_hash=config.model_hash or weights_hash(config.model, model),
        model_type=model.config.model_type,
        adapter=config.adapter,
        tokenizer=getattr(text_tokenizer, "name_or_path", None),
        task=task.describe(),
        label_names=list(task.label_names),
        prompts_sha256=_prompts_hash(prompts, labels),
        max_length=max_length,
        pooling="last_token",
        feature_mode=config.feature_mode,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        storage_dtype=config.storage_dtype,
        layers=layers,
        num_blocks=L,
        hidden_size=hidden,
        model_source=model_source(config.model),
        lens=None if words is None else words.to_dict(),
        processor=processor_identity(tokenizer) if images else None,
        images_sha256=images_sha256,
    )
    preview = []
    for i in range(min(3, len(prompts))):
        ids = inputs.token_ids(i)
        preview.append({"id": task.examples[i].id, "last_tokens": text_tokenizer.convert_ids_to_tokens(ids[-6:]),
                        "chip_reads": text_tokenizer.convert_ids_to_tokens(ids[-1:])[0]})
    budget = resolve_token_budget(config.max_tokens_per_batch, model, device)
    batch_size = config.batch_size or (1024 if budget else 16)
    batches = plan_batches(lengths, batch_size, budget)
    batches = batches[rank::world_size]
    my_rows = sum(len(b) for b in batches)
    writer = CacheWriter(
        config.out, meta, n_rows=len(prompts), layers=layers, hidden_size=hidden,
        storage_dtype=config.storage_dtype, shard_size=config.shard_size,
        extra={"model_stats": param_stats(model), "n_shortened": n_long, "preview": preview},
        rank=rank, world_size=world_size,
    )
    with writer:  # the cache's lock, released however this ends
        if writer.complete:
            log.info("cache %s is already complete (fingerprint %s)", config.out, writer.fingerprint)
            _barrier(world_size)
            if rank == 0 and world_size > 1 and not (Path(config.out) / "manifest.json").exists():
                merge_rank_manifests(config.out, world_size)
            _barrier(world_size)
            return Path(config.out)
        done = writer.done_indices()
        # Whole batches are recomputed unless all their rows are stored, so a resumed run computes
        # exactly the batches an uninterrupted one would (bit-identical features).
        todo = [b for b in batches if not all(i in done for i in b)]
        log.info("extracting %d examples (%d to go) from %s: %d layers x %d, %d batch%s on %s",
                 len(prompts), sum(len(b) for b in todo), config.model, L + 1, hidden, len(todo),
                 "" if len(todo) == 1 else "es", device)
        if n_long:
            log.warning("%d prompts were longer than max_length=%d tokens", n_long, max_length)
        started = time.perf_counter()
        progress = None
        if config.progress and rank == 0:
            progress = progress_bar(sum(len(b) for b in todo), "extract")
        pending: list[Future] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for batch in todo:
                feats, lens = features_for_batch(model, inputs, batch, device, config.feature_mode, words)
                keep = [k for k, i in enumerate(batch) if i not in done]
                rows = [batch[k] for k in keep]
                pending.append(pool.submit(
                    writer.write, np.array(rows), feats[keep], np.array([labels[i] for i in rows]),
                    [task.examples[i].id for i in rows], np.array([lengths[i] for i in rows]),
                    np.array([task.examples[i].n_choices for i in rows]), None if lens is None else lens[keep],
                ))
                if len(pending) > 2:  # bounded queue: at most two batches wait for the disk
                    pending.pop(0).result()
                if progress is not None:
                    progress.update(len(batch))
            for future in pending:
                future.result()
        if progress is not None:
            progress.close()
        writer.close(expected_rows=my_rows if world_size > 1 else None)
    _barrier(world_size)
    if rank == 0 and world_size > 1:
        merge_rank_manifests(config.out, world_size)
    _barrier(world_size)
    log.info("extraction finished in %.1fs: %s", time.perf_counter() - started, config.out)
    return Path(config.out)
