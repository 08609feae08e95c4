"""Depth-pruning baselines (chiptuning.prune.baselines) and `chiptuning compare`.

Planted patterns: in a tiny random Llama (large init so every real block matters), a block whose
attention output projection and MLP down projection are zero is exactly the identity. Each rule
then has a known answer: ShortGPT's Block Influence and Gromov's angular distance are 0 exactly
there, LLM-Streamline's span cosine is 1, and merging a run of identical identity blocks into
the block above them (base + sum of differences) gives that block's weights, so the merged model
computes exactly what the original does.
"""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chiptuning.registry import get_blocks, num_blocks
from tests.conftest import SENTENCES

TEXTS = SENTENCES["pos"] + SENTENCES["neg"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def make_model(tokenizer, kind: str = "llama", n_layers: int = 6, seed: int = 0, identity=(), copies=()):
    """Tiny random *ForCausalLM; blocks in ``identity`` (1-based) made identity, ``copies`` = [(dst, src)]."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, initializer_range=0.3,
                  pad_token_id=tokenizer.pad_token_id)
    config = tf.LlamaConfig(**common) if kind == "llama" else tf.Qwen2Config(**common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    blocks = get_blocks(model)
    with torch.no_grad():
        for i in identity:
            blocks[i - 1].self_attn.o_proj.weight.zero_()
            blocks[i - 1].mlp.down_proj.weight.zero_()
        for dst, src in copies:
            blocks[dst - 1].load_state_dict(blocks[src - 1].state_dict())
    return model


def calibration(texts=TEXTS, batch_size=8):
    from chiptuning.prune.baselines import Calibration

    return Calibration(list(texts), {"test": True}, max_length=64, batch_size=batch_size)


def final_states(model, tokenizer, texts=TEXTS[:6]):
    from chiptuning.features import last_token_features

    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    L = num_blocks(model)
    return last_token_features(model, enc["input_ids"], enc["attention_mask"], layers=[L])[:, 0]


def assert_reloads_and_generates(path, tokenizer, depth):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_hidden_layers == depth == len(get_blocks(model))
    assert [b.self_attn.layer_idx for b in get_blocks(model)] == list(range(depth))
    enc = tokenizer("Chip-tuning prunes the tail of the model", return_tensors="pt")
    kwargs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5,
                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(use_cache=True, **kwargs), model.generate(use_cache=False, **kwargs))
    return model


# -- block surgery --------------------------------------------------------------------------------

def test_remove_noncontiguous_blocks_qwen2_reloads_and_generates(tokenizer, tmp_path):
    from chiptuning.prune.baselines import remove_blocks_

    model = make_model(tokenizer, "qwen2", n_layers=5)
    kept = [get_blocks(model)[i] for i in (0, 2, 4)]
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention",
                                "full_attention"]
    remove_blocks_(model, [2, 4])
    assert list(get_blocks(model)) == kept
    assert model.config.layer_types == ["full_attention"] * 3  # entries of blocks 1, 3, 5
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert_reloads_and_generates(tmp_path, tokenizer, 3)


def test_merge_blocks_is_base_plus_sum_of_differences(tokenizer):
    from chiptuning.prune.baselines import merge_blocks

    blocks = list(get_blocks(make_model(tokenizer, n_layers=3, seed=1)))
    merged = merge_blocks(blocks)
    w = [b.mlp.up_proj.weight for b in blocks]
    torch.testing.assert_close(merged.mlp.up_proj.weight, w[0] + (w[1] - w[0]) + (w[2] - w[0]))
    assert merged is not blocks[0] and not torch.equal(merged.mlp.up_proj.weight, w[0])


# -- planted patterns -----------------------------------------------------------------------------

def test_tail_drops_the_last_blocks(tokenizer):
    from chiptuning.prune.baselines import apply_plan_, plan_tail

    model = make_model(tokenizer)
    first = list(get_blocks(model))[:4]
    plan = plan_tail(model, 2)
    assert plan.removed == [5, 6]
    apply_plan_(model, plan)
    assert list(get_blocks(model)) == first and model.config.num_hidden_layers == 4


def test_shortgpt_removes_the_planted_identity_blocks(tokenizer, tmp_path):
    from chiptuning.prune.baselines import plan_shortgpt, prune_with_method, read_record

    model = make_model(tokenizer, identity=(2, 5))
    plan = plan_shortgpt(model, 2, tokenizer, calibration())
    bi = np.array(plan.details["block_influence"])
    assert plan.removed == [2, 5]
    assert bi[[1, 4]].max() < 1e-6 < np.delete(bi, [1, 4]).min()
    reference = final_states(model, tokenizer)
    path = prune_with_method("planted", "shortgpt", tmp_path / "ckpt", n_layers=2, model=model, tokenizer=tokenizer,
                             calibration_task=_task_of(TEXTS))
    record = read_record(path)
    assert record.removed == [2, 5] and record.num_blocks == 4
    assert record.calibration["n_examples"] == len(TEXTS) and record.calibration["n_tokens"] > len(TEXTS)
    assert record.generation["kv_cache_matches"] is True
    pruned = assert_reloads_and_generates(path, tokenizer, 4)
    torch.testing.assert_close(final_states(pruned, tokenizer), reference, atol=1e-4, rtol=1e-4)


def test_shortgpt_and_angular_from_a_cache_find_the_planted_run(tokenizer, tmp_path, sentiment_file):
    from chiptuning.cache import CacheReader
    from chiptuning.extract import ExtractConfig, extract
    from chiptuning.prune.baselines import Calibration, layer_stats, plan_angular, plan_shortgpt
    from chiptuning.tasks import load_task

    model = make_model(tokenizer, identity=(3, 4))
    task = load_task(sentiment_file, text_column="text")
    cache = extract(ExtractConfig(out=str(tmp_path / "cache"), model="planted", device="cpu", model_hash="test"),
                    task, model=model.model, tokenizer=tokenizer)
    shortgpt = plan_shortgpt(model, 2, cache=cache)
    angular = plan_angular(model, 2, cache=CacheReader(cache))
    assert shortgpt.removed == [3, 4] and shortgpt.details["scores_from"] == "cache (last token)"
    assert angular.removed == [3, 4] and angular.details["start_layer"] == 2
    # The cache gives exactly the last-token angular distance of the same prompts run live.
    prompts, _ = task.build_prompts(tokenizer)
    live = layer_stats(model, tokenizer, Calibration(prompts, {}, max_length=None), spans=[2]).span_angular_last[2]
    np.testing.assert_allclose(angular.details["angular_distance"], live, atol=1e-4)
    # From calibration text (no cache) the same run is found.
    assert plan_angular(model, 2, tokenizer, calibration()).removed == [3, 4]


def test_streamline_replaces_the_most_similar_span(tokenizer):
    from chiptuning.prune.baselines import plan_streamline

    model = make_model(tokenizer, identity=(4, 5))
    plan = plan_streamline(model, 1, tokenizer, calibration(), epochs=1)
    assert plan.details["start_layer"] == 3 and plan.groups == [[1], [2], [3], [4, 5], [6]]
    assert max(plan.details["span_cosine"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("replacement", ["layer", "mlp"])
def test_streamline_replacement_beats_dropping_on_held_out_text(tokenizer, tmp_path, replacement):
    from chiptuning.prune.baselines import (
        Calibration,
        apply_plan_,
        attention_output_projections,
        capture_span,
        mse_over,
        plan_streamline,
        save_pruned_model,
    )

    model = make_model(tokenizer, seed=3)
    train_texts, held_texts = TEXTS[:18], TEXTS[18:]
    plan = plan_streamline(model, 1, tokenizer, calibration(train_texts, batch_size=3), replacement=replacement,
                           epochs=25, lr=3e-3)
    start = plan.details["start_layer"]
    new_block = plan.blocks[start]
    held = capture_span(model, tokenizer, Calibration(held_texts, {}, max_length=64), start, start + 2)
    mse_drop, mse_new = mse_over(held, None), mse_over(held, new_block)
    assert mse_new < 0.9 * mse_drop, (mse_new, mse_drop)
    training = plan.details["training"]
    assert training["held_out_mse_replacement"] < training["held_out_mse_drop"]
    if replacement == "mlp":
        assert all(float(p.weight.abs().max()) == 0 for _, p in attention_output_projections(new_block))
    apply_plan_(model, plan)
    save_pruned_model(model, tokenizer, tmp_path / "ckpt", plan, {"method": "streamline"})
    assert_reloads_and_generates(tmp_path / "ckpt", tokenizer, 5)


@pytest.mark.parametrize("method", ["slm", "laco"])
def test_merging_methods_merge_the_planted_window_exactly(tokenizer, tmp_path, method):
    from chiptuning.prune.baselines import apply_plan_, plan_laco, plan_slm, save_pruned_model

    # Blocks 3 and 4: identical identity blocks; merged with block 5 they give block 5 itself.
    model = make_model(tokenizer, identity=(3, 4), copies=[(4, 3)])
    block5 = copy.deepcopy(get_blocks(model)[4])
    reference = final_states(model, tokenizer)
    if method == "slm":
        plan = plan_slm(model, 2, tokenizer, calibration(), threshold=0.9999)
    else:
        plan = plan_laco(model, 2, tokenizer, calibration(), threshold=0.9999, merge_layers=3, interval=1)
    assert plan.groups == [[1], [2], [3, 4, 5], [6]], plan.details
    assert len(plan.details["sweeps"]) == 1  # found at the given threshold
    merged = plan.blocks[2]
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, dict(block5.named_parameters())[name], atol=1e-5, rtol=0)
    apply_plan_(model, plan)
    torch.testing.assert_close(final_states(model, tokenizer), reference, atol=1e-4, rtol=1e-4)
    save_pruned_model(model, tokenizer, tmp_path / "ckpt", plan, {"method": method})
    assert_reloads_and_generates(tmp_path / "ckpt", tokenizer, 4)


def test_slm_lowers_its_threshold_to_reach_the_target(tokenizer):
    from chiptuning.prune.baselines import plan_slm

    model = make_model(tokenizer, seed=5)
    plan = plan_slm(model, 3, tokenizer, calibration(TEXTS[:8]), threshold=0.999999)
    assert len(plan.groups) == 3
    thresholds = [s["threshold"] for s in plan.details["sweeps"]]
    assert len(thresholds) > 1 and thresholds == sorted(thresholds, reverse=True)



def test_the_next_threshold_lets_about_as_many_merges_in_as_are_missing():
    from chiptuning.prune.baselines.merging import next_threshold

    rejected = [0.5, 0.9, 0.7, 0.8]
    assert next_threshold(rejected, 1) == 0.9  # one block missing: the most similar rejected window
    assert next_threshold(rejected, 3) == 0.7
    assert next_threshold(rejected, 10) == 0.5  # fewer rejected windows than missing blocks
    assert next_threshold([], 2) == float("-inf")  # nothing rejected: no lower threshold helps

# -- library entry point and CLI ------------------------------------------------------------------

def _task_of(texts):
    from chiptuning.tasks import load_task

    rows = [{"id": str(i), "text": t, "label": "pos" if i < len(texts) // 2 else "neg"} for i, t in enumerate(texts)]
    import datasets

    return load_task(datasets.Dataset.from_list(rows), text_column="text")


def test_prune_with_method_on_an_encoder_records_calibration(minilm_path, sentiment_file, tmp_path):
    from transformers import AutoModel

    from chiptuning.prune.baselines import prune_with_method, read_record
    from chiptuning.tasks import load_task

    task = load_task(sentiment_file, text_column="text")
    path = prune_with_method(minilm_path, "angular", tmp_path / "minilm", ratio=0.34, calibration_task=task,
                             n_calibration=10)
    record = read_record(path)
    assert record.num_blocks == 4 and record.blocks_removed == 2
    assert record.calibration["n_examples"] == 10 and record.calibration["task"]["name"] == task.name
    assert record.generation is None  # an encoder does not generate
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.num_hidden_layers == 4


def test_compare_cli_writes_the_table(tokenizer, sentiment_file, tmp_path):
    from chiptuning.cli import main

    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, [
        "-q", "compare", "--model", str(tmp_path / "model"), "--data", str(sentiment_file), "--text-column", "text",
        "--n-layers", "2", "--methods", "tail,angular,laco", "--n-calibration", "8", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dense", "chip-tuning", "tail", "angular", "laco"]
    assert all(r["blocks_kept"] == "4" for r in rows[1:])
    assert all(0 <= float(r["chip_accuracy"]) <= 1 for r in rows)
    assert rows[0]["zero_shot_accuracy"] != ""  # a decoder has a zero-shot baseline
    summary = json.loads((out / "compare.json").read_text())
    assert summary["calibration"]["n_examples"] == 8 and summary["target"]["n_layers"] == 2
    assert (out / "compare.png").stat().st_size > 0 and "| chip-tuning |" in (out / "compare.md").read_text()
    assert "| laco |" in result.output
