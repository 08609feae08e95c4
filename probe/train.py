"""Train a chip at every layer of a cache: ``chiptuning probe train``.

Torch chips (linear, MLP) of a group of layers train as one batched computation
(:mod:`chiptuning.probe.batched`). Groups are sized so that their training features fit in
``max_memory_mb``; each layer is read from the cache once, so peak memory is about one group of
layers whatever the cache size. When even one layer does not fit, the rows are streamed from the
cache in chunks (:class:`CacheBatches`). The scikit-learn backend fits one ``LogisticRegression``
per layer in parallel with joblib.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from chiptuning.probe.artifacts import ChipSet, majority_baselines
from chiptuning.probe.batched import (
    PRECISIONS,
    ChipSpec,
    InMemoryBatches,
    RunningStats,
    _as_tensor,
    choose_threads,
    fit_banks,
    gather_standardized,
    mask_logits,
    predict_bank,
    resolve_precision,
    standardization,
    standardize_into,
    torch_threads,
)
from chiptuning.probe.chips import CHIP_KINDS, LogRegChip, optional_class_mask, split_validation

from chiptuning import __version__
from chiptuning.errors import CacheError, ChipTuningError, ProvenanceError

log = logging.getLogger(__name__)

#: Training regimes of the torch chips. "paper" is the Chip-Tuning paper's setting, exactly.
REGIMES: dict[str, dict[str, Any]] = {
    "default": dict(lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), batch_size=128, epochs=30,
                    early_stopping=True, n_iter_no_change=2, min_patience_steps=150, standardize=True,
                    max_train_rows=None, precision="auto"),
    "paper": dict(lr=1e-5, weight_decay=0.01, betas=(0.9, 0.99), batch_size=1, epochs=1,
                  early_stopping=False, n_iter_no_change=3, min_patience_steps=0, standardize=False,
                  max_train_rows=20000, precision="float32"),
}

#: Metadata fields that must agree between a train and an eval cache (when both record them).
SAME_SOURCE_KEYS = ("model", "model_hash", "model_type", "adapter", "tokenizer", "label_names",
                    "pooling", "feature_mode", "hidden_size", "num_blocks", "max_length")
SAME_TASK_KEYS = ("template", "text_column", "label_names")


@dataclass
class TrainConfig:
    """Settings of ``chiptuning probe train``; saved, resolved, in chips.json under "train".

    Fields left at None take the regime's value (see :data:`REGIMES`).

    Attributes:
        chip: "linear", "mlp" or "logreg" (``--chip``).
        regime: "default" or "paper" (``--regime``); torch chips only.
        lr: AdamW learning rate (``--lr``).
        weight_decay: AdamW weight decay (``--weight-decay``).
        betas: AdamW betas.
        batch_size: rows per step (``--batch-size``).
        epochs: most passes over the training rows (``--epochs``).
        early_stopping: stop each chip when its validation loss stops improving.
        n_iter_no_change: early-stopping patience in epochs (``--patience``).
        min_patience_steps: the patience is never shorter than this many optimizer steps (a
            small cache has few steps per epoch; see :class:`~chiptuning.probe.batched.ChipSpec`).
        standardize: standardize features per layer with training statistics (saved).
        max_train_rows: use at most this many training rows (seeded choice); the paper's 20,000.
        precision: "auto", "float32" or "bfloat16": precision of the products with the features
            (``--precision``); "auto" (default regime) is bfloat16 on CPUs with AMX / AVX512-BF16,
            float32 elsewhere; the paper regime is float32. Saved resolved.
        hidden: MLP hidden width (``--hidden``).
        C: inverse regularization of the logreg chips (``--C``).
        max_iter: solver iterations of the logreg chips.
        val_size: validation rows carved from the training cache (``--val-size``); 0 for none.
        seed: seed of the validation split, the row order and the initialisation (``--seed``).
        layers: layers to train (``--layers``); default every layer of the cache.
        n_jobs: joblib workers for the logreg chips (``--n-jobs``).
        device: torch device (``--device``).
        max_memory_mb: feature memory budget of the torch trainer (``--max-memory-mb``).
        threads: torch threads of the torch trainer (``--threads``); None picks the faster of 1
            and one per CPU (see :func:`~chiptuning.probe.batched.choose_threads`).
        fit_intercept: learn the linear chip's bias (``--no-intercept`` turns it off); without it
            the features are only scaled, not centered, so the chip folded onto raw features is
            bias-free (what ``chiptuning prune --export sequence-classification`` needs). Linear
            chips only.
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
        filled = {k: (preset[k] if getattr(self, k) is None else getattr(self, k)) for k in preset}
        if self.regime == "paper" and self.max_train_rows is None:
            filled["max_train_rows"] = preset["max_train_rows"]
        cfg = replace(self, **filled)
        cfg.betas = tuple(cfg.betas)
        if cfg.precision not in PRECISIONS:
            raise ChipTuningError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        cfg.precision = resolve_precision(cfg.precision, cfg.device)
        for name, value in (("--lr", cfg.lr), ("--batch-size", cfg.batch_size), ("--epochs", cfg.epochs),
                            ("--hidden", cfg.hidden), ("--C", cfg.C), ("--max-memory-mb", cfg.max_memory_mb)):
            if value is None or value <= 0:
                raise ChipTuningError(f"{name} must be > 0, got {value}")
        if not cfg.fit_intercept and cfg.chip != "linear":
            raise ChipTuningError(f"--no-intercept applies to linear chips, not {cfg.chip}")
        if cfg.n_iter_no_change < 1:
            raise ChipTuningError(f"--patience must be >= 1, got {cfg.n_iter_no_change}")
        if cfg.min_patience_steps < 0:
            raise ChipTuningError(f"min_patience_steps must be >= 0, got {cfg.min_patience_steps}")
        if cfg.weight_decay < 0:
            raise ChipTuningError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
        if cfg.val_size < 0:
            raise ChipTuningError(f"--val-size must be >= 0, got {cfg.val_size}")
        return cfg

    def spec(self) -> ChipSpec:
        """The batched trainer's settings for a torch chip."""
        return ChipSpec(kind=self.chip, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas,
                        epochs=self.epochs, hidden=self.hidden, early_stopping=self.early_stopping,
                        n_iter_no_change=self.n_iter_no_change, min_patience_steps=self.min_patience_steps,
                        precision=self.precision,
                        fit_intercept=self.fit_intercept)

    def chip_params(self, n_classes: int) -> dict:
        """Estimator params of the chip this config trains (what ``load_chips`` rebuilds)."""
        if self.chip == "logreg":
            return dict(C=self.C, max_iter=self.max_iter, standardize=self.standardize is not False,
                        classes=list(range(n_classes)), random_state=self.seed)
        params = dict(lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                      batch_size=self.batch_size, betas=list(self.betas), standardize=self.standardize,
                      early_stopping=self.early_stopping, n_iter_no_change=self.n_iter_no_change,
                      min_patience_steps=self.min_patience_steps, classes=list(range(n_classes)),
                      random_state=self.seed, device="cpu", precision=self.precision)
        if self.chip == "mlp":
            params["hidden"] = self.hidden
        else:
            params["fit_intercept"] = self.fit_intercept
        return params

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["betas"] = list(d["betas"]) if d["betas"] is not None else None
        return d


# -- caches -----------------------------------------------------------------------------------------

def open_cache(cache):
    """A CacheReader for a path, or the object itself (a reader or anything with its API)."""
    if isinstance(cache, (str, Path)):
        from chiptuning.cache import CacheReader

        return CacheReader(cache)
    return cache


def check_same_source(train, eval_cache) -> None:
    """Refuse an eval cache made from another model, template or label set than the train cache.

    Raises:
        ProvenanceError: a differing model / tokenizer / template / label field.
        CacheError: missing layers or another feature width.
    """
    a, b = train.meta or {}, eval_cache.meta or {}
    where = f"eval cache {getattr(eval_cache, 'path', '')}".rstrip()
    for key in SAME_SOURCE_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise ProvenanceError(
                f"{where} has {key}={_short(b[key])} but the train cache has {_short(a[key])}; "
                "extract both with the same model and task settings"
            )
    ta, tb = a.get("task") or {}, b.get("task") or {}
    for key in SAME_TASK_KEYS:
        if key in ta and key in tb and ta[key] != tb[key]:
            raise ProvenanceError(
                f"{where} has task {key}={_short(tb[key])} but the train cache has {_short(ta[key])}; "
                "extract both with the same --template / --text-column / labels"
            )
    if list(train.label_names) != list(eval_cache.label_names):
        raise ProvenanceError(
            f"{where} has labels {eval_cache.label_names} but the train cache has {train.label_names}"
        )
    if train.hidden_size != eval_cache.hidden_size:
        raise CacheError(f"{where} has hidden size {eval_cache.hidden_size}, the train cache {train.hidden_size}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _n_classes(cache) -> int:
    names = list(cache.label_names)
    n = len(names) if names else int(np.max(cache.labels)) + 1
    if names and int(np.max(cache.labels)) >= n:
        raise CacheError(f"cache {getattr(cache, 'path', '')} has a label index >= {n} (its label names: {names})")
    return n


def _class_mask(cache, n_classes: int, rows: np.ndarray | None = None) -> np.ndarray | None:
    """(N, C) validity mask from ``n_choices``; None when every row has every class."""
    n_choices = getattr(cache, "n_choices", None)
    if n_choices is None:
        return None
    return optional_class_mask(np.asarray(n_choices) if rows is None else np.asarray(n_choices)[rows], n_classes)


def carve_rows(n_rows: int, val_size: int, seed: int, max_train_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows) of the training cache: seeded, disjoint, sorted.

    ``val_size`` is capped at a fifth of the rows (with a warning) so a small cache still trains.
    With ``max_train_rows`` the training rows are the first ones of a seeded shuffle (the paper:
    shuffled with seed 42, first 20,000).
    """
    size = val_size
    if size > n_rows // 5:
        size = n_rows // 5
        log.warning("--val-size %d is too large for %d rows; using %d validation rows", val_size, n_rows, size)
    train_rows, val_rows = split_validation(n_rows, size, seed)
    if max_train_rows is not None and len(train_rows) > max_train_rows:
        shuffled = train_rows[np.random.default_rng(seed).permutation(len(train_rows))]
        train_rows = np.sort(shuffled[:max_train_rows])
    return train_rows, val_rows


# -- training -------------------------------------------------------------------------------------

def train_chips(
    train_cache,
    eval_cache=None,
    chip: str = "linear",
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    progress: bool = False,
    callback: Callable[[int, int, np.ndarray], None] | None = None,
    **options,
) -> ChipSet:
    """Train a chip at every layer of a cache and (with ``out``) write the chips directory.

    Args:
        train_cache: a cache directory or a CacheReader (or an object with its API).
        eval_cache: the eval split's cache (same model, template and labels), or None.
        chip: "linear", "mlp" or "logreg" (ignored when ``config`` is given).
        out: chips directory to write (chips.json, weights, metrics, predictions, plot).
        config: full settings; ``options`` override its fields.
        progress: show a progress bar over layer groups.
        callback: ``callback(epoch, step, rows)`` after every optimizer step (torch chips).
        **options: any :class:`TrainConfig` field (lr, epochs, regime, val_size, seed, ...).

    Returns:
        The trained :class:`ChipSet` (saved to ``out`` when given).

    Raises:
        ChipTuningError: bad settings; CacheError / ProvenanceError for mismatched caches.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown train_chips options: {sorted(unknown)}")
    cfg = replace(config or TrainConfig(chip=chip), **options).resolved()
    train = open_cache(train_cache)
    evals = open_cache(eval_cache) if eval_cache is not None else None
    if evals is not None:
        check_same_source(train, evals)
    layers = list(train.layers) if cfg.layers is None else [int(layer) for layer in cfg.layers]
    missing = [layer for layer in layers if layer not in train.layers or (evals is not None and layer not in evals.layers)]
    if missing:
        raise CacheError(f"--layers {missing} not in the cache(s) (layers {train.layers[0]}..{train.layers[-1]})")
    C = _n_classes(train)
    if evals is not None:
        _n_classes(evals)
    train_rows, val_rows = carve_rows(train.n_rows, cfg.val_size, cfg.seed, cfg.max_train_rows)
    if len(np.unique(train.labels[train_rows])) < 2:
        raise ChipTuningError("the training rows hold a single class; a chip needs at least two")
    log.info("training %s chips on %d layers: %d train rows, %d validation rows, %d eval rows",
             cfg.chip, len(layers), len(train_rows), len(val_rows), 0 if evals is None else evals.n_rows)
    if cfg.chip == "logreg":
        tensors, sk_chips, metrics, preds = None, *_train_logreg(train, evals, layers, train_rows, val_rows, C, cfg)
    else:
        sk_chips = None
        with torch_threads(choose_threads(cfg.threads)):
            tensors, metrics, preds = _train_torch(train, evals, layers, train_rows, val_rows, C, cfg,
                                                   progress=progress, callback=callback)
    config_dict = {
        "chiptuning_version": __version__,
        "chip": cfg.chip,
        "params": cfg.chip_params(C),
        "train": cfg.to_dict(),
        "layers": layers,
        "label_names": list(train.label_names) or [str(c) for c in range(C)],
        "n_classes": C,
        "hidden_size": int(train.hidden_size),
        "train_cache": _cache_record(train),
        "eval_cache": None if evals is None else _cache_record(evals, with_meta=False),
        "validation": {"size": len(val_rows), "seed": cfg.seed, "rows": val_rows.tolist(),
                       "source": "train cache", "n_train_rows": len(train_rows)},
        "model_stats": dict(getattr(train, "model_stats", None) or {}),
        "majority_baseline": majority_baselines(
            eval=None if evals is None else evals.labels,
            val=np.asarray(train.labels)[val_rows] if len(val_rows) else None),
    }
    eval_predictions = None
    if evals is not None:
        eval_predictions = {"layers": layers, "example_ids": [str(e) for e in evals.example_ids],
                            "labels": np.asarray(evals.labels), "predictions": preds}
    chips = ChipSet(config_dict, tensors=tensors, sklearn_chips=sk_chips, metrics=metrics,
                    eval_predictions=eval_predictions)
    if out is not None:
        chips.save(out)
    return chips


def _cache_record(cache, with_meta: bool = True) -> dict:
    record = {"path": str(getattr(cache, "path", "")), "fingerprint": cache.fingerprint,
              "n_rows": int(cache.n_rows)}
    if with_meta:
        record["meta"] = cache.meta
    else:
        record["model"] = (cache.meta or {}).get("model")
        record["split"] = ((cache.meta or {}).get("task") or {}).get("split")
    return record


def _feature_dtype(cache, specs: list[ChipSpec], standardize: bool) -> torch.dtype:
    """dtype of the in-memory training features of a group.

    bfloat16 when every spec computes in bfloat16, or when the chips read raw (unstandardized)
    features of a bfloat16 cache (an exact copy of what is stored, half the memory); else float32.
    """
    if specs and all(s.precision == "bfloat16" for s in specs):
        return torch.bfloat16
    if not standardize and getattr(cache, "storage_dtype", None) == "bfloat16":
        return torch.bfloat16
    return torch.float32


def _group_size(n_train: int, n_other: int, hidden: int, n_layers: int, max_memory_mb: float,
                itemsize: int = 4) -> int:
    """Layers per group so that the group's features (training rows in their dtype, validation
    rows in float32) fit in ``max_memory_mb``."""
    per_layer = (n_train * itemsize + n_other * 4) * hidden
    return max(1, min(n_layers, int(max_memory_mb * 2**20 // max(per_layer, 1))))


def _read_layer(cache, layer: int):
    """One whole layer as stored (bfloat16 bit patterns stay 16-bit), or float32 for any object
    with only the documented ``layer`` method."""
    if hasattr(cache, "layer_stored"):
        return cache.layer_stored(layer)
    return cache.layer(layer)


#: The training rows are read in place (a whole layer into the buffer it trains from) when they
#: are at least this fraction of the cache's rows; fewer are gathered (a paper-regime subset).
IN_PLACE_FRACTION = 0.9
_STORED = {np.dtype(np.uint16): torch.bfloat16, np.dtype(np.float32): torch.float32}


def _reads_in_place(cache, dtype: torch.dtype, n_train: int) -> bool:
    """Whether a layer can be read straight into the training buffer: the cache stores what
    training reads (bfloat16 trained in bfloat16, float32 in float32) and the training rows are
    nearly all of it."""
    stored = getattr(cache, "stored_dtype", None)
    return (hasattr(cache, "layer_stored") and stored is not None and _STORED.get(np.dtype(stored)) == dtype
            and n_train >= IN_PLACE_FRACTION * cache.n_rows)


def rows_held(cache, dtype: torch.dtype, n_train: int) -> int:
    """Rows of a layer the trainer holds in memory: the whole cache when it reads in place."""
    return cache.n_rows if _reads_in_place(cache, dtype, n_train) else n_train


#: Fewer optimizer steps than this in a whole run (at the epoch cap) and torch chips are very likely
#: undertrained: a warning says so.
FEW_STEPS = 100


def warn_few_steps(n_train: int, batch_size: int, epochs: int) -> None:
    """Warn when ``epochs`` passes over ``n_train`` rows at ``batch_size`` are few optimizer steps
    (e.g. a sweep recipe sized for 20,000 rows run on 2,000: 4 steps per epoch)."""
    steps = epochs * math.ceil(n_train / batch_size)
    if steps < FEW_STEPS:
        log.warning("%d training rows at --batch-size %d for at most %d epochs is only %d optimizer steps: "
                    "the chips are likely undertrained (raise --epochs or lower --batch-size)",
                    n_train, batch_size, epochs, steps)


def _workspace_tensor(workspace: dict | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, carved from ``workspace``'s buffer of that dtype (grown when too
    small) so group after group reuses the same memory; fresh when ``workspace`` is None.
    (A fresh multi-GB buffer per group pays a page fault on every 4 kB of its first touch.)"""
    numel = math.prod(shape)
    if workspace is None:
        return torch.empty(shape, dtype=dtype)
    flat = workspace.get(dtype)
    if flat is None or flat.numel() < numel:
        workspace.pop(dtype, None)
        flat = workspace[dtype] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def _as_stored(t: torch.Tensor, stored: np.dtype) -> np.ndarray:
    """A numpy view of a tensor's memory in the cache's stored dtype (bfloat16 as uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(stored)
    return t.numpy()


def load_standardized(cache, layers: list[int], train_rows: np.ndarray, other_rows: list[np.ndarray], *,
                      standardize: bool = True, dtype: torch.dtype = torch.float32, center: bool = True,
                      workspace: dict | None = None):
    """Read each layer once; compute its statistics on ``train_rows`` and standardize.

    When the cache stores ``dtype`` and the training rows are nearly all of it (the usual case:
    all rows but the validation part), each layer is read straight into the buffer it trains
    from and standardized there in place: ``x`` holds every row of the cache, the training rows
    at ``train_pos``, and the statistics are those of all rows minus the others. Otherwise ``x``
    holds the training rows only (``train_pos`` is ``arange``).

    Args:
        workspace: a dict whose buffers successive calls reuse (see :func:`_workspace_tensor`).

    Returns:
        x (G, M, H) in ``dtype``, train_pos (positions of the training rows in x),
        [(G, len(rows), H) float32 for each of ``other_rows``], stats [(mean (H,), scale (H,))]
        per layer.
    """
    G, H = len(layers), int(cache.hidden_size)
    train_rows = np.asarray(train_rows)
    in_place = _reads_in_place(cache, dtype, len(train_rows))
    if in_place:
        x = _workspace_tensor(workspace, (G, cache.n_rows, H), dtype)
        train_pos = train_rows
        excluded = np.setdiff1d(np.arange(cache.n_rows), train_rows)
    else:
        x = _workspace_tensor(workspace, (G, len(train_rows), H), dtype)
        train_pos = np.arange(len(train_rows))
    others = [torch.empty((G, len(rows), H), dtype=torch.float32) for rows in other_rows]
    stats = []
    for j, layer in enumerate(layers):
        if in_place:
            cache.layer_stored(layer, out=_as_stored(x[j], cache.stored_dtype))
            raw = x[j]
            mean, scale = standardization(raw, standardize, center=center, exclude=excluded)
        else:
            raw = _read_layer(cache, layer)
            if _as_tensor(raw).dtype == dtype:  # stored as trained: gather once, then work in place
                mean, scale = gather_standardized(raw, x[j], train_rows, standardize, center=center)
            else:
                mean, scale = standardization(raw, standardize, rows=train_rows, center=center)
                standardize_into(raw, mean, scale, x[j], rows=train_rows)
        for rows, out in zip(other_rows, others):  # from the raw values, before standardizing in place
            standardize_into(raw, mean, scale, out[j], rows=rows)
        if in_place and standardize:
            standardize_into(raw, mean, scale, raw)
        stats.append((mean, scale))
        del raw
    return x, train_pos, others, stats


def _standardized(cache, layers, rows, stats, *, stream: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """(G, len(rows), H) float32 features of ``rows`` standardized with the training statistics.

    ``stream`` reads them with ``iter_batches`` (memory bounded by the rows asked for, not the
    cache); otherwise one whole layer at a time. ``out``: a float32 buffer of that shape to fill.
    """
    rows = np.asarray(rows)
    H = int(cache.hidden_size)
    if out is None:
        out = torch.empty((len(layers), len(rows), H), dtype=torch.float32)
    if not stream:
        for j, layer in enumerate(layers):
            standardize_into(_read_layer(cache, layer), *stats[j], out[j], rows=rows)
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for row_idx, feats in cache.iter_batches(layers, 1024, rows=rows):
        pos = torch.from_numpy(order[np.searchsorted(sorted_rows, row_idx)])
        for j in range(len(layers)):
            mean, scale = (torch.from_numpy(s) for s in stats[j])
            out[j, pos] = (torch.from_numpy(np.ascontiguousarray(feats[:, j])) - mean) / scale
    return out


def score_specs(specs: list[ChipSpec], results: list[dict], x: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None, dtype: torch.dtype = torch.float32, rows: np.ndarray | None = None):
    """(accuracy (G,), mean loss (G,), predictions (G, N)) of each spec's G chips.

    Specs of the same chip type are scored together (one product per row chunk for all).
    ``rows`` scores only these rows of ``x`` (``y`` and ``mask`` are theirs).
    """
    out: list = [None] * len(specs)
    kinds: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        kinds.setdefault((spec.kind, spec.hidden), []).append(i)
    for (kind, _), members in kinds.items():
        params = {name: torch.stack([results[i]["params"][name] for i in members], dim=1)
                  for name in results[members[0]]["params"]}
        if rows is None:
            logits = predict_bank(kind, params, x, mask, dtype=dtype)  # (G, S, N, C)
        else:
            logits = mask_logits(predict_bank(kind, params, x, dtype=dtype)[:, :, torch.from_numpy(rows)], mask)
        G, S, N, C = logits.shape
        pred = logits.argmax(dim=3)
        acc = (pred == y.view(1, 1, -1)).double().mean(dim=2)
        loss = F.cross_entropy(logits.reshape(-1, C), y.repeat(G * S), reduction="none").view(G, S, N).mean(dim=2)
        for s, i in enumerate(members):
            out[i] = (acc[:, s].numpy(), loss[:, s].numpy(), pred[:, s].numpy())
    return out


def fit_group(train, evals, layers: list[int], train_rows: np.ndarray, val_rows: np.ndarray,
              specs: list[ChipSpec], *, n_classes: int, batch_size: int, seed: int, standardize: bool = True,
              center: bool = True,
              device: str = "cpu", max_memory_mb: float = 2048, callback=None,
              workspace: dict | None = None, warn: bool = True) -> dict:
    """Train every spec's chips on a group of layers: each layer is read once, standardized with
    its training statistics, and every setting trains on the same minibatches (one bank per chip
    type, see :func:`~chiptuning.probe.batched.fit_banks`). ``center=False`` only scales the
    features (mean 0 is saved), for bias-free linear chips (``--no-intercept``). Successive
    groups given the same ``workspace`` dict reuse one feature buffer; ``warn=False`` leaves the
    streaming warning to the first group.

    Returns:
        {"stats": [(mean, scale)] per layer, "results": fit_banks' results per spec,
        "scores": per spec {"train" | "val" | "eval": (accuracy (G,), loss (G,), predictions (G, N))},
        "streamed": whether the training rows were streamed from the cache}.
    """
    C, H = n_classes, int(train.hidden_size)
    y_all = torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    mask_all = _class_mask(train, C)
    mask_all = None if mask_all is None else torch.from_numpy(mask_all)

    def take(t, rows):
        return None if t is None else t[torch.from_numpy(np.asarray(rows, dtype=np.int64))]

    dtype = _feature_dtype(train, specs, standardize)
    stream = len(train_rows) * H * dtype.itemsize > max_memory_mb * 2**20
    if stream and warn:
        log.warning("one layer of training features (%.0f MB) exceeds --max-memory-mb %g; streaming from the cache",
                    len(train_rows) * H * dtype.itemsize / 2**20, max_memory_mb)
    if stream:
        stats, data = _streamed(train, layers, train_rows, y_all, mask_all, standardize, batch_size, seed,
                                max_memory_mb, center=center)
        x_tr = None
        x_val = _standardized(train, layers, val_rows, stats, stream=True)
    else:
        x_tr, train_pos, (x_val,), stats = load_standardized(
            train, layers, train_rows, [val_rows], standardize=standardize, center=center, dtype=dtype,
            workspace=workspace)
        data = InMemoryBatches(x_tr, take(y_all, train_rows), take(mask_all, train_rows), batch_size, seed,
                               rows=train_pos)
    val = (x_val, take(y_all, val_rows), take(mask_all, val_rows)) if len(val_rows) else None
    results = fit_banks(data, specs, H, C, seed=seed, val=val, device=device, callback=callback)
    parts = {}
    if x_tr is not None:
        in_order = len(train_pos) == x_tr.shape[1]  # x_tr holds the training rows only, in order
        parts["train"] = (x_tr, take(y_all, train_rows), take(mask_all, train_rows), None if in_order else train_pos)
    if val is not None:
        parts["val"] = (*val, None)
    scores: list[dict] = [{} for _ in specs]
    for name, (xs, ys, ms, rows) in parts.items():
        # The training rows are scored in the precision they trained in; val / eval in float32.
        compute = torch.bfloat16 if name == "train" and xs.dtype == torch.bfloat16 and all(
            s.precision == "bfloat16" for s in specs) else torch.float32
        for i, scored in enumerate(score_specs(specs, results, xs, ys, ms, compute, rows=rows)):
            scores[i][name] = scored
    if evals is not None:
        for i, scored in enumerate(_score_eval(evals, layers, stats, specs, results, C, stream)):
            scores[i]["eval"] = scored
    return {"stats": stats, "results": results, "scores": scores, "streamed": stream}


def _score_eval(evals, layers, stats, specs, results, n_classes: int, stream: bool) -> list[tuple]:
    """Eval scores of every spec, one layer at a time: an eval cache as large as the training
    cache costs one float32 layer of memory, not the group's layers."""
    m = _class_mask(evals, n_classes)
    y = torch.from_numpy(np.asarray(evals.labels, dtype=np.int64))
    mask = None if m is None else torch.from_numpy(m)
    per_layer = []
    x = torch.empty((1, evals.n_rows, int(evals.hidden_size)), dtype=torch.float32)  # reused by every layer
    for j, layer in enumerate(layers):
        _standardized(evals, [layer], np.arange(evals.n_rows), [stats[j]], stream=stream, out=x)
        one = [dict(r, params={k: v[j:j + 1] for k, v in r["params"].items()}) for r in results]
        per_layer.append(score_specs(specs, one, x, y, mask, torch.float32))
    return [tuple(np.concatenate([scored[i][k] for scored in per_layer]) for k in range(3))
            for i in range(len(specs))]


def _train_torch(train, evals, layers, train_rows, val_rows, C, cfg: TrainConfig, *, progress=False,
                 callback=None):
    """Batched training of torch chips, one group of layers at a time.

    Returns:
        tensors (name -> (n_layers, ...)), metric rows, eval predictions (n_layers, N_eval) or None.
    """
    from tqdm.auto import tqdm

    spec = cfg.spec()
    H = int(train.hidden_size)
    dtype = _feature_dtype(train, [spec], cfg.standardize)
    G = _group_size(rows_held(train, dtype, len(train_rows)), len(val_rows), H, len(layers), cfg.max_memory_mb,
                    dtype.itemsize)
    warn_few_steps(len(train_rows), cfg.batch_size, cfg.epochs)
    tensors: dict[str, list[np.ndarray]] = {}
    metrics, preds = [], []
    groups = [layers[i:i + G] for i in range(0, len(layers), G)]
    workspace: dict = {}  # one feature buffer for every group
    for i, group in enumerate(tqdm(groups, desc="chip groups", unit="group", disable=not progress)):
        fitted = fit_group(train, evals, group, train_rows, val_rows, [spec], n_classes=C,
                           batch_size=cfg.batch_size, seed=cfg.seed, standardize=cfg.standardize,
                           center=cfg.fit_intercept,
                           device=cfg.device, max_memory_mb=cfg.max_memory_mb, callback=callback,
                           workspace=workspace, warn=i == 0)
        result, scored, stats = fitted["results"][0], fitted["scores"][0], fitted["stats"]
        for name, value in result["params"].items():
            tensors.setdefault(name, []).append(value.numpy())
        tensors.setdefault("mean", []).append(np.stack([s[0] for s in stats]))
        tensors.setdefault("scale", []).append(np.stack([s[1] for s in stats]))
        for j, layer in enumerate(group):
            row = {"layer": layer, "chip": cfg.chip, "best_epoch": int(result["best_epoch"][j]),
                   "epochs_run": int(result["chip_epochs"][j]), "n_train": len(train_rows),
                   "n_val": len(val_rows), "n_eval": 0 if evals is None else int(evals.n_rows)}
            for name in ("train", "val", "eval"):
                acc, loss, _ = scored[name] if name in scored else (None, None, None)
                row[f"{name}_accuracy"] = None if acc is None else float(acc[j])
                row[f"{name}_loss"] = None if loss is None else float(loss[j])
            metrics.append(row)
            if "eval" in scored:
                preds.append(scored["eval"][2][j])
        log.info("layers %s: eval accuracy %s", group,
                 [round(m["eval_accuracy"], 4) if m["eval_accuracy"] is not None else None for m in metrics[-len(group):]])
    stacked = {name: np.concatenate(parts) for name, parts in tensors.items()}
    return stacked, metrics, (np.stack(preds) if preds else None)


# -- streaming (cache larger than the memory budget) ----------------------------------------------

class CacheBatches:
    """Minibatches streamed from the cache, for training rows that do not fit in memory.

    Each epoch reads the rows shard by shard in ``chunk_rows`` chunks (``CacheReader.iter_batches``),
    shuffles each chunk with a seeded generator and cuts it into minibatches: memory stays at one
    chunk of the group's layers. The order is therefore a shuffle within chunks, not a global one.
    """

    def __init__(self, cache, layers, rows, y_all, mask_all, stats, batch_size, seed, chunk_rows):
        self.cache, self.layers, self.rows = cache, layers, np.asarray(rows)
        self.y_all, self.mask_all = y_all, mask_all
        self.mean = torch.from_numpy(np.stack([s[0] for s in stats]))[:, None, :]  # (G, 1, H)
        self.scale = torch.from_numpy(np.stack([s[1] for s in stats]))[:, None, :]
        self.batch_size, self.chunk_rows = batch_size, chunk_rows
        self.n_chips = len(layers)
        self._rng = np.random.default_rng(seed)
        # position of a cache row in the training rows (the ``rows`` handed to callbacks)
        self._order = np.argsort(self.rows, kind="stable")
        self._sorted = self.rows[self._order]

    def epoch(self, epoch: int):
        for row_idx, feats in self.cache.iter_batches(self.layers, self.chunk_rows, rows=self.rows):
            perm = self._rng.permutation(len(row_idx))
            x = (torch.from_numpy(feats).transpose(0, 1) - self.mean) / self.scale  # (G, b, H)
            for start in range(0, len(perm), self.batch_size):
                local = torch.from_numpy(perm[start:start + self.batch_size])
                cache_rows = torch.from_numpy(np.asarray(row_idx))[local]
                mask = None if self.mask_all is None else self.mask_all[cache_rows]
                positions = self._order[np.searchsorted(self._sorted, cache_rows.numpy())]
                yield positions, x.index_select(1, local), self.y_all[cache_rows], mask


def _streamed(cache, layers, rows, y_all, mask_all, standardize: bool, batch_size: int, seed: int,
              max_memory_mb: float, center: bool = True):
    """Streaming statistics (one pass, chunk by chunk) and batches of a group."""
    H = int(cache.hidden_size)
    chunk = max(batch_size, int(max_memory_mb * 2**20 // (4 * H * len(layers) * 3)))
    running = [RunningStats(H) for _ in layers]
    if standardize:
        for _, feats in cache.iter_batches(layers, chunk, rows=rows):
            for j in range(len(layers)):
                running[j].update(torch.from_numpy(np.ascontiguousarray(feats[:, j])), center=center)
        stats = [r.result() for r in running]
    else:
        stats = [(np.zeros(H, np.float32), np.ones(H, np.float32)) for _ in layers]
    return stats, CacheBatches(cache, layers, rows, y_all, mask_all, stats, batch_size, seed, chunk)


# -- scikit-learn backend ---------------------------------------------------------------------------

def _train_logreg(train, evals, layers, train_rows, val_rows, C, cfg: TrainConfig):
    """One LogRegChip per layer, in parallel with joblib (each job reads its own layer)."""
    from chiptuning.cache import CacheReader
    from joblib import Parallel, delayed

    # A real reader holds open HDF5 files, which do not pickle: jobs reopen it by path (this is
    # also what lets a Dask or Ray backend run them on other machines that see the same files).
    t_src = str(train.path) if isinstance(train, CacheReader) else train
    e_src = str(evals.path) if isinstance(evals, CacheReader) else evals
    params = cfg.chip_params(C)
    jobs = (delayed(_fit_logreg_layer)(t_src, e_src, layer, train_rows, val_rows, C, params) for layer in layers)
    results = Parallel(n_jobs=cfg.n_jobs)(jobs)
    chips = {layer: chip for layer, (chip, _, _) in zip(layers, results)}
    metrics = [row for _, row, _ in results]
    preds = np.stack([p for _, _, p in results]) if evals is not None else None
    return chips, metrics, preds


def _fit_logreg_layer(train_src, eval_src, layer, train_rows, val_rows, C, params):
    from threadpoolctl import threadpool_limits

    train = open_cache(train_src)
    evals = open_cache(eval_src) if eval_src is not None else None
    x = train.layer(layer)
    y = np.asarray(train.labels)
    # BLAS threads sized like the torch trainer's (oversubscribed OpenMP pools next to torch's
    # can make lbfgs many times slower).
    with threadpool_limits(limits=choose_threads(None)):
        chip = LogRegChip(**params).fit(x[train_rows], y[train_rows])
    row = {"layer": layer, "chip": "logreg", "best_epoch": None, "epochs_run": int(chip.n_iter_),
           "n_train": len(train_rows), "n_val": len(val_rows), "n_eval": 0 if evals is None else int(evals.n_rows)}
    parts = {"train": (x[train_rows], y[train_rows], _class_mask(train, C, train_rows))}
    if len(val_rows):
        parts["val"] = (x[val_rows], y[val_rows], _class_mask(train, C, val_rows))
    if evals is not None:
        parts["eval"] = (evals.layer(layer), np.asarray(evals.labels), _class_mask(evals, C))
    pred_eval = None
    for name in ("train", "val", "eval"):
        if name not in parts:
            row[f"{name}_accuracy"] = row[f"{name}_loss"] = None
            continue
        xs, ys, mask = parts[name]
        proba = chip.predict_proba(xs, class_mask=mask)
        pred = proba.argmax(axis=1)
        row[f"{name}_accuracy"] = float((pred == ys).mean())
        row[f"{name}_loss"] = float(-np.log(np.clip(proba[np.arange(len(ys)), ys], 1e-12, None)).mean())
        if name == "eval":
            pred_eval = pred
    for cache in (train, evals):
        if cache is not None and isinstance(train_src, (str, Path)) and hasattr(cache, "close"):
            cache.close()
    return chip, row, pred_eval


__all__ = ["REGIMES", "TrainConfig", "carve_rows", "check_same_source", "open_cache", "train_chips"]
