"""Exact truncation across architectures: reload cleanly, same feature(l), same generation."""

from __future__ import annotations

import copy

import pytest
import torch
from chiptuning.prune import truncate_

from chiptuning.errors import ChipTuningError
from chiptuning.features import last_token_features
from chiptuning.registry import get_blocks

L = 4


def arch_config(kind: str):
    """A tiny random config (4 blocks, width 32) of each architecture pruning must handle."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gqa = dict(intermediate_size=64, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**gqa, **common),
        "mistral": lambda: tf.MistralConfig(**gqa, sliding_window=4, **common),
        # sliding window on the upper layers: layer_types differ per layer and must be sliced.
        "qwen2": lambda: tf.Qwen2Config(**gqa, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=2, **common),
        "qwen3": lambda: tf.Qwen3Config(**gqa, head_dim=8, **common),
        "gemma": lambda: tf.GemmaConfig(**gqa, head_dim=8, **common),
        "gemma2": lambda: tf.Gemma2Config(**gqa, head_dim=8, sliding_window=4, **common),
        "phi3": lambda: tf.Phi3Config(**gqa, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=64, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=L, n_head=4, bos_token_id=1,
                                      eos_token_id=2),
        "bert": lambda: tf.BertConfig(intermediate_size=64, **common),
        "roberta": lambda: tf.RobertaConfig(intermediate_size=64, max_position_embeddings=64,
                                            **{**common, "pad_token_id": 1, "bos_token_id": 0}),
    }
    return configs[kind]()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2",
         "bert", "roberta"]
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2"]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of different lengths (pad id 0 never appears as a real token). (3, 12)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 7, 4)):
        ids[row, n:], mask[row, n:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("kind", ARCHS)
def test_truncated_checkpoint_reloads_and_reads_the_same_feature(kind, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    full = AutoModel.from_config(arch_config(kind)).eval()
    ids, mask = _batch()
    layers = [1, L // 2, L - 1]
    reference = last_token_features(full, ids, mask, layers=layers)  # (3, 3, H)
    for k, layer in enumerate(layers):
        model = truncate_(copy.deepcopy(full), layer)
        assert len(get_blocks(model)) == layer and model.config.num_hidden_layers == layer
        model.save_pretrained(tmp_path / str(layer))
        reloaded, info = AutoModel.from_pretrained(tmp_path / str(layer), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert reloaded.config.num_hidden_layers == layer
        if getattr(full.config, "layer_types", None) is not None:
            assert reloaded.config.layer_types == full.config.layer_types[:layer]
        for block, original in zip(get_blocks(reloaded), get_blocks(full)):
            for mod, orig in zip(block.modules(), original.modules()):
                assert getattr(mod, "layer_idx", None) == getattr(orig, "layer_idx", None)
        pruned = last_token_features(reloaded.eval(), ids, mask, layers=[layer])[:, 0]
        torch.testing.assert_close(pruned, reference[:, k], atol=1e-5, rtol=0)


def test_gpt2_depth_goes_through_n_layer(tmp_path):
    from transformers import AutoModel

    model = truncate_(AutoModel.from_config(arch_config("gpt2")), 3)
    assert model.config.n_layer == 3


def test_qwen2_sliding_layers_are_sliced_not_recomputed():
    from transformers import AutoModel

    model = AutoModel.from_config(arch_config("qwen2"))
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention",
                                        "sliding_attention"]
    truncate_(model, 3)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("layer", [0, L + 1, -1, 2.0])
def test_out_of_range_layer_is_refused(layer):
    from transformers import AutoModel

    model = AutoModel.from_config(arch_config("llama"))
    with pytest.raises(ChipTuningError, match=rf"must be in 1\.\.{L}"):
        truncate_(model, layer)
    assert len(get_blocks(model)) == L  # refused before touching anything


def test_full_depth_removes_nothing():
    from transformers import AutoModel

    model = AutoModel.from_config(arch_config("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    truncate_(model, L)
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3"])
def test_keep_lm_head_generation_with_and_without_kv_cache(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = truncate_(AutoModelForCausalLM.from_config(arch_config(kind)).eval(), 2)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.eval()
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = reloaded.generate(prompt, use_cache=True, **kw)
    without_cache = reloaded.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == 14
    torch.testing.assert_close(with_cache, without_cache, atol=0, rtol=0)
    torch.testing.assert_close(model.generate(prompt, use_cache=True, **kw), with_cache, atol=0, rtol=0)
