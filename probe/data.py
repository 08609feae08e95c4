"""What the trainers read from a cache, and how much of it they hold at once.

Opening caches (by path or as reader objects) and checking that a train and an eval cache come
from the same model and task; classes and class masks; the seeded validation split
(:func:`carve_rows`); memory planning (the dtype the training features are held in, how many
layers a group holds within ``max_memory_mb``, whether a layer is read in place); reading a group
of layers once and standardizing it (:func:`load_standardized`, :func:`read_standardized`); and
streaming minibatches from a cache larger than the memory budget (:class:`CacheBatches`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from chiptuning.cache import CacheReader
from chiptuning.errors import CacheError, ProvenanceError
from chiptuning.probe.batched import (
    ChipSpec,
    RunningStats,
    as_tensor,
    gather_standardized,
    standardization,
    standardize_into,
)
from chiptuning.probe.chips import optional_class_mask, split_validation

log = logging.getLogger(__name__)

#: Metadata fields that must agree between a train and an eval cache (when both record them).
SAME_SOURCE_KEYS = ("model", "model_hash", "model_type", "adapter", "tokenizer", "label_names",
                    "pooling", "feature_mode", "hidden_size", "num_blocks", "max_length")
SAME_TASK_KEYS = ("template", "text_column", "label_names")


# -- caches -----------------------------------------------------------------------------------------

def open_cache(cache, verify: bool = False):
    """A CacheReader for a path, or the object itself (a reader or anything with its API).

    ``verify``: compare every shard with its checksum first (what the trainers do before
    training): one more read of the cache, sha256 at 0.2-2 GB/s depending on the CPU (0.43 s for
    a 142 MB cache on a busy 2-vCPU VM, against 65 s of training on it).

    Raises:
        CacheError: a missing, incomplete or (with ``verify``) corrupt cache, naming the shard.
    """
    reader = CacheReader(cache) if isinstance(cache, (str, Path)) else cache
    if verify and hasattr(reader, "verify_checksums"):
        started = time.perf_counter()
        reader.verify_checksums()
        log.debug("checksums of %s verified in %.2f s", getattr(reader, "path", "the cache"),
                 time.perf_counter() - started)
    return reader


def cache_source(cache):
    """What a worker task reopens a cache from: a CacheReader's path (its open HDF5 files do not
    pickle, and a Dask or Ray worker on another machine that sees the same files needs a path);
    any other object (or None) as is."""
    return str(cache.path) if isinstance(cache, CacheReader) else cache


@contextlib.contextmanager
def opened(train_src, eval_src=None) -> Iterator[tuple]:
    """(train, eval) caches of a worker task from what :func:`cache_source` gave (eval None when
    ``eval_src`` is); the ones opened here from a path are closed after."""
    train = open_cache(train_src)
    evals = None if eval_src is None else open_cache(eval_src)
    try:
        yield train, evals
    finally:
        for src, cache in ((train_src, train), (eval_src, evals)):
            if isinstance(src, (str, Path)) and hasattr(cache, "close"):
                cache.close()


def check_same_source(train, eval_cache) -> None:
    """Refuse an eval cache made from another model, template or label set than the train cache.

    Raises:
        ProvenanceError: a differing model / tokenizer / template / label field.
        CacheError: missing layers or another feature width.
    """
    a, b = train.meta.to_dict(), eval_cache.meta.to_dict()
    where = f"eval cache {getattr(eval_cache, 'path', '')}".rstrip()
    for key in SAME_SOURCE_KEYS:  # a field one side does not record is not compared
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ProvenanceError(
                f"{where} has {key}={_short(b[key])} but the train cache has {_short(a[key])}; "
                "extract both with the same model and task settings"
            )
    ta, tb = a.get("task") or {}, b.get("task") or {}
    for key in SAME_TASK_KEYS:
        if ta.get(key) is not None and tb.get(key) is not None and ta[key] != tb[key]:
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


# -- classes and rows -------------------------------------------------------------------------------

def cache_n_classes(cache) -> int:
    """Number of classes of a cache: its label names, or the largest label + 1 without names.

    Raises:
        CacheError: a label index outside the label names.
    """
    names = list(cache.label_names)
    n = len(names) if names else int(np.max(cache.labels)) + 1
    if names and int(np.max(cache.labels)) >= n:
        raise CacheError(f"cache {getattr(cache, 'path', '')} has a label index >= {n} (its label names: {names})")
    return n


def cache_class_mask(cache, n_classes: int, rows: np.ndarray | None = None) -> np.ndarray | None:
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


def read_parts(train, evals, layer: int, train_rows: np.ndarray, val_rows: np.ndarray,
               n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """One layer's float32 features, labels and class mask (or None) of the training rows
    ("train"), the validation rows ("val", when there are any) and the eval cache ("eval", when
    given): what a scikit-learn chip fits and is scored on. Each cache's layer is read once."""
    x = train.layer(layer)
    y = np.asarray(train.labels)
    parts = {"train": (x[train_rows], y[train_rows], cache_class_mask(train, n_classes, train_rows))}
    if len(val_rows):
        parts["val"] = (x[val_rows], y[val_rows], cache_class_mask(train, n_classes, val_rows))
    if evals is not None:
        parts["eval"] = (evals.layer(layer), np.asarray(evals.labels), cache_class_mask(evals, n_classes))
    return parts


# -- memory planning --------------------------------------------------------------------------------

def feature_dtype(cache, specs: list[ChipSpec], standardize: bool) -> torch.dtype:
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


def layers_per_group(cache, specs: list[ChipSpec], standardize: bool, n_train: int, n_val: int, n_layers: int,
                     max_memory_mb: float) -> int:
    """How many of ``n_layers`` layers one group holds so that its features fit in
    ``max_memory_mb``: the rows a layer holds (:func:`rows_held`) in :func:`feature_dtype`, and
    the validation rows in float32."""
    dtype = feature_dtype(cache, specs, standardize)
    return _group_size(rows_held(cache, dtype, n_train), n_val, int(cache.hidden_size), n_layers, max_memory_mb,
                       dtype.itemsize)


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


# -- reading and standardizing layers ---------------------------------------------------------------

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
            if as_tensor(raw).dtype == dtype:  # stored as trained: gather once, then work in place
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


def read_standardized(cache, layers, rows, stats, *, stream: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
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


def stream_batches(cache, layers, rows, y_all, mask_all, standardize: bool, batch_size: int, seed: int,
                   max_memory_mb: float, center: bool = True):
    """Streaming statistics (one pass, chunk by chunk) and batches of a group.

    Returns:
        stats [(mean (H,), scale (H,))] per layer, :class:`CacheBatches` of the rows.
    """
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


__all__ = [
    "IN_PLACE_FRACTION",
    "SAME_SOURCE_KEYS",
    "SAME_TASK_KEYS",
    "CacheBatches",
    "cache_class_mask",
    "cache_n_classes",
    "cache_source",
    "carve_rows",
    "check_same_source",
    "feature_dtype",
    "layers_per_group",
    "load_standardized",
    "open_cache",
    "opened",
    "read_parts",
    "read_standardized",
    "rows_held",
    "stream_batches",
]
