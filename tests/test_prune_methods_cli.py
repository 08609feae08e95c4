"""`chiptuning baseline`: the depth-pruning baselines through the command line, and the deprecated
`chiptuning prune --method`."""

from __future__ import annotations

import json

from click.testing import CliRunner
from transformers import AutoConfig

from chiptuning.cli import main


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_baseline_command(tiny_models, sentiment_file, tmp_path):
    out = tmp_path / "tail"
    result = _cli("baseline", "--model", tiny_models["llama"], "--method", "tail", "--n-layers", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "tail" and record["num_blocks"] == 3
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3

    out = tmp_path / "shortgpt"
    result = _cli("baseline", "--model", tiny_models["llama"], "--method", "shortgpt", "--n-layers", "2",
                  "--calibration-data", sentiment_file, "--calibration-text-column", "text",
                  "--n-calibration", "8", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "pruning.json").read_text())["num_blocks"] == 2


def test_baseline_user_errors_are_one_line(tiny_models, tmp_path):
    result = _cli("baseline", "--model", tiny_models["llama"], "--method", "shortgpt", "--n-layers", "1",
                  "--out", tmp_path / "x")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "calibration" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _cli("prune", "--model", tiny_models["llama"], "--out", tmp_path / "y")
    assert result.exit_code == 1 and "--chips" in result.output


def test_prune_method_still_works_and_names_the_new_command(tiny_models, sentiment_file, tmp_path):
    out = tmp_path / "laco"
    result = _cli("prune", "--model", tiny_models["llama"], "--method", "laco", "--n-layers", "1",
                  "--calibration-data", sentiment_file, "--calibration-text-column", "text", "--n-calibration", "8",
                  "--threshold", "0.5", "--merge-layers", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("\n") == 1 and "chiptuning baseline --method laco" in result.stderr
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "laco" and record["options"]["threshold"] == 0.5
    assert record["options"]["merge_layers"] == 2 and record["num_blocks"] == 3
    result = _cli("prune", "--model", tiny_models["llama"], "--method", "tail", "--n-layers", "1", "--layer", "2",
                  "--out", tmp_path / "z")
    assert result.exit_code == 1 and "go with --method chip" in result.output
