"""HDF5 shard cache of last-token features: writer (resumable, atomic) and reader.

``manifest.json`` lists the shards (``shard-00000.h5``; ``shard-r01-00000.h5`` from rank 1 of a
data-parallel run); each shard holds ``hidden/<l>`` (rows, hidden_size) per layer, the per-row
``index`` (position in the task's examples), ``labels``, ``example_ids``, ``n_tokens``,
``n_choices`` (the first n_choices classes are valid) and, for decoders, ``lens`` (rows, n_layers,
K): the label words' logits. A shard is built in memory, written into the writer's marked
temporary folder, recorded, then renamed into place; a ``shard-*.h5`` the manifest does not list
is never read or deleted. Rows are read back in canonical order.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from chiptuning.cache.manifest import STORAGE_DTYPES, CacheManifest, CacheMeta, ShardRecord
from chiptuning.errors import CacheError, first_line
from chiptuning.io import check_regular, sha256_file, write_bytes
from chiptuning.outputs import CACHE, DirLock, claim_output, clean_stale, sibling_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The writer's marked temporary folder inside the cache (``.shards.tmp-<host>-<pid>-<random>``).
SCRATCH = "shards"
_CHUNK_ROWS = 256
#: Largest magnitude a stored feature may have: real hidden states stay far below (7B decoders'
#: "massive activations" are ~1e4); a larger or non-finite value is a broken run or a corrupt shard.
MAX_ABS_FEATURE = 2.0 ** 20
#: The same bound on the stored bits, sign cleared: (view dtype, mask, limit); float16: inf and NaN.
_BAD_BITS = {"float32": (np.uint32, 0x7FFFFFFF, 0x49800000), "bfloat16": (np.uint16, 0x7FFF, 0x4980),
             "float16": (np.uint16, 0x7FFF, 0x7C00)}
_CHECK_ROWS = 8192
_COLUMNS = ("index", "labels", "example_ids", "n_tokens", "n_choices")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_dtype(storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise CacheError(f"unknown storage dtype {storage_dtype!r}; choose one of {STORAGE_DTYPES}")


def check_self_contained(f: h5py.File) -> None:
    """Refuse (CacheError naming the object) a shard that would read bytes from outside its own
    file: external storage, virtual datasets, soft, external or user-defined links."""
    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link, where = group.get(name, getlink=True), f"{prefix}{name}"
            if not isinstance(link, h5py.HardLink):
                raise CacheError(f"{f.filename}: {where} is a {type(link).__name__}, which reads from elsewhere; "
                                 "a shard holds its own data only: refusing it")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                visit(obj, f"{where}/")
            elif isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.id.get_create_plist().get_external_count()):
                raise CacheError(f"{f.filename}: dataset {where} reads its data from other files "
                                 f"({'virtual' if obj.is_virtual else 'external storage'}); refusing it")

    visit(f, "")


def first_bad_row(stored: np.ndarray, storage_dtype: str) -> int | None:
    """The first row of ``stored`` (rows first) holding a value that is not finite or of magnitude
    >= :data:`MAX_ABS_FEATURE`, or None. Reads the bit patterns a block of rows at a time."""
    _check_dtype(storage_dtype)
    dtype, mask, limit = _BAD_BITS[storage_dtype]
    bits = np.ascontiguousarray(stored).view(dtype)
    bits = bits.reshape(len(bits), -1) if bits.ndim != 1 else bits.reshape(-1, 1)
    for start in range(0, len(bits), _CHECK_ROWS):
        bad = (np.bitwise_and(bits[start:start + _CHECK_ROWS], dtype(mask)) >= dtype(limit)).any(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def encode(features: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 features -> what is stored (bfloat16 as its 16-bit pattern, rounded to nearest even as
    torch does); CacheError for a value the reader would refuse or beyond the float16 range."""
    _check_dtype(storage_dtype)
    features = np.asarray(features, dtype=np.float32)
    if first_bad_row(features, "float32") is not None:
        finite = features[np.isfinite(features)]
        biggest = float(np.abs(finite).max()) if finite.size else float("nan")
        raise CacheError(f"the model produced features that are not finite or too large to be sane (largest "
                         f"finite |x| = {biggest:.3g}, bound {MAX_ABS_FEATURE:.0f}); extract with --dtype fp32, "
                         "or check the model")
    if storage_dtype == "bfloat16":
        bits = np.ascontiguousarray(features).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    if storage_dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is reported below, as one clear error
            out = features.astype(np.float16)
        if not np.isfinite(out).all():
            raise CacheError(f"features exceed the float16 range (max |x| = {np.abs(features).max():.3g}); "
                             "use --storage-dtype bfloat16 or float32")
        return out
    return features


def decode(stored: np.ndarray, storage_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """What is stored -> float32, into ``out`` (float32, same shape) when given. A bfloat16 pattern
    shifted into the high half of a 32-bit word is the float32 of the same value."""
    if out is None:
        if storage_dtype != "bfloat16":
            return stored.astype(np.float32, copy=False)
        out = np.empty(stored.shape, dtype=np.float32)
    if storage_dtype == "bfloat16":
        np.left_shift(stored, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = stored
    return out


def open_shard(path: Path) -> h5py.File:
    """A shard opened for reading: a regular file (h5py would block on a pipe) whose data all live
    inside it (:func:`check_self_contained`); OSError or CacheError otherwise."""
    check_regular(path)
    f = h5py.File(path, "r")
    try:
        check_self_contained(f)
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def _reading(cache: Path, shard: ShardRecord):
    """Turn what h5py raises on a damaged shard into one CacheError line."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CacheError(f"cannot read shard {cache / shard.file} ({first_line(err)}); the cache is damaged: "
                         f"run `chiptuning cache verify {cache}`") from None


def read_manifest(path: Path, missing_ok: bool = False) -> CacheManifest | None:
    """The validated manifest at ``path`` (CacheError if it is not one); None when it is missing and
    ``missing_ok``."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return None
        raise CacheError(f"no cache at {path.parent} ({path.name} is missing); run `chiptuning extract` first")
    return CacheManifest.read(path)


# -- writer ---------------------------------------------------------------------------------------

class CacheWriter:
    """Writes the ``n_rows`` rows of the cache at ``path``, resuming where an interrupted run stopped;
    one writer at a time. ``meta`` must fingerprint like an existing cache's there; ``extra``:
    manifest fields that do not determine the content (``model_stats``, ``preview``, ...)."""

    def __init__(self, path: str | Path, meta: CacheMeta | dict, n_rows: int, layers: Sequence[int],
                 hidden_size: int, storage_dtype: str = "float32", shard_size: int = 1024,
                 extra: dict | None = None, rank: int = 0, world_size: int = 1) -> None:
        _check_dtype(storage_dtype)
        self.path = Path(path)
        self.meta = meta if isinstance(meta, CacheMeta) else CacheMeta.from_dict(meta, "cache meta")
        self.fingerprint = self.meta.fingerprint()
        self.layers = [int(layer) for layer in layers]
        self.hidden_size, self.storage_dtype, self.shard_size = int(hidden_size), storage_dtype, int(shard_size)
        self.rank, self.world_size = int(rank), int(world_size)
        single = world_size == 1
        self._manifest_name = MANIFEST if single else f"manifest.rank{rank:02d}.json"
        self._prefix = "shard-" if single else f"shard-r{rank:02d}-"
        self._buffer: list[dict] = []
        self._buffered = 0
        self._failed: str | None = None
        self._scratch: Path | None = None
        if single:  # (data-parallel ranks are checked together by extract, before any writes)
            claim_output(self.path, CACHE)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = DirLock(self.path, ".lock" if single else f".lock-r{rank:02d}").acquire()
        try:
            clean_stale(self.path / SCRATCH)  # the temporaries of a writer that was killed
            self.manifest = self._open(n_rows, dict(extra or {}))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the lock and remove the temporary folder (``close`` and ``with`` do this)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        self.lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self, n_rows: int, extra: dict) -> CacheManifest:
        existing = read_manifest(self.path / MANIFEST, missing_ok=True)
        if existing is None and self.world_size > 1:
            existing = read_manifest(self.path / self._manifest_name, missing_ok=True)
        shards, complete, created = [], False, _now()
        if existing is not None:
            if existing.fingerprint != self.fingerprint:
                raise CacheError(f"{self.path} holds a cache made with other settings "
                                 f"({existing.meta.differences(self.meta)}); write to another --out directory "
                                 "or delete this one")
            # A listed shard whose file is missing was cut off before its rename: its rows are redone.
            shards = [s for s in existing.shards if (self.world_size == 1 or s.rank == self.rank)
                      and (self.path / s.file).exists()]
            complete, created = existing.complete, existing.created
        manifest = CacheManifest(
            fingerprint=self.fingerprint, meta=self.meta, layers=self.layers, hidden_size=self.hidden_size,
            storage_dtype=self.storage_dtype, n_rows=int(n_rows), shards=shards, complete=complete, created=created,
            model_stats=dict(extra.pop("model_stats", None) or {}), n_shortened=extra.pop("n_shortened", None),
            preview=list(extra.pop("preview", None) or []), extra=extra,
            part=self.rank if self.world_size > 1 else None)
        if not manifest.complete:
            self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: CacheManifest) -> None:
        manifest.updated = _now()
        manifest.write(self.path / self._manifest_name)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def done_indices(self) -> set[int]:
        """Example positions already stored in complete shards (skipped on resume)."""
        done: set[int] = set()
        for shard in self.manifest.shards:
            with _reading(self.path, shard), open_shard(self.path / shard.file) as f:
                done.update(f["index"][:].tolist())
        return done

    def write(self, index: np.ndarray, features: np.ndarray, labels: np.ndarray, example_ids: Sequence[str],
              n_tokens: np.ndarray, n_choices: np.ndarray, lens: np.ndarray | None = None) -> None:
        """Buffer B rows (``index``: their positions in the task's example list; ``features``:
        (B, n_layers, H) float32; ``lens``: (B, n_layers, K) label-word logits, when the meta records
        a lens); a shard is written whenever ``shard_size`` rows are buffered."""
        if self._failed is not None:  # a shard failed (a full disk): write nothing more, the run stops
            raise CacheError(f"not writing to {self.path} after an earlier shard failed ({self._failed})")
        B = len(index)
        if features.shape != (B, len(self.layers), self.hidden_size):
            raise ValueError(f"features shape {features.shape} != {(B, len(self.layers), self.hidden_size)}")
        batch = {"index": np.asarray(index, dtype=np.int64), "features": encode(features, self.storage_dtype),
                 "labels": np.asarray(labels, dtype=np.int64),
                 "example_ids": np.array([str(e) for e in example_ids], dtype=object),
                 "n_tokens": np.asarray(n_tokens, dtype=np.int32), "n_choices": np.asarray(n_choices, dtype=np.int32)}
        if lens is not None:
            batch["lens"] = np.asarray(lens, dtype=np.float32)
        self._buffer.append(batch)
        self._buffered += B
        while self._buffered >= self.shard_size:
            try:
                self._flush(self.shard_size)
            except BaseException as err:
                self._failed = first_line(err)
                raise

    def _take(self, n: int) -> dict:
        """Pop the first n buffered rows as one batch."""
        joined = {key: np.concatenate([part[key] for part in self._buffer]) if len(self._buffer) > 1
                  else self._buffer[0][key] for key in self._buffer[0]}
        self._buffered -= n
        # a copy: a view would keep the whole joined array alive until the next flush
        self._buffer = [{key: value[n:].copy() for key, value in joined.items()}] if self._buffered else []
        return {key: value[:n] for key, value in joined.items()}

    def _shard_image(self, batch: dict, name: Path) -> bytes:
        """One shard as the bytes of an HDF5 file, built in memory."""
        rows = len(batch["index"])
        with h5py.File(str(name), "w", driver="core", backing_store=False) as f:
            f.attrs["storage_dtype"] = self.storage_dtype
            f.attrs["fingerprint"] = self.fingerprint
            group = f.create_group("hidden")
            chunk = (min(rows, _CHUNK_ROWS), self.hidden_size)
            for j, layer in enumerate(self.layers):
                group.create_dataset(str(layer), data=np.ascontiguousarray(batch["features"][:, j]), chunks=chunk)
            for key in ("index", "labels", "example_ids", "n_tokens", "n_choices", "lens"):
                if key in batch:
                    text = h5py.string_dtype("utf-8") if key == "example_ids" else None
                    f.create_dataset(key, data=batch[key], dtype=text)
            f.flush()
            return f.id.get_file_image()

    def _flush(self, n: int) -> None:
        batch = self._take(n)
        listed = {s.file for s in self.manifest.shards}
        number = len(self.manifest.shards)
        while (name := f"{self._prefix}{number:05d}.h5") in listed or os.path.lexists(self.path / name):
            number += 1  # never overwrite any file
        if self._scratch is None:
            self._scratch = sibling_dir(self.path / SCRATCH)
        tmp = self._scratch / name
        image = self._shard_image(batch, tmp)
        write_bytes(tmp, image)  # plain file I/O: a full disk fails one write, never HDF5's own flush
        checksum = hashlib.sha256(image).hexdigest()
        del image
        # recorded, then renamed: cut off in between, the next run finds it missing and redoes its rows
        self.manifest.shards.append(ShardRecord(file=name, rows=n, sha256=checksum, rank=self.rank))
        self._write_manifest(self.manifest)
        os.link(tmp, self.path / name)  # fails rather than replace a file that appeared meanwhile
        tmp.unlink()
        log.debug("wrote %s (%d rows)", name, n)

    def close(self, expected_rows: int | None = None) -> CacheManifest:
        """Write the last partial shard, mark the cache complete and release it; CacheError unless it
        holds ``expected_rows`` (this rank's rows; default the manifest's ``n_rows``)."""
        if self._buffered:
            self._flush(self._buffered)
        stored = self.manifest.stored_rows
        expected = self.manifest.n_rows if expected_rows is None else expected_rows
        if stored != expected:
            raise CacheError(f"cache {self.path} holds {stored} rows, expected {expected}")
        self.manifest.complete = True
        self._write_manifest(self.manifest)
        self.release()
        return self.manifest


def merge_rank_manifests(path: str | Path, world_size: int) -> CacheManifest:
    """Join the per-rank manifests of a data-parallel extraction into the one ``manifest.json``."""
    path = Path(path)
    parts = [read_manifest(path / f"manifest.rank{r:02d}.json") for r in range(world_size)]
    if not all(p.complete for p in parts):
        raise CacheError(f"not every rank finished writing {path}; re-run the same command to resume")
    if len({p.fingerprint for p in parts}) != 1:
        raise CacheError(f"ranks wrote {path} with different settings")
    merged = parts[0]
    merged.shards = [s for p in parts for s in p.shards]
    merged.world_size, merged.part = world_size, None
    if merged.stored_rows != merged.n_rows:
        raise CacheError(f"cache {path} holds {merged.stored_rows} rows across ranks, expected {merged.n_rows}")
    merged.complete, merged.updated = True, _now()
    merged.write(path / MANIFEST)
    for r in range(world_size):
        (path / f"manifest.rank{r:02d}.json").unlink()
    return merged


# -- reader ---------------------------------------------------------------------------------------

class CacheReader:
    """Read-only view of the complete cache at ``path``, rows in canonical (dataset) order
    (CacheError for a missing, incomplete or damaged cache)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path / MANIFEST)
        if not manifest.complete:
            raise CacheError(f"cache {self.path} is incomplete ({manifest.stored_rows} of {manifest.n_rows} rows); "
                             "re-run the same extract command to resume")
        self.manifest: CacheManifest = manifest
        self.fingerprint: str = manifest.fingerprint
        self.meta: CacheMeta = manifest.meta
        self.layers: list[int] = list(manifest.layers)
        self.hidden_size: int = manifest.hidden_size
        self.storage_dtype: str = manifest.storage_dtype
        #: numpy dtype of the stored arrays (uint16 holds bfloat16 bit patterns)
        self.stored_dtype = np.dtype({"bfloat16": np.uint16, "float16": np.float16}.get(self.storage_dtype, np.float32))
        self.model_stats: dict = manifest.model_stats
        self.shards: list[ShardRecord] = manifest.shards
        self._files: dict[str, h5py.File] = {}
        self._verified = False
        cols = {key: self._read_all(key) for key in _COLUMNS}
        self._check_columns(cols["index"], cols["labels"], cols["n_choices"])
        self._order = np.argsort(cols["index"], kind="stable")  # canonical row k is shard-order row _order[k]
        self.index = cols["index"][self._order]
        self.labels = cols["labels"][self._order].astype(np.int64)
        self.example_ids = np.array([i.decode() if isinstance(i, bytes) else str(i)
                                     for i in cols["example_ids"][self._order]], dtype=object)
        self.n_tokens = cols["n_tokens"][self._order]
        self.n_choices = cols["n_choices"][self._order]
        self.n_rows = len(self.labels)
        self.num_blocks = max(self.layers) if self.layers else 0
        self.label_names = list(self.meta.label_names)
        self.has_lens = self.meta.lens is not None  # the label words' logits per layer (decoders)
        self._starts = np.cumsum([0] + [s.rows for s in self.shards])  # shard boundaries, in shard order
        # Shards written in dataset order (the usual single-process case) need no reordering.
        self._in_order = bool(np.array_equal(self._order, np.arange(len(self._order))))

    def _check_columns(self, index: np.ndarray, labels: np.ndarray, n_choices: np.ndarray) -> None:
        """Refuse an index that is not a permutation of the examples, labels outside the label names
        or a number of valid classes outside 1..C."""
        n, C = self.manifest.n_rows, len(self.meta.label_names)
        problem = None
        if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
            problem = f"its row index is not a permutation of the {n} examples"
        elif C and ((labels < 0) | (labels >= C)).any():
            problem = f"it holds labels outside 0..{C - 1}"
        elif C and ((n_choices < 1) | (n_choices > C)).any():
            problem = f"it holds numbers of valid classes outside 1..{C}"
        if problem is not None:
            raise CacheError(f"cache {self.path}: {problem}; the cache is damaged: run "
                             f"`chiptuning cache verify {self.path}`")

    def _file(self, shard: ShardRecord) -> h5py.File:
        if shard.file not in self._files:
            with _reading(self.path, shard):
                self._files[shard.file] = open_shard(self.path / shard.file)
        return self._files[shard.file]

    def lens(self) -> np.ndarray:
        """Label-word logits of every layer, (N, n_layers, K) float32 in canonical order, the K tokens
        ``meta.lens["token_ids"]`` flattened (:mod:`chiptuning.zeroshot`); CacheError if none."""
        if not self.has_lens:
            raise CacheError(f"cache {self.path} stores no label-word logits (extract a decoder with --lens)")
        return self._read_all("lens")[self._order].astype(np.float32, copy=False)

    def _read_all(self, key: str) -> np.ndarray:
        """A per-row dataset of every shard, in shard order (each shard's row count checked)."""
        parts = []
        for shard in self.shards:
            with _reading(self.path, shard):
                parts.append(self._file(shard)[key][:])
            if len(parts[-1]) != shard.rows:
                raise CacheError(f"shard {shard.file} holds {len(parts[-1])} rows of {key}, manifest says {shard.rows}")
        return np.concatenate(parts)

    def verify_checksums(self) -> None:
        """Compare every shard with its sha256 in the manifest, once per reader; CacheError naming the
        first shard that is missing or changed."""
        if self._verified:
            return
        for shard in self.shards:
            with _reading(self.path, shard):
                digest = sha256_file(self.path / shard.file)
            if digest != shard.sha256:
                raise CacheError(f"shard {self.path / shard.file} does not match its checksum in the manifest (the "
                                 "file changed or is corrupt); refusing to read it: run "
                                 f"`chiptuning cache verify {self.path}`")
        self._verified = True

    def _check_values(self, stored: np.ndarray, layer: int, start: int = 0) -> None:
        """Refuse features no model run writes (:func:`first_bad_row`); ``start``: the shard-order
        row of ``stored[0]``."""
        bad = first_bad_row(stored, self.storage_dtype)
        if bad is not None:
            row = start + bad
            s = int(np.searchsorted(self._starts, row, side="right")) - 1
            raise CacheError(f"shard {self.path / self.shards[s].file}: hidden/{layer} row {row - int(self._starts[s])} "
                             f"holds a value that is not finite or of magnitude >= {MAX_ABS_FEATURE:.0f}; the shard "
                             f"is corrupt: run `chiptuning cache verify {self.path}`")

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise CacheError(f"layer {layer} is not in cache {self.path} (layers {self.layers[0]}..{self.layers[-1]})")

    def layer_stored(self, layer: int, rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """One layer as stored (:attr:`stored_dtype`), (N, H) in canonical order, or only ``rows``.
        Each shard is read straight into one array (``out``, when given: a C-contiguous (N, H) array
        of :attr:`stored_dtype`, with ``rows`` None); rows are reordered only when needed."""
        self._check_layer(layer)
        shape = (int(self._starts[-1]), self.hidden_size)
        if out is not None and (rows is not None or out.shape != shape or out.dtype != self.stored_dtype
                                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous {shape} {self.stored_dtype} array and rows None")
        stored = np.empty(shape, dtype=self.stored_dtype) if out is None else out
        for s, shard in enumerate(self.shards):
            start, stop = int(self._starts[s]), int(self._starts[s + 1])
            if stop > start:
                with _reading(self.path, shard):
                    self._file(shard)["hidden"][str(layer)].read_direct(stored, dest_sel=np.s_[start:stop])
        self._check_values(stored, layer)
        if rows is not None:
            return stored[np.asarray(rows) if self._in_order else self._order[rows]]
        if not self._in_order:
            stored[:] = stored[self._order]
        return stored

    def layer(self, layer: int, rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Features of one layer, (N, H) float32 in canonical order, or only the canonical ``rows``;
        decoded into ``out`` (float32, the result's shape) when given."""
        return decode(self.layer_stored(layer, rows), self.storage_dtype, out=out)

    def iter_batches(self, layers: Sequence[int], batch_size: int, rows: np.ndarray | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream several layers shard by shard, only the canonical ``rows`` when given (memory:
        ``batch_size * len(layers) * H`` floats). Yields (canonical row positions (b,), features
        (b, len(layers), H) float32)."""
        for layer in layers:
            self._check_layer(layer)
        canonical = np.argsort(self._order)  # canonical position of each shard-order row
        wanted = np.zeros(self.n_rows, dtype=bool)
        wanted[slice(None) if rows is None else np.asarray(rows)] = True
        for s, shard in enumerate(self.shards):
            start, stop = int(self._starts[s]), int(self._starts[s + 1])
            offsets = np.flatnonzero(wanted[canonical[start:stop]])
            group = self._file(shard)["hidden"]
            for b in range(0, len(offsets), batch_size):
                chunk = offsets[b:b + batch_size]
                lo, hi = int(chunk[0]), int(chunk[-1]) + 1
                # one contiguous slice read per layer, then pick rows (h5py fancy indexing is slow)
                parts = []
                for layer in layers:
                    with _reading(self.path, shard):
                        raw = group[str(layer)][lo:hi]
                    self._check_values(raw, layer, start + lo)
                    parts.append(decode(raw, self.storage_dtype)[chunk - lo])
                yield canonical[start + chunk], np.stack(parts, axis=1)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, rows={self.n_rows}, layers={len(self.layers)}, hidden={self.hidden_size})"
