"""Train a chip at every layer of a cache: ``chiptuning probe train``.

Torch chips (linear, MLP) of a group of layers train as one bank of chips
(:mod:`chiptuning.probe.bank`). Groups are sized so that their training features fit in
``max_memory_mb``; each layer is read from the cache once, so peak memory is about one group of
layers whatever the cache size. When even one layer does not fit, the rows are streamed from the
cache in chunks (:class:`~chiptuning.probe.data.CacheBatches`). The scikit-learn backend fits one
``LogisticRegression`` per layer in parallel with joblib. What is read from the cache and how is
in :mod:`chiptuning.probe.data`; the scores in :mod:`chiptuning.probe.scoring`.

A validation part is carved from the *training* cache (seeded, disjoint, 200 rows by default as
in the paper); it drives early stopping and the ``validate`` selection strategy, and its rows are
recorded in chips.json.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from chiptuning.errors import ChipTuningError
from chiptuning.outputs import CHIPS, check_output
from chiptuning.probe.bank import PRECISIONS, Hyperparams, choose_threads, fit_banks, resolve_precision, torch_threads
from chiptuning.probe.chips import CHIP_KINDS, LogRegChip
from chiptuning.probe.chipset import ChipSet, majority_baselines
from chiptuning.probe.data import (
    CacheBatches,
    InMemoryBatches,
    cache_class_mask,
    cache_n_classes,
    cache_source,
    carve_rows,
    feature_dtype,
    layers_per_group,
    load_standardized,
    open_caches,
    opened,
    read_parts,
    read_standardized,
)
from chiptuning.probe.lens import lens_curve, zero_shot_report
from chiptuning.probe.records import CacheRef, ChipsRecord, Validation
from chiptuning.probe.scoring import chip_metrics, score_eval, score_logreg, score_specs
from chiptuning.progress import progress_bar
from chiptuning.records import Record

log = logging.getLogger(__name__)

#: The torch chips' training regimes; "paper" is the Chip-Tuning paper's setting, exactly, on at
#: most :data:`PAPER_MAX_TRAIN_ROWS` training rows.
REGIMES: dict[str, Hyperparams] = {
    "default": Hyperparams(n_iter_no_change=2, min_patience_steps=150, precision="auto"),
    "paper": Hyperparams(lr=1e-5, weight_decay=0.01, betas=(0.9, 0.99), batch_size=1, epochs=1, early_stopping=False,
                         standardize=False),
}
PAPER_MAX_TRAIN_ROWS = 20000
#: The :class:`Hyperparams` a TrainConfig sets (None: the regime's); the estimators take the same.
TRAINED = ("lr", "weight_decay", "epochs", "batch_size", "betas", "standardize", "early_stopping",
           "n_iter_no_change", "min_patience_steps", "precision")


@dataclass
class TrainConfig(Record):
    """Settings of ``chiptuning probe train``; saved, resolved, in chips.json under "train".

    The fields of :data:`TRAINED`, ``hidden`` and ``fit_intercept`` are the torch chips'
    :class:`~chiptuning.probe.bank.Hyperparams` (None: the regime's value, see :data:`REGIMES`;
    the flags: ``--lr``, ``--weight-decay``, ``--batch-size``, ``--epochs``, ``--patience``,
    ``--precision``, ``--hidden``, ``--no-intercept``). The others:

    Attributes:
        chip: "linear", "mlp" or "logreg"; regime: "default" or "paper" (torch chips).
        max_train_rows: at most this many training rows (a seeded choice; the paper's 20,000).
        C, max_iter: the logreg chips' inverse regularization and solver iterations.
        val_size: validation rows carved from the training cache (0: none).
        seed: of the validation split, the row order and the initialisation.
        layers: the layers to train (default all); n_jobs: joblib workers of the logreg chips.
        device, max_memory_mb, threads: where the torch chips train, their feature memory budget
            and torch threads (None: :func:`~chiptuning.probe.bank.choose_threads`).
    """

    chip: str = "linear"
    regime: str = "default"
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    batch_size: int | None = None
    epochs: int | None = None
    early_stopping: bool | None = None
    n_iter_no_change: int | None = None
    min_patience_steps: int | None = None
    standardize: bool | None = None
    max_train_rows: int | None = None
    precision: str | None = None
    hidden: int = 256
    C: float = 1.0
    max_iter: int = 1000
    val_size: int = 200
    seed: int = 42
    layers: list[int] | None = None
    n_jobs: int | None = None
    device: str = "cpu"
    max_memory_mb: int = 2048
    threads: int | None = None
    fit_intercept: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the regime's values filled in, checked (errors name the CLI flag)."""
        if self.chip not in CHIP_KINDS:
            raise ChipTuningError(f"--chip must be one of {', '.join(CHIP_KINDS)}, got {self.chip!r}")
        if self.regime not in REGIMES:
            raise ChipTuningError(f"--regime must be one of {', '.join(REGIMES)}, got {self.regime!r}")
        if self.chip == "logreg" and self.regime != "default":
            raise ChipTuningError("--regime applies to the torch chips (linear, mlp), not logreg")
        preset = REGIMES[self.regime]
        cfg = replace(self, **{k: getattr(preset, k) for k in TRAINED if getattr(self, k) is None})
        if cfg.max_train_rows is None and self.regime == "paper":
            cfg.max_train_rows = PAPER_MAX_TRAIN_ROWS
        cfg.betas = tuple(cfg.betas)
        if cfg.precision not in PRECISIONS:
            raise ChipTuningError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        cfg.precision = resolve_precision(cfg.precision, cfg.device)
        positive = {"--lr": cfg.lr, "--batch-size": cfg.batch_size, "--epochs": cfg.epochs, "--hidden": cfg.hidden,
                    "--C": cfg.C, "--max-memory-mb": cfg.max_memory_mb}
        for flag, value in positive.items():
            if value is None or value <= 0:
                raise ChipTuningError(f"{flag} must be > 0, got {value}")
        if cfg.n_iter_no_change < 1:
            raise ChipTuningError(f"--patience must be >= 1, got {cfg.n_iter_no_change}")
        for flag, value in {"min_patience_steps": cfg.min_patience_steps, "--weight-decay": cfg.weight_decay,
                            "--val-size": cfg.val_size}.items():
            if value < 0:
                raise ChipTuningError(f"{flag} must be >= 0, got {value}")
        if not cfg.fit_intercept and cfg.chip != "linear":
            raise ChipTuningError(f"--no-intercept applies to linear chips, not {cfg.chip}")
        return cfg

    def spec(self) -> Hyperparams:
        """The torch chip's hyperparameters (of a resolved config)."""
        return Hyperparams(kind=self.chip, hidden=self.hidden, fit_intercept=self.fit_intercept,
                           **{k: getattr(self, k) for k in TRAINED})

    def chip_params(self, n_classes: int) -> dict:
        """Estimator params of the chip this config trains (what ``load_chips`` rebuilds)."""
        common = dict(classes=list(range(n_classes)), random_state=self.seed)
        if self.chip == "logreg":
            return dict(C=self.C, max_iter=self.max_iter, standardize=self.standardize is not False, **common)
        params = {k: getattr(self, k) for k in TRAINED if k != "precision"}
        params = dict(params, betas=list(self.betas), **common, device="cpu", precision=self.precision)
        if self.chip == "mlp":
            return dict(params, hidden=self.hidden)
        return dict(params, fit_intercept=self.fit_intercept)


# -- training -------------------------------------------------------------------------------------

def train_chips(train_cache, eval_cache=None, chip: str = "linear", out: str | Path | None = None, *,
                config: TrainConfig | None = None, progress: bool = False,
                callback: Callable[[int, int, np.ndarray], None] | None = None, overwrite: bool = False,
                **options) -> ChipSet:
    """Train a chip at every layer of a cache and (with ``out``) write the chips directory.

    Args:
        train_cache: a cache directory or a CacheReader (or an object with its API).
        eval_cache: the eval split's cache (same model, template and labels), or None.
        chip: "linear", "mlp" or "logreg" (ignored when ``config`` is given).
        out: chips directory to write (chips.json, weights, metrics, predictions, plot).
        config: full settings; ``options`` (any :class:`TrainConfig` field) override its fields.
        progress: a progress bar over layer groups.
        callback: ``callback(epoch, step, rows)`` after every optimizer step (torch chips).
        overwrite: replace the chips directory ``out`` (anything else there is refused before training).

    Raises:
        ChipTuningError: bad settings or ``out`` in the way; CacheError: a missing or corrupt cache
            (every shard's checksum is verified first); ProvenanceError: mismatched caches.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown train_chips options: {sorted(unknown)}")
    cfg = replace(config or TrainConfig(chip=chip), **options).resolved()
    if out is not None:
        check_output(out, CHIPS, overwrite=overwrite)  # refused now, not after training
    train, evals, layers = open_caches(train_cache, eval_cache, cfg.layers)
    if evals is not None:
        cache_n_classes(evals)
    C = cache_n_classes(train)
    train_rows, val_rows = carve_rows(train.n_rows, cfg.val_size, cfg.seed, cfg.max_train_rows)
    if len(np.unique(train.labels[train_rows])) < 2:
        raise ChipTuningError("the training rows hold a single class; a chip needs at least two")
    log.info("training %s chips on %d layers: %d train rows, %d validation rows, %d eval rows",
             cfg.chip, len(layers), len(train_rows), len(val_rows), 0 if evals is None else evals.n_rows)
    tensors = sk_chips = None
    if cfg.chip == "logreg":
        sk_chips, metrics, preds = _train_logreg(train, evals, layers, train_rows, val_rows, C, cfg)
    else:
        with torch_threads(choose_threads(cfg.threads)):
            tensors, metrics, preds = _train_torch(train, evals, layers, train_rows, val_rows, C, cfg,
                                                   progress=progress, callback=callback)
    zero_shot = None
    if evals is not None and getattr(evals, "has_lens", False) and getattr(train, "has_lens", False):
        # The model's own answer at every layer, beside the chips' (from the caches, no model run).
        lens = {row["layer"]: row for row in lens_curve(evals, train)}
        for row in metrics:
            row.update({k: v for k, v in lens.get(int(row["layer"]), {}).items() if k != "layer"})
        zero_shot = zero_shot_report(evals, train)
    record = ChipsRecord(
        chip=cfg.chip, layers=layers, n_classes=C, label_names=list(train.label_names) or [str(c) for c in range(C)],
        params=cfg.chip_params(C), train=cfg.to_dict(), hidden_size=int(train.hidden_size),
        train_cache=CacheRef.of(train), eval_cache=None if evals is None else CacheRef.of(evals, with_meta=False),
        validation=Validation(size=len(val_rows), seed=cfg.seed, rows=val_rows.tolist(), n_train_rows=len(train_rows)),
        model_stats=dict(getattr(train, "model_stats", None) or {}),
        majority_baseline=majority_baselines(eval=None if evals is None else evals.labels,
                                             val=np.asarray(train.labels)[val_rows] if len(val_rows) else None),
        zero_shot=zero_shot)
    eval_predictions = None if evals is None else {
        "layers": layers, "example_ids": [str(e) for e in evals.example_ids], "labels": np.asarray(evals.labels),
        "predictions": preds}
    chips = ChipSet(record, tensors=tensors, sklearn_chips=sk_chips, metrics=metrics, eval_predictions=eval_predictions)
    if out is not None:
        chips.save(out, overwrite=overwrite)
    return chips


#: Fewer optimizer steps than this in a whole run and torch chips are likely undertrained (a warning).
FEW_STEPS = 100


def warn_few_steps(n_train: int, batch_size: int, epochs: int) -> None:
    """Warn when ``epochs`` passes over ``n_train`` rows at ``batch_size`` are few optimizer steps."""
    steps = epochs * math.ceil(n_train / batch_size)
    if steps < FEW_STEPS:
        log.warning("%d training rows at --batch-size %d for at most %d epochs is only %d optimizer steps: "
                    "the chips are likely undertrained (raise --epochs or lower --batch-size)",
                    n_train, batch_size, epochs, steps)


def fit_group(train, evals, layers: list[int], train_rows: np.ndarray, val_rows: np.ndarray,
              specs: list[Hyperparams], *, n_classes: int, seed: int, device: str = "cpu",
              max_memory_mb: float = 2048, callback=None, workspace: dict | None = None, warn: bool = True) -> dict:
    """Train every setting's chips on a group of layers, on the same minibatches (one bank per chip
    type, :func:`~chiptuning.probe.bank.fit_banks`): each layer is read once and standardized with
    its training statistics (only scaled for bias-free chips). The settings share ``batch_size``,
    ``standardize`` and ``fit_intercept``. Successive groups given the same ``workspace`` dict reuse
    one feature buffer; ``warn=False`` leaves the streaming warning to the first group.

    Returns:
        {"stats": [(mean, scale)] per layer, "results": fit_banks' per setting, "scores": per setting
        {part: (accuracy (G,), loss (G,), predictions (G, N))}, "streamed": rows streamed from the cache}.
    """
    C, H, first = n_classes, int(train.hidden_size), specs[0]
    y_all = torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    mask_all = cache_class_mask(train, C)
    mask_all = None if mask_all is None else torch.from_numpy(mask_all)

    def take(rows):
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return y_all[idx], None if mask_all is None else mask_all[idx]

    dtype = feature_dtype(train, specs, first.standardize)
    stream = len(train_rows) * H * dtype.itemsize > max_memory_mb * 2**20
    if stream and warn:
        log.warning("one layer of training features (%.0f MB) exceeds --max-memory-mb %g; streaming from the cache",
                    len(train_rows) * H * dtype.itemsize / 2**20, max_memory_mb)
    parts = {}
    if stream:
        data = CacheBatches(train, layers, train_rows, y_all, mask_all, standardize=first.standardize, seed=seed,
                            batch_size=first.batch_size, max_memory_mb=max_memory_mb, center=first.fit_intercept)
        stats = data.stats
        x_val = read_standardized(train, layers, val_rows, stats, stream=True)
    else:
        x_tr, train_pos, x_val, stats = load_standardized(
            train, layers, train_rows, val_rows, standardize=first.standardize, center=first.fit_intercept,
            dtype=dtype, workspace=workspace)
        y_tr, mask_tr = take(train_rows)
        data = InMemoryBatches(x_tr, y_tr, mask_tr, first.batch_size, seed, rows=train_pos)
        in_order = len(train_pos) == x_tr.shape[1]  # x_tr holds the training rows only, in order
        parts["train"] = (x_tr, y_tr, mask_tr, None if in_order else train_pos)
    val = (x_val, *take(val_rows)) if len(val_rows) else None
    results = fit_banks(data, specs, H, C, seed=seed, val=val, device=device, callback=callback)
    if val is not None:
        parts["val"] = (*val, None)
    per_part = {}  # part -> [(accuracy, loss, predictions)] per setting
    for name, (xs, ys, ms, rows) in parts.items():
        # The training rows are scored in the precision they trained in; val / eval in float32.
        bf16 = name == "train" and xs.dtype == torch.bfloat16 and all(s.precision == "bfloat16" for s in specs)
        per_part[name] = score_specs(specs, results, xs, ys, ms, torch.bfloat16 if bf16 else torch.float32, rows=rows)
    if evals is not None:
        per_part["eval"] = score_eval(evals, layers, stats, specs, results, C, stream)
    scores = [{name: scored[i] for name, scored in per_part.items()} for i in range(len(specs))]
    return {"stats": stats, "results": results, "scores": scores, "streamed": stream}


def _train_torch(train, evals, layers, train_rows, val_rows, C, cfg: TrainConfig, *, progress=False, callback=None):
    """Torch chips, one group of layers at a time: tensors (name -> (n_layers, ...)), metric rows,
    eval predictions (n_layers, N_eval) or None."""
    spec = cfg.spec()
    G = layers_per_group(train, [spec], cfg.standardize, len(train_rows), len(val_rows), len(layers), cfg.max_memory_mb)
    warn_few_steps(len(train_rows), cfg.batch_size, cfg.epochs)
    tensors: dict[str, list[np.ndarray]] = {}
    metrics, preds, workspace = [], [], {}  # one feature buffer for every group
    groups = [layers[i:i + G] for i in range(0, len(layers), G)]
    bar = progress_bar(len(groups), "chip groups", unit="group", enabled=progress)
    for i, group in enumerate(groups):
        fitted = fit_group(train, evals, group, train_rows, val_rows, [spec], n_classes=C, seed=cfg.seed,
                           device=cfg.device, max_memory_mb=cfg.max_memory_mb, callback=callback,
                           workspace=workspace, warn=i == 0)
        result, scored, stats = fitted["results"][0], fitted["scores"][0], fitted["stats"]
        for name, value in result["params"].items():
            tensors.setdefault(name, []).append(value.numpy())
        tensors.setdefault("mean", []).append(np.stack([s[0] for s in stats]))
        tensors.setdefault("scale", []).append(np.stack([s[1] for s in stats]))
        for j, layer in enumerate(group):
            metrics.append({"layer": layer, "chip": cfg.chip, "best_epoch": int(result["best_epoch"][j]),
                            "epochs_run": int(result["chip_epochs"][j]), "n_train": len(train_rows),
                            "n_val": len(val_rows), "n_eval": 0 if evals is None else int(evals.n_rows),
                            **chip_metrics(scored, j)})
            if "eval" in scored:
                preds.append(scored["eval"][2][j])
        bar.update(1)
    bar.close()
    return {name: np.concatenate(parts) for name, parts in tensors.items()}, metrics, np.stack(preds) if preds else None


# -- scikit-learn backend ---------------------------------------------------------------------------

def _train_logreg(train, evals, layers, train_rows, val_rows, C, cfg: TrainConfig):
    """One LogRegChip per layer, in parallel with joblib (each job reads its own layer)."""
    t_src, e_src, params = cache_source(train), cache_source(evals), cfg.chip_params(C)
    fitted = [one for [one] in Parallel(n_jobs=cfg.n_jobs)(
        delayed(fit_logreg_layer)(t_src, e_src, layer, train_rows, val_rows, [params]) for layer in layers)]
    n_eval = 0 if evals is None else int(evals.n_rows)
    metrics = [{"layer": layer, "chip": "logreg", "best_epoch": None, "epochs_run": int(chip.n_iter_),
                "n_train": len(train_rows), "n_val": len(val_rows), "n_eval": n_eval, **scores}
               for layer, (chip, scores, _) in zip(layers, fitted)]
    preds = np.stack([p for _, _, p in fitted]) if evals is not None else None
    return {layer: chip for layer, (chip, _, _) in zip(layers, fitted)}, metrics, preds


def fit_logreg_layer(train_src, eval_src, layer: int, train_rows, val_rows, params: list[dict]) -> list[tuple]:
    """[(chip, {"<part>_accuracy", "<part>_loss"}, eval predictions or None)]: a LogRegChip of each ``params``
    fitted at one layer, read once from :func:`~chiptuning.probe.data.cache_source`'s caches, with BLAS threads
    sized like the torch trainer's (oversubscribed OpenMP pools beside torch's can make lbfgs many times slower)."""
    with opened(train_src, eval_src) as (train, evals):
        parts = read_parts(train, evals, layer, train_rows, val_rows, cache_n_classes(train))
    fitted = []
    for chip_params in params:
        with threadpool_limits(limits=choose_threads(None)):
            chip = LogRegChip(**chip_params).fit(*parts["train"][:2])
        fitted.append((chip, *score_logreg(chip, parts)))
    return fitted


__all__ = ["FEW_STEPS", "PAPER_MAX_TRAIN_ROWS", "REGIMES", "TRAINED", "TrainConfig", "fit_group", "fit_logreg_layer",
           "train_chips", "warn_few_steps"]
