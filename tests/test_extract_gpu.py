"""GPU extraction (marked `gpu`: deselected by default, skipped without CUDA) and the auto budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.encoding import CPU_TOKEN_BUDGET, auto_token_budget
from chiptuning.extract import ExtractConfig, extract
from chiptuning.models import load_backbone
from chiptuning.tasks import load_task


def test_auto_budget_on_cpu_gives_the_simple_paths_features(tiny_models, sentiment_file, tmp_path):
    path = tiny_models["llama"]
    assert auto_token_budget(load_backbone(path), torch.device("cpu")) == CPU_TOKEN_BUDGET
    task = load_task(sentiment_file, text_column="text")
    auto = CacheReader(extract(ExtractConfig(out=str(tmp_path / "a"), model=path, device="cpu",
                                             batch_size=None, max_tokens_per_batch="auto"), task))
    fixed = CacheReader(extract(ExtractConfig(out=str(tmp_path / "f"), model=path, device="cpu",
                                              batch_size=1), task))
    assert auto.fingerprint == fixed.fingerprint  # batching is not part of the content
    for layer in auto.layers:
        np.testing.assert_allclose(auto.layer(layer), fixed.layer(layer), atol=1e-5, rtol=1e-5)


def test_bad_budget_is_refused(tiny_models, sentiment_file, tmp_path):
    from chiptuning.errors import ChipTuningError

    task = load_task(sentiment_file, text_column="text", limit=2)
    with pytest.raises(ChipTuningError, match="max-tokens-per-batch"):
        extract(ExtractConfig(out=str(tmp_path / "c"), model=tiny_models["llama"], device="cpu",
                              max_tokens_per_batch=-3), task)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_bf16_cuda_matches_fp32_cpu(tiny_models, sentiment_file, tmp_path, kind):
    """bf16 on the GPU (token budget, auto) agrees with fp32 on the CPU within bf16 rounding."""
    path = tiny_models[kind]
    task = load_task(sentiment_file, text_column="text")
    cpu = CacheReader(extract(ExtractConfig(out=str(tmp_path / "cpu"), model=path, device="cpu"), task))
    gpu = CacheReader(extract(ExtractConfig(out=str(tmp_path / "gpu"), model=path, device="cuda", dtype="bf16",
                                            storage_dtype="bfloat16", batch_size=None,
                                            max_tokens_per_batch="auto"), task))
    assert list(gpu.example_ids) == list(cpu.example_ids)
    for layer in cpu.layers:
        ref, got = cpu.layer(layer), gpu.layer(layer)
        scale = np.abs(ref).max() + 1e-6
        # bf16 keeps 8 bits of mantissa; errors grow a little with depth on random weights.
        assert np.abs(got - ref).max() / scale < 0.05, (kind, layer)
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        assert cos.min() > 0.995, (kind, layer)


def test_auto_budget_on_cuda_scales_with_free_memory(tiny_models, monkeypatch):
    """The CUDA branch, with the free-memory query faked: more free memory, a larger budget."""
    model = load_backbone(tiny_models["llama"])
    budgets = {}
    for free_gib in (1, 4, 1000):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free_gib: (f * 2**30, 80 * 2**30))
        budgets[free_gib] = auto_token_budget(model, torch.device("cuda", 0))
    assert 512 <= budgets[1] < budgets[4] <= 262144
    assert budgets[1000] == 262144  # clamped
    cfg = model.config
    per_token = 2 * (8 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4  # fp32 weights
    assert budgets[4] == min(262144, int(0.5 * 4 * 2**30 / per_token))
