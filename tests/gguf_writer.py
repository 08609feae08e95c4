"""Tiny random models written as GGUF files, the way llama.cpp's converter writes them (for tests).

A file holds what transformers' GGUF loader reads back: the hyperparameters under the llama.cpp
keys transformers maps to its config (``GGUF_CONFIG_MAPPING``), a tokenizer in the metadata, and
every weight under its llama.cpp name (gguf's ``TensorNameMap``) after the changes llama.cpp makes
on the way out (:data:`LLAMA_CPP_TENSORS`), which transformers undoes on the way in.

:func:`write_gguf` returns the state dict transformers should rebuild, so a test can check the file
against the loader tensor by tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf  # the test importing this module skips without it (pytest.importorskip)
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

EOT = "<|endoftext|>"
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


# -- tokenizers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    """A tokenizer as GGUF metadata.

    Attributes:
        model: ``tokenizer.ggml.model``: "gpt2" (byte-level BPE) or "llama" (sentencepiece).
        tokens: the vocabulary, by id.
        token_types: llama.cpp's token types (1 normal, 2 unknown, 3 control, 6 byte).
        merges: BPE merges ("a b"); empty for sentencepiece, whose merges come from the scores.
        scores: sentencepiece scores (None for BPE).
        special: bos / eos / unk / pad -> token id.
    """

    model: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    special: dict[str, int]


def _train_bpe(texts: list[str], pre_tokenizer, vocab_size: int, alphabet=()) -> dict:
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(alphabet), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return json.loads(tokenizer.to_str())["model"]


def byte_level_vocab(texts: list[str], vocab_size: int = 320) -> Vocab:
    """A GPT-2 style byte-level BPE learned on ``texts`` (256 bytes + merges), with one control token
    (``<|endoftext|>``) serving as bos, eos and pad."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = _train_bpe(texts, byte_level, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    tokens = sorted(model["vocab"], key=model["vocab"].get) + [EOT]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eot = len(tokens) - 1
    return Vocab("gpt2", tokens, [1] * eot + [3], merges, None,
                 {"bos": eot, "eos": eot, "pad": eot})


def sentencepiece_vocab(texts: list[str], pieces: int = 96) -> Vocab:
    """A llama-style sentencepiece vocabulary: <unk> <s> </s>, 256 byte-fallback tokens, then pieces
    learned on ``texts`` (``▁`` for a space), scored best-first."""
    from tokenizers import pre_tokenizers

    model = _train_bpe(texts, pre_tokenizers.Metaspace(), pieces)
    learned = sorted(model["vocab"], key=model["vocab"].get)
    tokens = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(learned))]
    return Vocab("llama", tokens, types, [], scores, {"unk": 0, "bos": 1, "eos": 2, "pad": 0})


def _write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special.items():
        adders[name](token_id)


# -- what llama.cpp's converter does to each family's tensors ------------------------------------------

# Each takes (gguf name, array in the transformers layout, config) and returns {gguf name: array}.
TensorFn = Callable[[str, np.ndarray, object], dict[str, np.ndarray]]


def _llama_permute(name: str, w: np.ndarray, config) -> dict[str, np.ndarray]:
    """llama.cpp orders each rotary head's q/k rows interleaved (LlamaModel.permute)."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[-2])
    if heads is not None and name.endswith(".weight"):
        w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return {name: w}


def _gemma_norms(name: str, w: np.ndarray, config) -> dict[str, np.ndarray]:
    """Gemma scales by (1 + w); llama.cpp stores 1 + w (Gemma2Model.modify_tensors)."""
    return {name: w + 1 if name.endswith("norm.weight") else w}


def _bloom_qkv(name: str, w: np.ndarray, config) -> dict[str, np.ndarray]:
    """Bloom fuses q/k/v per head; llama.cpp stores all q, then all k, then all v."""
    if ".attn_qkv." in name:
        heads, width = config.n_head, config.hidden_size
        w = w.reshape(heads, 3, width // heads, *w.shape[1:])
        w = np.concatenate([w[:, i].reshape(width, *w.shape[3:]) for i in range(3)])
    return {name: w}


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gpt2_conv1d(name: str, w: np.ndarray, config) -> dict[str, np.ndarray]:
    """GPT-2's Conv1D weights are (in, out); llama.cpp stores them as (out, in)."""
    return {name: w.T.copy() if name.endswith(_GPT2_CONV1D) else w}


def _moe_experts(name: str, w: np.ndarray, config) -> dict[str, np.ndarray]:
    """transformers fuses the experts' gate and up projections; llama.cpp keeps them apart, and
    the shared expert's gate as a vector."""
    if name.endswith(".ffn_gate_up_exps.weight"):
        half = w.shape[1] // 2
        return {name.replace("gate_up", "gate"): w[:, :half], name.replace("gate_up", "up"): w[:, half:]}
    if name.endswith(".ffn_gate_inp_shexp.weight"):
        return {name: w.reshape(-1)}
    return {name: w}


#: llama.cpp architecture -> what its converter does to the transformers tensors.
LLAMA_CPP_TENSORS: dict[str, TensorFn] = {
    "llama": _llama_permute,
    "gemma2": _gemma_norms,
    "gemma3": _gemma_norms,
    "bloom": _bloom_qkv,
    "gpt2": _gpt2_conv1d,
    "qwen2moe": _moe_experts,
    "qwen3moe": _moe_experts,
}

#: transformers' fused expert parameters (no ``.weight``), which gguf's name map does not list.
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _gguf_name(name_map, hf_name: str) -> str | None:
    if m := _FUSED_EXPERTS.fullmatch(hf_name):
        return f"blk.{m[1]}.ffn_{m[2].removesuffix('_proj')}_exps.weight"
    base, _, suffix = hf_name.rpartition(".")
    parts = base.split(".")
    for start in range(len(parts)):  # the map lists some names without the wrapper's prefix (Bloom's)
        if (gguf_base := name_map.get_name(".".join(parts[start:]))) is not None:
            return f"{gguf_base}.{suffix}"
    return None


# -- families --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """How to write a tiny model of one llama.cpp architecture.

    Attributes:
        config: the tiny sizes, as transformers config arguments. Only what transformers reads back
            from the GGUF metadata belongs here; anything else would come back as the class default.
        tokenizer: "gpt2" (byte-level BPE) or "llama" (sentencepiece), as the family's real files.
        matrices: how 2-D weights are stored: F32, F16 or Q8_0 (norms and biases stay F32).
    """

    config: dict = field(default_factory=dict)
    tokenizer: str = "gpt2"
    matrices: str = "F32"


_SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=256)

#: llama.cpp architecture -> its tiny model. The test asks for one per family that transformers
#: reads from GGUF and the chip-tuning registry supports.
FAMILIES: dict[str, Family] = {
    # q/k permuted, an untied output matrix, Q8_0 blocks (dequantized by transformers)
    "llama": Family(dict(_SIZES, head_dim=8, tie_word_embeddings=False), tokenizer="llama", matrices="Q8_0"),
    "qwen2": Family(_SIZES, matrices="F16"),
    # transformers reads no head_dim for qwen3: the class default (128) it is
    "qwen3": Family(dict(_SIZES, num_attention_heads=2, num_key_value_heads=1)),
    # transformers reads no expert or shared-expert width (llama.cpp's expert_feed_forward_length):
    # the class defaults they are, so the experts are wide; few of them, and two blocks
    "qwen2moe": Family(dict(_SIZES, num_hidden_layers=2, num_experts=2, num_experts_per_tok=1)),
    "qwen3moe": Family(dict(_SIZES, num_hidden_layers=2, head_dim=8, num_experts=2, num_experts_per_tok=1)),
    "gemma2": Family(dict(_SIZES, head_dim=8, sliding_window=16), tokenizer="llama"),
    # the 6th block is the first global one: 6 blocks, sliding window smaller than the prompts
    "gemma3": Family(dict(_SIZES, num_hidden_layers=6, head_dim=8, sliding_window=8), tokenizer="llama"),
    "phi3": Family(_SIZES, tokenizer="llama"),
    "stablelm": Family(_SIZES),
    "starcoder2": Family(_SIZES),
    # Falcon-7B style (one key/value head, the only layout transformers reads unchanged)
    "falcon": Family(dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)),
    "bloom": Family(dict(hidden_size=32, n_layer=4, n_head=4)),
    # transformers reads the context length into n_ctx, not n_positions: the class default (1024) it is
    "gpt2": Family(dict(n_embd=32, n_layer=4, n_head=4)),
}


def _metadata_keys(arch: str, model_type: str) -> dict[str, str]:
    """llama.cpp key (without the architecture) -> the config attribute transformers reads it into."""
    table = GGUF_CONFIG_MAPPING.get(arch) or GGUF_CONFIG_MAPPING[model_type]
    return {key: attr for key, attr in table.items() if isinstance(attr, str)}


def _metadata_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        raise TypeError(f"{key}: cannot write {value!r}")


def _store(w: np.ndarray, matrices: str) -> tuple[np.ndarray, object, np.ndarray]:
    """(data to write, its ggml type or None for f32, the values transformers gets back)."""
    Q = gguf.GGMLQuantizationType
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2 or matrices == "F32":
        return w, None, w
    if matrices == "F16":
        return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
    if matrices == "Q8_0" and w.shape[-1] % 32 == 0:
        data = gguf.quants.quantize(w, Q.Q8_0)
        return data, Q.Q8_0, gguf.quants.dequantize(data, Q.Q8_0).reshape(w.shape)
    return w, None, w


def write_gguf(path: Path, arch: str, model_type: str, vocab: Vocab, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny random ``model_type`` model as a llama.cpp ``arch`` GGUF file at ``path``.

    Returns:
        the state dict transformers should rebuild from the file (the random weights, as stored:
        half precision or quantized where the file is).
    """
    family = FAMILIES[arch]
    keys = _metadata_keys(arch, model_type)
    unread = set(family.config) - set(keys.values()) - {"tie_word_embeddings"}  # that one: from the tensors
    if unread:
        raise ValueError(f"{arch}: transformers reads no {sorted(unread)} from a GGUF file")
    special = {f"{name}_token_id": token_id for name, token_id in vocab.special.items() if name != "unk"}
    config = AutoConfig.for_model(model_type, vocab_size=len(vocab.tokens), **special, **family.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-random-{arch}")
    for key, attr in keys.items():
        value = getattr(config, attr, None)
        if value is not None:
            _metadata_value(writer, f"{arch}.{key}", value)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[family.matrices]
    writer.add_file_type(file_type)
    _write_vocab(writer, vocab)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    llama_cpp = LLAMA_CPP_TENSORS.get(arch, lambda name, w, config: {name: w})
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {}
    for hf_name, w in state.items():
        # the values transformers gets back: quantization works on rows of the last axis, which the
        # llama.cpp changes reorder only (llama) where a file here is quantized
        expected[hf_name] = torch.from_numpy(_store(w, family.matrices)[2])
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp writes no output matrix for tied embeddings
        gguf_name = _gguf_name(name_map, hf_name)
        if gguf_name is None:
            raise ValueError(f"{arch}: no llama.cpp name for {hf_name}")
        for name, stored in llama_cpp(gguf_name, w, config).items():
            data, raw_dtype, _ = _store(stored, family.matrices)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
