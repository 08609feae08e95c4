"""Extraction: layer convention, padding invariance, resume, token-budget batching, OOM splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.encoding import plan_batches
from chiptuning.errors import CacheError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.models import load_backbone, load_tokenizer
from chiptuning.tasks import load_task


def _extract(model_path, task, out, **kw):
    cfg = ExtractConfig(out=str(out), model=model_path, device="cpu", **kw)
    return CacheReader(extract(cfg, task))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "minilm"])
def test_layer_convention_matches_hidden_states(tiny_models, sentiment_file, tmp_path, kind):
    """feature(l) = HF hidden_states[l] at the last token for l < L; at L ours is raw (pre-norm)."""
    path = tiny_models[kind]
    task = load_task(sentiment_file, text_column="text", limit=4)
    reader = _extract(path, task, tmp_path / "c", batch_size=3)
    model, tok = load_backbone(path), load_tokenizer(path)
    L = model.config.num_hidden_layers
    assert reader.layers == list(range(L + 1))
    for row, ex in enumerate(task.examples):
        ids = tok(ex.fields["text"], return_tensors="pt")["input_ids"]
        with torch.no_grad():  # input ids only: MiniLM's tokenizer also returns token_type_ids
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(L):
            np.testing.assert_allclose(reader.layer(layer)[row], hs[layer][0, -1].numpy(), atol=1e-5)
        if kind != "minilm":  # decoders: HF's last entry is final-normed, ours is the raw stream
            assert not np.allclose(reader.layer(L)[row], hs[L][0, -1].numpy(), atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "minilm"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_at_a_time(tiny_models, sentiment_file, tmp_path, kind, side):
    task = load_task(sentiment_file, text_column="text", limit=10)
    single = _extract(tiny_models[kind], task, tmp_path / "one", batch_size=1)
    batched = _extract(tiny_models[kind], task, tmp_path / "many", batch_size=5, padding_side=side)
    lengths = batched.n_tokens
    assert lengths.min() < lengths.max(), "test needs prompts of different lengths to exercise padding"
    for layer in single.layers:
        np.testing.assert_allclose(batched.layer(layer), single.layer(layer), atol=1e-5)
    np.testing.assert_array_equal(batched.labels, single.labels)
    np.testing.assert_array_equal(batched.example_ids, single.example_ids)


def test_token_budget_equals_simple_path(tiny_models, sentiment_file, tmp_path):
    task = load_task(sentiment_file, text_column="text")
    simple = _extract(tiny_models["llama"], task, tmp_path / "simple", batch_size=4)
    budget = _extract(tiny_models["llama"], task, tmp_path / "budget", batch_size=64, max_tokens_per_batch=40)
    assert simple.fingerprint == budget.fingerprint  # batching is not part of the content
    np.testing.assert_array_equal(budget.example_ids, simple.example_ids)
    for layer in simple.layers:
        np.testing.assert_allclose(budget.layer(layer), simple.layer(layer), atol=1e-5)


def test_device_map_loading_path_equals_the_plain_path(tiny_models, sentiment_file, tmp_path):
    """The ``--device-map auto`` loading path gives the cache of the plain path. On a machine with
    only a CPU, transformers puts every weight there without dispatch hooks, so this checks the
    path, not a split: blocks on several GPUs (the feature hooks then index each block's output on
    its own device and gather the rows on the inputs' device) have not been run on several GPUs
    (no GPU was available when this was written)."""
    pytest.importorskip("accelerate")
    task = load_task(sentiment_file, text_column="text", limit=8)
    plain = _extract(tiny_models["llama"], task, tmp_path / "plain", batch_size=4)
    mapped = _extract(tiny_models["llama"], task, tmp_path / "mapped", batch_size=4, device_map="auto")
    assert plain.fingerprint == mapped.fingerprint
    for layer in plain.layers:
        np.testing.assert_allclose(mapped.layer(layer), plain.layer(layer), atol=1e-6)


def test_plan_batches_budget():
    lengths = [5, 20, 7, 20, 3, 9]
    batches = plan_batches(lengths, batch_size=8, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 40
    assert plan_batches(lengths, batch_size=4) == [[0, 1, 2, 3], [4, 5]]


def test_interrupted_run_resumes_to_identical_cache(tiny_models, sentiment_file, tmp_path, monkeypatch):
    import chiptuning.extract.extractor as ex

    task = load_task(sentiment_file, text_column="text")
    full = _extract(tiny_models["gpt2"], task, tmp_path / "full", batch_size=3, shard_size=5)

    real = ex.features_for_batch
    calls = {"n": 0}

    def dies_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "features_for_batch", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_models["gpt2"], task, tmp_path / "resumed", batch_size=3, shard_size=5)
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(tmp_path / "resumed")
    monkeypatch.setattr(ex, "features_for_batch", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "features_for_batch", counting)
    resumed = _extract(tiny_models["gpt2"], task, tmp_path / "resumed", batch_size=3, shard_size=5)
    assert counted["n"] < 8, "resume should skip the batches already stored"
    for layer in full.layers:
        np.testing.assert_array_equal(resumed.layer(layer), full.layer(layer))
    np.testing.assert_array_equal(resumed.example_ids, full.example_ids)
    np.testing.assert_array_equal(resumed.labels, full.labels)


def test_other_settings_are_refused(tiny_models, sentiment_file, tmp_path):
    task = load_task(sentiment_file, text_column="text", limit=6)
    _extract(tiny_models["gpt2"], task, tmp_path / "c")
    with pytest.raises(CacheError, match="other settings"):
        _extract(tiny_models["llama"], task, tmp_path / "c")


def test_out_of_memory_batch_is_split(tiny_models, sentiment_file, tmp_path, monkeypatch):
    import chiptuning.extract.extractor as ex

    task = load_task(sentiment_file, text_column="text", limit=8)
    reference = _extract(tiny_models["llama"], task, tmp_path / "ref", batch_size=8)
    real = ex.last_token_features
    sizes = []

    def oom_above_two(model, ids, mask, **kw):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, mask, **kw)

    monkeypatch.setattr(ex, "last_token_features", oom_above_two)
    split = _extract(tiny_models["llama"], task, tmp_path / "split", batch_size=8)
    assert sizes[0] == 8 and max(s for s in sizes if s <= 2) == 2
    for layer in reference.layers:
        np.testing.assert_allclose(split.layer(layer), reference.layer(layer), atol=1e-5)


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_storage_dtypes(tiny_models, sentiment_file, tmp_path, storage):
    task = load_task(sentiment_file, text_column="text", limit=5)
    fp32 = _extract(tiny_models["llama"], task, tmp_path / "f32")
    small = _extract(tiny_models["llama"], task, tmp_path / storage, storage_dtype=storage)
    for layer in fp32.layers:
        a, b = fp32.layer(layer), small.layer(layer)
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)
        if storage == "bfloat16":  # stored bits are exactly torch's bf16 rounding
            expected = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(b, expected)


def test_float16_overflow_fails_loudly():
    from chiptuning.cache.store import encode

    with pytest.raises(CacheError, match="float16 range"):
        encode(np.array([[7e4]], dtype=np.float32), "float16")


def test_progress_is_logged_when_not_on_a_terminal(tiny_models, sentiment_file, tmp_path, monkeypatch, caplog):
    """A background extraction (stderr redirected to a log) reports done/total, rate and time left
    between its first line and its last, instead of a bar nobody sees."""
    import chiptuning.progress

    monkeypatch.setattr(chiptuning.progress, "LOG_EVERY_S", 0.0)
    task = load_task(sentiment_file, text_column="text", limit=6)
    with caplog.at_level("INFO", logger="chiptuning.progress"):
        _extract(tiny_models["llama"], task, tmp_path / "c", batch_size=2, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "chiptuning.progress"]
    assert [line.split()[:2] for line in lines] == [["extract:", "2/6"], ["extract:", "4/6"]], lines
    assert all(" ex/s, about " in line and line.endswith(" left") for line in lines), lines
