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
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from chiptuning.cache import CacheReader
from chiptuning.errors import CacheError, ProvenanceError

if TYPE_CHECKING:
    from chiptuning.probe.bank import ChipSpec

log = logging.getLogger(__name__)

#: Metadata fields that must agree between a train and an eval cache (when both record them).
SAME_SOURCE_KEYS = ("model", "model_hash", "model_type", "adapter", "tokenizer", "label_names",
                    "pooling", "feature_mode", "hidden_size", "num_blocks", "max_length")
SAME_TASK_KEYS = ("template", "text_column", "label_names")


# -- rows and classes -------------------------------------------------------------------------------

def split_validation(n_rows: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint split of ``n_rows`` rows into (train_rows, val_rows), both sorted.

    The validation rows are the first ``size`` of ``np.random.default_rng(seed).permutation``.
    """
    perm = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(perm[size:]), np.sort(perm[:size])


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
    """:func:`mask_from_n_choices`, or None when every row has every class (nothing to mask)."""
    n_choices = np.asarray(n_choices, dtype=np.int64)
    if n_choices.size == 0 or (n_choices >= n_classes).all():
        return None
    return mask_from_n_choices(n_choices, n_classes)


# -- standardization --------------------------------------------------------------------------------

_STATS_CHUNK = 256  # rows: a float32 chunk stays in cache across the passes over it (2048: ~1.5x slower)


def as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype == np.uint16:  # bfloat16 bit patterns (the cache's storage)
        return torch.from_numpy(np.ascontiguousarray(x)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float16 else np.float32))


def _chunks(t: torch.Tensor, rows: np.ndarray | None, buf: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 chunk of ``t[rows]``) by row chunks, gathered and decoded into reused
    buffers (fresh allocations cost page faults on every chunk)."""
    idx = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))
    n = t.shape[0] if idx is None else len(idx)
    gathered = None if idx is None else torch.empty((buf.shape[0], t.shape[1]), dtype=t.dtype)
    for start in range(0, n, _STATS_CHUNK):
        if idx is None:
            src = t[start:start + _STATS_CHUNK]
        else:
            part = idx[start:start + _STATS_CHUNK]
            src = torch.index_select(t, 0, part, out=gathered[:len(part)])
        chunk = buf[:src.shape[0]]
        chunk.copy_(src)
        yield start, chunk


class RunningStats:
    """Per-feature mean and variance merged chunk by chunk (Chan et al.), in float64.

    Each chunk is centered on its own mean before squaring (no cancellation when a feature's
    mean dwarfs its spread). The result depends only on the values and the chunking, not on
    their storage dtype: a bfloat16 array and its float32 decoding give identical statistics.
    """

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.mean = torch.zeros(n_features, dtype=torch.float64)
        self.m2 = torch.zeros(n_features, dtype=torch.float64)

    def update(self, chunk: torch.Tensor, center: bool = True) -> None:
        """Merge a (b, H) chunk; a float32 chunk is overwritten (used as scratch)."""
        b = chunk.shape[0]
        if b == 0:
            return
        f = chunk if chunk.dtype == torch.float32 else chunk.float()
        if center:
            mean = f.mean(dim=0)
            f.sub_(mean)
        else:
            mean = torch.zeros(f.shape[1])
        m2 = f.mul_(f).sum(dim=0).double()
        mean = mean.double()
        total = self.n + b
        delta = mean - self.mean
        self.mean += delta * (b / total)
        self.m2 += m2 + delta.square() * (self.n * b / total)
        self.n = total

    def remove(self, other: RunningStats) -> None:
        """Take out the rows merged into ``other`` (a subset of the rows merged here): the
        statistics of the remaining rows, without reading them again."""
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


def standardization(x, standardize: bool = True, center: bool = True,
                    rows: np.ndarray | None = None, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of one layer's training features.

    Args:
        x: (N, H) features: float32 / float16 numpy, uint16 bfloat16 patterns, or a tensor.
        standardize: False gives mean 0 and scale 1 (the chip sees raw features).
        center: False keeps mean 0 (scale only), so a folded linear chip stays bias-free.
        rows: only these rows of ``x`` (default all).
        exclude: every row of ``x`` but these (instead of ``rows``): computed as all rows minus
            the excluded ones (:meth:`RunningStats.remove`), so the kept rows are never gathered.

    Returns:
        mean (H,), scale (H,) float32; a constant feature gets scale 1.
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
    if not center:
        mean = np.zeros(H, np.float32)
    return mean, scale


def _running_stats(t: torch.Tensor, rows: np.ndarray | None, center: bool) -> RunningStats:
    stats = RunningStats(t.shape[1])
    n = t.shape[0] if rows is None else len(rows)
    buf = torch.empty((max(1, min(_STATS_CHUNK, n)), t.shape[1]), dtype=torch.float32)
    for _, chunk in _chunks(t, rows, buf):
        stats.update(chunk, center=center)
    return stats


def standardize_into(x, mean: np.ndarray, scale: np.ndarray, out: torch.Tensor,
                     rows: np.ndarray | None = None) -> torch.Tensor:
    """``out[i] = (x[rows[i]] - mean) / scale`` in float32, rounded to ``out``'s dtype, by chunks.

    Args:
        x: (N, H) features (see :func:`standardization`).
        mean, scale: (H,) float32.
        out: (len(rows), H) tensor (float32 or bfloat16).
        rows: rows of ``x`` (default all).
    """
    t = as_tensor(x)
    m, s = torch.from_numpy(np.asarray(mean, np.float32)), torch.from_numpy(np.asarray(scale, np.float32))
    buf = torch.empty((min(_STATS_CHUNK, max(out.shape[0], 1)), t.shape[1]), dtype=torch.float32)
    for start, chunk in _chunks(t, rows, buf):
        out[start:start + len(chunk)].copy_(chunk.sub_(m).div_(s))
    return out


def gather_standardized(x, out: torch.Tensor, rows: np.ndarray | None = None, standardize: bool = True,
                        center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Gather ``x[rows]`` into ``out`` (x's own dtype), then compute the statistics on ``out`` and
    standardize it in place: one gather of the stored values instead of one per pass.

    Gives what :func:`standardization` + :func:`standardize_into` give (the same values in the
    same chunks), for ``x`` already in ``out``'s dtype (e.g. a bfloat16 cache trained in bfloat16).

    Returns:
        mean (H,), scale (H,) float32.
    """
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


class Batches(Protocol):
    """Training rows of a group of layers, served as standardized minibatches."""

    n_chips: int

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yields (rows (B,) positions in the training rows, x (G, B, H), y (B,), class_mask (B, C) | None)."""
        ...


class InMemoryBatches:
    """Minibatches of features held in memory, in a seeded order.

    Epoch e visits the rows in ``np.random.default_rng(seed)``'s e-th permutation (one generator
    drawn from epoch after epoch), so the order does not depend on the layers in the group.

    Args:
        x: (G, M, H) standardized features, contiguous (a gather from a strided view is ~100x
            slower); the training rows are ``x[:, rows]``.
        y: (N,) class indices of the training rows.
        class_mask: (N, C) bool or None.
        batch_size: rows per step.
        seed: order seed.
        shuffle: False visits the rows in order.
        rows: (N,) positions of the training rows in ``x`` (default all M).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None,
                 batch_size: int, seed: int, shuffle: bool = True, rows: np.ndarray | None = None) -> None:
        self.x, self.y, self.class_mask = x, y, class_mask
        self.rows = np.arange(x.shape[1]) if rows is None else np.asarray(rows)
        if len(self.rows) != len(y):
            raise ValueError(f"{len(self.rows)} training rows but {len(y)} labels")
        self.n_chips = x.shape[0]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._orders: list[np.ndarray] = []

    def order(self, epoch: int) -> np.ndarray:
        """Order of an epoch, as positions in the training rows (drawn in sequence, so epoch e
        always gets the same order)."""
        n = len(self.rows)
        while len(self._orders) <= epoch:
            self._orders.append(self._rng.permutation(n) if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def epoch(self, epoch: int):
        """Minibatches of an epoch. The yielded features live in a buffer reused by the next
        minibatch of the same size (a fresh (G, B, H) allocation per step costs page faults)."""
        order = self.order(epoch)
        G, H = self.x.shape[0], self.x.shape[2]
        buffers: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), self.batch_size):
            pos = order[start:start + self.batch_size]
            idx = torch.from_numpy(pos)
            mask = None if self.class_mask is None else self.class_mask[idx]
            src = torch.from_numpy(self.rows[pos])
            if len(pos) not in buffers:
                buffers[len(pos)] = torch.empty((G, len(pos), H), dtype=self.x.dtype, device=self.x.device)
            xb = buffers[len(pos)]
            for g in range(G):  # row gathers of one layer: contiguous source rows
                torch.index_select(self.x[g], 0, src, out=xb[g])
            yield pos, xb, self.y[idx], mask



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
