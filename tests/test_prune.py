"""Pruned checkpoints: parity with the cache, provenance, edited-file refusal, evaluation."""

from __future__ import annotations

import csv
import json

import joblib
import numpy as np
import pytest
from chiptuning.cache import CacheReader
from chiptuning.extract import ExtractConfig, extract
from chiptuning.prune import ChipModel, evaluate, prune, read_provenance, save_pruned
from chiptuning.prune.checkpoint import TaskChip, chips_cache, resolve_layer
from chiptuning.prune.provenance import check_model_matches_cache
from sklearn.linear_model import LogisticRegression

from chiptuning.errors import ChipTuningError, DataError, ProvenanceError
from chiptuning.models import load_backbone, load_tokenizer, weights_hash
from chiptuning.tasks import load_task

REVIEWS = [
    ("A delight from start to finish.", "pos"), ("Dull, and far too long.", "neg"),
    ("I loved every minute of this wonderful trip with my family.", "pos"),
    ("The meal was cold and the waiter was rude to everyone at our table.", "neg"),
    ("Fantastic!", "pos"), ("Awful.", "neg"), ("Kind and cheerful staff.", "pos"),
    ("Our flight was delayed for six miserable hours and nobody told us why.", "neg"),
    ("A joy to read on a quiet evening.", "pos"), ("Tedious and badly written.", "neg"),
    ("Great value, excellent quality, I would happily buy it again.", "pos"),
    ("It broke after two days.", "neg"),
]


class StandInChips:
    """What ``chiptuning.probe.load_chips`` returns, reduced to what pruning uses.

    One fitted sklearn LogisticRegression per layer, trained on the cache itself.
    """

    def __init__(self, reader: CacheReader, layers: list[int], selection: dict | None = None, **logreg):
        self.layers = layers
        self.label_names = reader.label_names
        self.config = {"chip": "logreg", "train_cache": {"fingerprint": reader.fingerprint, "meta": reader.meta}}
        self._chips = {
            layer: LogisticRegression(max_iter=500, **logreg).fit(reader.layer(layer), reader.labels)
            for layer in layers
        }
        self.metrics = [{"layer": layer, "train_accuracy": self._chips[layer].score(reader.layer(layer), reader.labels)}
                        for layer in layers]
        self.selection = selection

    def chip(self, layer: int):
        return self._chips[layer]

    def save_layer(self, layer: int, out_dir) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "chip.json").write_text(json.dumps({"layer": layer}, indent=2, sort_keys=True))
        joblib.dump(self._chips[layer], out_dir / "chip.joblib")


@pytest.fixture(autouse=True)
def stand_in_chip_loader(monkeypatch):
    import chiptuning.prune.chip_model as cm

    monkeypatch.setattr(cm, "load_chip_dir", lambda path: joblib.load(path / "chip.joblib"))


@pytest.fixture(scope="module")
def caches(tiny_models, tmp_path_factory):
    """One cache of the 24 sentiment sentences per model (kind -> CacheReader)."""
    root = tmp_path_factory.mktemp("caches")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": text, "label": label}) + "\n"
                            for i, (text, label) in enumerate(REVIEWS)))
    task = load_task(data, text_column="text")
    out = {}
    for kind, path in tiny_models.items():
        cfg = ExtractConfig(out=str(root / kind), model=path, device="cpu", batch_size=8)
        out[kind] = CacheReader(extract(cfg, task))
    out["data"] = data
    return out


def _prune(tiny_models, caches, kind, layer, out, reader=None, logreg=None, **kw):
    reader = reader or caches[kind]
    path = tiny_models[kind]
    chips = StandInChips(reader, [layer], **(logreg or {}))
    fingerprint, meta = chips_cache(chips)
    task = TaskChip(chips, layer, f"fixed:{layer}", fingerprint, meta, name="custom")
    save_pruned(load_backbone(path), load_tokenizer(path), [task], out,
                base={"id": path, "hash": weights_hash(path)}, **kw)
    return chips


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "minilm"])
def test_pruned_checkpoint_predicts_what_the_chip_predicted_on_the_cache(tiny_models, caches, kind, tmp_path):
    from transformers import AutoModel

    reader = caches[kind]
    L = reader.num_blocks
    texts = [f"{t}" for t in load_task(caches["data"], text_column="text").build_prompts()[0]]
    for layer in (1, L // 2, L - 1):
        out = tmp_path / f"pruned-{layer}"
        chips = _prune(tiny_models, caches, kind, layer, out)
        backbone, info = AutoModel.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        assert backbone.config.num_hidden_layers == layer
        clf = ChipModel.from_pretrained(out)
        np.testing.assert_allclose(clf.features(texts), reader.layer(layer), atol=1e-5, rtol=0)
        expected = chips.chip(layer).predict(reader.layer(layer))
        np.testing.assert_array_equal(clf.predict_index(texts), expected)
        assert clf.predict(texts) == [reader.label_names[i] for i in expected]
        assert clf.predict_proba(texts).shape == (len(texts), 2)


def test_provenance_record_and_model_card(tiny_models, caches, tmp_path):
    _prune(tiny_models, caches, "llama", 2, tmp_path / "p")
    record = read_provenance(tmp_path / "p")
    assert record["layer"] == 2 and record["num_blocks"] == 4
    task = record["tasks"][record["default_task"]]
    assert task["label_names"] == ["neg", "pos"] and task["text_column"] == "text"
    assert task["cache_fingerprint"] == caches["llama"].fingerprint
    assert {"config.json", "model.safetensors", "README.md", "chip/chip.joblib"} <= set(record["checksums"])
    params = record["params"]
    assert params["after"]["total"] < params["before"]["total"]
    assert params["removed"]["blocks"] == sum(params["before"]["blocks"][2:])
    card = (tmp_path / "p" / "README.md").read_text()
    assert "pruned to 2 of 4 blocks" in card and "ChipModel.from_pretrained" in card
    text = (tmp_path / "p" / "chiptuning.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "chip/chip.joblib", "chiptuning.json"])
def test_edited_files_are_refused(tiny_models, caches, tmp_path, victim):
    out = tmp_path / "p"
    _prune(tiny_models, caches, "gpt2", 2, out)
    path = out / victim
    if victim.endswith(".json"):
        data = json.loads(path.read_text())
        data["num_hidden_layers" if victim == "config.json" else "layer"] = 3
        path.write_text(json.dumps(data))
    else:
        blob = bytearray(path.read_bytes())
        blob[-1] ^= 1
        path.write_bytes(bytes(blob))
    with pytest.raises(ProvenanceError, match="modified after pruning"):
        ChipModel.from_pretrained(out)


def test_missing_file_and_not_a_checkpoint_are_refused(tiny_models, caches, tmp_path):
    out = tmp_path / "p"
    _prune(tiny_models, caches, "gpt2", 1, out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ProvenanceError, match="tokenizer.json .* is missing"):
        ChipModel.from_pretrained(out)
    with pytest.raises(ProvenanceError, match="not a chip-tuning checkpoint"):
        ChipModel.from_pretrained(tiny_models["gpt2"])


def test_cache_from_another_model_is_refused(tiny_models, caches):
    from transformers import AutoConfig

    meta = caches["gpt2"].meta
    with pytest.raises(ProvenanceError, match="cache from another model.*model_type 'gpt2'"):
        check_model_matches_cache(tiny_models["llama"], weights_hash(tiny_models["llama"]),
                                  AutoConfig.from_pretrained(tiny_models["llama"]), meta)
    # Same architecture, other weights: caught by the weights hash.
    other = dict(caches["llama"].meta, model_hash="files:0000000000000000")
    with pytest.raises(ProvenanceError, match="weights hash"):
        check_model_matches_cache(tiny_models["llama"], weights_hash(tiny_models["llama"]),
                                  AutoConfig.from_pretrained(tiny_models["llama"]), other)
    check_model_matches_cache(tiny_models["llama"], weights_hash(tiny_models["llama"]),
                              AutoConfig.from_pretrained(tiny_models["llama"]), caches["llama"].meta)


def test_layer_comes_from_selection_or_flag(caches):
    chips = StandInChips(caches["gpt2"], [1, 2, 3], selection={"layer": 2, "strategy": "validate"})
    assert resolve_layer(chips, None) == (2, "validate")
    assert resolve_layer(chips, 3) == (3, "fixed:3")
    with pytest.raises(ChipTuningError, match="no chip at layer 4"):
        resolve_layer(chips, 4)
    chips.selection = None
    with pytest.raises(ChipTuningError, match="pass --layer"):
        resolve_layer(chips, None)


def test_out_dir_that_is_not_a_checkpoint_is_not_overwritten(tiny_models, caches, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ChipTuningError, match="not a pruned checkpoint"):
        _prune(tiny_models, caches, "gpt2", 1, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary left behind


def test_evaluate_writes_metrics_and_predictions(tiny_models, caches, tmp_path):
    chips = _prune(tiny_models, caches, "qwen2", 2, tmp_path / "p")
    metrics = evaluate(tmp_path / "p", caches["data"], out_dir=tmp_path / "eval")
    reader = caches["qwen2"]
    expected = chips.chip(2).predict(reader.layer(2))
    assert metrics["accuracy"] == pytest.approx(float((expected == reader.labels).mean()))
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["example_id"] for r in rows] == list(reader.example_ids)
    assert [int(r["prediction"]) for r in rows] == list(expected)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_examples"] == len(REVIEWS)


# -- command line ---------------------------------------------------------------------------------

@pytest.fixture
def stand_in_probe(monkeypatch, caches):
    """``chiptuning.probe.load_chips`` returning stand-in chips of the gpt2 cache (layers 1..3)."""
    import sys
    import types

    probe = types.ModuleType("chiptuning.probe")
    probe.load_chips = lambda path: StandInChips(caches["gpt2"], [1, 2, 3], selection={"layer": 2, "strategy": "validate"})
    monkeypatch.setitem(sys.modules, "chiptuning.probe", probe)


def _cli(*args):
    from click.testing import CliRunner

    from chiptuning.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_prune_eval_push(tiny_models, caches, tmp_path, stand_in_probe, monkeypatch):
    chips_dir = tmp_path / "chips"
    chips_dir.mkdir()
    result = _cli("prune", "--model", tiny_models["gpt2"], "--chips", chips_dir, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "at layer 2 of 4" in result.output and read_provenance(tmp_path / "p")["tasks"]["custom"]["strategy"] == "validate"

    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (tmp_path / "eval" / "predictions.csv").is_file()
    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--text-column", "text", "--out", tmp_path / "eval2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "metrics.json").read_text().count('"accuracy"') == 1

    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.setdefault("upload", kw) and "https://hf.co/me/m/commit/1")
    result = _cli("push", tmp_path / "p", "--repo-id", "me/m")
    assert result.exit_code == 0, result.output
    assert calls["create"] == "me/m" and calls["upload"]["folder_path"] == str(tmp_path / "p")
    assert "layer 2 of 4" in calls["upload"]["commit_message"]


def test_cli_user_errors_are_one_line(tiny_models, caches, tmp_path, stand_in_probe):
    chips_dir = tmp_path / "chips"
    chips_dir.mkdir()
    # chips from the gpt2 cache given the llama model: refused before anything is written.
    result = _cli("prune", "--model", tiny_models["llama"], "--chips", chips_dir, "--out", tmp_path / "p")
    assert result.exit_code == 1 and "cache from another model" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p").exists()
    result = _cli("prune", "--model", tiny_models["gpt2"], "--chips", chips_dir, "--layer", "7", "--out", tmp_path / "p")
    assert result.exit_code == 1 and "no chip at layer 7" in result.output
    result = _cli("push", tiny_models["gpt2"], "--repo-id", "me/m")
    assert result.exit_code == 1 and "not a chip-tuning checkpoint" in result.output
    _prune(tiny_models, caches, "gpt2", 1, tmp_path / "ok")
    result = _cli("eval", tmp_path / "ok", "--data", caches["data"], "--labels", "pos,neg", "--out", tmp_path / "e")
    assert result.exit_code == 1 and "differ from the checkpoint's" in result.output


# -- feature modes, export, several tasks ---------------------------------------------------------

def _texts(caches):
    return load_task(caches["data"], text_column="text").build_prompts()[0]


def _extract_normed(tiny_models, caches, kind, out):
    task = load_task(caches["data"], text_column="text")
    cfg = ExtractConfig(out=str(out), model=tiny_models[kind], device="cpu", feature_mode="normed")
    return CacheReader(extract(cfg, task))


# Code run in a fresh interpreter where `chiptuning` cannot be imported: the export must serve alone.
_SERVE_WITHOUT_CHIPTUNING = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "chiptuning":
            raise ImportError("chiptuning is blocked in this test")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    single = [model(**tok(t, return_tensors="pt")).logits.argmax(-1).item() for t in texts]
    batch = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
print(json.dumps({"single": [model.config.id2label[i] for i in single],
                  "batch": [model.config.id2label[i] for i in batch]}))
"""


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_normed_features_and_sequence_classification_export(tiny_models, caches, tmp_path, kind):
    import subprocess
    import sys

    reader = _extract_normed(tiny_models, caches, kind, tmp_path / "cache")
    assert not np.allclose(reader.layer(2), caches[kind].layer(2))  # normed differs from raw
    chips = _prune(tiny_models, caches, kind, 2, tmp_path / "p", reader=reader,
                   logreg={"fit_intercept": False}, export="sequence-classification")
    texts = _texts(caches)
    clf = ChipModel.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(clf.features(texts), reader.layer(2), atol=1e-5, rtol=0)
    expected = [reader.label_names[i] for i in chips.chip(2).predict(reader.layer(2))]
    assert clf.predict(texts) == expected
    assert len(set(expected)) == 2, "test needs a chip that predicts both classes"
    out = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_CHIPTUNING, str(tmp_path / "p"), json.dumps(texts)],
                         capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["single"] == expected and served["batch"] == expected
    assert "AutoModelForSequenceClassification" in (tmp_path / "p" / "README.md").read_text()


def test_export_needs_normed_features_and_a_bias_free_chip(tiny_models, caches, tmp_path):
    with pytest.raises(ChipTuningError, match="feature-mode normed"):
        _prune(tiny_models, caches, "llama", 2, tmp_path / "a", logreg={"fit_intercept": False},
               export="sequence-classification")
    reader = _extract_normed(tiny_models, caches, "llama", tmp_path / "cache")
    with pytest.raises(ChipTuningError, match="bias-free"):
        _prune(tiny_models, caches, "llama", 2, tmp_path / "b", reader=reader, export="sequence-classification")
    with pytest.raises(ChipTuningError, match="decoder models"):
        _prune(tiny_models, caches, "minilm", 2, tmp_path / "c", reader=_extract_normed(
            tiny_models, caches, "minilm", tmp_path / "cm"), logreg={"fit_intercept": False},
            export="sequence-classification")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cm"]


def test_several_tasks_in_one_checkpoint(tiny_models, caches, tmp_path):
    path = tiny_models["llama"]
    rows = [json.loads(line) for line in caches["data"].read_text().splitlines()]
    length_data = tmp_path / "length.jsonl"
    length_data.write_text("".join(json.dumps({**r, "label": "long" if len(r["text"]) > 30 else "short"}) + "\n"
                                   for r in rows))
    length = CacheReader(extract(ExtractConfig(out=str(tmp_path / "lc"), model=path, device="cpu"),
                                 load_task(length_data, text_column="text")))
    sentiment = caches["llama"]
    tasks = []
    for name, reader, layer in (("sentiment", sentiment, 1), ("length", length, 3)):
        chips = StandInChips(reader, [layer])
        fingerprint, meta = chips_cache(chips)
        tasks.append(TaskChip(chips, layer, f"fixed:{layer}", fingerprint, meta, name=name))
    save_pruned(load_backbone(path), load_tokenizer(path), tasks, tmp_path / "p",
                base={"id": path, "hash": weights_hash(path)})
    clf = ChipModel.from_pretrained(tmp_path / "p")
    assert clf.layer == 3 and clf.tasks == ["length", "sentiment"]  # sorted, as in the JSON
    texts = _texts(caches)
    for task, reader in zip(tasks, (sentiment, length)):
        np.testing.assert_allclose(clf.features(texts, task=task.name), reader.layer(task.layer), atol=1e-5, rtol=0)
        expected = [reader.label_names[i] for i in task.chips.chip(task.layer).predict(reader.layer(task.layer))]
        assert clf.predict(texts, task=task.name) == expected
    assert clf.predict(texts) == clf.predict(texts, task="sentiment")
    assert clf.label_names("length") == ["long", "short"]
    with pytest.raises(DataError, match="unknown task 'topic'"):
        clf.predict(texts, task="topic")
    metrics = evaluate(tmp_path / "p", length_data, task="length")
    assert metrics["layer"] == 3 and metrics["task"] == "length"


def test_eval_against_the_dense_model(tiny_models, caches, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chips = _prune(tiny_models, caches, "gpt2", 2, tmp_path / "p")
    metrics = evaluate(tmp_path / "p", caches["data"], out_dir=tmp_path / "eval", dense=True, batch_size=5)
    dense = metrics["dense"]
    assert dense["chip_agreement_with_pruned"] == 1.0 and dense["chip_accuracy"] == metrics["accuracy"]
    assert metrics["ideal_speedup"] == 2.0 and metrics["speedup"] > 0
    # The zero-shot baseline equals scoring " neg" / " pos" with the full LM, one prompt at a time.
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    choices = [tok(" " + name, add_special_tokens=False)["input_ids"][0] for name in ("neg", "pos")]
    expected = []
    for text in _texts(caches):
        with torch.no_grad():
            logits = lm(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0, -1]
        expected.append(int(logits[choices].argmax()))
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["dense_zero_shot"]) for r in rows] == expected
    labels = caches["gpt2"].labels
    assert dense["zero_shot_accuracy"] == pytest.approx(float((np.array(expected) == labels).mean()))
    assert [int(r["dense_prediction"]) for r in rows] == list(chips.chip(2).predict(caches["gpt2"].layer(2)))


def test_lora_adapter_is_merged_before_pruning(tiny_models, caches, tmp_path, monkeypatch):
    import sys
    import types

    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    path = tiny_models["llama"]
    torch_model = AutoModel.from_pretrained(path)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(torch_model, config).save_pretrained(tmp_path / "adapter")
    task = load_task(caches["data"], text_column="text")
    reader = CacheReader(extract(ExtractConfig(out=str(tmp_path / "cache"), model=path, device="cpu",
                                               adapter=str(tmp_path / "adapter")), task))
    assert not np.allclose(reader.layer(2), caches["llama"].layer(2))  # the adapter changes features
    chips = StandInChips(reader, [1, 2, 3], selection={"layer": 2, "strategy": "validate"})
    probe = types.ModuleType("chiptuning.probe")
    probe.load_chips = lambda _: chips
    monkeypatch.setitem(sys.modules, "chiptuning.probe", probe)

    with pytest.raises(ProvenanceError, match="adapter"):
        prune(path, tmp_path / "chips", tmp_path / "no-adapter")
    prune(path, tmp_path / "chips", tmp_path / "p", adapter=str(tmp_path / "adapter"))
    clf = ChipModel.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(clf.features(_texts(caches)), reader.layer(2), atol=1e-5, rtol=0)
    assert clf.record["base_model"]["adapter"] == str(tmp_path / "adapter")
    metrics = evaluate(tmp_path / "p", caches["data"], dense=True)
    assert metrics["dense"]["chip_agreement_with_pruned"] == 1.0  # the dense model got the adapter too


def test_adapter_saved_from_a_causal_lm_lands_on_the_backbone(tiny_models, tmp_path):
    import torch

    peft = pytest.importorskip("peft")
    from chiptuning.prune.adapters import load_model_with_adapter, merge_adapter_
    from transformers import AutoModel, AutoModelForCausalLM

    path = tiny_models["gpt2"]
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path), config).save_pretrained(tmp_path / "a")
    plain = AutoModel.from_pretrained(path)
    merged = load_model_with_adapter(path, str(tmp_path / "a"), causal_lm=False)
    assert type(merged).__name__ == "GPT2Model"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).last_hidden_state, plain(ids).last_hidden_state)
        head = load_model_with_adapter(path, str(tmp_path / "a"), causal_lm=True)
        torch.testing.assert_close(head.base_model(ids).last_hidden_state, merged(ids).last_hidden_state)
    with pytest.raises(ChipTuningError, match="does not fit GPT2Model"):
        merge_adapter_(AutoModel.from_pretrained(path), str(tmp_path / "a"))


def test_keep_lm_head_checkpoint_generates_and_classifies(tiny_models, caches, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models["gpt2"]
    chips = StandInChips(caches["gpt2"], [2])
    fingerprint, meta = chips_cache(chips)
    task = TaskChip(chips, 2, "fixed:2", fingerprint, meta, name="custom")
    with pytest.raises(ChipTuningError, match="needs the model with its head"):
        save_pruned(load_backbone(path), load_tokenizer(path), [task], tmp_path / "x", base={"id": path},
                    keep_lm_head=True)
    save_pruned(AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path), [task], tmp_path / "p",
                base={"id": path, "hash": weights_hash(path)}, keep_lm_head=True)
    record = read_provenance(tmp_path / "p")
    assert record["architecture"] == "GPT2LMHeadModel" and record["params"]["removed"]["lm_head"] == 0
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    prompt = torch.tensor([[101, 2023, 2003]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(lm.generate(prompt, use_cache=True, **kw), lm.generate(prompt, use_cache=False, **kw))
    clf = ChipModel.from_pretrained(tmp_path / "p")
    expected = chips.chip(2).predict(caches["gpt2"].layer(2))
    np.testing.assert_array_equal(clf.predict_index(_texts(caches)), expected)
