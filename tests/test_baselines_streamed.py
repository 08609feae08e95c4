"""The depth-pruning baselines on a streamed model (``offload="stream"``): every block waits on the
meta device and is read from the model's files when a forward reaches it.

Each method must plan, cut and save exactly what it does on the same model held in memory (fp32:
the same weights through the same operations, so every score, similarity, training metric and
saved weight is equal bit for bit; LLM-Streamline trains its replacement from the same start, on
the same captured states, with the same seed), while the model stays streamed: no original block
is ever read into memory for good, only the blocks a method makes (merged or trained) are.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from chiptuning.models import is_streamed
from chiptuning.registry import get_blocks
from tests.test_baselines import make_model, tokenizer  # noqa: F401 -- tokenizer is a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Options that keep each method quick and give it the planted answer (see tests/test_baselines.py).
OPTIONS = {
    "tail": {},
    "shortgpt": {},
    "angular": {},
    "streamline": {"epochs": 2, "lr": 3e-3},
    "slm": {"threshold": 0.9999},
    "laco": {"threshold": 0.9999, "merge_layers": 3, "interval": 1},
}


@pytest.fixture(scope="module")
def planted_dir(tokenizer, tmp_path_factory):  # noqa: F811 -- the imported fixture
    """A tiny Llama saved as a directory: blocks 3 and 4 identical identity blocks."""
    path = tmp_path_factory.mktemp("planted")
    make_model(tokenizer, identity=(3, 4), copies=[(4, 3)]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calibration_task(sentiment_file):
    from chiptuning.tasks import load_task

    return load_task(sentiment_file, text_column="text")


class Spy:
    """Watches ``prune_with_method`` plan and reload: whether the model was streamed when planning
    began, whether every original block still was when it ended, and whether the saved checkpoint
    was reloaded streamed."""

    def __init__(self, monkeypatch):
        from chiptuning.prune.baselines import apply

        self.seen: dict[str, object] = {}
        plan_method, check_reload = apply.plan_method, apply.check_reload

        def planning(model, *args, **kwargs):
            originals = list(get_blocks(model))
            self.seen["streamed_before"] = is_streamed(model)
            plan = plan_method(model, *args, **kwargs)
            self.seen["originals_streamed_after"] = [is_streamed(b) for b in originals]
            self.seen["new_blocks"] = [b for b in plan.blocks or [] if all(b is not o for o in originals)]
            return plan

        def reloading(*args, **kwargs):
            model = check_reload(*args, **kwargs)
            self.seen["reloaded_streamed"] = is_streamed(model)
            return model

        monkeypatch.setattr(apply, "plan_method", planning)
        monkeypatch.setattr(apply, "check_reload", reloading)


def weights(path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_streamed_model_prunes_exactly_like_one_in_memory(method, planted_dir, calibration_task, tmp_path,
                                                             monkeypatch):
    from chiptuning.prune.baselines import prune_with_method, read_record

    spy = Spy(monkeypatch)
    records, saved = {}, {}
    for offload in ("none", "stream"):
        out = prune_with_method(str(planted_dir), method, tmp_path / offload, n_layers=2,
                                calibration_task=calibration_task, n_calibration=16, offload=offload,
                                **OPTIONS[method])
        records[offload], saved[offload] = read_record(out), weights(out)
        streamed = offload == "stream"
        assert spy.seen["streamed_before"] is streamed
        assert spy.seen["reloaded_streamed"] is streamed
        # No original block was read into memory for good: the plan's new blocks are all it holds.
        assert spy.seen["originals_streamed_after"] == [streamed] * 6
        assert not any(is_streamed(b) for b in spy.seen["new_blocks"])
    memory, stream = records["none"], records["stream"]
    assert stream.groups == memory.groups and stream.removed == memory.removed
    assert stream.details == memory.details  # scores, similarities, thresholds, training metrics: all exact
    assert stream.params == memory.params and stream.num_blocks == memory.num_blocks == 4
    assert stream.generation == memory.generation and stream.generation["kv_cache_matches"] is True
    assert stream.checksums == memory.checksums  # the same files, byte for byte
    assert saved["stream"].keys() == saved["none"].keys()
    for name, tensor in saved["none"].items():
        assert torch.equal(saved["stream"][name], tensor), name
    expected = {"tail": [5, 6], "shortgpt": [3, 4], "angular": [3, 4], "slm": [3, 4, 5], "laco": [3, 4, 5]}
    if method in expected:  # the planted answer, found on the streamed model too
        assert stream.removed == expected[method]
    if method == "streamline":  # trained: the replacement moved away from its start, the same way in both
        assert stream.details["training"]["best_epoch"] >= 1


def test_prune_cli_passes_offload_to_the_baselines(planted_dir, tmp_path, monkeypatch):
    from chiptuning.cli import main
    from chiptuning.prune.baselines import apply, read_record

    streamed = []
    plan_method = apply.plan_method
    monkeypatch.setattr(apply, "plan_method",
                        lambda model, *a, **k: streamed.append(is_streamed(model)) or plan_method(model, *a, **k))
    out = tmp_path / "tail"
    result = CliRunner().invoke(main, ["-q", "prune", "--model", str(planted_dir), "--method", "tail", "--n-layers", "2",
                                       "--offload", "stream", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert streamed == [True] and read_record(out).removed == [5, 6]


def test_compare_cli_runs_streamed(planted_dir, sentiment_file, tmp_path, monkeypatch):
    from chiptuning.cli import main
    from chiptuning.models import load_model
    from chiptuning.prune.baselines import apply

    loaded = []

    def loading(*args, **kwargs):
        model = load_model(*args, **kwargs)
        loaded.append(is_streamed(model))
        return model

    monkeypatch.setattr(apply, "load_model", loading)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, [
        "-q", "compare", "--model", str(planted_dir), "--data", str(sentiment_file), "--text-column", "text",
        "--n-layers", "2", "--methods", "tail,slm", "--slm-threshold", "0.9999", "--n-calibration", "8",
        "--offload", "stream", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert loaded == [True, True]  # each baseline pruned a streamed model
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dense", "chip-tuning", "tail", "slm"]
    assert all(r["blocks_kept"] == "4" for r in rows[1:]) and rows[3]["changed_blocks"] == "3+4+5"
    assert all(0 <= float(r["chip_accuracy"]) <= 1 for r in rows)
    assert json.loads((out / "compare.json").read_text())["complete"] is True
