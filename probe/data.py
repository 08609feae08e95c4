"""What the trainers read from a cache, and how much of it they hold at once.

Opening caches and checking that a train and an eval cache come from the same model and task;
classes, class masks and the seeded validation split; per-feature standardization in bounded
memory; minibatches (:class:`InMemoryBatches`, or :class:`CacheBatches` streamed from a cache
larger than the memory budget); memory planning (the dtype the training features are held in, how
many layers a group holds, whether a layer is read in place) and reading a group of layers once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from chiptuning.cache import CacheReader
from chiptuning.errors import CacheError, ProvenanceError

if TYPE_CHECKING:
    from chiptuning.probe.bank import Hyperparams

log = logging.getLogger(__name__)

#: Metadata fields that must agree between a train and an eval cache (when both record them).
SAME_SOURCE_KEYS = ("model", "model_hash", "model_type", "adapter", "tokenizer", "label_names",
                    "pooling", "feature_mode", "hidden_size", "num_blocks", "max_length")
SAME_TASK_KEYS = ("template", "text_column", "label_names")


# -- rows and classes -------------------------------------------------------------------------------

def split_validation(n_rows: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint, sorted (train_rows, val_rows): the validation rows are the first ``size``
    of ``np.random.default_rng(seed).permutation(n_rows)``."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(perm[size:]), np.sort(perm[:size])


def carve_rows(n_rows: int, val_size: int, seed: int, max_train_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows) of the training cache. ``val_size`` is capped at a fifth of the rows
    (with a warning); with ``max_train_rows`` the training rows are the first ones of a seeded
    shuffle (the paper: seed 42, the first 20,000)."""
    size = min(val_size, n_rows // 5)
    if size < val_size:
        log.warning("--val-size %d is too large for %d rows; using %d validation rows", val_size, n_rows, size)
    train_rows, val_rows = split_validation(n_rows, size, seed)
    if max_train_rows is not None and len(train_rows) > max_train_rows:
        train_rows = np.sort(train_rows[np.random.default_rng(seed).permutation(len(train_rows))][:max_train_rows])
    return train_rows, val_rows


def as_class_mask(class_mask, n_rows: int, n_classes: int) -> np.ndarray | None:
    """Check a class mask: (n_rows, n_classes) bool with at least one valid class per row."""
    if class_mask is None:
        return None
    mask = np.asarray(class_mask, dtype=bool)
    if mask.shape != (n_rows, n_classes):
        raise ValueError(f"class_mask has shape {mask.shape}, expected {(n_rows, n_classes)}")
    if not mask.any(axis=1).all():
        raise ValueError("class_mask leaves a row with no valid class")
    return mask


def mask_from_n_choices(n_choices: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) mask of the first ``n_choices[i]`` classes of each row (the cache's convention)."""
    return np.arange(n_classes)[None, :] < np.asarray(n_choices)[:, None]


def optional_class_mask(n_choices, n_classes: int) -> np.ndarray | None:
    """:func:`mask_from_n_choices`, or None when every row has every class."""
    n_choices = np.asarray(n_choices, dtype=np.int64)
    if n_choices.size == 0 or (n_choices >= n_classes).all():
        return None
    return mask_from_n_choices(n_choices, n_classes)


def cache_class_mask(cache, n_classes: int, rows: np.ndarray | None = None) -> np.ndarray | None:
    """(N, C) validity mask of a cache's rows from ``n_choices``; None when every row has every class."""
    n_choices = getattr(cache, "n_choices", None)
    if n_choices is None:
        return None
    return optional_class_mask(np.asarray(n_choices) if rows is None else np.asarray(n_choices)[rows], n_classes)


def cache_n_classes(cache) -> int:
    """A cache's classes: its label names, or the largest label + 1 without names.

    Raises:
        CacheError: a label index outside the label names.
    """
    names = list(cache.label_names)
    n = len(names) if names else int(np.max(cache.labels)) + 1
    if names and int(np.max(cache.labels)) >= n:
        raise CacheError(f"cache {getattr(cache, 'path', '')} has a label index >= {n} (its label names: {names})")
    return n


# -- caches -----------------------------------------------------------------------------------------

def open_cache(cache, verify: bool = False):
    """A CacheReader for a path, or the object itself; ``verify`` compares every shard with its
    checksum first (what the trainers do before training).

    Raises:
        CacheError: a missing, incomplete or (with ``verify``) corrupt cache, naming the shard.
    """
    reader = CacheReader(cache) if isinstance(cache, (str, Path)) else cache
    if verify and hasattr(reader, "verify_checksums"):
        reader.verify_checksums()
    return reader


def open_caches(train_cache, eval_cache, layers: list[int] | None) -> tuple:
    """(train, eval or None, layers) to train on: the caches opened with their checksums verified
    and checked to come from the same source; the layers (default every layer of the training cache)
    present in both, else a CacheError naming the missing ones."""
    train = open_cache(train_cache, verify=True)
    evals = None if eval_cache is None else open_cache(eval_cache, verify=True)
    if evals is not None:
        check_same_source(train, evals)
    layers = list(train.layers) if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in layers
               if layer not in train.layers or (evals is not None and layer not in evals.layers)]
    if missing:
        raise CacheError(f"--layers {missing} not in the cache(s) (layers {train.layers[0]}..{train.layers[-1]})")
    return train, evals, layers


def cache_source(cache):
    """What a worker task reopens a cache from: a CacheReader's path (open HDF5 files do not
    pickle, and a remote worker that sees the same files needs a path), any other object as is."""
    return str(cache.path) if isinstance(cache, CacheReader) else cache


@contextlib.contextmanager
def opened(train_src, eval_src=None) -> Iterator[tuple]:
    """(train, eval) caches of a worker task from :func:`cache_source`'s answers; those opened here
    from a path are closed after."""
    train, evals = open_cache(train_src), None if eval_src is None else open_cache(eval_src)
    try:
        yield train, evals
    finally:
        for src, cache in ((train_src, train), (eval_src, evals)):
            if isinstance(src, (str, Path)) and hasattr(cache, "close"):
                cache.close()


def check_same_source(train, eval_cache) -> None:
    """Refuse an eval cache made from another model, template or label set than the train cache
    (ProvenanceError), or of another width (CacheError)."""
    a, b = train.meta.to_dict(), eval_cache.meta.to_dict()
    where = f"eval cache {getattr(eval_cache, 'path', '')}".rstrip()
    pairs = [(key, a.get(key), b.get(key), "model and task settings") for key in SAME_SOURCE_KEYS]
    pairs += [(f"task {key}", (a.get("task") or {}).get(key), (b.get("task") or {}).get(key),
               "--template / --text-column / labels") for key in SAME_TASK_KEYS]
    for key, ours, theirs, settings in pairs:  # a field one side does not record is not compared
        if ours is not None and theirs is not None and ours != theirs:
            raise ProvenanceError(f"{where} has {key}={_short(theirs)} but the train cache has {_short(ours)}; "
                                  f"extract both with the same {settings}")
    if list(train.label_names) != list(eval_cache.label_names):
        raise ProvenanceError(f"{where} has labels {eval_cache.label_names} but the train cache has "
                              f"{train.label_names}")
    if train.hidden_size != eval_cache.hidden_size:
        raise CacheError(f"{where} has hidden size {eval_cache.hidden_size}, the train cache {train.hidden_size}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_parts(train, evals, layer: int, train_rows: np.ndarray, val_rows: np.ndarray,
               n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """One layer's float32 features, labels and class mask of the training rows ("train"), the
    validation rows ("val", if any) and the eval cache ("eval", if given): what a scikit-learn chip
    fits and is scored on. Each cache's layer is read once."""
    x, y = train.layer(layer), np.asarray(train.labels)
    parts = {"train": (x[train_rows], y[train_rows], cache_class_mask(train, n_classes, train_rows))}
    if len(val_rows):
        parts["val"] = (x[val_rows], y[val_rows], cache_class_mask(train, n_classes, val_rows))
    if evals is not None:
        parts["eval"] = (evals.layer(layer), np.asarray(evals.labels), cache_class_mask(evals, n_classes))
    return parts


# -- standardization --------------------------------------------------------------------------------

_STATS_CHUNK = 256  # rows: a float32 chunk stays in the CPU's cache across the passes over it


def as_tensor(x) -> torch.Tensor:
    """A tensor view of features: float32 / float16 numpy, uint16 bfloat16 bit patterns, or a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(x)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float16 else np.float32))


def _chunks(t: torch.Tensor, rows: np.ndarray | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 chunk of ``t[rows]``), gathered and decoded into reused buffers."""
    idx = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))
    n = t.shape[0] if idx is None else len(idx)
    buf = torch.empty((max(1, min(_STATS_CHUNK, n)), t.shape[1]))
    gathered = None if idx is None else torch.empty((buf.shape[0], t.shape[1]), dtype=t.dtype)
    for start in range(0, n, _STATS_CHUNK):
        if idx is None:
            src = t[start:start + _STATS_CHUNK]
        else:
            part = idx[start:start + _STATS_CHUNK]
            src = torch.index_select(t, 0, part, out=gathered[:len(part)])
        yield start, buf[:src.shape[0]].copy_(src)


class RunningStats:
    """Per-feature mean and variance merged chunk by chunk (Chan et al.), in float64. Each chunk is
    centered on its own mean before squaring (no cancellation when a mean dwarfs the spread); the
    result depends on the values and the chunking only, not on their storage dtype."""

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.mean, self.m2 = torch.zeros(n_features, dtype=torch.float64), torch.zeros(n_features, dtype=torch.float64)

    def update(self, chunk: torch.Tensor, center: bool = True) -> None:
        """Merge a (b, H) chunk; a float32 chunk is overwritten (used as scratch)."""
        b = chunk.shape[0]
        if b == 0:
            return
        f = chunk if chunk.dtype == torch.float32 else chunk.float()
        mean = f.mean(dim=0) if center else torch.zeros(f.shape[1])
        m2 = f.sub_(mean).square_().sum(dim=0).double()
        total, delta = self.n + b, mean.double() - self.mean
        self.mean += delta * (b / total)
        self.m2 += m2 + delta.square() * (self.n * b / total)
        self.n = total

    def remove(self, other: RunningStats) -> None:
        """Take out the rows merged into ``other`` (a subset of the rows merged here)."""
        n = self.n - other.n
        if n <= 0:
            raise ValueError(f"cannot remove {other.n} of {self.n} rows")
        mean = (self.mean * self.n - other.mean * other.n) / n
        delta = other.mean - mean
        self.m2 = (self.m2 - other.m2 - delta.square() * (n * other.n / self.n)).clamp_min_(0)
        self.mean, self.n = mean, n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        scale = (self.m2 / max(self.n, 1)).sqrt()
        scale[scale < 1e-6] = 1.0
        return self.mean.float().numpy(), scale.float().numpy()


def _running_stats(t: torch.Tensor, rows: np.ndarray | None, center: bool) -> RunningStats:
    stats = RunningStats(t.shape[1])
    for _, chunk in _chunks(t, rows):
        stats.update(chunk, center=center)
    return stats


def standardization(x, standardize: bool = True, center: bool = True, rows: np.ndarray | None = None,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean (H,), scale (H,)) float32 of one layer's training features (see
    :func:`as_tensor` for ``x``); a constant feature gets scale 1.

    ``standardize=False`` gives mean 0 and scale 1; ``center=False`` keeps mean 0 (scale only: a
    folded linear chip stays bias-free); ``rows`` (default all) or ``exclude``: every row but these,
    computed as all rows minus them (the kept rows are never gathered).
    """
    t = as_tensor(x)
    H = t.shape[1]
    if not standardize:
        return np.zeros(H, np.float32), np.ones(H, np.float32)
    if rows is not None and exclude is not None:
        raise ValueError("give rows or exclude, not both")
    stats = _running_stats(t, rows, center)
    if exclude is not None and len(exclude):
        stats.remove(_running_stats(t, exclude, center))
    mean, scale = stats.result()
    return (mean if center else np.zeros(H, np.float32)), scale


def standardize_into(x, mean: np.ndarray, scale: np.ndarray, out: torch.Tensor,
                     rows: np.ndarray | None = None) -> torch.Tensor:
    """``out[i] = (x[rows[i]] - mean) / scale`` computed in float32 by chunks, rounded to ``out``'s dtype."""
    t = as_tensor(x)
    m, s = torch.from_numpy(np.asarray(mean, np.float32)), torch.from_numpy(np.asarray(scale, np.float32))
    for start, chunk in _chunks(t, rows):
        out[start:start + len(chunk)].copy_(chunk.sub_(m).div_(s))
    return out


def gather_standardized(x, out: torch.Tensor, rows: np.ndarray | None = None, standardize: bool = True,
                        center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Gather ``x[rows]`` into ``out`` (``x``'s own dtype), then take the statistics on ``out`` and
    standardize it in place: one gather instead of one per pass, the same values as
    :func:`standardization` + :func:`standardize_into`. Returns (mean, scale)."""
    t = as_tensor(x)
    if t.dtype != out.dtype:
        raise ValueError(f"gather_standardized needs x in out's dtype {out.dtype}, got {t.dtype}")
    if rows is None:
        out.copy_(t)
    else:
        torch.index_select(t, 0, torch.from_numpy(np.asarray(rows, dtype=np.int64)), out=out)
    mean, scale = standardization(out, standardize, center=center)
    if standardize:
        standardize_into(out, mean, scale, out)
    return mean, scale


# -- minibatches ------------------------------------------------------------------------------------

class Batches(Protocol):
    """Training rows of a group of layers, served as standardized minibatches."""

    n_chips: int

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yields (rows (B,) positions in the training rows, x (G, B, H), y (B,), class_mask (B, C) | None)."""
        ...


class InMemoryBatches:
    """Minibatches of features held in memory. Epoch e visits the rows in the e-th permutation of
    ``np.random.default_rng(seed)`` (in order without ``shuffle``), whatever the layers of the group.

    ``x``: (G, M, H) standardized features, contiguous; the training rows are ``x[:, rows]``
    (default all M); ``y`` (N,) and ``class_mask`` (N, C) or None: of the training rows.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None,
                 batch_size: int, seed: int, shuffle: bool = True, rows: np.ndarray | None = None) -> None:
        self.x, self.y, self.class_mask = x, y, class_mask
        self.rows = np.arange(x.shape[1]) if rows is None else np.asarray(rows)
        if len(self.rows) != len(y):
            raise ValueError(f"{len(self.rows)} training rows but {len(y)} labels")
        self.n_chips, self.batch_size, self.shuffle = x.shape[0], int(batch_size), shuffle
        self._rng, self._orders = np.random.default_rng(seed), []

    def order(self, epoch: int) -> np.ndarray:
        """An epoch's order, as positions in the training rows (drawn in sequence: the same for epoch e)."""
        while len(self._orders) <= epoch:
            n = len(self.rows)
            self._orders.append(self._rng.permutation(n) if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def epoch(self, epoch: int):
        """An epoch's minibatches; the features live in a buffer the next minibatch of the same size reuses."""
        order, buffers = self.order(epoch), {}
        for start in range(0, len(order), self.batch_size):
            pos = order[start:start + self.batch_size]
            idx = torch.from_numpy(pos)
            if len(pos) not in buffers:
                buffers[len(pos)] = self.x.new_empty((self.x.shape[0], len(pos), self.x.shape[2]))
            xb = torch.index_select(self.x, 1, torch.from_numpy(self.rows[pos]), out=buffers[len(pos)])
            yield pos, xb, self.y[idx], None if self.class_mask is None else self.class_mask[idx]


def stacked_stats(stats: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer [(mean (H,), scale (H,))] as two (G, 1, H) tensors, to standardize (G, B, H) features."""
    mean, scale = (torch.from_numpy(np.stack(part))[:, None, :] for part in zip(*stats))
    return mean, scale


class CacheBatches:
    """Minibatches streamed from the cache, for training rows that do not fit in memory: each epoch
    reads the rows shard by shard in chunks sized to ``max_memory_mb``, shuffles each chunk (seeded)
    and cuts it into minibatches, so memory stays at one chunk of the group's layers (the order is a
    shuffle within chunks, not a global one).

    ``stats``: [(mean (H,), scale (H,))] per layer of the training rows, taken in one streamed pass
    first (mean 0 and scale 1 without ``standardize``, mean 0 without ``center``).
    """

    def __init__(self, cache, layers, rows, y_all, mask_all, *, standardize: bool, batch_size: int, seed: int,
                 max_memory_mb: float, center: bool = True) -> None:
        H = int(cache.hidden_size)
        self.cache, self.layers, self.rows = cache, layers, np.asarray(rows)
        self.y_all, self.mask_all, self.n_chips = y_all, mask_all, len(layers)
        self.batch_size, self._rng = batch_size, np.random.default_rng(seed)
        self.chunk_rows = max(batch_size, int(max_memory_mb * 2**20 // (4 * H * len(layers) * 3)))
        self.stats = [(np.zeros(H, np.float32), np.ones(H, np.float32)) for _ in layers]
        if standardize:
            running = [RunningStats(H) for _ in layers]
            for _, feats in cache.iter_batches(layers, self.chunk_rows, rows=self.rows):
                for j in range(len(layers)):
                    running[j].update(torch.from_numpy(np.ascontiguousarray(feats[:, j])), center=center)
            self.stats = [r.result() for r in running]
        self.mean, self.scale = stacked_stats(self.stats)
        self._order = np.argsort(self.rows, kind="stable")  # a cache row's position in the training rows
        self._sorted = self.rows[self._order]

    def epoch(self, epoch: int):
        for row_idx, feats in self.cache.iter_batches(self.layers, self.chunk_rows, rows=self.rows):
            perm = self._rng.permutation(len(row_idx))
            x = (torch.from_numpy(feats).transpose(0, 1) - self.mean) / self.scale  # (G, b, H)
            for start in range(0, len(perm), self.batch_size):
                local = torch.from_numpy(perm[start:start + self.batch_size])
                cache_rows = torch.from_numpy(np.asarray(row_idx))[local]
                positions = self._order[np.searchsorted(self._sorted, cache_rows.numpy())]
                yield (positions, x.index_select(1, local), self.y_all[cache_rows],
                       None if self.mask_all is None else self.mask_all[cache_rows])


# -- memory planning and reading a group of layers --------------------------------------------------

#: The training rows are read in place (a whole layer into the buffer it trains from) when they are
#: at least this fraction of the cache's rows; fewer are gathered (a paper-regime subset).
IN_PLACE_FRACTION = 0.9
_STORED = {np.dtype(np.uint16): torch.bfloat16, np.dtype(np.float32): torch.float32}


def feature_dtype(cache, specs: list[Hyperparams], standardize: bool) -> torch.dtype:
    """dtype of a group's training features in memory: bfloat16 when every setting computes in it,
    or when raw (unstandardized) features of a bfloat16 cache are read (an exact copy); else float32."""
    if (specs and all(s.precision == "bfloat16" for s in specs)) or (
            not standardize and getattr(cache, "storage_dtype", None) == "bfloat16"):
        return torch.bfloat16
    return torch.float32


def _reads_in_place(cache, dtype: torch.dtype, n_train: int) -> bool:
    """Whether a layer is read straight into the training buffer: the cache stores what training
    reads and the training rows are nearly all of it."""
    stored = getattr(cache, "stored_dtype", None)
    return (hasattr(cache, "layer_stored") and stored is not None and _STORED.get(np.dtype(stored)) == dtype
            and n_train >= IN_PLACE_FRACTION * cache.n_rows)


def layers_per_group(cache, specs: list[Hyperparams], standardize: bool, n_train: int, n_val: int, n_layers: int,
                     max_memory_mb: float) -> int:
    """Layers one group holds so that its features fit in ``max_memory_mb``: the rows a layer holds
    in :func:`feature_dtype` (every row of the cache when a layer is read in place), the validation rows
    in float32."""
    dtype = feature_dtype(cache, specs, standardize)
    rows_held = cache.n_rows if _reads_in_place(cache, dtype, n_train) else n_train
    per_layer = (rows_held * dtype.itemsize + n_val * 4) * int(cache.hidden_size)
    return max(1, min(n_layers, int(max_memory_mb * 2**20 // max(per_layer, 1))))


def _read_layer(cache, layer: int):
    """One whole layer as stored (bfloat16 bit patterns stay 16-bit), or float32 from ``layer``."""
    return cache.layer_stored(layer) if hasattr(cache, "layer_stored") else cache.layer(layer)


def _workspace_tensor(workspace: dict | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor carved from ``workspace``'s buffer of that dtype (grown when too small),
    so group after group reuses the same memory (a fresh multi-GB buffer pays a page fault per 4 kB)."""
    numel = math.prod(shape)
    if workspace is None:
        return torch.empty(shape, dtype=dtype)
    if workspace.get(dtype) is None or workspace[dtype].numel() < numel:
        workspace.pop(dtype, None)
        workspace[dtype] = torch.empty(numel, dtype=dtype)
    return workspace[dtype][:numel].view(shape)


def load_standardized(cache, layers: list[int], train_rows: np.ndarray, val_rows: np.ndarray, *,
                      standardize: bool = True, dtype: torch.dtype = torch.float32, center: bool = True,
                      workspace: dict | None = None):
    """Read each layer once, take its statistics on ``train_rows`` and standardize.

    When the cache stores ``dtype`` and the training rows are nearly all of it, each layer is read
    straight into the buffer it trains from and standardized there: ``x`` holds every row, the
    training rows at ``train_pos``, with the statistics of all rows minus the others. Otherwise
    ``x`` holds the training rows only.

    Returns:
        x (G, M, H) in ``dtype``, train_pos, the validation rows (G, len(val_rows), H) in float32,
        [(mean (H,), scale (H,))] per layer.
    """
    G, H, train_rows = len(layers), int(cache.hidden_size), np.asarray(train_rows)
    in_place = _reads_in_place(cache, dtype, len(train_rows))
    x = _workspace_tensor(workspace, (G, cache.n_rows if in_place else len(train_rows), H), dtype)
    train_pos = train_rows if in_place else np.arange(len(train_rows))
    excluded = np.setdiff1d(np.arange(cache.n_rows), train_rows) if in_place else None
    x_val = torch.empty((G, len(val_rows), H), dtype=torch.float32)
    stats = []
    for j, layer in enumerate(layers):
        if in_place:
            view = x[j].view(torch.int16).numpy().view(cache.stored_dtype) if dtype == torch.bfloat16 else x[j].numpy()
            cache.layer_stored(layer, out=view)
            raw = x[j]
            mean, scale = standardization(raw, standardize, center=center, exclude=excluded)
        else:
            raw = _read_layer(cache, layer)
            if as_tensor(raw).dtype == dtype:  # stored as trained: gather once, then work in place
                mean, scale = gather_standardized(raw, x[j], train_rows, standardize, center=center)
            else:
                mean, scale = standardization(raw, standardize, rows=train_rows, center=center)
                standardize_into(raw, mean, scale, x[j], rows=train_rows)
        standardize_into(raw, mean, scale, x_val[j], rows=val_rows)  # from the raw values, before in place
        if in_place and standardize:
            standardize_into(raw, mean, scale, raw)
        stats.append((mean, scale))
    return x, train_pos, x_val, stats


def read_standardized(cache, layers, rows, stats, *, stream: bool = False,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """(G, len(rows), H) float32 features of ``rows`` (into ``out`` when given) standardized with the
    training statistics: a whole layer at a time, or with ``stream`` through ``iter_batches``."""
    rows = np.asarray(rows)
    if out is None:
        out = torch.empty((len(layers), len(rows), int(cache.hidden_size)), dtype=torch.float32)
    if not stream:
        for j, layer in enumerate(layers):
            standardize_into(_read_layer(cache, layer), *stats[j], out[j], rows=rows)
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    mean, scale = stacked_stats(stats)
    for row_idx, feats in cache.iter_batches(layers, 1024, rows=rows):
        pos = torch.from_numpy(order[np.searchsorted(sorted_rows, row_idx)])
        out[:, pos] = (torch.from_numpy(feats).transpose(0, 1) - mean) / scale
    return out


__all__ = ["IN_PLACE_FRACTION", "SAME_SOURCE_KEYS", "SAME_TASK_KEYS", "Batches", "CacheBatches", "InMemoryBatches",
           "RunningStats", "as_class_mask", "cache_class_mask", "cache_n_classes", "cache_source", "carve_rows",
           "check_same_source", "feature_dtype", "gather_standardized", "layers_per_group", "load_standardized",
           "mask_from_n_choices", "open_cache", "open_caches", "opened", "optional_class_mask", "read_parts",
           "read_standardized", "split_validation", "stacked_stats", "standardization", "standardize_into"]
