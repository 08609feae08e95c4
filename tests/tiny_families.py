"""A tiny random model of every family of the architecture registry, built from its config.

Four blocks of width 32 (``tests.test_prune_parity.L``) and a vocabulary of 260 tokens: a
byte-level BPE tokenizer without merges (:func:`byte_tokenizer`, one token per byte, GPT-2's byte
alphabet), so every model's embedding and head stay small. A character tokenizer also loads the
same under every family's ``AutoTokenizer`` class: transformers rebuilds a Qwen2 model's tokenizer
as ``Qwen2Tokenizer`` from its vocabulary and merges whatever class was saved, which turns a
WordPiece tokenizer such as MiniLM's into one that drops most of each text.

:data:`FAMILIES` holds one config builder per ``model_type``; the families of
``tests.test_prune_parity`` come from its ``arch_config`` (not copied). :data:`NOT_TINY` names,
with the reason, a registered family that cannot be built tiny offline (none today): a family in
neither is a test failure, so a new registry entry is caught.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tests.test_prune_parity import ARCHS, L, arch_config

#: The special tokens, ids 0..3 (``arch_config``'s pad, bos and eos ids: 0, 1, 2).
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: the special tokens, then one token per byte."""
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate([*SPECIAL, *alphabet])}
    return GPT2Tokenizer(vocab=vocab, merges=[], pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", model_max_length=128)


def _common(vocab_size: int, pad_token_id: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)


_GQA = dict(intermediate_size=64, num_key_value_heads=2)


def _own_configs() -> dict[str, Callable[[int, int], object]]:
    """Builders ``(vocab_size, pad_token_id) -> config`` of the families arch_config lacks."""
    import transformers as tf

    c = _common
    return {
        # MoE: 4 experts, 2 per token (every layer sparse; qwen2_moe keeps its shared expert).
        "mixtral": lambda v, p: tf.MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2, **c(v, p)),
        "qwen2_moe": lambda v, p: tf.Qwen2MoeConfig(**_GQA, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                                    mlp_only_layers=[1], **c(v, p)),
        "qwen3_moe": lambda v, p: tf.Qwen3MoeConfig(**_GQA, head_dim=8, moe_intermediate_size=32, num_experts=4,
                                                    num_experts_per_tok=2, decoder_sparse_step=1, **c(v, p)),
        "gemma3_text": lambda v, p: tf.Gemma3TextConfig(**_GQA, head_dim=8, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"] * (L // 2),
                                                        **c(v, p)),
        "olmo": lambda v, p: tf.OlmoConfig(**_GQA, **c(v, p)),
        "olmo2": lambda v, p: tf.Olmo2Config(**_GQA, **c(v, p)),
        "granite": lambda v, p: tf.GraniteConfig(**_GQA, **c(v, p)),
        "cohere": lambda v, p: tf.CohereConfig(**_GQA, **c(v, p)),
        "stablelm": lambda v, p: tf.StableLmConfig(**_GQA, **c(v, p)),
        "starcoder2": lambda v, p: tf.Starcoder2Config(**_GQA, **c(v, p)),
        "smollm3": lambda v, p: tf.SmolLM3Config(**_GQA, no_rope_layer_interval=2, **c(v, p)),
        "helium": lambda v, p: tf.HeliumConfig(**_GQA, head_dim=8, **c(v, p)),
        "glm": lambda v, p: tf.GlmConfig(**_GQA, head_dim=8, **c(v, p)),
        "phi": lambda v, p: tf.PhiConfig(intermediate_size=64, **c(v, p)),
        "gpt_neo": lambda v, p: tf.GPTNeoConfig(vocab_size=v, hidden_size=32, num_layers=L, num_heads=4,
                                                attention_types=[[["global", "local"], L // 2]], window_size=4,
                                                intermediate_size=64, max_position_embeddings=128,
                                                pad_token_id=p, bos_token_id=1, eos_token_id=2),
        "gptj": lambda v, p: tf.GPTJConfig(vocab_size=v, n_embd=32, n_layer=L, n_head=4, rotary_dim=4, n_positions=128,
                                           pad_token_id=p, bos_token_id=1, eos_token_id=2),
        "falcon": lambda v, p: tf.FalconConfig(**c(v, p)),
        "bloom": lambda v, p: tf.BloomConfig(vocab_size=v, hidden_size=32, n_layer=L, n_head=4, pad_token_id=p,
                                             bos_token_id=1, eos_token_id=2),
        "opt": lambda v, p: tf.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128, **c(v, p)),
        "xlm-roberta": lambda v, p: tf.XLMRobertaConfig(intermediate_size=64, max_position_embeddings=160, **c(v, p)),
        # embedding_size below the width: ElectraModel projects the embeddings (a module beside the blocks).
        "electra": lambda v, p: tf.ElectraConfig(intermediate_size=64, embedding_size=16, max_position_embeddings=128,
                                                 **c(v, p)),
        "distilbert": lambda v, p: tf.DistilBertConfig(vocab_size=v, dim=32, n_layers=L, n_heads=4, hidden_dim=64,
                                                       max_position_embeddings=128, pad_token_id=p),
    }


def _parity_config(kind: str) -> Callable[[int, int], object]:
    return lambda v, p: arch_config(kind, vocab_size=v, pad_token_id=p)


#: model_type -> (vocab_size, pad_token_id) -> a tiny config of that family.
FAMILIES: dict[str, Callable[[int, int], object]] = {
    **{kind: _parity_config(kind) for kind in ARCHS},
    **_own_configs(),
}

#: Registered families that cannot be built tiny offline, with the reason.
NOT_TINY: dict[str, str] = {}


def save_family_model(family: str, out: Path, tokenizer, seed: int = 0) -> str:
    """A tiny random ``family`` backbone (``AutoModel``; a decoder's head, untied or tied as its
    config says, comes with ``AutoModelForCausalLM``) saved with ``tokenizer`` to ``out``."""
    from transformers import AutoModel, AutoModelForCausalLM

    from chiptuning.registry import get_spec

    config = FAMILIES[family](len(tokenizer), tokenizer.pad_token_id)
    assert config.model_type == family, (config.model_type, family)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if get_spec(config).decoder else AutoModel).from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
