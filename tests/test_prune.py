"""Pruned checkpoints: provenance, refusals, the CLI, export, several tasks, eval, adapters.

Every chip here is a real one: trained by ``chiptuning.probe`` (library or ``chiptuning probe
train``) on a cache written by ``chiptuning.extract``, saved, and read back with ``load_chips``.
The per-architecture parity tests live in ``test_prune_parity.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError, DataError, ProvenanceError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.models import load_backbone, load_model, load_tokenizer, merge_adapter_, weights_hash
from chiptuning.probe import ChipSet, LinearChip, load_chips, select_layer, train_chips
from chiptuning.prune import ChipModel, evaluate, prune, read_provenance, save_pruned
from chiptuning.prune.checkpoint import load_task_chips, resolve_layer
from chiptuning.prune.provenance import PROVENANCE_FILE, check_model_matches_cache, write_provenance
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def caches(tiny_models, tmp_path_factory):
    """One cache of the 12 reviews per model (kind -> CacheReader), and the data file ("data")."""
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


def train(reader, out, layers, strategy=None):
    """Real linear chips at ``layers`` of ``reader``'s cache, saved to ``out`` and loaded back.

    ``strategy``: run ``chiptuning select`` with it (writes selection.json).
    """
    train_chips(reader, chip="linear", out=out, layers=layers, val_size=2, seed=0)
    if strategy:
        select_layer(out, strategy)
    return load_chips(out)


def bias_free_chips(reader, layer, out):
    """A chips directory holding one bias-free linear chip (what --export folds into a score head).

    ``chiptuning probe train`` has no bias-free option, so the probe's own LinearChip is fitted
    with ``fit_intercept=False`` and saved as a real ChipSet.
    """
    chip = LinearChip(fit_intercept=False, random_state=0, epochs=60).fit(reader.layer(layer), reader.labels)
    config = {"chip": "linear", "layers": [layer], "n_classes": len(reader.label_names),
              "label_names": list(reader.label_names), "hidden_size": reader.hidden_size,
              "train_cache": {"fingerprint": reader.fingerprint, "meta": reader.meta}}
    ChipSet(config, sklearn_chips={layer: chip}, metrics=[{"layer": layer, "chip": "linear"}]).save(out)
    return load_chips(out)


def _prune(tiny_models, caches, kind, layer, out, reader=None, chips_dir=None, **kw):
    """Train chips at ``layer`` (unless given), prune ``kind``'s model with them; returns the chips."""
    reader = reader or caches[kind]
    if chips_dir is None:
        chips_dir = out.parent / f"{out.name}-chips"
        train(reader, chips_dir, [layer])
    prune(tiny_models[kind], chips_dir, out, layer=layer, **kw)
    return load_chips(chips_dir)


def _one_line(result, *fragments):
    """A CLI user error: exit 1, one line naming the problem, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_provenance_record_and_model_card(tiny_models, caches, tmp_path):
    _prune(tiny_models, caches, "llama", 2, tmp_path / "p")
    record = read_provenance(tmp_path / "p")
    assert record["layer"] == 2 and record["num_blocks"] == 4
    task = record["tasks"][record["default_task"]]
    assert task["label_names"] == ["neg", "pos"] and task["text_column"] == "text"
    assert task["cache_fingerprint"] == caches["llama"].fingerprint
    assert {"config.json", "model.safetensors", "README.md", "chip/chip.json", "chip/chip.safetensors",
            "layer_accuracy.png"} <= set(record["checksums"])
    assert task["chips_config"]["chip"] == "linear" and task["chips_config"]["layers"] == [2]
    params = record["params"]
    assert params["after"]["total"] < params["before"]["total"]
    assert params["removed"]["blocks"] == sum(params["before"]["blocks"][2:])
    card = (tmp_path / "p" / "README.md").read_text()
    assert "pruned to 2 of 4 blocks" in card and "ChipModel.from_pretrained" in card
    assert "layer_accuracy.png" in card
    text = (tmp_path / "p" / "chiptuning.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "chip/chip.safetensors", "chiptuning.json"])
def test_edited_files_are_refused(tiny_models, caches, tmp_path, victim):
    out = tmp_path / "p"
    _prune(tiny_models, caches, "gpt2", 2, out)
    ChipModel.from_pretrained(out)  # intact: loads
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
    _one_line(_cli("eval", out, "--data", caches["data"], "--out", tmp_path / "e"), "modified after pruning")


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
    other = dict(caches["llama"].meta.to_dict(), model_hash="files:0000000000000000")
    with pytest.raises(ProvenanceError, match="weights hash"):
        check_model_matches_cache(tiny_models["llama"], weights_hash(tiny_models["llama"]),
                                  AutoConfig.from_pretrained(tiny_models["llama"]), other)
    check_model_matches_cache(tiny_models["llama"], weights_hash(tiny_models["llama"]),
                              AutoConfig.from_pretrained(tiny_models["llama"]), caches["llama"].meta)


def test_base_model_that_does_not_match_the_provenance_is_refused(tiny_models, caches, tmp_path):
    """Files swapped for another model's and the checksums re-stamped: the record still tells."""
    import shutil

    out = tmp_path / "p"
    _prune(tiny_models, caches, "gpt2", 2, out)
    record = read_provenance(out)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(f"{tiny_models['llama']}/{name}", out / name)
    (out / PROVENANCE_FILE).unlink()
    write_provenance(out, {k: v for k, v in record.items() if k not in ("checksums", "record_sha256")})
    with pytest.raises(ProvenanceError, match=r"does not match its provenance \(model_type 'llama', provenance says 'gpt2'"):
        ChipModel.from_pretrained(out)
    _one_line(_cli("eval", out, "--data", caches["data"], "--out", tmp_path / "e"), "does not match its provenance")


def test_dense_model_other_than_the_base_is_refused(tiny_models, caches, tmp_path):
    _prune(tiny_models, caches, "gpt2", 2, tmp_path / "p")
    other = tmp_path / "other-gpt2"
    model = load_backbone(tiny_models["gpt2"])
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.add_(1.0)  # same architecture, other weights
    model.save_pretrained(other)
    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--out", tmp_path / "e",
                  "--dense", "--dense-model", other)
    _one_line(result, "but the checkpoint was pruned from")


def test_layer_comes_from_selection_or_flag(caches, tmp_path):
    chips = train(caches["gpt2"], tmp_path / "chips", [1, 2, 3], strategy="validate")
    chosen = chips.selection.layer
    assert chosen in (1, 2, 3)
    assert resolve_layer(chips, None) == (chosen, "validate")
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "precious-chips"]  # no temporary left


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

def _cli(*args):
    from click.testing import CliRunner

    from chiptuning.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_probe_train_select_prune_eval_push(tiny_models, caches, tmp_path, monkeypatch):
    chips_dir = tmp_path / "chips"
    result = _cli("probe", "train", caches["gpt2"].path, "--chip", "linear", "--layers", "1-3", "--val-size", "2",
                  "--seed", "0", "--out", chips_dir)
    assert result.exit_code == 0, result.output
    result = _cli("select", chips_dir, "--strategy", "fixed:2")
    assert result.exit_code == 0, result.output
    result = _cli("prune", "--model", tiny_models["gpt2"], "--chips", chips_dir, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "at layer 2 of 4" in result.output and read_provenance(tmp_path / "p")["tasks"]["custom"]["strategy"] == "fixed:2"

    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (tmp_path / "eval" / "predictions.csv").is_file()
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        served = [int(r["prediction"]) for r in csv.DictReader(f)]
    assert served == list(load_chips(chips_dir).chip(2).predict(caches["gpt2"].layer(2)))
    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--text-column", "text", "--out", tmp_path / "eval2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "metrics.json").read_text().count('"accuracy"') == 1

    import huggingface_hub

    calls = {}

    def commit(self, **kw):  # what would be uploaded: every operation's bytes, read now
        calls["commit"] = dict(kw, files={op.path_in_repo: (op.path_or_fileobj.read() if hasattr(
            op.path_or_fileobj, "read") else Path(op.path_or_fileobj).read_bytes()) for op in kw["operations"]})
        return "https://hf.co/me/m/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", commit)
    (tmp_path / "p" / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # inert: not uploaded
    result = _cli("push", tmp_path / "p", "--repo-id", "me/m")
    assert result.exit_code == 0, result.output
    assert calls["create"] == "me/m" and "layer 2 of 4" in calls["commit"]["commit_message"]
    recorded = read_provenance(tmp_path / "p")["checksums"]
    assert set(calls["commit"]["files"]) == set(recorded) | {PROVENANCE_FILE}  # exactly the recorded files
    assert all(hashlib.sha256(calls["commit"]["files"][rel]).hexdigest() == digest for rel, digest in recorded.items())


def test_cli_prune_keeps_the_dtype_of_a_bf16_cache(tiny_models, caches, tmp_path):
    """Without --dtype a chip checkpoint is saved in the dtype its cache was extracted in, so the
    served predictions equal the chip's on the cached bf16 features (an fp32 checkpoint would not
    be the model the chip was trained on). Exact because eval batches by the same token budget as
    extraction: in bf16 another batching (other padding) moves features by a rounding step."""
    task = load_task(caches["data"], text_column="text")
    reader = CacheReader(extract(ExtractConfig(out=str(tmp_path / "cache"), model=tiny_models["llama"],
                                               device="cpu", dtype="bf16", batch_size=None), task))
    assert reader.meta.dtype == "bfloat16"
    chips_dir = tmp_path / "chips"
    train(reader, chips_dir, [2])
    result = _cli("prune", "--model", tiny_models["llama"], "--chips", chips_dir, "--layer", "2", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert read_provenance(tmp_path / "p")["dtype"] == "bfloat16"
    result = _cli("eval", tmp_path / "p", "--data", caches["data"], "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        served = [int(r["prediction"]) for r in csv.DictReader(f)]
    assert served == list(load_chips(chips_dir).chip(2).predict(reader.layer(2)))
    result = _cli("prune", "--model", tiny_models["llama"], "--chips", chips_dir, "--layer", "2", "--dtype", "fp32",
                  "--out", tmp_path / "p32")
    assert result.exit_code == 0, result.output
    assert read_provenance(tmp_path / "p32")["dtype"] == "float32"


def test_cli_user_errors_are_one_line(tiny_models, caches, tmp_path):
    chips_dir = tmp_path / "chips"
    train(caches["gpt2"], chips_dir, [1, 2, 3], strategy="fixed:2")
    # chips from the gpt2 cache given the llama model: refused before anything is written.
    result = _cli("prune", "--model", tiny_models["llama"], "--chips", chips_dir, "--out", tmp_path / "p")
    _one_line(result, "cache from another model")
    assert not (tmp_path / "p").exists()
    _one_line(_cli("prune", "--model", tiny_models["gpt2"], "--chips", chips_dir, "--layer", "7", "--out", tmp_path / "p"),
              "no chip at layer 7")
    _one_line(_cli("push", tiny_models["gpt2"], "--repo-id", "me/m"), "not a chip-tuning checkpoint")
    _prune(tiny_models, caches, "gpt2", 1, tmp_path / "ok")
    result = _cli("eval", tmp_path / "ok", "--data", caches["data"], "--labels", "pos,neg", "--out", tmp_path / "e")
    _one_line(result, "differ from the checkpoint's")


# -- feature modes, export, several tasks ---------------------------------------------------------

def _texts(caches):
    return load_task(caches["data"], text_column="text").build_prompts()[0]


def _extract_normed(tiny_models, caches, kind, out):
    task = load_task(caches["data"], text_column="text")
    cfg = ExtractConfig(out=str(out), model=tiny_models[kind], device="cpu", feature_mode="normed")
    return CacheReader(extract(cfg, task))


# Run in a fresh, isolated interpreter (-I: no PYTHONPATH, no user site, not the cwd) from "/",
# with every import of `chiptuning` blocked: the export must serve with transformers alone.
_SERVE_WITHOUT_CHIPTUNING = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "chiptuning":
            raise ImportError("chiptuning is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import chiptuning  # noqa
    sys.exit("chiptuning is importable: the test would prove nothing")
except ImportError:
    pass
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    single = [model(**tok(t, return_tensors="pt")).logits.argmax(-1).item() for t in texts]
    batch = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
print(json.dumps({"single": [model.config.id2label[i] for i in single],
                  "batch": [model.config.id2label[i] for i in batch],
                  "chiptuning_loaded": sorted(m for m in sys.modules if m.startswith("chiptuning"))}))
"""


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_normed_features_and_sequence_classification_export(tiny_models, caches, tmp_path, kind):
    import subprocess
    import sys

    reader = _extract_normed(tiny_models, caches, kind, tmp_path / "cache")
    assert not np.allclose(reader.layer(2), caches[kind].layer(2))  # normed differs from raw
    chips = bias_free_chips(reader, 2, tmp_path / "chips")
    _prune(tiny_models, caches, kind, 2, tmp_path / "p", reader=reader, chips_dir=tmp_path / "chips",
           export="sequence-classification")
    texts = _texts(caches)
    clf = ChipModel.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(clf.features(texts), reader.layer(2), atol=1e-5, rtol=0)
    expected = [reader.label_names[i] for i in chips.chip(2).predict(reader.layer(2))]
    assert clf.predict(texts) == expected
    assert len(set(expected)) == 2, "test needs a chip that predicts both classes"
    out = subprocess.run([sys.executable, "-I", "-c", _SERVE_WITHOUT_CHIPTUNING, str(tmp_path / "p"), json.dumps(texts)],
                         capture_output=True, text=True, cwd="/", env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["chiptuning_loaded"] == []
    assert served["single"] == expected and served["batch"] == expected
    assert "AutoModelForSequenceClassification" in (tmp_path / "p" / "README.md").read_text()


def test_export_needs_normed_features_and_a_bias_free_chip(tiny_models, caches, tmp_path):
    with pytest.raises(ChipTuningError, match="feature-mode normed"):
        _prune(tiny_models, caches, "llama", 2, tmp_path / "a", export="sequence-classification",
               chips_dir=bias_free_chips(caches["llama"], 2, tmp_path / "chips-a").path)
    reader = _extract_normed(tiny_models, caches, "llama", tmp_path / "cache")
    with pytest.raises(ChipTuningError, match="bias-free"):  # probe train's linear chips have a bias
        _prune(tiny_models, caches, "llama", 2, tmp_path / "b", reader=reader, export="sequence-classification")
    minilm = _extract_normed(tiny_models, caches, "minilm", tmp_path / "cm")
    with pytest.raises(ChipTuningError, match="decoder models"):
        _prune(tiny_models, caches, "minilm", 2, tmp_path / "c", reader=minilm, export="sequence-classification",
               chips_dir=bias_free_chips(minilm, 2, tmp_path / "chips-c").path)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_several_tasks_in_one_checkpoint(tiny_models, caches, tmp_path):
    path = tiny_models["llama"]
    rows = [json.loads(line) for line in caches["data"].read_text().splitlines()]
    length_data = tmp_path / "length.jsonl"
    length_data.write_text("".join(json.dumps({**r, "label": "long" if len(r["text"]) > 30 else "short"}) + "\n"
                                   for r in rows))
    length = CacheReader(extract(ExtractConfig(out=str(tmp_path / "lc"), model=path, device="cpu"),
                                 load_task(length_data, text_column="text")))
    sentiment = caches["llama"]
    train(sentiment, tmp_path / "chips-sentiment", [1, 2], strategy="fixed:1")
    train(length, tmp_path / "chips-length", [2, 3], strategy="fixed:3")
    prune(path, [f"sentiment={tmp_path / 'chips-sentiment'}", f"length={tmp_path / 'chips-length'}"], tmp_path / "p")
    tasks = load_task_chips([tmp_path / "chips-sentiment", tmp_path / "chips-length"])
    clf = ChipModel.from_pretrained(tmp_path / "p")
    assert clf.layer == 3 and clf.tasks == ["length", "sentiment"]  # sorted, as in the JSON
    texts = _texts(caches)
    for name, task, reader in zip(("sentiment", "length"), tasks, (sentiment, length)):
        np.testing.assert_allclose(clf.features(texts, task=name), reader.layer(task.layer), atol=1e-5, rtol=0)
        expected = [reader.label_names[i] for i in task.chips.chip(task.layer).predict(reader.layer(task.layer))]
        assert clf.predict(texts, task=name) == expected
    assert [t.layer for t in tasks] == [1, 3]
    assert clf.predict(texts) == clf.predict(texts, task="sentiment")
    assert clf.label_names("length") == ["long", "short"]
    with pytest.raises(DataError, match="unknown task 'topic'"):
        clf.predict(texts, task="topic")
    metrics = evaluate(tmp_path / "p", length_data, task="length")
    assert metrics["layer"] == 3 and metrics["task"] == "length"


def test_eval_against_the_dense_model(tiny_models, caches, tmp_path):
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


def test_eval_dense_times_both_models_after_a_full_warm_up(tiny_models, caches, tmp_path, monkeypatch):
    """With --dense each model first runs every input once, untimed: kernels built per batch shape
    (oneDNN's bf16 matmuls) would otherwise be paid by whichever model is timed first."""
    import chiptuning.prune.evaluation as evaluation

    _prune(tiny_models, caches, "gpt2", 2, tmp_path / "p")
    calls = []
    features_of_inputs, dense_pass = ChipModel.features_of_inputs, evaluation.dense_pass
    monkeypatch.setattr(ChipModel, "features_of_inputs",
                        lambda self, inputs, *a, **kw: calls.append(("pruned", len(inputs))) or
                        features_of_inputs(self, inputs, *a, **kw))
    monkeypatch.setattr(evaluation, "dense_pass",
                        lambda model, **kw: calls.append(("dense", len(kw["inputs"]))) or dense_pass(model, **kw))
    n = len(REVIEWS)
    evaluate(tmp_path / "p", caches["data"], dense=True, batch_size=5)
    assert calls == [("pruned", n), ("pruned", n), ("dense", n), ("dense", n)]
    calls.clear()  # --repeats 3: three timed passes of each model, the fastest reported
    metrics = evaluate(tmp_path / "p", caches["data"], dense=True, batch_size=5, repeats=3)
    assert calls == [("pruned", n)] * 4 + [("dense", n)] * 4
    for timed in (metrics, metrics["dense"]):
        assert len(timed["timed_passes_s"]) == 3 and timed["elapsed_s"] == min(timed["timed_passes_s"])
    assert metrics["speedup"] == metrics["dense"]["elapsed_s"] / metrics["elapsed_s"]
    calls.clear()
    evaluate(tmp_path / "p", caches["data"], batch_size=5)  # without --dense: a short warm-up
    assert calls == [("pruned", 8), ("pruned", n)]


def _lora(path, out, saved_from: str):
    """A random (non-identity) LoRA adapter of the tiny Llama, saved from the backbone or the CausalLM."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if saved_from == "causal_lm" else AutoModel
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft.get_peft_model(cls.from_pretrained(path), config).save_pretrained(out)
    return str(out)


def test_lora_adapter_saved_from_a_causal_lm_works_end_to_end(tiny_models, caches, tmp_path):
    """The paper's CT(LoRA): extract, prune and eval all merge the adapter through load_backbone."""
    path = tiny_models["llama"]
    adapter = _lora(path, tmp_path / "adapter", "causal_lm")
    task = load_task(caches["data"], text_column="text")
    reader = CacheReader(extract(ExtractConfig(out=str(tmp_path / "cache"), model=path, device="cpu",
                                               adapter=adapter), task))
    assert not np.allclose(reader.layer(2), caches["llama"].layer(2))  # the adapter reached extraction
    train(reader, tmp_path / "chips", [1, 2, 3], strategy="fixed:2")

    with pytest.raises(ProvenanceError, match="adapter"):
        prune(path, tmp_path / "chips", tmp_path / "no-adapter")
    prune(path, tmp_path / "chips", tmp_path / "p", adapter=adapter)
    clf = ChipModel.from_pretrained(tmp_path / "p")
    np.testing.assert_allclose(clf.features(_texts(caches)), reader.layer(2), atol=1e-5, rtol=0)
    assert clf.record.base_model.adapter == adapter
    metrics = evaluate(tmp_path / "p", caches["data"], dense=True)
    assert metrics["dense"]["chip_agreement_with_pruned"] == 1.0  # the dense model got the adapter too


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the refused case, on purpose
@pytest.mark.parametrize("saved_from", ["backbone", "causal_lm"])
def test_adapter_lands_whichever_class_it_was_saved_from(tiny_models, tmp_path, saved_from):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, AutoModelForCausalLM

    path = tiny_models["llama"]
    adapter = _lora(path, tmp_path / "a", saved_from)
    cls = AutoModelForCausalLM if saved_from == "causal_lm" else AutoModel
    reference = peft.PeftModel.from_pretrained(cls.from_pretrained(path), adapter).merge_and_unload()
    reference = getattr(reference, "base_model", reference).eval()  # (B, T, H) below from the backbone
    plain = load_backbone(path)
    merged = load_backbone(path, adapter=adapter)
    head = load_model(path, adapter=adapter, causal_lm=True)
    assert type(merged).__name__ == "LlamaModel" and type(head).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        assert not torch.allclose(plain(ids).last_hidden_state, expected)
        torch.testing.assert_close(merged(ids).last_hidden_state, expected)
        torch.testing.assert_close(head.base_model(ids).last_hidden_state, expected)
    if saved_from == "causal_lm":  # named for the CausalLM's paths: no place in a bare backbone
        with pytest.raises(ChipTuningError, match="does not fit LlamaModel"):
            merge_adapter_(AutoModel.from_pretrained(path), adapter)


def test_keep_lm_head_checkpoint_generates_and_classifies(tiny_models, caches, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_models["gpt2"]
    train(caches["gpt2"], tmp_path / "chips", [2], strategy="fixed:2")
    tasks = load_task_chips([tmp_path / "chips"])
    with pytest.raises(ChipTuningError, match="needs the model with its head"):
        save_pruned(load_backbone(path), load_tokenizer(path), tasks, tmp_path / "x", base={"id": path},
                    keep_lm_head=True)
    prune(path, tmp_path / "chips", tmp_path / "p", keep_lm_head=True)
    record = read_provenance(tmp_path / "p")
    assert record["architecture"] == "GPT2LMHeadModel" and record["params"]["removed"]["lm_head"] == 0
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    prompt = torch.tensor([[101, 2023, 2003]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(lm.generate(prompt, use_cache=True, **kw), lm.generate(prompt, use_cache=False, **kw))
    clf = ChipModel.from_pretrained(tmp_path / "p")
    expected = tasks[0].chips.chip(2).predict(caches["gpt2"].layer(2))
    np.testing.assert_array_equal(clf.predict_index(_texts(caches)), expected)
