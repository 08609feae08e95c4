"""Exact pruning on every supported architecture, with real chips trained on real caches.

Two tiers:

* surgery (:func:`truncate_` alone): the truncated model reloads cleanly, reads the same
  feature(l), keeps per-layer config and attention layer indices consistent, and generates the
  same tokens with and without a KV cache when the LM head is kept;
* end to end: tiny random model (MiniLM's tokenizer) -> ``chiptuning.extract`` cache ->
  ``chiptuning.probe.train_chips`` -> ``chiptuning.prune.prune`` at the first, middle and
  last-but-one layer -> reload: the checkpoint predicts exactly what its chip predicted from the
  cache, on every example.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.features import last_token_features
from chiptuning.probe import load_chips, train_chips
from chiptuning.prune import ChipModel, prune, read_provenance, truncate_
from chiptuning.registry import get_blocks
from chiptuning.tasks import load_task

L = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def arch_config(kind: str, vocab_size: int = 128, pad_token_id: int = 0):
    """A tiny random config (4 blocks, width 32) of each architecture pruning must handle."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                  pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    gqa = dict(intermediate_size=64, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**gqa, **common),
        "mistral": lambda: tf.MistralConfig(**gqa, sliding_window=4, **common),
        # sliding window on the upper layers: layer_types differ per layer and must be sliced.
        "qwen2": lambda: tf.Qwen2Config(**gqa, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=2, **common),
        "qwen3": lambda: tf.Qwen3Config(**gqa, head_dim=8, **common),
        "gemma": lambda: tf.GemmaConfig(**gqa, head_dim=8, **common),
        # alternating sliding / full layers (layer_types), window shorter than the prompts.
        "gemma2": lambda: tf.Gemma2Config(**gqa, head_dim=8, sliding_window=4, **common),
        "phi3": lambda: tf.Phi3Config(**gqa, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=64, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=L, n_head=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id),
        "bert": lambda: tf.BertConfig(intermediate_size=64, **common),
        "roberta": lambda: tf.RobertaConfig(intermediate_size=64, max_position_embeddings=96, **common),
    }
    return configs[kind]()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2",
         "bert", "roberta"]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of different lengths (pad id 0 never appears as a real token). (3, 12)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 7, 4)):
        ids[row, n:], mask[row, n:] = 0, 0
    return ids, mask


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_report(load):
    """Run ``load()`` and return (its result, the weight warnings transformers logged meanwhile).

    Listens on transformers' own logger (it does not propagate, and its stream handler may hold a
    stale stderr), with its global verbosity (the CLI tests lower it) at "warning" meanwhile.
    """
    from transformers.utils import logging as hf_logging

    logger, records = logging.getLogger("transformers"), _Records()
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(records)
    try:
        result = load()
    finally:
        logger.removeHandler(records)
        hf_logging.set_verbosity(before)
    words = ("LOAD REPORT", "MISSING", "UNEXPECTED", "MISMATCH", "newly initialized")
    return result, [m for m in records.messages if any(word in m for word in words)]


# -- surgery ----------------------------------------------------------------------------------------

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
        (reloaded, info), report = load_report(
            lambda path=tmp_path / str(layer): AutoModel.from_pretrained(path, output_loading_info=True))
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert report == []
        assert reloaded.config.num_hidden_layers == layer
        if getattr(full.config, "layer_types", None) is not None:
            assert reloaded.config.layer_types == full.config.layer_types[:layer]
        for block, original in zip(get_blocks(reloaded), get_blocks(full)):
            for mod, orig in zip(block.modules(), original.modules()):
                assert getattr(mod, "layer_idx", None) == getattr(orig, "layer_idx", None)
        pruned = last_token_features(reloaded.eval(), ids, mask, layers=[layer])[:, 0]
        torch.testing.assert_close(pruned, reference[:, k], atol=1e-5, rtol=0)


def test_the_reload_check_sees_a_naive_cut(tmp_path):
    """Deleting blocks without updating the config reloads with new random blocks: caught."""
    from transformers import AutoModel

    model = AutoModel.from_config(arch_config("llama"))
    model.layers = model.layers[:2]  # config still says 4 blocks
    model.save_pretrained(tmp_path)
    (_, info), report = load_report(lambda: AutoModel.from_pretrained(tmp_path, output_loading_info=True))
    assert info["missing_keys"] and report


def test_gpt2_depth_goes_through_n_layer():
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


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2"])
def test_keep_lm_head_generation_with_and_without_kv_cache(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(arch_config(kind)).eval()
    model = truncate_(copy.deepcopy(full), 2)
    model.save_pretrained(tmp_path)
    (reloaded, info), report = load_report(
        lambda: AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and report == []
    reloaded.eval()
    # Upper blocks renumbered: a KV cache indexed by the old layer_idx would miss entries.
    assert [b.self_attn.layer_idx if hasattr(b, "self_attn") else b.attn.layer_idx if hasattr(b, "attn")
            else b.attention.layer_idx for b in get_blocks(reloaded)] == [0, 1]
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = reloaded.generate(prompt, use_cache=True, **kw)
    without_cache = reloaded.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == 14
    torch.testing.assert_close(with_cache, without_cache, atol=0, rtol=0)
    torch.testing.assert_close(model.generate(prompt, use_cache=True, **kw), with_cache, atol=0, rtol=0)


# -- end to end: cache -> real chips -> pruned checkpoint -> same predictions -----------------------

@pytest.fixture(scope="module")
def tokenizer_path(minilm_path) -> str:
    return minilm_path


def _tiny_model_dir(kind: str, out, tokenizer_path: str) -> str:
    """A tiny random ``kind`` model saved with MiniLM's (real) tokenizer, sized to its vocabulary."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    model = AutoModel.from_config(arch_config(kind, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("kind", ARCHS + ["minilm"])
def test_pruned_checkpoint_predicts_what_its_chip_predicted_on_the_cache(kind, sentiment_file, tokenizer_path,
                                                                         tmp_path):
    from transformers import AutoModel

    model_dir = tokenizer_path if kind == "minilm" else _tiny_model_dir(kind, tmp_path / "model", tokenizer_path)
    task = load_task(sentiment_file, text_column="text")
    reader = CacheReader(extract(ExtractConfig(out=str(tmp_path / "cache"), model=model_dir, device="cpu",
                                               batch_size=8), task))
    n_blocks = reader.num_blocks
    layers = [1, n_blocks // 2, n_blocks - 1]
    train_chips(reader, chip="linear", out=tmp_path / "chips", layers=layers, val_size=4, seed=0)
    chips = load_chips(tmp_path / "chips")  # what `chiptuning prune` reads, from disk
    texts = [example.fields["text"] for example in task.examples]
    predicted_classes = set()
    for layer in layers:
        out = tmp_path / f"pruned-{layer}"
        prune(model_dir, tmp_path / "chips", out, layer=layer)
        (backbone, info), report = load_report(
            lambda path=out: AutoModel.from_pretrained(path, output_loading_info=True))
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")) and report == []
        assert backbone.config.num_hidden_layers == layer
        assert read_provenance(out)["num_blocks"] == n_blocks

        clf = ChipModel.from_pretrained(out)
        cached = reader.layer(layer)  # (N, H), canonical row order = file order
        np.testing.assert_allclose(clf.features(texts), cached, atol=1e-5, rtol=0)
        expected = chips.chip(layer).predict(cached)
        np.testing.assert_array_equal(clf.predict_index(texts), expected)
        assert clf.predict(texts) == [reader.label_names[i] for i in expected]
        predicted_classes |= set(expected.tolist())
    # Exact equality of one constant prediction would prove little: the chips must discriminate.
    assert predicted_classes == {0, 1}
