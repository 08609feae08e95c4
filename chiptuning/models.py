"""Loading models, tokenizers and processors, and the facts about them that provenance records.

Shared by ``chiptuning.extract`` and ``chiptuning.prune`` so both identify a model the same way:
:func:`weights_hash` is what a cache records and what pruning checks. A vision-language model
loads with its own Auto classes (``AutoModel`` for the backbone with its vision tower,
``AutoModelForImageTextToText`` with the LM head) and comes with its processor
(:func:`load_processor`).

A model larger than memory is *streamed* (``offload="stream"``, or ``"auto"`` when its weights do
not fit): everything but its blocks is loaded, and each block's weights are read from the model's
own safetensors files as a forward reaches it and freed after (transformers' disk offload through
accelerate, the same loading code and the same tensors as an ordinary load, so the features are
the same bit for bit). A forward of a batch then reads every block once: the whole batch passes
block l before block l+1 is read.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import set_module_tensor_to_device
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from chiptuning.errors import ChipTuningError
from chiptuning.model_files import is_gguf, resolve_gguf, resolve_model_path
from chiptuning.registry import base_model, get_blocks, get_embedding, get_final_norm, get_spec, text_config

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_SAMPLE = 1 << 20
#: ``--offload``: none (every weight in memory), stream (the blocks read from the weight files as
#: each forward reaches them), auto (stream when the weights do not fit :func:`memory_budget`).
OFFLOAD_MODES = ("none", "stream", "auto")
#: The share of the available memory the weights may take before ``--offload auto`` streams them.
WEIGHTS_SHARE = 0.7


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ChipTuningError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16") from None


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) -> cuda if available else cpu; refuses cuda without a GPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChipTuningError(f"--device {name} but no CUDA device is available; use --device cpu")
    return torch.device(name)


def weights_hash(model_name_or_path: str, model=None) -> str:
    """Identify a checkpoint's weights.

    GGUF file: its sha256. Local directory: sha256 over each weight file's name, size and
    first/last MiB (cheap on a 13 GB checkpoint, and changes when any file is replaced). Hub id:
    the commit hash the weights were loaded from. Otherwise (an in-memory model), a hash of every
    parameter.
    """
    if is_gguf(model_name_or_path):
        return "gguf:" + resolve_gguf(model_name_or_path).sha256[:16]
    path = Path(model_name_or_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if files:
            digest = hashlib.sha256()
            for file in files:
                size = file.stat().st_size
                digest.update(f"{file.name}:{size}".encode())
                with open(file, "rb") as f:
                    digest.update(f.read(_SAMPLE))
                    if size > _SAMPLE:
                        f.seek(max(size - _SAMPLE, _SAMPLE))
                        digest.update(f.read(_SAMPLE))
            return "files:" + digest.hexdigest()[:16]
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit:
        return "commit:" + commit
    if model is not None:
        return "params:" + params_hash(model)
    return "unknown"


def params_hash(model) -> str:
    """sha256 (16 hex digits) of every parameter and buffer of an in-memory model."""
    if is_streamed(model):
        raise ChipTuningError("a streamed model's weights are hashed from its files: give its directory, hub id or "
                              "GGUF file, not only the model object")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def param_stats(model) -> dict:
    """Parameter counts by part, from the model itself (used for pruning ratios).

    Returns:
        {"embedding": ..., "blocks": [per block], "final_norm": ..., "lm_head": ..., "other": ...,
        "total": ...}. ``lm_head`` counts an untied output projection even when the loaded model
        has none (``AutoModel``), from the config, since the full model ships it.
    """
    blocks = [_count(block) for block in get_blocks(model)]
    norm = _count(get_final_norm(model))
    embedding = _count(get_embedding(model))
    backbone_total = sum(p.numel() for p in model.parameters())
    lm_head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    text = text_config(config)  # a vision-language model's vocabulary and width are its text model's
    tied = bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
    if lm_head_module is not None:
        lm_head = 0 if tied else _count(lm_head_module)
        backbone_total -= _count(lm_head_module) if not tied else 0
    elif get_spec(model).decoder and not tied:
        lm_head = int(text.vocab_size) * int(text.hidden_size)
    else:
        lm_head = 0
    other = backbone_total - embedding - sum(blocks) - norm
    return {
        "embedding": embedding,
        "blocks": blocks,
        "final_norm": norm,
        "lm_head": lm_head,
        "other": other,
        "total": embedding + sum(blocks) + norm + lm_head + other,
    }


def model_source(model_name_or_path: str) -> dict | None:
    """Where the weights came from when that is more than a name: a GGUF file's name, sha256 and
    quantization (recorded by caches and checkpoints); None for hub ids and directories."""
    return resolve_gguf(model_name_or_path).to_dict() if is_gguf(model_name_or_path) else None


def load_tokenizer(model_name_or_path: str, padding_side: str = "right"):
    """Tokenizer with a pad token (eos or unk when the model has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot load a tokenizer from {model_name_or_path!r}: {str(err).splitlines()[0]}") from None
    return _padded(tokenizer, model_name_or_path, padding_side)


def _padded(tokenizer, model_name_or_path: str, padding_side: str):
    """``tokenizer`` with a pad token (eos or unk when it has none), padding on ``padding_side``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ChipTuningError(f"tokenizer of {model_name_or_path!r} has no pad, eos or unk token")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_processor(model_name_or_path: str, padding_side: str = "right"):
    """A vision-language model's processor (image processor + tokenizer + chat template), with a
    pad token, padding on ``padding_side``.

    The image processor is always the PIL/numpy one (``backend="pil"``), whether torchvision is
    installed or not, so that a cache and the checkpoint serving its chip see the same pixels on
    every machine.

    Raises:
        ChipTuningError: no processor there, or a tokenizer without a pad, eos or unk token.
    """
    path = resolve_model_path(model_name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        if not type(processor.image_processor).__name__.endswith("Pil"):
            processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ChipTuningError(f"cannot load the processor of {model_name_or_path!r} (a vision-language model "
                              f"needs one): {str(err).splitlines()[0]}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ChipTuningError(f"the processor of {model_name_or_path!r} ({type(processor).__name__}) has no "
                              "tokenizer or no image processor")
    _padded(tokenizer, model_name_or_path, padding_side)
    return processor


def load_preprocessor(model_name_or_path: str, padding_side: str = "right"):
    """What turns inputs into the model's inputs: the tokenizer (:func:`load_tokenizer`), or for a
    vision-language model its processor (:func:`load_processor`)."""
    loader = load_processor if get_spec(load_config(model_name_or_path)).images else load_tokenizer
    return loader(model_name_or_path, padding_side=padding_side)


def head_model_class(model_or_config):
    """The Auto class of a registered model *with* its LM head: ``AutoModelForImageTextToText``
    for a vision-language model, ``AutoModelForCausalLM`` otherwise."""
    return AutoModelForImageTextToText if get_spec(model_or_config).images else AutoModelForCausalLM


# -- PEFT adapters ---------------------------------------------------------------------------------
# An adapter saved from a ``*ForCausalLM`` names its weights ``base_model.model.model.layers...``;
# one saved from a bare backbone ``base_model.model.layers...``. Applied to the other class, PEFT
# finds no module for them and only warns, so the "fine-tuned" model silently stays the base
# model. :func:`load_model` therefore merges on the class the adapter was saved from and refuses an
# adapter whose weights do not all land.

_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        # peft is optional (only --adapter needs it): imported on first use.
        import peft
        from peft.utils import load_peft_weights
    except ImportError:
        raise ChipTuningError("--adapter needs the peft package: pip install peft") from None
    return peft, load_peft_weights


def adapter_keys(adapter: str) -> list[str]:
    """Names of the adapter's weights as saved (``base_model.model.<param path>``)."""
    _, load_peft_weights = _peft()
    try:
        return sorted(load_peft_weights(adapter, device="cpu"))
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot read adapter {adapter!r}: {str(err).splitlines()[0]}") from None


def saved_from_head_model(adapter: str, backbone_prefix: str) -> bool:
    """True if the adapter was saved from a model with a head (its names go through the backbone)."""
    keys = [k[len(_PEFT_PREFIX):] for k in adapter_keys(adapter) if k.startswith(_PEFT_PREFIX)]
    return bool(keys) and all(k.startswith(backbone_prefix + ".") for k in keys)


def merge_adapter_(model, adapter: str):
    """Apply ``adapter`` to ``model`` in place and merge it into the weights; returns the merged model.

    Raises:
        ChipTuningError: adapter weights that find no module in ``model``.
    """
    peft, _ = _peft()
    expected = adapter_keys(adapter)
    wrapped = peft.PeftModel.from_pretrained(model, adapter)
    loaded = {key.replace(".default", "") for key in wrapped.state_dict()}
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise ChipTuningError(
            f"adapter {adapter!r} does not fit {type(model).__name__}: {len(missing)} of {len(expected)} "
            f"weights have no place (first: {missing[0]}); was it trained on another model?"
        )
    merged = wrapped.merge_and_unload()
    log.info("merged adapter %s (%d weights) into %s", adapter, len(expected), type(model).__name__)
    return merged


# -- loading ---------------------------------------------------------------------------------------

def load_config(model_name_or_path: str):
    """The model's config, with an architecture the registry knows.

    Raises:
        ChipTuningError: no such model; UnsupportedModelError naming an unknown model type.
    """
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot load model {model_name_or_path!r}: {str(err).splitlines()[0]}") from None
    get_spec(config)
    return config


@contextlib.contextmanager
def quiet(logger: str):
    """Within the block, ``logger`` says only errors."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: a GPU's free memory, else the system's available
    memory (``MemAvailable``; the physical memory where that cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_device(model) -> torch.device:
    """Where ``model`` computes: the device of its first weight in memory (a streamed model's blocks
    wait on the meta device and are brought there when they run)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def is_streamed(model) -> bool:
    """Whether some of ``model``'s weights are read from its files as a forward reaches them (they
    wait on the meta device)."""
    return any(p.device.type == "meta" for p in model.parameters())


def materialize_(module) -> None:
    """Read every weight of ``module`` (a streamed model's block) into memory, on its execution
    device, and stop streaming it: it can then be copied, merged or trained like any module."""
    for sub in module.modules():  # accelerate hooks each submodule holding weights of its own
        hook = getattr(sub, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            continue
        device = getattr(hook, "execution_device", None) or "cpu"
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type == "meta":
                set_module_tensor_to_device(sub, name, device, value=weights[name])
    remove_hook_from_module(module, recurse=True)


def materialized_copy(block):
    """A copy of ``block`` with every weight in memory, ``block`` itself left as it is.

    A streamed block (:func:`is_streamed`) keeps streaming: only the copy reads its weights from
    the model's files (:func:`materialize_`), so a method that merges or trains blocks holds the
    blocks it makes, never the model's.
    """
    if not is_streamed(block):
        return copy.deepcopy(block)
    # The copy shares the hooks' index of the weight files instead of copying it; its own hooks
    # (copies) only tell materialize_ where to read from, and go with them.
    memo = {}
    for sub in block.modules():
        hook = getattr(sub, "_hf_hook", None)
        for shared in ("weights_map", "tied_params_map"):
            value = getattr(hook, shared, None)
            if value is not None:
                memo[id(value)] = value
    copied = copy.deepcopy(block, memo)
    materialize_(copied)
    return copied


def settle_(model) -> None:
    """Make a model whose weights are all in memory an ordinary one again: no loading hooks, no
    device map (after the streamed blocks were cut away)."""
    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map


def empty_model(config, causal_lm: bool = False):
    """The model of ``config`` with every parameter on the meta device (no memory): its structure."""
    cls = head_model_class(config) if causal_lm else AutoModel
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def weights_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s parameters in ``dtype``."""
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def module_path(root, target) -> str:
    """The dotted name of ``target`` inside ``root``."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ChipTuningError(f"{type(target).__name__} is not part of {type(root).__name__}; this is a bug")


def stream_device_map(skeleton, device: torch.device, streamed: range) -> dict[str, str]:
    """A device map for transformers: the blocks in ``streamed`` (0-based) on "disk" (read from the
    checkpoint's safetensors files when a forward reaches them), everything else on ``device``."""
    blocks = get_blocks(skeleton)
    path = module_path(skeleton, blocks).split(".")
    device_map, prefix, parent = {}, "", skeleton
    for part in path:
        if any(True for _ in parent.parameters(recurse=False)):
            raise ChipTuningError(f"{type(skeleton).__name__} keeps weights beside its blocks' container; it cannot be "
                                  "streamed (use --offload none)")
        for name, _ in parent.named_children():
            if name != part:
                device_map[prefix + name] = str(device)
        prefix, parent = f"{prefix}{part}.", getattr(parent, part)
    for i in range(len(blocks)):
        device_map[f"{prefix}{i}"] = "disk" if i in streamed else str(device)
    return device_map


def wants_stream(offload: str, config, dtype: torch.dtype, device: torch.device, causal_lm: bool) -> bool:
    """Whether ``offload`` streams the blocks: always for "stream", for "auto" when the weights
    would take more than :data:`WEIGHTS_SHARE` of the memory available on ``device``."""
    if offload not in OFFLOAD_MODES:
        raise ChipTuningError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if offload != "auto":
        return offload == "stream"
    needed, free = weights_bytes(empty_model(config, causal_lm), dtype), available_memory(device)
    stream = needed > WEIGHTS_SHARE * free
    log.log(logging.INFO if stream else logging.DEBUG, "--offload auto: the weights take %.1f GB, %.1f GB are "
            "available on %s: %s", needed / 1e9, free / 1e9, device.type, "streaming the blocks" if stream else "in memory")
    return stream


def load_model(model_name_or_path: str, dtype: str = "fp32", device: str | None = "cpu",
               device_map: str | None = None, adapter: str | None = None, causal_lm: bool = False,
               offload: str = "none", keep_blocks: int | None = None):
    """A registered model in eval mode: the backbone (``AutoModel``) or, with ``causal_lm``, the
    ``*ForCausalLM`` (backbone + LM head; for a vision-language model its
    ``AutoModelForImageTextToText`` class, and the backbone keeps its vision tower and projector).

    The one loading path of extract, prune and eval, so an adapter lands the same way in each.

    Args:
        model_name_or_path: hub id, local directory or GGUF file (converted once, see
            :mod:`chiptuning.model_files`).
        dtype: fp32, bf16 or fp16.
        device: where to put it (ignored with ``device_map``).
        device_map: e.g. "auto" for models larger than one GPU (needs accelerate).
        adapter: a PEFT (LoRA) adapter directory merged into the weights before anything else,
            whether it was saved from the backbone or from the ``*ForCausalLM``.
        causal_lm: return the model with its LM head.
        offload: "none", "stream" (the blocks are read from the weight files as each forward
            reaches them, and freed after: a model larger than memory runs) or "auto" (stream when
            the weights would not fit); see the module docstring.
        keep_blocks: only blocks 1..keep_blocks will ever run (pruning): the others are never read.

    Raises:
        ChipTuningError: no such model, an unregistered architecture, an adapter that does not fit,
            an adapter with a streamed model.
    """
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    config = load_config(model_name_or_path)  # fail early, naming the model type, before loading weights
    path = resolve_model_path(model_name_or_path)
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": False}  # never code shipped with a model
    head_class = head_model_class(config)
    saved_with_head = any(name.endswith("ForConditionalGeneration") for name in config.architectures or [])
    # A vision-language checkpoint saved with its LM head: AutoModel loads its backbone but reports the
    # head's weights as unexpected; load the model it was saved as and keep its backbone.
    as_head = causal_lm or (get_spec(config).images and saved_with_head and not adapter)
    stream = wants_stream(offload, config, torch_dtype, resolve_device(device), as_head)
    if (stream or keep_blocks is not None) and not device_map:
        if adapter:
            raise ChipTuningError("--adapter is merged into weights in memory; merge it into a copy of the model first "
                                  "(peft's merge_and_unload, save_pretrained) and stream that, or use --offload none")
        skeleton = empty_model(config, as_head)
        L = len(get_blocks(skeleton))
        streamed = range(0 if stream else int(keep_blocks), L)
        if len(streamed):
            # Weights stored as they are used are read from the checkpoint's own files; only those
            # transformers converts on load (fused experts) are written here, for the model's lifetime.
            scratch = tempfile.TemporaryDirectory(prefix="chiptuning-offload-")
            kwargs.update(device_map=stream_device_map(skeleton, resolve_device(device), streamed),
                          offload_folder=scratch.name)
    elif device_map:
        kwargs["device_map"] = device_map
    # accelerate warns that offloaded weights wait on the meta device: here that is the point
    with quiet("accelerate.big_modeling"):
        model = (head_class if as_head else AutoModel).from_pretrained(path, **kwargs)
    if as_head and not causal_lm:
        model = base_model(model)
    if adapter:
        if saved_from_head_model(adapter, getattr(model, "base_model_prefix", "model")):
            if not causal_lm:  # the adapter names the head model's paths: merge there, keep the backbone
                model = head_class.from_pretrained(path, **kwargs)
            model = merge_adapter_(model, adapter)
        else:  # saved from the backbone: merge into it in place (a head model holds it)
            merge_adapter_(base_model(model), adapter)
        if not causal_lm:
            model = base_model(model)
    if "device_map" not in kwargs:
        model = model.to(resolve_device(device))
    if "offload_folder" in kwargs:
        model.chiptuning_offload_dir = scratch  # removed with the model
    return model.eval()


def load_backbone(model_name_or_path: str, dtype: str = "fp32", device: str | None = "cpu",
                  device_map: str | None = None, adapter: str | None = None):
    """The model without its LM head (``AutoModel``), in eval mode; see :func:`load_model`."""
    return load_model(model_name_or_path, dtype=dtype, device=device, device_map=device_map, adapter=adapter)
