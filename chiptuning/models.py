"""Loading models, tokenizers and processors, and what provenance records of a model.

A model larger than memory is *streamed* (``offload="stream"``, or ``"auto"`` when its weights do
not fit): everything but its blocks is loaded, and each block's weights are read from the model's
own safetensors files as a forward reaches it (transformers' disk offload through accelerate: the
same tensors as an ordinary load, so the features are the same bit for bit).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from chiptuning.errors import ChipTuningError, first_line
from chiptuning.model_files import is_gguf, resolve_gguf, resolve_model_path
from chiptuning.registry import base_model, get_blocks, get_embedding, get_final_norm, get_spec, text_config

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_SAMPLE = 1 << 20
#: ``--offload``: none (every weight in memory), stream (the blocks read from the weight files as
#: each forward reaches them), auto (stream when the weights do not fit).
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
    """Identify a checkpoint's weights: a GGUF file's sha256; for a local directory a sha256 over
    each weight file's name, size and first/last MiB (cheap on 13 GB, changes when a file is
    replaced); for a hub id the commit it was loaded from; else a hash of every parameter."""
    if is_gguf(model_name_or_path):
        return "gguf:" + resolve_gguf(model_name_or_path).sha256[:16]
    path = Path(model_name_or_path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")) \
        if path.is_dir() else []
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
    return "params:" + params_hash(model) if model is not None else "unknown"


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


def count_params(module) -> int:
    """Parameters of ``module`` (0 for None)."""
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def param_stats(model) -> dict:
    """Parameter counts by part, for pruning ratios: {"embedding", "blocks": [per block],
    "final_norm", "lm_head", "other", "total"}. An untied LM head is counted from the config when
    the loaded model has none (``AutoModel``), since the full model ships it."""
    blocks = [count_params(block) for block in get_blocks(model)]
    norm, embedding = count_params(get_final_norm(model)), count_params(get_embedding(model))
    loaded = count_params(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text = text_config(model.config)  # a vision-language model's vocabulary and width are its text model's
    tied = bool(getattr(model.config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
    lm_head = 0
    if not tied and head is not None:
        lm_head = count_params(head)
        loaded -= lm_head
    elif not tied and get_spec(model).decoder:
        lm_head = int(text.vocab_size) * int(text.hidden_size)
    other = loaded - embedding - sum(blocks) - norm
    return {"embedding": embedding, "blocks": blocks, "final_norm": norm, "lm_head": lm_head, "other": other,
            "total": embedding + sum(blocks) + norm + lm_head + other}


def model_source(model_name_or_path: str) -> dict | None:
    """A GGUF file's name, sha256 and quantization; None for hub ids and directories."""
    return resolve_gguf(model_name_or_path).to_dict() if is_gguf(model_name_or_path) else None


def _padded(tokenizer, model_name_or_path: str, padding_side: str):
    """``tokenizer`` with a pad token (eos or unk when it has none), padding on ``padding_side``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ChipTuningError(f"tokenizer of {model_name_or_path!r} has no pad, eos or unk token")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model_name_or_path: str, padding_side: str = "right"):
    """The model's tokenizer, with a pad token."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(model_name_or_path),
                                                               trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot load a tokenizer from {model_name_or_path!r}: {first_line(err)}") from None
    return _padded(tokenizer, model_name_or_path, padding_side)


def load_processor(model_name_or_path: str, padding_side: str = "right"):
    """A vision-language model's processor, its tokenizer padded. The image processor is always the
    PIL one, with or without torchvision, so a cache and its checkpoint see the same pixels."""
    path = resolve_model_path(model_name_or_path)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
        if not type(processor.image_processor).__name__.endswith("Pil"):
            processor.image_processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil",
                                                                                        trust_remote_code=False)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ChipTuningError(f"cannot load the processor of {model_name_or_path!r} (a vision-language model "
                              f"needs one): {first_line(err)}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ChipTuningError(f"the processor of {model_name_or_path!r} ({type(processor).__name__}) has no "
                              "tokenizer or no image processor")
    _padded(tokenizer, model_name_or_path, padding_side)
    return processor


def load_preprocessor(model_name_or_path: str, padding_side: str = "right"):
    """The tokenizer, or for a vision-language model its processor."""
    loader = load_processor if get_spec(load_config(model_name_or_path)).reads_images else load_tokenizer
    return loader(model_name_or_path, padding_side=padding_side)


def head_model_class(model_or_config):
    """The Auto class of a registered model *with* its LM head."""
    reads_images = get_spec(model_or_config).reads_images
    return transformers.AutoModelForImageTextToText if reads_images else transformers.AutoModelForCausalLM


def load_config(model_name_or_path: str):
    """The model's config, of an architecture the registry knows (else UnsupportedModelError)."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot load model {model_name_or_path!r}: {first_line(err)}") from None
    get_spec(config)
    return config


# -- PEFT adapters ---------------------------------------------------------------------------------
# Applied to another class than the one it was saved from, PEFT only warns and the model silently
# stays the base model: load_model merges on the adapter's class and refuses weights that do not land.

_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft.utils  # optional (only --adapter needs it): imported on first use
    except ImportError:
        raise ChipTuningError("--adapter needs the peft package: pip install peft") from None
    return peft


def adapter_keys(adapter: str) -> list[str]:
    """Names of the adapter's weights as saved (``base_model.model.<param path>``)."""
    peft = _peft()
    try:
        return sorted(peft.utils.load_peft_weights(adapter, device="cpu"))
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot read adapter {adapter!r}: {first_line(err)}") from None


def saved_from_head_model(adapter: str, backbone_prefix: str) -> bool:
    """True if the adapter was saved from a model with a head (its names go through the backbone)."""
    keys = [k[len(_PEFT_PREFIX):] for k in adapter_keys(adapter) if k.startswith(_PEFT_PREFIX)]
    return bool(keys) and all(k.startswith(backbone_prefix + ".") for k in keys)


def merge_adapter_(model, adapter: str):
    """Apply ``adapter`` to ``model`` and merge it into the weights; returns the merged model.
    ChipTuningError when some adapter weights find no module in ``model``."""
    expected = adapter_keys(adapter)
    wrapped = _peft().PeftModel.from_pretrained(model, adapter)
    loaded = {key.replace(".default", "") for key in wrapped.state_dict()}
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise ChipTuningError(f"adapter {adapter!r} does not fit {type(model).__name__}: {len(missing)} of "
                              f"{len(expected)} weights have no place (first: {missing[0]}); was it trained on "
                              "another model?")
    merged = wrapped.merge_and_unload()
    log.info("merged adapter %s (%d weights) into %s", adapter, len(expected), type(model).__name__)
    return merged


# -- streaming -------------------------------------------------------------------------------------

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
    """Bytes free on ``device``: a GPU's free memory, else the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def model_device(model) -> torch.device:
    """The device of ``model``'s first weight in memory (a streamed model's blocks wait on "meta")."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def is_streamed(model) -> bool:
    """Whether some weights of ``model`` are read from its files as a forward reaches them."""
    return any(p.device.type == "meta" for p in model.parameters())


def materialize_(module) -> None:
    """Read every weight of ``module`` (a streamed block) into memory on its execution device and
    stop streaming it: it can then be copied, merged or trained like any module."""
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
    """A copy of ``block`` with every weight in memory; a streamed ``block`` itself keeps streaming,
    so a method that merges or trains blocks holds only the blocks it makes."""
    if not is_streamed(block):
        return copy.deepcopy(block)
    # the copy shares the hooks' index of the weight files instead of copying it
    shared = [getattr(getattr(sub, "_hf_hook", None), name, None) for sub in block.modules()
              for name in ("weights_map", "tied_params_map")]
    copied = copy.deepcopy(block, {id(value): value for value in shared if value is not None})
    materialize_(copied)
    return copied


def settle_(model) -> None:
    """Make a model whose weights are all in memory an ordinary one: no hooks, no device map."""
    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map


def empty_model(config, causal_lm: bool = False):
    """The model of ``config`` with every parameter on the meta device: its structure."""
    cls = head_model_class(config) if causal_lm else AutoModel
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def stream_device_map(skeleton, device: torch.device, streamed: range) -> dict[str, str]:
    """A transformers device map: the blocks in ``streamed`` (0-based) on "disk" (read from the
    safetensors files when a forward reaches them), everything else on ``device``."""
    blocks = get_blocks(skeleton)
    device_map, prefix, parent = {}, "", skeleton
    for part in next(name for name, module in skeleton.named_modules() if module is blocks).split("."):
        if any(True for _ in parent.parameters(recurse=False)):
            raise ChipTuningError(f"{type(skeleton).__name__} keeps weights beside its blocks' container; it cannot be "
                                  "streamed (use --offload none)")
        device_map.update({prefix + name: str(device) for name, _ in parent.named_children() if name != part})
        prefix, parent = f"{prefix}{part}.", getattr(parent, part)
    device_map.update({f"{prefix}{i}": "disk" if i in streamed else str(device) for i in range(len(blocks))})
    return device_map


def wants_stream(offload: str, structure: Callable[[], torch.nn.Module], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``offload`` streams the blocks: always for "stream"; for "auto" when the weights of
    ``structure()`` (the model on the meta device, built only then) would take more than
    :data:`WEIGHTS_SHARE` of the memory available on ``device``."""
    if offload not in OFFLOAD_MODES:
        raise ChipTuningError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if offload != "auto":
        return offload == "stream"
    needed = count_params(structure()) * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    stream = needed > WEIGHTS_SHARE * free
    log.log(logging.INFO if stream else logging.DEBUG, "--offload auto: the weights take %.1f GB, %.1f GB are "
            "available on %s: %s", needed / 1e9, free / 1e9, device.type, "streaming the blocks" if stream else "in memory")
    return stream


# -- loading ---------------------------------------------------------------------------------------

def load_model(model_name_or_path: str, dtype: str = "fp32", device: str | None = "cpu",
               device_map: str | None = None, adapter: str | None = None, causal_lm: bool = False,
               offload: str = "none", keep_blocks: int | None = None):
    """A registered model (hub id, directory or GGUF file) in eval mode: the backbone, or with
    ``causal_lm`` the model with its LM head; the one loading path of every command.

    ``device`` is ignored with a ``device_map`` (e.g. "auto" across GPUs). ``adapter``: a PEFT
    adapter merged into the weights first. ``offload``: "none", "stream" or "auto" (see the module
    docstring). ``keep_blocks``: only blocks 1..keep_blocks will ever run: the others are never read.
    """
    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    config = load_config(model_name_or_path)  # fails early, naming the model type, before any weight
    path = resolve_model_path(model_name_or_path)
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": False}  # never code shipped with a model
    head_class = head_model_class(config)
    # A vision-language checkpoint saved with its LM head: AutoModel would report the head's weights as
    # unexpected; load the model it was saved as and keep its backbone.
    saved_with_head = any(name.endswith("ForConditionalGeneration") for name in config.architectures or [])
    as_head = causal_lm or (get_spec(config).reads_images and saved_with_head and not adapter)
    structure = functools.cache(lambda: empty_model(config, as_head))  # built once, when needed
    stream = wants_stream(offload, structure, torch_dtype, resolve_device(device))
    scratch = None
    if (stream or keep_blocks is not None) and not device_map:
        if adapter:
            raise ChipTuningError("--adapter is merged into weights in memory; merge it into a copy of the model first "
                                  "(peft's merge_and_unload, save_pretrained) and stream that, or use --offload none")
        streamed = range(0 if stream else int(keep_blocks), len(get_blocks(structure())))
        if len(streamed):
            # weights transformers converts on load (fused experts) are written here, for the model's lifetime
            scratch = tempfile.TemporaryDirectory(prefix="chiptuning-offload-")
            kwargs.update(device_map=stream_device_map(structure(), resolve_device(device), streamed),
                          offload_folder=scratch.name)
    elif device_map:
        kwargs["device_map"] = device_map
    with quiet("accelerate.big_modeling"):  # it warns that offloaded weights wait on "meta": the point here
        model = (head_class if as_head else AutoModel).from_pretrained(path, **kwargs)
    if adapter and saved_from_head_model(adapter, getattr(model, "base_model_prefix", "model")):
        model = merge_adapter_(model if causal_lm else head_class.from_pretrained(path, **kwargs), adapter)
    elif adapter:
        merge_adapter_(base_model(model), adapter)  # in place: a head model holds its backbone
    if not causal_lm:
        model = base_model(model)
    if "device_map" not in kwargs:
        model = model.to(resolve_device(device))
    if scratch is not None:
        model.chiptuning_offload_dir = scratch  # removed with the model
    return model.eval()


def load_backbone(model_name_or_path: str, dtype: str = "fp32", device: str | None = "cpu",
                  device_map: str | None = None, adapter: str | None = None):
    """The model without its LM head, in eval mode; see :func:`load_model`."""
    return load_model(model_name_or_path, dtype=dtype, device=device, device_map=device_map, adapter=adapter)
