"""Architecture registry: where each model family keeps its embedding, blocks and final norm, as
attribute paths relative to the *base model* (one entry serves ``AutoModel`` and ``AutoModelFor*``).
A vision-language entry (:data:`VISION_LANGUAGE`) says where the model keeps its language model;
:func:`get_spec` joins it with the language model's own entry, so hooks and surgery reach the
language model's blocks and leave the vision tower and projector untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from chiptuning.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one model family live: the blocks' ``nn.ModuleList``, the norm after the
    last block (None for post-LN encoders such as BERT), the token embedding. ``positions_from_mask``:
    position ids derived from the attention mask are passed, so left padding does not shift them
    (False where the model derives its own). ``language_model``: a vision-language model's."""

    blocks: str
    final_norm: str | None
    embedding: str
    decoder: bool = True
    positions_from_mask: bool = True
    reads_images: bool = False
    language_model: str | None = None


_LLAMA_LIKE = ArchSpec(blocks="layers", final_norm="norm", embedding="embed_tokens")
_BERT_LIKE = ArchSpec(blocks="encoder.layer", final_norm=None, embedding="embeddings", decoder=False)
_ROBERTA_LIKE = dataclasses.replace(_BERT_LIKE, positions_from_mask=False)

#: model_type -> ArchSpec. Add a family here and every stage supports it.
ARCHITECTURES: dict[str, ArchSpec] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "smollm3",
                     "helium", "glm"), _LLAMA_LIKE),
    "phi": ArchSpec(blocks="layers", final_norm="final_layernorm", embedding="embed_tokens"),
    **dict.fromkeys(("gpt2", "gpt_neo", "gptj"), ArchSpec(blocks="h", final_norm="ln_f", embedding="wte")),
    "falcon": ArchSpec(blocks="h", final_norm="ln_f", embedding="word_embeddings"),
    "bloom": ArchSpec(blocks="h", final_norm="ln_f", embedding="word_embeddings", positions_from_mask=False),
    "gpt_neox": ArchSpec(blocks="layers", final_norm="final_layer_norm", embedding="embed_in"),
    "opt": ArchSpec(blocks="decoder.layers", final_norm="decoder.final_layer_norm", embedding="decoder.embed_tokens"),
    "bert": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": dataclasses.replace(_ROBERTA_LIKE, blocks="transformer.layer"),
}


# -- vision-language models ------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionLanguageSpec:
    """Where a vision-language family keeps its language model (a registered text family, of
    ``text_type`` when only the ``model_type`` is known), vision tower and projector."""

    language_model: str
    vision: str
    projector: str
    positions_from_mask: bool = True
    text_type: str = "llama"


#: model_type -> VisionLanguageSpec: the vision-language models chip-tuning supports.
VISION_LANGUAGE: dict[str, VisionLanguageSpec] = {
    "llava": VisionLanguageSpec(language_model="language_model", vision="vision_tower",
                                projector="multi_modal_projector"),
    # Idefics3 (and SmolVLM-Instruct): SigLIP-style vision model, pixel-shuffle connector, a Llama.
    "idefics3": VisionLanguageSpec(language_model="text_model", vision="vision_model", projector="connector"),
    # Gemma 3 (4B and up): its image tokens attend to each other both ways (token_type_ids).
    "gemma3": VisionLanguageSpec(language_model="language_model", vision="vision_tower",
                                 projector="multi_modal_projector", text_type="gemma3_text"),
}


def _unsupported(model_type, config=None) -> UnsupportedModelError:
    vision_language = ", ".join(sorted(VISION_LANGUAGE))
    if config is not None and hasattr(config, "vision_config"):
        return UnsupportedModelError(f"vision-language model_type {model_type!r} is not supported by chip-tuning "
                                     f"(supported vision-language models: {vision_language}); add a "
                                     "VisionLanguageSpec to chiptuning/registry.py")
    return UnsupportedModelError(f"model_type {model_type!r} is not in the chip-tuning architecture registry (known: "
                                 f"{', '.join(sorted(ARCHITECTURES))}; vision-language: {vision_language}); add an "
                                 "ArchSpec to chiptuning/registry.py")


def _vision_language_spec(model_type: str, config) -> ArchSpec:
    """The ArchSpec of a vision-language model: its language model's spec, one level down."""
    vl = VISION_LANGUAGE[model_type]
    text_type = getattr(text_config(config), "model_type", None) if config is not None else vl.text_type
    if text_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"{model_type!r} model with a {text_type!r} language model: that language model "
                                    "family is not in the chip-tuning architecture registry; add an ArchSpec to "
                                    "chiptuning/registry.py")
    text = ARCHITECTURES[text_type]
    if not text.decoder:
        raise UnsupportedModelError(f"{model_type!r} model with a {text_type!r} encoder as its language model "
                                    "is not supported (chip-tuning reads a decoder's last token)")
    prefix = vl.language_model + "."
    return ArchSpec(blocks=prefix + text.blocks, final_norm=prefix + text.final_norm if text.final_norm else None,
                    embedding=prefix + text.embedding, decoder=True,
                    positions_from_mask=vl.positions_from_mask and text.positions_from_mask, reads_images=True,
                    language_model=vl.language_model)


def get_spec(model_or_config) -> ArchSpec:
    """The ArchSpec of a model, a config or a ``model_type``; UnsupportedModelError naming the type."""
    config = None if isinstance(model_or_config, str) else getattr(model_or_config, "config", model_or_config)
    model_type = model_or_config if config is None else getattr(config, "model_type", None)
    if model_type in VISION_LANGUAGE:
        return _vision_language_spec(model_type, config)
    if model_type not in ARCHITECTURES:
        raise _unsupported(model_type, config)
    return ARCHITECTURES[model_type]


def _resolve(root, path: str):
    """The module at the dotted attribute ``path`` of ``root`` (``root`` itself for "")."""
    return functools.reduce(getattr, path.split("."), root) if path else root


def base_model(model):
    """The backbone (``LlamaModel`` inside ``LlamaForCausalLM``; the model itself otherwise)."""
    return getattr(model, "base_model", model)


def get_blocks(model):
    """The ``nn.ModuleList`` of transformer blocks, in order (block l is ``get_blocks(m)[l-1]``)."""
    return _resolve(base_model(model), get_spec(model).blocks)


def set_blocks(model, blocks) -> None:
    """Replace the block list (used by pruning)."""
    parent, _, name = get_spec(model).blocks.rpartition(".")
    setattr(_resolve(base_model(model), parent), name, blocks)


def get_final_norm(model):
    """The final norm module, or None for architectures without one."""
    path = get_spec(model).final_norm
    return _resolve(base_model(model), path) if path else None


def get_embedding(model):
    """The token embedding module."""
    return _resolve(base_model(model), get_spec(model).embedding)


def get_language_model(model):
    """The language model inside a vision-language model; the backbone itself for a language model."""
    return _resolve(base_model(model), get_spec(model).language_model or "")


def text_config(config):
    """The config of the text model (itself for a language model), where the depth and width are."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_blocks(model_or_config) -> int:
    """L, the number of transformer blocks according to the config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_spec(config)
    return int(text_config(config).num_hidden_layers)
