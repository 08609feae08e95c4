"""Architecture registry: where each model family keeps its embedding, blocks and final norm.

One table, used by ``chiptuning.extract`` (to hook the blocks) and ``chiptuning.prune`` (to cut
them). Paths are attribute paths relative to the *base model* (``model.base_model``), so the same
entry serves ``AutoModel`` and ``AutoModelFor*`` classes alike. An unknown ``model_type`` fails
loudly instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from chiptuning.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one model family live.

    Attributes:
        blocks: attribute path of the ``nn.ModuleList`` of transformer blocks.
        final_norm: attribute path of the norm applied after the last block, or None (post-LN
            encoders such as BERT normalise inside every block).
        embedding: attribute path of the token embedding (or embeddings module).
        decoder: True for causal language models (their LM head and generation matter).
        positions_from_mask: True if position ids must be passed explicitly, derived from the
            attention mask, so that left padding does not shift positions. False where the model
            derives them from the input ids itself (RoBERTa) or has no position ids.
    """

    blocks: str
    final_norm: str | None
    embedding: str
    decoder: bool = True
    positions_from_mask: bool = True


_LLAMA_LIKE = ArchSpec(blocks="layers", final_norm="norm", embedding="embed_tokens")
_BERT_LIKE = ArchSpec(blocks="encoder.layer", final_norm=None, embedding="embeddings", decoder=False)

#: model_type -> ArchSpec. Add a family here and every stage supports it.
ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
            "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm",
            "starcoder2", "smollm3", "helium", "glm",
        )
    },
    "phi": ArchSpec(blocks="layers", final_norm="final_layernorm", embedding="embed_tokens"),
    "gpt2": ArchSpec(blocks="h", final_norm="ln_f", embedding="wte"),
    "gpt_neo": ArchSpec(blocks="h", final_norm="ln_f", embedding="wte"),
    "gptj": ArchSpec(blocks="h", final_norm="ln_f", embedding="wte"),
    "falcon": ArchSpec(blocks="h", final_norm="ln_f", embedding="word_embeddings"),
    "bloom": ArchSpec(blocks="h", final_norm="ln_f", embedding="word_embeddings",
                      positions_from_mask=False),
    "gpt_neox": ArchSpec(blocks="layers", final_norm="final_layer_norm", embedding="embed_in"),
    "opt": ArchSpec(blocks="decoder.layers", final_norm="decoder.final_layer_norm",
                    embedding="decoder.embed_tokens"),
    "bert": _BERT_LIKE,
    "roberta": ArchSpec(blocks="encoder.layer", final_norm=None, embedding="embeddings",
                        decoder=False, positions_from_mask=False),
    "xlm-roberta": ArchSpec(blocks="encoder.layer", final_norm=None, embedding="embeddings",
                            decoder=False, positions_from_mask=False),
    "electra": _BERT_LIKE,
    "distilbert": ArchSpec(blocks="transformer.layer", final_norm=None, embedding="embeddings",
                           decoder=False, positions_from_mask=False),
}


def get_spec(model_or_config) -> ArchSpec:
    """Return the ArchSpec for a model, a config or a ``model_type`` string; raise
    UnsupportedModelError naming the type."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not in the chip-tuning architecture registry "
            f"(known: {known}); add an ArchSpec to chiptuning/registry.py"
        )
    return ARCHITECTURES[model_type]


def _resolve(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def base_model(model):
    """The backbone (``LlamaModel`` inside ``LlamaForCausalLM``; the model itself otherwise)."""
    return getattr(model, "base_model", model)


def get_blocks(model):
    """The ``nn.ModuleList`` of transformer blocks, in order (block l is ``get_blocks(m)[l-1]``)."""
    return _resolve(base_model(model), get_spec(model).blocks)


def set_blocks(model, blocks) -> None:
    """Replace the block list (used by pruning)."""
    path = get_spec(model).blocks
    parent_path, _, name = path.rpartition(".")
    parent = _resolve(base_model(model), parent_path) if parent_path else base_model(model)
    setattr(parent, name, blocks)


def get_final_norm(model):
    """The final norm module, or None for architectures without one."""
    path = get_spec(model).final_norm
    return _resolve(base_model(model), path) if path else None


def get_embedding(model):
    """The token embedding module."""
    return _resolve(base_model(model), get_spec(model).embedding)


def text_config(config):
    """The config of the text model (itself for a plain language model; the text part of a
    multimodal one), where the depth and width are."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_blocks(model_or_config) -> int:
    """L, the number of transformer blocks according to the config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_spec(config)
    return int(text_config(config).num_hidden_layers)
