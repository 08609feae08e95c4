"""Probe stage: chips, the bank trainer, the paper regime, selection, artifacts, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chiptuning.cache import CacheMeta
from chiptuning.errors import ChipTuningError, ProvenanceError
from chiptuning.probe import ChipSet, LinearChip, LogRegChip, MLPChip, load_chip, load_chips, select_layer, train_chips
from chiptuning.probe.bank import Hyperparams, fit_banks
from chiptuning.probe.data import InMemoryBatches, carve_rows
from tests.conftest import require_extra

# -- caches ---------------------------------------------------------------------------------------

MODEL_STATS = {"embedding": 1000, "blocks": [500, 500, 500, 500], "final_norm": 10, "lm_head": 1000,
               "other": 0, "total": 4010}


def planted_features(n: int, n_layers: int, hidden: int, n_classes: int, seed: int,
                     signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, n_layers, H) features whose class signal grows with depth (layer 0 has none), labels (N,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = np.random.default_rng(1234).normal(size=(n_classes, hidden))
    depth = np.linspace(0.0, 1.0, n_layers)
    feats = rng.normal(size=(n, n_layers, hidden)) + signal * depth[None, :, None] * centers[y][:, None, :]
    return feats.astype(np.float32), y


def write_cache(path: Path, feats: np.ndarray, labels: np.ndarray, *, label_names: list[str],
                n_choices: np.ndarray | None = None, meta: dict | None = None, shard_size: int = 128) -> Path:
    """A complete cache written by the real CacheWriter (layers 0..n_layers-1)."""
    from chiptuning.cache import CacheWriter

    n, n_layers, hidden = feats.shape
    base = {"model": "toy-model", "model_hash": "abc", "label_names": label_names,
            "task": {"template": "{text}", "label_names": label_names, "split": Path(path).name},
            "hidden_size": hidden, "num_blocks": n_layers - 1, "feature_mode": "raw"}
    base.update(meta or {})
    blocks = [500] * (n_layers - 1)
    stats = dict(MODEL_STATS, blocks=blocks, total=2010 + sum(blocks))
    writer = CacheWriter(path, base, n_rows=n, layers=range(n_layers), hidden_size=hidden,
                         shard_size=shard_size, extra={"model_stats": stats})
    choices = np.full(n, len(label_names)) if n_choices is None else n_choices
    writer.write(np.arange(n), feats, labels, [f"{Path(path).name}-{i}" for i in range(n)],
                 np.full(n, 7), choices)
    writer.close()
    return Path(path)


class FakeCache:
    """In-memory object with the ``CacheReader`` API of docs/ARCHITECTURE.md (nothing more)."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, label_names: list[str],
                 n_choices: np.ndarray | None = None, meta: dict | None = None) -> None:
        n, n_layers, hidden = feats.shape
        self._feats = feats
        self.labels = np.asarray(labels, dtype=np.int64)
        self.layers = list(range(n_layers))
        self.num_blocks = n_layers - 1
        self.hidden_size = hidden
        self.n_rows = n
        self.label_names = list(label_names)
        self.n_choices = np.full(n, len(label_names)) if n_choices is None else np.asarray(n_choices)
        self.n_tokens = np.full(n, 7)
        self.example_ids = np.array([f"f{i}" for i in range(n)], dtype=object)
        self.meta = CacheMeta.from_dict({"model": "toy-model", "label_names": self.label_names, **(meta or {})})
        self.fingerprint = "fake-" + self.meta.model
        self.model_stats = dict(MODEL_STATS, blocks=[500] * (n_layers - 1))
        self.manifest = {"meta": self.meta}

    def layer(self, layer: int, rows=None) -> np.ndarray:
        x = np.ascontiguousarray(self._feats[:, self.layers.index(layer)])
        return x if rows is None else x[np.asarray(rows)]

    def iter_batches(self, layers, batch_size, rows=None):
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        idx = [self.layers.index(layer) for layer in layers]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield chunk, self._feats[chunk][:, idx]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Train / eval caches: 5 layers x 24 features, 3 classes, signal growing with depth."""
    root = tmp_path_factory.mktemp("probe")
    names = ["neg", "neu", "pos"]
    f_tr, y_tr = planted_features(600, 5, 24, 3, seed=1)
    f_ev, y_ev = planted_features(300, 5, 24, 3, seed=2)
    return {
        "train": write_cache(root / "train", f_tr, y_tr, label_names=names),
        "eval": write_cache(root / "eval", f_ev, y_ev, label_names=names),
        "root": root, "names": names,
    }


@pytest.fixture(scope="module")
def linear_chips(toy):
    out = toy["root"] / "chips-linear"
    chips = train_chips(toy["train"], toy["eval"], chip="linear", out=out, epochs=15)
    return chips, out


# -- chips against scikit-learn -------------------------------------------------------------------

def test_linear_chip_matches_logistic_regression_on_real_data(tmp_path):
    """Same cache, real data (scikit-learn's handwritten digits, each image also shifted by one
    pixel four ways; eval images are never seen in training): within 1 accuracy point.

    Both are trained to convergence. (Early stopping on validation loss, the default regime,
    lands about one point lower on this small problem: the loss turns up before the accuracy.)"""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images, y = digits.images[order], digits.target[order]

    def shifted(imgs):  # (n, 8, 8) -> (5n, 64)
        moved = [np.roll(imgs, s, axis=a) for a in (1, 2) for s in (1, -1)]
        return np.concatenate([imgs] + moved).reshape(-1, 64).astype(np.float32)

    def two_layers(X):  # layer 0 = noisy pixels, layer 1 = the pixels
        return np.stack([X + np.random.default_rng(1).normal(scale=4, size=X.shape).astype(np.float32), X], 1)

    n_tr, names = 1300, [str(d) for d in range(10)]
    X_tr, y_tr, X_ev, y_ev = shifted(images[:n_tr]), np.tile(y[:n_tr], 5), shifted(images[n_tr:]), np.tile(y[n_tr:], 5)
    train = write_cache(tmp_path / "train", two_layers(X_tr), y_tr, label_names=names, shard_size=4096)
    evals = write_cache(tmp_path / "eval", two_layers(X_ev), y_ev, label_names=names, shard_size=4096)
    ours = train_chips(train, evals, chip="linear", lr=1e-2, batch_size=256, epochs=60, early_stopping=False)
    sk = train_chips(train, evals, chip="logreg")
    for layer in (0, 1):
        a, b = ours.metrics_at(layer)["eval_accuracy"], sk.metrics_at(layer)["eval_accuracy"]
        assert abs(a - b) <= 0.01, (layer, a, b)
        assert a > 0.5  # far above chance (0.1): the comparison is not between two broken chips
    # the logreg backend is plain scikit-learn on standardized features
    keep = np.setdiff1d(np.arange(len(y_tr)), ours.config["validation"]["rows"])
    scaler = StandardScaler().fit(X_tr[keep])
    plain = LogisticRegression(max_iter=1000, random_state=42).fit(scaler.transform(X_tr[keep]), y_tr[keep])
    agree = (plain.predict(scaler.transform(X_ev)) == sk.chip(1).predict(X_ev)).mean()
    assert agree > 0.99


# -- batched == single-layer ----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_batched_trainer_equals_single_layer_chips(toy, kind, precision):
    """float32 on this float32 cache reads each layer in place into the training buffer (statistics
    as all rows minus the validation rows); bfloat16 gathers the training rows: both give the
    chips of single-layer training."""
    from chiptuning.cache import CacheReader

    reader = CacheReader(toy["train"])
    chips = train_chips(reader, chip=kind, epochs=3, early_stopping=False, seed=7, hidden=16, batch_size=32,
                        precision=precision)
    train_rows, _ = carve_rows(reader.n_rows, 200, 7, None)
    cls = {"linear": LinearChip, "mlp": MLPChip}[kind]
    extra = {"hidden": 16} if kind == "mlp" else {}
    for layer in reader.layers:
        single = cls(epochs=3, lr=1e-3, weight_decay=1e-2, batch_size=32, random_state=7,
                     classes=[0, 1, 2], precision=precision, **extra)
        single.fit(reader.layer(layer, train_rows), reader.labels[train_rows])
        batched = chips.chip(layer)
        np.testing.assert_allclose(batched.mean_, single.mean_, rtol=1e-6, atol=1e-6)
        if kind == "linear":
            np.testing.assert_allclose(batched.coef_, single.coef_, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(batched.intercept_, single.intercept_, rtol=1e-4, atol=1e-5)
        else:
            for a, b in zip(batched.coefs_ + batched.intercepts_, single.coefs_ + single.intercepts_):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the chips are not all the same: the layers differ, so equal weights would mean a bug
    assert not np.allclose(chips.chip(0).decision_function(reader.layer(0)),
                           chips.chip(4).decision_function(reader.layer(0)))


def test_batched_early_stopping_equals_single_layer():
    """With early stopping each chip of a group stops where it would stop alone."""
    feats, y = planted_features(300, 4, 12, 3, seed=3, signal=1.0)
    x = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2)))  # (G, N, H)
    y_t = torch.from_numpy(y)
    tr, va = np.arange(200), np.arange(200, 300)
    spec = Hyperparams(kind="linear", lr=5e-2, epochs=40, early_stopping=True, n_iter_no_change=2)

    def run(layers):
        data = InMemoryBatches(x[layers][:, tr], y_t[tr], None, batch_size=16, seed=0)
        val = (x[layers][:, va], y_t[va], None)
        return fit_banks(data, [spec], 12, 3, seed=0, val=val)[0]

    together = run([0, 1, 2, 3])
    stopped = together["best_epoch"]
    assert len(set(stopped.tolist())) > 1  # the chips stop at different epochs
    # each chip trained until its patience ran out (or the epoch cap), not as long as its group
    assert together["chip_epochs"].tolist() == [min(40, int(b) + 3) for b in stopped]
    for g in range(4):
        alone = run([g])
        assert alone["best_epoch"][0] == stopped[g] and alone["chip_epochs"][0] == together["chip_epochs"][g]
        for name in ("weight", "bias"):
            torch.testing.assert_close(together["params"][name][g], alone["params"][name][0], rtol=1e-4, atol=1e-5)


def test_min_patience_steps_lengthens_the_patience_of_short_epochs():
    """13 steps per epoch: a patience of 2 epochs is raised to ceil(60 / 13) = 5 epochs."""
    feats, y = planted_features(300, 4, 12, 3, seed=3, signal=1.0)
    x = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2)))
    y_t = torch.from_numpy(y)
    tr, va = np.arange(200), np.arange(200, 300)

    def run(min_steps):
        spec = Hyperparams(kind="linear", lr=5e-2, epochs=40, early_stopping=True, n_iter_no_change=2,
                        min_patience_steps=min_steps)
        data = InMemoryBatches(x[:, tr], y_t[tr], None, batch_size=16, seed=0)
        return fit_banks(data, [spec], 12, 3, seed=0, val=(x[:, va], y_t[va], None))[0]

    short, long = run(0), run(60)
    assert short["chip_epochs"].tolist() == [min(40, int(b) + 3) for b in short["best_epoch"]]
    assert long["chip_epochs"].tolist() == [min(40, int(b) + 6) for b in long["best_epoch"]]
    assert (long["chip_epochs"] > short["chip_epochs"]).any()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_settings_in_one_bank_equal_each_setting_alone(kind, precision):
    """Weight decays sharing a bank (one product per step, per-setting decoupled decay) give the
    chips each setting gives alone, and the settings do differ."""
    feats, y = planted_features(240, 3, 16, 3, seed=8)
    x = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2)))
    y_t = torch.from_numpy(y)
    specs = [Hyperparams(kind=kind, lr=1e-2, weight_decay=wd, epochs=4, hidden=8, early_stopping=False,
                      precision=precision) for wd in (0.0, 0.5, 5.0)]

    def run(chosen):
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        return fit_banks(InMemoryBatches(x.to(dtype), y_t, None, batch_size=32, seed=0), chosen, 16, 3, seed=0)

    together = run(specs)
    for spec, result in zip(specs, together):
        alone = run([spec])[0]
        for name, value in result["params"].items():
            torch.testing.assert_close(value, alone["params"][name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0]["params"]["weight"], together[2]["params"]["weight"])


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_bank_trains_what_torch_nn_and_adamw_train(kind, fit_intercept):
    """Each chip of a bank (several layers, several weight decays, a class mask) ends where the
    same chip written with ``torch.nn`` and trained alone with ``torch.optim.AdamW`` ends: same
    initialisation, same minibatches, mean cross-entropy with the masked classes at -inf."""
    from chiptuning.probe.bank import init_params

    G, N, H, C, D = 2, 90, 12, 4, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(G, N, H, generator=gen)
    y = torch.randint(0, 2, (N,), generator=gen)
    mask = torch.ones(N, C, dtype=torch.bool)
    mask[::3, 2:] = False  # some rows have two options only (their labels are 0 or 1)
    specs = [Hyperparams(kind=kind, lr=2e-2, weight_decay=wd, epochs=3, hidden=D, early_stopping=False,
                      fit_intercept=fit_intercept, lr_decay=0.5) for wd in (0.0, 0.3)]
    data = InMemoryBatches(x, y, mask, batch_size=16, seed=4)
    results = fit_banks(data, specs, H, C, seed=9)
    order = [InMemoryBatches(x, y, mask, batch_size=16, seed=4).order(e) for e in range(3)]
    for spec, result in zip(specs, results):
        for g in range(G):
            start = init_params(spec, H, C, seed=9)
            if kind == "linear":
                net = torch.nn.Linear(H, C, bias=fit_intercept)
                layers = {"weight": net.weight, "bias": net.bias}
            else:
                net = torch.nn.Sequential(torch.nn.Linear(H, D), torch.nn.ReLU(), torch.nn.Linear(D, C, bias=fit_intercept))
                layers = {"weight_hidden": net[0].weight, "bias_hidden": net[0].bias, "weight": net[2].weight,
                          "bias": net[2].bias}
            with torch.no_grad():
                for name, param in layers.items():
                    if param is not None:
                        param.copy_(start[name])
            optimizer = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
            for rows in order:
                for b in range(0, N, 16):
                    idx = torch.from_numpy(rows[b:b + 16])
                    logits = net(x[g, idx]).masked_fill(~mask[idx], float("-inf"))
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(logits, y[idx]).backward()
                    optimizer.step()
                optimizer.param_groups[0]["lr"] *= spec.lr_decay
            for name, param in layers.items():
                expected = torch.zeros(C) if param is None else param.detach()
                torch.testing.assert_close(result["params"][name][g], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(results[0]["params"]["weight"], results[1]["params"]["weight"])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_layers_stepped_in_slices_train_what_one_slice_trains(monkeypatch, precision):
    """A bank steps its layers in slices (each a parameter of its own, a view of the bank's
    tensors): one layer per slice gives the chips of all layers in one."""
    import chiptuning.probe.bank as bank

    feats, y = planted_features(200, 5, 16, 3, seed=2)
    dtype = bank.DTYPES[precision]
    x = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2))).to(dtype)
    specs = [Hyperparams(kind="mlp", hidden=8, lr=1e-2, weight_decay=wd, epochs=2, early_stopping=False,
                      precision=precision) for wd in (0.0, 0.1)]

    def run():
        return fit_banks(InMemoryBatches(x, torch.from_numpy(y), None, batch_size=32, seed=0), specs, 16, 3, seed=0)

    whole = run()
    monkeypatch.setattr(bank, "STEP_WEIGHTS", 1)
    sliced = run()
    for a, b in zip(whole, sliced):
        for name in a["params"]:
            torch.testing.assert_close(a["params"][name], b["params"][name], rtol=1e-6, atol=1e-7)


def test_the_trainer_steps_with_torch_optim_adamw(monkeypatch):
    """The optimizer is ``torch.optim.AdamW``, with its fused kernel on the CPU."""
    import chiptuning.probe.bank as bank

    made, original = [], bank.adamw
    monkeypatch.setattr(bank, "adamw", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    feats, y = planted_features(64, 2, 8, 2, seed=0)
    x = torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2)))
    fit_banks(InMemoryBatches(x, torch.from_numpy(y), None, batch_size=16, seed=0), [Hyperparams(epochs=1)], 8, 2, seed=0)
    (optimizer,) = made
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]


@pytest.mark.parametrize("center", [True, False])
def test_gather_standardized_equals_the_two_pass_path(center):
    """Gathering the stored bfloat16 rows once and standardizing in place gives exactly the
    statistics and features of the gather-per-pass path."""
    from chiptuning.probe.data import gather_standardized, standardization, standardize_into

    rng = np.random.default_rng(0)
    raw = torch.from_numpy((rng.normal(size=(700, 24)) * 3 + 5).astype(np.float32)).bfloat16()
    stored = raw.view(torch.int16).numpy().view(np.uint16)  # the cache's bfloat16 bit patterns
    rows = np.sort(rng.choice(700, 600, replace=False))
    mean, scale = standardization(stored, rows=rows, center=center)
    expected = standardize_into(stored, mean, scale, torch.empty(600, 24, dtype=torch.bfloat16), rows=rows)
    out = torch.empty(600, 24, dtype=torch.bfloat16)
    got_mean, got_scale = gather_standardized(stored, out, rows, center=center)
    np.testing.assert_array_equal(got_mean, mean)
    np.testing.assert_array_equal(got_scale, scale)
    assert torch.equal(out, expected) and out.float().abs().mean() < 2  # and it did standardize


def test_running_stats_remove_gives_the_statistics_of_the_other_rows():
    from chiptuning.probe.data import standardization

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(900, 16)) * rng.uniform(0.01, 5, 16) + rng.uniform(-300, 300, 16)).astype(np.float32)
    x[:, 3] = 7.0  # a constant feature keeps scale 1
    out = np.sort(rng.choice(900, 40, replace=False))
    keep = np.setdiff1d(np.arange(900), out)
    for center in (True, False):
        mean, scale = standardization(x, center=center, rows=keep)
        got_mean, got_scale = standardization(x, center=center, exclude=out)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_scale, scale, rtol=1e-5)
        assert got_scale[3] == (1.0 if center else 7.0)  # constant: scale 1 when centered, else its RMS


@pytest.mark.parametrize("shuffled_shards", [False, True])
def test_layers_read_in_place_train_the_chips_of_the_gather_path(tmp_path, monkeypatch, shuffled_shards):
    """A bfloat16 cache trained in bfloat16: each layer is read straight into the training
    buffer (the statistics are all rows minus the validation rows); forcing the gather path gives
    the same chips and metrics. With shards written out of row order (as several extraction
    processes write them) the in-place read reorders the rows."""
    import chiptuning.probe.data as data_mod
    from chiptuning.cache import CacheReader, CacheWriter

    feats, y = planted_features(700, 3, 32, 3, seed=5)
    feats[:, :, 4] += 80.0  # a feature whose mean dwarfs its spread
    meta = {"model": "toy-model", "label_names": ["a", "b", "c"], "hidden_size": 32, "num_blocks": 2,
            "task": {"template": "{text}", "label_names": ["a", "b", "c"]}}
    writer = CacheWriter(tmp_path / "bf16", meta, n_rows=700, layers=range(3), hidden_size=32,
                         storage_dtype="bfloat16", shard_size=128)
    order = [slice(350, 700), slice(0, 350)] if shuffled_shards else [slice(0, 700)]
    for part in order:
        rows = np.arange(700)[part]
        writer.write(rows, feats[rows], y[rows], [f"r{i}" for i in rows], np.full(len(rows), 7), np.full(len(rows), 3))
    writer.close()
    reader = CacheReader(tmp_path / "bf16")
    assert reader._in_order is not shuffled_shards
    reads = []
    original = CacheReader.layer_stored
    monkeypatch.setattr(CacheReader, "layer_stored",
                        lambda self, layer, rows=None, out=None: reads.append(out is not None)
                        or original(self, layer, rows, out))
    settings = dict(chip="linear", precision="bfloat16", epochs=4, early_stopping=True, seed=3, batch_size=64,
                    val_size=50)
    in_place = train_chips(reader, **settings)
    assert reads and all(reads)
    reads.clear()
    monkeypatch.setattr(data_mod, "IN_PLACE_FRACTION", 2.0)
    gathered = train_chips(reader, **settings)
    assert reads and not any(reads)
    np.testing.assert_allclose(in_place._tensors["mean"], gathered._tensors["mean"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(in_place._tensors["scale"], gathered._tensors["scale"], rtol=1e-5)
    np.testing.assert_allclose(in_place._tensors["weight"], gathered._tensors["weight"], rtol=1e-2, atol=2e-3)
    for a, b in zip(in_place.metrics, gathered.metrics):
        assert abs(a["train_accuracy"] - b["train_accuracy"]) <= 2 / 650 and a["best_epoch"] == b["best_epoch"]
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 50)
    assert in_place.metrics[-1]["train_accuracy"] > 0.6  # real chips, not two broken ones


def test_layer_stored_into_a_buffer(toy):
    from chiptuning.cache import CacheReader

    reader = CacheReader(toy["train"])
    buf = np.empty((reader.n_rows, reader.hidden_size), dtype=reader.stored_dtype)
    assert reader.layer_stored(2, out=buf) is buf
    np.testing.assert_array_equal(buf, reader.layer_stored(2))
    with pytest.raises(ValueError, match="C-contiguous"):
        reader.layer_stored(2, out=buf[:10])


# -- the paper regime -----------------------------------------------------------------------------

def test_paper_regime_follows_the_paper(toy, monkeypatch):
    import chiptuning.probe.bank as bank

    made, original = [], bank.adamw
    monkeypatch.setattr(bank, "adamw", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    steps = []
    chips = train_chips(toy["train"], chip="linear", regime="paper",
                        callback=lambda epoch, step, rows: steps.append((epoch, rows.copy())))
    assert len(made) == 1  # one optimizer: every chip of the group in one bank
    (group,) = made[0].param_groups
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-5, (0.9, 0.99), 1e-8, 0.01)
    assert not group["amsgrad"] and not group["maximize"]
    assert chips.config["train"]["precision"] == "float32"
    train = chips.config["train"]
    assert (train["batch_size"], train["epochs"], train["standardize"], train["max_train_rows"]) == (1, 1, False, 20000)
    n_train = chips.config["validation"]["n_train_rows"]
    assert all(len(rows) == 1 for _, rows in steps) and {e for e, _ in steps} == {0}
    order = np.concatenate([rows for _, rows in steps])
    np.testing.assert_array_equal(order, np.random.default_rng(42).permutation(n_train))
    assert chips.chip(2).scale_.tolist() == [1.0] * 24  # raw features, as in the paper


def test_paper_regime_caps_training_rows_seeded():
    train, val = carve_rows(30000, 200, 42, 20000)
    assert len(train) == 20000 and len(val) == 200 and not set(train) & set(val)
    again, _ = carve_rows(30000, 200, 42, 20000)
    np.testing.assert_array_equal(train, again)


# -- validation rows ------------------------------------------------------------------------------

def test_validation_rows_are_seeded_disjoint_and_recorded(linear_chips):
    chips, _ = linear_chips
    rows = chips.config["validation"]["rows"]
    assert len(rows) == 120 == chips.config["validation"]["size"]  # 200 capped at a fifth of 600
    train, val = carve_rows(600, 200, 42, None)
    assert rows == val.tolist() and not set(train) & set(val) and len(train) + len(val) == 600
    assert carve_rows(600, 200, 43, None)[1].tolist() != rows


# -- class masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LinearChip, MLPChip, LogRegChip])
def test_masked_class_is_never_predicted(cls):
    feats, y = planted_features(400, 2, 8, 4, seed=5)
    X = feats[:, 1]
    chip = cls(random_state=0).fit(X, y) if cls is LogRegChip else cls(random_state=0, epochs=10).fit(X, y)
    assert (chip.predict(X) == 3).sum() > 50  # class 3 is predicted without a mask
    mask = np.ones((len(y), 4), dtype=bool)
    mask[:, 3] = False
    mask[::2, 2] = False
    pred = chip.predict(X, class_mask=mask)
    assert not (pred == 3).any() and not (pred[::2] == 2).any()
    proba = chip.predict_proba(X, class_mask=mask)
    assert (proba[~mask] == 0).all() and np.allclose(proba.sum(1), 1)


def test_masked_classes_in_training_follow_n_choices(tmp_path):
    """C3-style rows with 2-4 options: no prediction falls outside a row's options."""
    feats, y = planted_features(500, 3, 10, 4, seed=6, signal=0.5)
    n_choices = np.random.default_rng(0).integers(2, 5, len(y))
    y = np.minimum(y, n_choices - 1)
    cache = write_cache(tmp_path / "c3", feats, y, label_names=list("ABCD"), n_choices=n_choices)
    chips = train_chips(cache, cache, chip="linear", epochs=3, out=tmp_path / "chips")
    preds = np.loadtxt(tmp_path / "chips" / "eval_predictions.csv", delimiter=",", skiprows=1,
                       usecols=range(2, 5), dtype=int)
    assert (preds < n_choices[:, None]).all()
    unmasked = chips.chip(0).predict(feats[:, 0])
    assert (unmasked >= n_choices).any()  # without the mask the layer-0 chip does stray


# -- selection ------------------------------------------------------------------------------------

def _chipset(val_acc, eval_acc=None, stats=None) -> ChipSet:
    layers = list(range(len(val_acc)))
    metrics = [{"layer": layer, "val_accuracy": v, "eval_accuracy": None if eval_acc is None else eval_acc[layer]}
               for layer, v in zip(layers, val_acc)]
    config = {"chip": "linear", "layers": layers, "n_classes": 2, "label_names": ["a", "b"],
              "model_stats": stats or {}}
    return ChipSet(config, tensors={}, metrics=metrics)


def test_within_delta_never_picks_more_than_delta_below_best():
    rng = np.random.default_rng(0)
    for _ in range(300):
        val = np.round(rng.uniform(0.2, 0.9, rng.integers(2, 12)), 3)
        delta = float(rng.choice([0.0, 0.005, 0.01, 0.05, 0.2]))
        s = select_layer(_chipset(val.tolist()), f"within:{delta}", write=False)
        best = val[1:].max()  # layer 0 (embeddings, no block) is never a candidate
        assert s.layer >= 1
        assert val[s.layer] >= best - delta - 1e-9
        assert all(v < best - delta - 1e-9 for v in val[1:s.layer])  # shallowest such layer
    s = select_layer(_chipset([0.5, 0.79, 0.8, 0.7]), "within:1%", write=False)
    assert s.layer == 1


def test_strategies_and_pruning_ratio():
    stats = {"embedding": 100, "blocks": [10, 20, 30, 40], "final_norm": 1, "lm_head": 99, "total": 300}
    cs = _chipset([0.5, 0.9, 0.9, 0.8, 0.7], eval_acc=[0.5, 0.8, 0.85, 0.9, 0.7], stats=stats)
    v = select_layer(cs, "validate", write=False)
    assert v.layer == 1 and not v.oracle  # tie -> shallowest
    assert v.pruning.params_removed == 20 + 30 + 40 and v.pruning.ratio == pytest.approx(90 / 300)
    assert v.pruning.ratio_with_lm_head == pytest.approx(189 / 300)
    o = select_layer(cs, "optimal", write=False)
    assert o.layer == 3 and o.oracle and "ORACLE" in o.why
    f = select_layer(cs, "fixed:4", write=False)
    assert f.layer == 4 and f.pruning.ratio == 0.0
    with pytest.raises(ChipTuningError, match="no chip at layer 9"):
        select_layer(cs, "fixed:9", write=False)
    with pytest.raises(ChipTuningError, match="unknown --strategy"):
        select_layer(cs, "best", write=False)
    with pytest.raises(ChipTuningError, match="within:DELTA"):
        select_layer(cs, "within:5", write=False)


def test_pruning_strategies_never_pick_layer_0():
    """A pruned model needs at least one block: layer 0 is skipped even when it is the best."""
    cs = _chipset([0.95, 0.6, 0.7, 0.65], eval_acc=[0.97, 0.6, 0.75, 0.7])
    for strategy, expected in (("validate", 2), ("optimal", 2), ("within:0.5", 1), ("within:0.0", 2)):
        s = select_layer(cs, strategy, write=False)
        assert s.layer == expected, strategy
        assert "layer 0" in s.why and "1..3" in s.why
    with pytest.raises(ChipTuningError, match="at least one transformer block"):
        select_layer(cs, "fixed:0", write=False)
    with pytest.raises(ChipTuningError, match="at least one transformer block"):
        select_layer(_chipset([0.9]), "validate", write=False)


def test_select_writes_selection_and_report(linear_chips):
    chips, out = linear_chips
    s = select_layer(out, "validate")
    saved = json.loads((out / "selection.json").read_text())
    assert saved["layer"] == s.layer and load_chips(out).selection.layer == s.layer
    report = (out / "report.md").read_text()
    assert f"**layer {s.layer}**" in report and "| layer |" in report
    assert s.layer >= 2  # layers 0-1 carry little signal


# -- artifacts ------------------------------------------------------------------------------------

def test_chips_directory_contents(linear_chips, toy):
    chips, out = linear_chips
    for name in ("chips.json", "chips.safetensors", "metrics.csv", "metrics.json", "eval_predictions.csv",
                 "layer_accuracy.png"):
        assert (out / name).exists(), name
    text = (out / "chips.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    from chiptuning import __version__
    from chiptuning.cache import CacheReader

    reader = CacheReader(toy["train"])
    assert config["chiptuning_version"] == __version__
    assert config["train_cache"]["fingerprint"] == reader.fingerprint
    assert config["train_cache"]["meta"] == reader.meta.to_dict()
    assert config["eval_cache"]["fingerprint"] == CacheReader(toy["eval"]).fingerprint
    assert config["label_names"] == toy["names"] and config["layers"] == [0, 1, 2, 3, 4]
    assert config["model_stats"]["blocks"] == [500] * 4
    header = (out / "eval_predictions.csv").read_text().splitlines()[0]
    assert header == "example_id,label,layer_0,layer_1,layer_2,layer_3,layer_4"
    accs = [m["eval_accuracy"] for m in chips.metrics]
    assert accs[0] < 0.5 < 0.9 < accs[4]  # chance at the embeddings, the signal at depth


def test_save_load_round_trip(linear_chips, toy, tmp_path, caplog):
    from chiptuning.cache import CacheReader

    chips, out = linear_chips
    x = CacheReader(toy["eval"]).layer(3)
    loaded = load_chips(out)
    assert loaded.layers == chips.layers and loaded.label_names == toy["names"]
    np.testing.assert_array_equal(loaded.chip(3).predict_proba(x), chips.chip(3).predict_proba(x))
    single = chips.save_layer(3, tmp_path / "chip")
    chip = load_chip(single)
    np.testing.assert_array_equal(chip.predict(x), chips.chip(3).predict(x))
    assert chip.chip_config_["layer"] == 3 and chip.chip_config_["label_names"] == toy["names"]
    # a newer version's unknown keys load with a warning
    config = json.loads((out / "chips.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config["from_the_future"] = 1
    config["params"]["new_knob"] = 2
    (copy / "chips.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        again = load_chips(copy)
        np.testing.assert_array_equal(again.chip(3).predict(x), chips.chip(3).predict(x))
    assert "from_the_future" in caplog.text and "new_knob" in caplog.text


def test_logreg_backend_round_trip(toy, tmp_path):
    out = tmp_path / "chips-logreg"
    chips = train_chips(toy["train"], toy["eval"], chip="logreg", out=out, n_jobs=2, layers=[3, 4])
    # a linear model: its arrays in safetensors, no pickle anywhere
    assert (out / "chips.safetensors").exists() and not (out / "chips.joblib").exists() and chips.layers == [3, 4]
    loaded = load_chips(out)
    from chiptuning.cache import CacheReader

    x = CacheReader(toy["eval"]).layer(4)
    np.testing.assert_array_equal(loaded.chip(4).predict(x), chips.chip(4).predict(x))
    assert load_chip(loaded.save_layer(4, tmp_path / "one")).predict(x).tolist() == chips.chip(4).predict(x).tolist()


def test_mlp_chips_train_and_reload(toy, tmp_path):
    chips = train_chips(toy["train"], toy["eval"], chip="mlp", hidden=32, epochs=5, out=tmp_path / "mlp")
    assert chips.metrics_at(4)["eval_accuracy"] > 0.9
    from chiptuning.cache import CacheReader

    x = CacheReader(toy["eval"]).layer(4)
    np.testing.assert_array_equal(load_chips(tmp_path / "mlp").chip(4).predict(x), chips.chip(4).predict(x))


def test_reproducible_with_a_seed(toy):
    a = train_chips(toy["train"], chip="linear", epochs=2, layers=[2])
    b = train_chips(toy["train"], chip="linear", epochs=2, layers=[2])
    c = train_chips(toy["train"], chip="linear", epochs=2, layers=[2], seed=1)
    np.testing.assert_array_equal(a.chip(2).coef_, b.chip(2).coef_)
    assert not np.array_equal(a.chip(2).coef_, c.chip(2).coef_)


def test_streaming_when_a_layer_exceeds_the_memory_budget(toy, caplog):
    steps = []
    with caplog.at_level(logging.WARNING):
        streamed = train_chips(toy["train"], toy["eval"], chip="linear", epochs=30, layers=[2],
                               max_memory_mb=0.01, callback=lambda e, s, rows: steps.append((e, rows)))
    assert "streaming" in caplog.text
    first_epoch = np.concatenate([rows for e, rows in steps if e == 0])
    assert sorted(first_epoch.tolist()) == list(range(streamed.config["validation"]["n_train_rows"]))
    in_memory = train_chips(toy["train"], toy["eval"], chip="linear", epochs=30, layers=[2])
    np.testing.assert_allclose(streamed.chip(2).mean_, in_memory.chip(2).mean_, atol=1e-4)
    np.testing.assert_allclose(streamed.chip(2).scale_, in_memory.chip(2).scale_, rtol=1e-4)
    a, b = streamed.metrics_at(2)["eval_accuracy"], in_memory.metrics_at(2)["eval_accuracy"]
    assert abs(a - b) < 0.03 and a > 0.8


def test_works_on_any_object_with_the_cache_api():
    feats, y = planted_features(300, 3, 8, 2, seed=9)
    fake = FakeCache(feats, y, ["no", "yes"])
    chips = train_chips(fake, FakeCache(*planted_features(100, 3, 8, 2, seed=10), ["no", "yes"]), epochs=30, lr=1e-2)
    assert chips.metrics_at(2)["eval_accuracy"] > 0.9
    assert select_layer(chips, "validate", write=False).pruning.params_removed == 500 * (2 - chips.selection.layer)


def test_eval_cache_from_another_model_or_label_set_is_refused(toy, tmp_path):
    feats, y = planted_features(50, 5, 24, 3, seed=4)
    other_model = write_cache(tmp_path / "m", feats, y, label_names=toy["names"], meta={"model": "other-model"})
    with pytest.raises(ProvenanceError, match="model='other-model'"):
        train_chips(toy["train"], other_model)
    other_labels = write_cache(tmp_path / "l", feats, y, label_names=["x", "y", "z"])
    with pytest.raises(ProvenanceError, match="label"):
        train_chips(toy["train"], other_labels)
    other_template = write_cache(tmp_path / "t", feats, y, label_names=toy["names"],
                                 meta={"task": {"template": "Q: {text}", "label_names": toy["names"]}})
    with pytest.raises(ProvenanceError, match="template"):
        train_chips(toy["train"], other_template)


def test_too_few_optimizer_steps_are_warned_about(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="chiptuning.probe.train"):
        train_chips(toy["train"], chip="linear", layers=[4], epochs=30)  # 4 steps x 30 epochs
    assert "optimizer steps" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="chiptuning.probe.train"):
        train_chips(toy["train"], chip="linear", layers=[4], epochs=3, batch_size=256)
    assert "only 6 optimizer steps" in caplog.text and "raise --epochs or lower --batch-size" in caplog.text


def test_bad_settings_name_the_flag(toy):
    with pytest.raises(ChipTuningError, match="--lr"):
        train_chips(toy["train"], lr=-1.0)
    with pytest.raises(ChipTuningError, match="--regime"):
        train_chips(toy["train"], chip="logreg", regime="paper")
    with pytest.raises(ChipTuningError, match="--patience"):
        train_chips(toy["train"], n_iter_no_change=0)


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_train_and_select(toy, tmp_path):
    from chiptuning.cli import main

    runner = CliRunner()
    out = tmp_path / "cli-chips"
    result = runner.invoke(main, ["-q", "probe", "train", str(toy["train"]), "--eval", str(toy["eval"]),
                                  "--chip", "linear", "--out", str(out), "--epochs", "5", "--layers", "2-4"])
    assert result.exit_code == 0, result.output
    assert "best eval accuracy" in result.output and (out / "chips.json").exists()
    assert load_chips(out).layers == [2, 3, 4]
    result = runner.invoke(main, ["select", str(out), "--strategy", "optimal"])
    assert result.exit_code == 0, result.output
    assert "ORACLE" in result.output and "% of parameters removed" in result.output
    assert json.loads((out / "selection.json").read_text())["oracle"] is True


def test_cli_no_intercept_trains_bias_free_linear_chips(toy, tmp_path):
    from chiptuning.cli import main

    runner = CliRunner()
    for flag, name in (([], "with"), (["--no-intercept"], "without")):
        result = runner.invoke(main, ["-q", "probe", "train", str(toy["train"]), "--chip", "linear", "--epochs", "3",
                                      "--layers", "3,4", "--out", str(tmp_path / name)] + flag)
        assert result.exit_code == 0, result.output
    with_bias, bias_free = load_chips(tmp_path / "with"), load_chips(tmp_path / "without")
    assert bias_free.config["train"]["fit_intercept"] is False
    assert bias_free.config["params"]["fit_intercept"] is False
    for layer in (3, 4):
        chip = bias_free.chip(layer)
        assert not chip.fit_intercept and np.all(chip.intercept_ == 0) and np.all(chip.mean_ == 0)
        weight, bias = chip.linear_weights()  # folded onto raw features: still no bias
        assert np.all(bias == 0) and np.any(weight != 0)
        assert np.any(with_bias.chip(layer).linear_weights()[1] != 0)  # the default does learn one
        # and the saved single-chip directory keeps it bias-free
        chip_dir = bias_free.save_layer(layer, tmp_path / f"chip-{layer}")
        assert np.all(load_chip(chip_dir).linear_weights()[1] == 0)
    # what `chiptuning prune --export sequence-classification` reads from the chip
    from chiptuning.prune.export import linear_chip_weights

    n_classes = len(toy["names"])
    assert linear_chip_weights(load_chip(chip_dir), n_classes).shape == (n_classes, bias_free.config["hidden_size"])
    with pytest.raises(ChipTuningError, match="bias-free"):
        linear_chip_weights(with_bias.chip(4), n_classes)
    result = runner.invoke(main, ["probe", "train", str(toy["train"]), "--chip", "mlp", "--no-intercept",
                                  "--out", str(tmp_path / "mlp")])
    assert result.exit_code == 1 and "--no-intercept applies to linear chips" in result.output


def test_plot_draws_the_majority_class_baseline(tmp_path, monkeypatch):
    """The plot's reference line is the eval labels' majority-class accuracy (an unbalanced
    task's real floor), not only 1/C."""
    import chiptuning.probe.chipset as chipset

    feats, y = planted_features(300, 3, 8, 3, seed=5)
    y_eval = np.array([0] * 70 + [1] * 20 + [2] * 10)
    train = write_cache(tmp_path / "train", feats, y, label_names=list("abc"))
    evals = write_cache(tmp_path / "eval", feats[:100], y_eval, label_names=list("abc"))
    drawn = []
    real = chipset.plot_layer_accuracy
    monkeypatch.setattr(chipset, "plot_layer_accuracy", lambda *a, **k: drawn.append(k) or real(*a, **k))
    chips = train_chips(train, evals, chip="linear", epochs=2, out=tmp_path / "chips")
    val_rows = np.asarray(chips.config["validation"]["rows"])
    assert chips.config["majority_baseline"] == {
        "eval": pytest.approx(0.7), "val": pytest.approx(np.bincount(y[val_rows]).max() / len(val_rows))}
    assert drawn[-1]["baseline"] == pytest.approx(0.7) and "eval" in drawn[-1]["baseline_label"]
    assert (tmp_path / "chips" / "layer_accuracy.png").stat().st_size > 0
    # without an eval cache the validation labels' baseline is drawn
    train_chips(train, chip="linear", epochs=2, out=tmp_path / "chips-val")
    assert drawn[-1]["baseline"] == pytest.approx(chips.config["majority_baseline"]["val"])
    assert "val" in drawn[-1]["baseline_label"]


def test_cli_errors_are_one_line(toy, tmp_path):
    from chiptuning.cli import main

    feats, y = planted_features(40, 5, 24, 3, seed=4)
    other = write_cache(tmp_path / "other", feats, y, label_names=toy["names"], meta={"model": "other-model"})
    runner = CliRunner()
    result = runner.invoke(main, ["probe", "train", str(toy["train"]), "--eval", str(other), "--out",
                                  str(tmp_path / "x")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "other-model" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["select", str(tmp_path / "missing"), "--strategy", "validate"])
    assert result.exit_code == 1 and "no chips directory" in result.output


# -- sweep ----------------------------------------------------------------------------------------

def test_sweep_grid_best_settings_and_outputs(toy, tmp_path):
    from chiptuning.probe.sweep import SweepConfig, sweep

    config = SweepConfig(chips=["linear", "mlp", "logreg"], weight_decays=[0.0, 0.1], Cs=[0.01, 1.0],
                         lrs=[1e-3], epochs=[3, 10], hidden=16, layers=[1, 3], n_jobs=1)
    result = sweep(toy["train"], toy["eval"], out=tmp_path / "sweep", config=config)
    rows = result["rows"]
    assert len(rows) == (2 * 2 * 1 * 2 + 2) * 2  # (linear+mlp) x wd x lr x epochs + logreg Cs, x layers
    assert {r["setting"] for r in rows if r["chip"] == "logreg"} == {"C=0.01", "C=1"}
    assert all(r["epochs_run"] <= 3 for r in rows if r["epochs"] == 3)
    best = result["best"]
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    per_layer = {(r["chip"], r["layer"]): r for r in result["best_per_layer"]}
    assert len(per_layer) == 6
    for (kind, layer), r in per_layer.items():
        assert r["val_accuracy"] == max(x["val_accuracy"] for x in rows if x["chip"] == kind and x["layer"] == layer)
    for name in ("sweep.csv", "sweep.json", "best_per_layer.csv", "layer_accuracy.png"):
        assert (tmp_path / "sweep" / name).exists()
    # a bank in the sweep is the same chip train_chips trains alone with those settings
    alone = train_chips(toy["train"], toy["eval"], chip="linear", weight_decay=0.1, epochs=10, layers=[3])
    row = next(r for r in rows if r["chip"] == "linear" and r["setting"] == "lr=0.001,wd=0.1,epochs=10"
               and r["layer"] == 3)
    assert row["eval_accuracy"] == pytest.approx(alone.metrics_at(3)["eval_accuracy"], abs=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_sweep_prints_the_command_that_trains_its_best_chips(toy, tmp_path, kind):
    """A sweep keeps metrics, not chips: its best_command trains the best setting at every layer,
    and those chips score what the sweep reported; select on the sweep directory points to it."""
    import shlex

    from chiptuning.cli import main

    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["-q", "probe", "sweep", str(toy["train"]), "--eval", str(toy["eval"]),
                                       "--out", str(out), "--chips", kind, "--weight-decay", "0,0.1",
                                       "--C", "0.01,1", "--epochs", "5", "--layers", "2,4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sweep.json").read_text())
    command, best = report["best_command"], report["best"]
    assert command in result.output and f"--chip {kind}" in command
    selected = CliRunner().invoke(main, ["select", str(out)])
    assert selected.exit_code == 1 and "is a sweep directory" in selected.output and command in selected.output
    args = shlex.split(command)
    assert args[:3] == ["chiptuning", "probe", "train"]
    trained = CliRunner().invoke(main, ["-q", *args[1:]])
    assert trained.exit_code == 0, trained.output
    chips = load_chips(out / f"chips-{kind}")
    assert chips.layers == list(range(5))
    assert chips.metrics_at(best["layer"])["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert chips.metrics_at(best["layer"])["eval_accuracy"] == pytest.approx(best["eval_accuracy"], abs=1 / 300)


def test_sweep_backend_errors_are_clear(toy, tmp_path):
    from chiptuning.probe.sweep import SweepConfig, sweep

    with pytest.raises(ChipTuningError, match="joblib backend 'no-such-backend'"):
        sweep(toy["train"], config=SweepConfig(chips=["linear"], backend="no-such-backend", layers=[1]))


def test_sweep_on_a_local_dask_cluster(toy):
    distributed = require_extra("distributed", "distributed")

    from chiptuning.probe.sweep import SweepConfig, sweep

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster, \
            distributed.Client(cluster):
        result = sweep(toy["train"], config=SweepConfig(chips=["linear", "logreg"], weight_decays=[0.0],
                                                        Cs=[1.0], epochs=[3], layers=[2, 4], backend="dask"))
    assert len(result["rows"]) == 4


def test_sweep_on_a_local_ray_cluster(toy, monkeypatch, tmp_path):
    # A local Ray instance that cannot start on this machine (an environment limit, not chiptuning)
    # skips it, saying why.
    ray = require_extra("ray", "distributed")
    # Ray puts the driver's working directory on its workers' sys.path: started from a checkout, the
    # source tree's `chiptuning/` folder (which holds no stage folders) would shadow the installed
    # package in the workers.
    monkeypatch.chdir(tmp_path)

    from chiptuning.probe.sweep import SweepConfig, sweep

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - whatever stops Ray from starting here
        pytest.skip(f"a local Ray instance could not start here: {str(err).splitlines()[0]}")
    try:
        result = sweep(toy["train"], config=SweepConfig(chips=["linear", "logreg"], weight_decays=[0.0], Cs=[1.0],
                                                        epochs=[3], layers=[2, 4], backend="ray", n_jobs=2))
    finally:
        ray.shutdown()
    assert len(result["rows"]) == 4
    assert {(r["chip"], r["layer"]) for r in result["rows"]} == {("linear", 2), ("linear", 4), ("logreg", 2),
                                                                  ("logreg", 4)}


def test_cli_sweep(toy, tmp_path):
    from chiptuning.cli import main

    result = CliRunner().invoke(main, ["-q", "probe", "sweep", str(toy["train"]), "--eval", str(toy["eval"]),
                                       "--out", str(tmp_path / "s"), "--chips", "linear", "--weight-decay",
                                       "0,0.1", "--epochs", "3", "--layers", "3,4"])
    assert result.exit_code == 0, result.output
    assert "4 chips trained" in result.output and (tmp_path / "s" / "sweep.csv").exists()
    # per-chip learning rates and epoch caps
    result = CliRunner().invoke(main, ["-q", "probe", "sweep", str(toy["train"]), "--out", str(tmp_path / "p"),
                                       "--chips", "linear,mlp", "--weight-decay", "0", "--lr", "2e-3,mlp:5e-4",
                                       "--epochs", "3,mlp:2", "--layers", "4"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p" / "sweep.json").read_text())["rows"]
    assert {(r["chip"], r["lr"], r["epochs"]) for r in rows} == {("linear", 2e-3, 3), ("mlp", 5e-4, 2)}
    assert max(r["epochs_run"] for r in rows if r["chip"] == "mlp") <= 2
    config = json.loads((tmp_path / "p" / "sweep.json").read_text())["config"]
    assert (config["n_iter_no_change"], config["min_patience_steps"]) == (2, 150)  # the train defaults
    result = CliRunner().invoke(main, ["probe", "sweep", str(toy["train"]), "--out", str(tmp_path / "z"),
                                       "--patience", "0"])
    assert result.exit_code == 1 and "--patience must be >= 1" in result.output
    result = CliRunner().invoke(main, ["probe", "sweep", str(toy["train"]), "--out", str(tmp_path / "q"),
                                       "--lr", "cnn:1e-3"])
    assert result.exit_code == 1 and "--lr cnn:VALUE" in result.output
