"""Architecture registry: where each model family keeps its embedding, blocks and final norm.

One table, used by ``chiptuning.extract`` (to hook the blocks) and ``chiptuning.prune`` (to cut
them). Paths are attribute paths relative to the *base model* (``model.base_model``), so the same
entry serves ``AutoModel`` and ``AutoModelFor*`` classes alike. An unknown ``model_type`` fails
loudly instead of guessing.

Vision-language models (:data:`VISION_LANGUAGE`) have a section of their own: an entry says where
the VLM keeps its language model (``language_model`` in LLaVA, ``text_model`` in Idefics3), and the
language model's own family (its text config's ``model_type``) says where the blocks are inside it.
:func:`get_spec` joins the two, so hooks and surgery reach the *language model's* blocks while the
vision tower and the projector stay untouched.
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
        images: a vision-language model: it reads images through its processor.
        language_model: in a vision-language model, the attribute path of its language model
            (the module whose config is the text config); None otherwise.
    """

    blocks: str
    final_norm: str | None
    embedding: str
    decoder: bool = True
    positions_from_mask: bool = True
    images: bool = False
    language_model: str | None = None


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



# -- vision-language models ------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionLanguageSpec:
    """Where a vision-language family keeps its parts, relative to its base model (``LlavaModel``
    inside ``LlavaForConditionalGeneration``).

    Attributes:
        language_model: the language model (a registered text family: its blocks are the ones hooked
            and cut).
        vision: the vision tower (kept whole by pruning).
        projector: the module mapping vision features into the language model's width.
        positions_from_mask: position ids may be passed from the attention mask (False for families
            whose backbone computes its own, e.g. multimodal rotary positions).
        text_type: the language model family assumed when only the ``model_type`` is known.
    """

    language_model: str
    vision: str
    projector: str
    positions_from_mask: bool = True
    text_type: str = "llama"


#: model_type -> VisionLanguageSpec: the vision-language models chip-tuning supports.
VISION_LANGUAGE: dict[str, VisionLanguageSpec] = {
    # LLaVA-1.5 style: CLIP vision tower, MLP projector, a Llama (or Mistral, Qwen2...) language model.
    "llava": VisionLanguageSpec(language_model="language_model", vision="vision_tower",
                                projector="multi_modal_projector"),
    # Idefics3 (and SmolVLM-Instruct, which is an idefics3 model): SigLIP-style vision model,
    # pixel-shuffle connector, a Llama language model called text_model.
    "idefics3": VisionLanguageSpec(language_model="text_model", vision="vision_model", projector="connector"),
    # Gemma 3 (4B and up): SigLIP vision tower, pooling projector, a Gemma-3 language model whose
    # image tokens attend to each other both ways (the processor's token_type_ids).
    "gemma3": VisionLanguageSpec(language_model="language_model", vision="vision_tower",
                                 projector="multi_modal_projector", text_type="gemma3_text"),
}


def _unsupported(model_type, config=None) -> UnsupportedModelError:
    known = ", ".join(sorted(ARCHITECTURES))
    if config is not None and hasattr(config, "vision_config"):
        return UnsupportedModelError(
            f"vision-language model_type {model_type!r} is not supported by chip-tuning (supported "
            f"vision-language models: {', '.join(sorted(VISION_LANGUAGE))}); add a VisionLanguageSpec to "
            "chiptuning/registry.py"
        )
    return UnsupportedModelError(
        f"model_type {model_type!r} is not in the chip-tuning architecture registry "
        f"(known: {known}; vision-language: {', '.join(sorted(VISION_LANGUAGE))}); add an ArchSpec to "
        "chiptuning/registry.py"
    )


def _vision_language_spec(model_type: str, config) -> ArchSpec:
    """The ArchSpec of a vision-language model: its language model's spec, one level down."""
    vl = VISION_LANGUAGE[model_type]
    text_type = getattr(text_config(config), "model_type", None) if config is not None else vl.text_type
    if text_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model_type!r} model with a {text_type!r} language model: that language model family is "
            "not in the chip-tuning architecture registry; add an ArchSpec to chiptuning/registry.py"
        )
    text = ARCHITECTURES[text_type]
    if not text.decoder:
        raise UnsupportedModelError(f"{model_type!r} model with a {text_type!r} encoder as its language model "
                                    "is not supported (chip-tuning reads a decoder's last token)")
    prefix = vl.language_model + "."
    return ArchSpec(
        blocks=prefix + text.blocks,
        final_norm=prefix + text.final_norm if text.final_norm else None,
        embedding=prefix + text.embedding,
        decoder=True,
        positions_from_mask=vl.positions_from_mask and text.positions_from_mask,
        images=True,
        language_model=vl.language_model,
    )


def get_spec(model_or_config) -> ArchSpec:
    """Return the ArchSpec for a model, a config or a ``model_type`` string; raise
    UnsupportedModelError naming the type."""
    config = None
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type in VISION_LANGUAGE:
        return _vision_language_spec(model_type, config)
    if model_type not in ARCHITECTURES:
        raise _unsupported(model_type, config)
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


def get_language_model(model):
    """The language model inside a vision-language model (whose blocks are hooked and cut); the
    backbone itself for a language model."""
    path = get_spec(model).language_model
    return _resolve(base_model(model), path) if path else base_model(model)


def text_config(config):
    """The config of the text model (itself for a plain language model; the text part of a
    multimodal one), where the depth and width are."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_blocks(model_or_config) -> int:
    """L, the number of transformer blocks according to the config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_spec(config)
    return int(text_config(config).num_hidden_layers)
