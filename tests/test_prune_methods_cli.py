"""`chiptuning prune --method`: the depth-pruning baselines through the command line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from chiptuning.cli import main


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_baseline_method_through_the_cli(tiny_models, sentiment_file, tmp_path):
    out = tmp_path / "tail"
    result = _cli("prune", "--model", tiny_models["llama"], "--method", "tail", "--n-layers", "1", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "tail" and record["num_blocks"] == 3
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3

    out = tmp_path / "shortgpt"
    result = _cli("prune", "--model", tiny_models["llama"], "--method", "shortgpt", "--n-layers", "2",
                  "--calibration-data", sentiment_file, "--calibration-text-column", "text",
                  "--n-calibration", "8", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "pruning.json").read_text())["num_blocks"] == 2


def test_baseline_method_user_errors_are_one_line(tiny_models, tmp_path):
    result = _cli("prune", "--model", tiny_models["llama"], "--method", "shortgpt", "--n-layers", "1",
                  "--out", tmp_path / "x")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "calibration" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _cli("prune", "--model", tiny_models["llama"], "--out", tmp_path / "y")
    assert result.exit_code == 1 and "--chips" in result.output


def test_cli_lists_every_library_method():
    from chiptuning.cli.prune import BASELINE_METHODS
    from chiptuning.prune.baselines import METHODS

    assert set(BASELINE_METHODS) == set(METHODS)
