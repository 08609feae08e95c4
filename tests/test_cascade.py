"""Early exit through a cascade of chips: calibrated on the cache, run for real by the pruned model.

The cascade simulated on the cache's features and the pruned checkpoint run from raw text (its
rows leaving the batch as they exit) must give the same answer and the same exit layer for every
example, on every architecture family: positions, masks and rotary embeddings as the full forward
computes them, Gemma-2 / Mistral / Qwen2 sliding windows included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chiptuning.cache import CacheReader
from chiptuning.extract import ExtractConfig, extract
from chiptuning.probe import Cascade, load_chips, select_layer, train_chips
from chiptuning.probe.cascade import GRID, calibrate_cascade, describe_exits, exit_probabilities, simulate
from chiptuning.prune import ChipModel, prune
from chiptuning.registry import get_blocks
from chiptuning.tasks import load_task
from tests.conftest import write_jsonl
from tests.test_prune_parity import _tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = {"pos": "good great fine happy nice warm bright".split(), "neg": "bad awful poor sad cold dark grim".split()}
FILLER = "the a day film meal trip room story song place".split()


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """90 short texts of different lengths; the label is in a keyword (chips can learn it)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(90):
        label = "pos" if i % 2 else "neg"
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 12)))) + [str(rng.choice(WORDS[label]))]
        rng.shuffle(words)
        rows.append({"id": f"r{i}", "text": " ".join(words), "label": label})
    return write_jsonl(tmp_path_factory.mktemp("data") / "reviews.jsonl", rows)


def _caches(model_dir: str, data, root):
    out = {}
    for part, split in (("train", "train[:60]"), ("eval", "train[60:]")):
        task = load_task(data, text_column="text", split=split)
        out[part] = CacheReader(extract(ExtractConfig(out=str(root / part), model=model_dir, device="cpu",
                                                      batch_size=8, max_tokens_per_batch=0), task))
    return out


def _force_exits(chips_dir, caches) -> Cascade:
    """A cascade over every layer whose thresholds split the eval rows between the exit layers
    (the calibration's own choice is tested below; here the run must see rows exit everywhere)."""
    select_layer(chips_dir, "cascade:0.5")
    chips = load_chips(chips_dir)
    selection = chips.selection
    layers = [layer for layer in chips.layers if layer >= 1]
    p = exit_probabilities(chips, caches["eval"], layers)
    confidence = p.max(axis=2)  # (n_layers, N)
    thresholds = [float(np.quantile(confidence[j], 0.7)) for j in range(len(layers) - 1)] + [0.0]
    cascade = Cascade(layers=layers, thresholds=thresholds, delta=0.5, reference_layer=layers[-1])
    selection.layer, selection.cascade = layers[-1], cascade
    selection.write(chips_dir / "selection.json")
    return cascade


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma2", "gpt2", "bert"])
def test_cascade_from_raw_text_equals_the_cascade_on_the_cache(kind, reviews, minilm_path, tmp_path):
    model_dir = _tiny_model_dir(kind, tmp_path / "model", minilm_path)
    caches = _caches(model_dir, reviews, tmp_path)
    chips_dir = tmp_path / "chips"
    train_chips(caches["train"], caches["eval"], chip="linear", out=chips_dir, val_size=12, seed=0)
    cascade = _force_exits(chips_dir, caches)
    prune(model_dir, chips_dir, tmp_path / "pruned")
    clf = ChipModel.from_pretrained(tmp_path / "pruned")
    assert [e.layer for e in clf.cascades["custom"]] == cascade.layers
    texts = [json.loads(line)["text"] for line in reviews.read_text().splitlines()][60:]

    expected, expected_exit = simulate(exit_probabilities(load_chips(chips_dir), caches["eval"], cascade.layers),
                                       cascade.layers, cascade.thresholds)
    labels, exits = clf.predict_with_exits(texts)
    np.testing.assert_array_equal(exits, expected_exit)
    assert labels == [caches["eval"].label_names[i] for i in expected]
    assert len(set(exits.tolist())) >= 3  # rows really left at several layers (the test can fail)
    # One at a time (batch size 1) gives the same answers.
    single = [clf.predict_with_exits([t], batch_size=1) for t in texts[:10]]
    assert [s[0][0] for s in single] == labels[:10] and [int(s[1][0]) for s in single] == exits[:10].tolist()


def test_a_confident_example_runs_no_block_after_its_exit(reviews, minilm_path, tmp_path):
    model_dir = _tiny_model_dir("llama", tmp_path / "model", minilm_path)
    caches = _caches(model_dir, reviews, tmp_path)
    chips_dir = tmp_path / "chips"
    train_chips(caches["train"], caches["eval"], chip="linear", out=chips_dir, val_size=12, seed=0)
    select_layer(chips_dir, "cascade:0.5")
    selection = json.loads((chips_dir / "selection.json").read_text())
    selection["cascade"].update(layers=[1, 2, 3, 4], thresholds=[0.0, None, None, 0.0])  # everyone exits at 1
    selection["layer"] = 4
    (chips_dir / "selection.json").write_text(json.dumps(selection))
    prune(model_dir, chips_dir, tmp_path / "pruned")
    clf = ChipModel.from_pretrained(tmp_path / "pruned")
    calls = []
    handles = [b.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, b in enumerate(get_blocks(clf.model))]
    try:
        _, exits = clf.predict_with_exits(["a good day"], batch_size=1)
    finally:
        for h in handles:
            h.remove()
    assert exits.tolist() == [1] and calls == [0]  # block 1 ran, blocks 2..4 did not


def simulate_score(probabilities, layers, threshold, labels):
    """(accuracy, mean depth) of the cascade with one shared threshold."""
    pred, depth = simulate(probabilities, layers, [threshold] * (len(layers) - 1) + [0.0])
    return float((pred == labels).mean()), float(depth.mean())


def test_calibration_keeps_accuracy_within_delta_and_falls_back_when_none_can(tmp_path):
    from tests.test_probe import write_cache

    rng = np.random.default_rng(0)
    n, hidden = 400, 16
    y = rng.integers(0, 2, n)
    signal = np.where(y[:, None] == 1, 1.0, -1.0) * np.ones((n, hidden))
    feats = np.stack([rng.normal(size=(n, hidden)) * 0.01,  # layer 0: nothing
                      signal * 0.3 + rng.normal(size=(n, hidden)),  # layer 1: some signal
                      signal + rng.normal(size=(n, hidden)) * 0.5,  # layer 2: more
                      signal * 3 + rng.normal(size=(n, hidden)) * 0.5], axis=1).astype(np.float32)  # layer 3: clear
    train = write_cache(tmp_path / "train", feats[:300], y[:300], label_names=["a", "b"])
    evals = write_cache(tmp_path / "eval", feats[300:], y[300:], label_names=["a", "b"])
    chips = train_chips(train, evals, chip="linear", out=tmp_path / "chips", val_size=100, seed=0)
    cascade, material = calibrate_cascade(chips, delta=0.02)
    sim = cascade.simulated
    assert sim.val_accuracy >= sim.reference_val_accuracy - 0.02 - 1e-9
    assert not cascade.fallback and sim.val_mean_depth < cascade.reference_layer  # blocks saved
    # One shared threshold: the grid's threshold with the fewest validation blocks among those within delta.
    shared = {t for _, t in cascade.exits[:-1]}
    assert len(shared) == 1
    val_p, y_val = material["val"]
    layers = material["layers"]
    allowed = [(simulate_score(val_p, layers, t, y_val), t) for t in GRID]
    allowed = [(d, t) for (acc, d), t in allowed if acc >= sim.reference_val_accuracy - 0.02 - 1e-9]
    assert sim.val_mean_depth == pytest.approx(min(d for d, _ in allowed))
    assert describe_exits(cascade.exits) == f"layer 1 when the chip's top probability is >= {shared.pop():.3g}, else layer 2"
    assert describe_exits([(1, 0.9), (2, 0.9), (3, 0.0)]) == "layers 1-2 when the chip's top probability is >= 0.9, else layer 3"
    assert describe_exits([(1, 0.9), (2, 0.8), (3, 0.0)]) == "layer 1 if its chip is >= 0.9 sure, layer 2 if its chip is >= 0.8 sure, else layer 3"

    # Constant early layers: any exit before the last answers with the prior, so none meets delta 0.
    flat = feats.copy()
    flat[:, 1:3] = 1.0
    train = write_cache(tmp_path / "train-flat", flat[:300], y[:300], label_names=["a", "b"])
    evals = write_cache(tmp_path / "eval-flat", flat[300:], y[300:], label_names=["a", "b"])
    chips = train_chips(train, evals, chip="linear", out=tmp_path / "chips-flat", val_size=100, seed=0)
    selection = select_layer(chips, "cascade:0")
    assert selection.cascade.fallback is True and "no early exit" in selection.why
    assert all(t is None for t in selection.cascade.thresholds[:-1])
    assert (tmp_path / "chips-flat" / "cascade.png").is_file() and (tmp_path / "chips-flat" / "cascade_curve.csv").is_file()


def test_cascade_thresholds_never_and_simulation():
    p = np.array([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.3, 0.7]]])  # (2 exits, 2 rows, 2 classes)
    pred, exit_layer = simulate(p, [3, 7], [0.8, 0.0])
    assert pred.tolist() == [0, 1] and exit_layer.tolist() == [3, 7]
    pred, exit_layer = simulate(p, [3, 7], [None, 0.0])
    assert exit_layer.tolist() == [7, 7]
    assert torch.equal(torch.tensor(pred), torch.tensor([1, 1]))
