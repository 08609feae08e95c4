"""HDF5 shard cache of last-token features: writer (resumable, atomic) and reader.

Layout of one cache directory (one per model, task and split)::

    manifest.json          # what determines the content + its fingerprint, shard list, complete flag
    shard-00000.h5         # rows in extraction order; single process
    shard-r01-00000.h5     # ... or one series per rank when extraction is data-parallel
    (each shard)
      hidden/<l>           # (rows, hidden_size) for every layer l, chunked by rows
      index                # (rows,) int64 position of the row in the task's example list
      labels               # (rows,) int64
      example_ids          # (rows,) utf-8 strings
      n_tokens             # (rows,) int32 prompt length in tokens
      n_choices            # (rows,) int32 number of valid classes (the first n_choices are valid)
      lens                 # (rows, n_layers, K) float32, decoders only: the LM head's logits of the
                           # K label-word tokens (meta.lens) applied to each layer's feature

Rows are read back in canonical order (sorted by ``index``), whatever order extraction wrote them
in. A shard is built in memory and written with plain file I/O (a full disk is one ``OSError``,
never a half-closed HDF5 file) into the writer's own marked temporary folder in the cache; the
manifest then records it (atomically) and it is renamed into place, so a killed run loses at most
the shard in progress, a re-run skips every row already stored, and no file the writer did not
make is ever removed (a ``shard-*.h5`` the manifest does not list is never read, never deleted).
One writer at a time: a lock file in the cache holds the writer's pid
(:class:`chiptuning.outputs.DirLock`).

What is read is checked: the manifest through its record (:class:`CacheManifest`: types, ranges,
and the meta's fingerprint recomputed, so an edited meta is refused); every shard opened must keep
its data inside its own file (:func:`check_self_contained`: no external storage, virtual datasets,
soft or external links); :meth:`CacheReader.verify_checksums` compares every shard with its sha256
in the manifest (the trainers call it before training), and every feature read must be finite and
below :data:`MAX_ABS_FEATURE` in magnitude (:func:`first_bad_row`), the same bound the writer
enforces. Only numpy and h5py are used here.
"""

from __future__ import annotations

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
from chiptuning.errors import CacheError
from chiptuning.io import sha256_file, write_bytes
from chiptuning.outputs import CACHE, DirLock, check_output, clean_stale, sibling_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The writer's temporary folder inside the cache (``.shards.tmp-<host>-<pid>-<random>``, marked).
SCRATCH = "shards"
_CHUNK_ROWS = 256
#: Largest magnitude a stored feature may have (2**20). Hidden states of real models stay far
#: below (the "massive activations" of 7B decoders are ~1e3-1e4); a larger or non-finite value
#: is a broken model run (refused at extraction) or a corrupt shard (refused at read).
MAX_ABS_FEATURE = 2.0 ** 20
#: The same bound on the stored bit patterns, sign bit cleared: |x| >= 2**20, inf and NaN all
#: have a pattern at or above it (float16 cannot hold 2**20: only inf / NaN are refused).
_BAD_BITS = {"float32": (np.uint32, 0x7FFFFFFF, 0x49800000), "bfloat16": (np.uint16, 0x7FFF, 0x4980),
             "float16": (np.uint16, 0x7FFF, 0x7C00)}
_CHECK_ROWS = 8192


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- storage dtypes -------------------------------------------------------------------------------

def check_self_contained(f: h5py.File) -> None:
    """Refuse a shard that would read bytes from outside its own file: external storage, virtual
    datasets, soft, external or user-defined links (h5py would follow them silently).

    Raises:
        CacheError: naming the object.
    """
    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{prefix}{name}"
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
    """The first row of ``stored`` (what is stored, rows first) holding a value that is not
    finite or has a magnitude of at least :data:`MAX_ABS_FEATURE`; None when every value is sane.

    Works on the bit patterns, a block of rows at a time (no float copy)."""
    if storage_dtype not in _BAD_BITS:
        raise CacheError(f"unknown storage dtype {storage_dtype!r}; choose one of {STORAGE_DTYPES}")
    dtype, mask, limit = _BAD_BITS[storage_dtype]
    bits = np.ascontiguousarray(stored).view(dtype)
    bits = bits.reshape(len(bits), -1) if bits.ndim != 1 else bits.reshape(-1, 1)
    for start in range(0, len(bits), _CHECK_ROWS):
        block = np.bitwise_and(bits[start:start + _CHECK_ROWS], dtype(mask))
        bad = (block >= dtype(limit)).any(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def encode(features: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 features -> what is stored. bfloat16 is stored exactly as its 16-bit pattern.

    Raises:
        CacheError: a value that is not finite or of magnitude >= :data:`MAX_ABS_FEATURE` (the
            reader would refuse it), or beyond the float16 range.
    """
    features = np.asarray(features, dtype=np.float32)
    if first_bad_row(features, "float32") is not None:
        finite = features[np.isfinite(features)]
        biggest = float(np.abs(finite).max()) if finite.size else float("nan")
        raise CacheError(
            f"the model produced features that are not finite or too large to be sane (largest finite |x| = "
            f"{biggest:.3g}, bound {MAX_ABS_FEATURE:.0f}); extract with --dtype fp32, or check the model"
        )
    if storage_dtype == "float32":
        return features
    if storage_dtype == "bfloat16":
        bits = np.ascontiguousarray(features, dtype=np.float32).view(np.uint32)
        # Round to nearest even, as torch does; exact for values that already are bfloat16.
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    if storage_dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is reported below, as one clear error
            out = features.astype(np.float16)
        if not np.isfinite(out).all():
            raise CacheError(
                f"features exceed the float16 range (max |x| = {np.abs(features).max():.3g}); "
                "use --storage-dtype bfloat16 or float32"
            )
        return out
    raise CacheError(f"unknown storage dtype {storage_dtype!r}; choose one of {STORAGE_DTYPES}")


def decode(stored: np.ndarray, storage_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """What is stored -> float32, written into ``out`` (float32, same shape) when given.

    bfloat16 is decoded in one pass: its 16-bit pattern shifted into the high half of a 32-bit
    word is the float32 of the same value.
    """
    if out is None:
        if storage_dtype != "bfloat16":
            return stored.astype(np.float32, copy=False)
        out = np.empty(stored.shape, dtype=np.float32)
    if storage_dtype == "bfloat16":
        np.left_shift(stored, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = stored
    return out


# -- writer ---------------------------------------------------------------------------------------

class CacheWriter:
    """Writes shards of one cache, resuming where an interrupted run stopped.

    Args:
        path: the cache directory.
        meta: every setting that determines the content (model + weights hash, tokenizer, task,
            template, split, limit, seed, pooling, storage dtype, layers, hidden size, ...), as a
            :class:`CacheMeta` or its dict. Its fingerprint must match an existing cache's, or the
            writer refuses.
        n_rows: the number of rows the finished cache will hold.
        layers: the layer indices stored (``hidden/<l>``).
        hidden_size: feature width.
        storage_dtype: "float32", "bfloat16" (exact 16-bit pattern) or "float16" (checked finite).
        shard_size: rows per shard.
        extra: manifest fields that do not determine the content: ``model_stats``,
            ``n_shortened``, ``preview`` (see :class:`CacheManifest`), or others kept as given.
        rank: this process's rank in data-parallel extraction (shards ``shard-rNN-*.h5``).
        world_size: number of ranks writing into this cache.
    """

    def __init__(
        self,
        path: str | Path,
        meta: CacheMeta | dict,
        n_rows: int,
        layers: Sequence[int],
        hidden_size: int,
        storage_dtype: str = "float32",
        shard_size: int = 1024,
        extra: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise CacheError(f"unknown storage dtype {storage_dtype!r}; choose one of {STORAGE_DTYPES}")
        self.path = Path(path)
        self.meta = meta if isinstance(meta, CacheMeta) else CacheMeta.from_dict(meta, "cache meta")
        self.fingerprint = self.meta.fingerprint()
        self.layers = [int(layer) for layer in layers]
        self.hidden_size = int(hidden_size)
        self.storage_dtype = storage_dtype
        self.shard_size = int(shard_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self._manifest_name = MANIFEST if world_size == 1 else f"manifest.rank{rank:02d}.json"
        self._buffer: list[dict] = []
        self._buffered = 0
        self._failed: str | None = None
        if world_size == 1:  # (data-parallel ranks are checked together by extract, before any writes)
            check_output(self.path, CACHE)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = DirLock(self.path, ".lock" if world_size == 1 else f".lock-r{rank:02d}").acquire()
        self._scratch: Path | None = None
        try:
            clean_stale(self.path / SCRATCH)  # the temporaries of a writer that was killed
            self.manifest = self._open(n_rows, extra or {})
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the cache's lock and remove the writer's temporary folder (``close`` does; so
        does leaving a ``with writer:`` block)."""
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
        if existing is not None and existing.fingerprint != self.fingerprint:
            raise CacheError(
                f"{self.path} holds a cache made with other settings ({existing.meta.differences(self.meta)}); "
                "write to another --out directory or delete this one"
            )
        # A shard the manifest lists but whose file is missing was cut off before its rename: its
        # rows are redone. A shard-*.h5 the manifest does not list is not the writer's: never read,
        # never removed.
        if existing is not None and self.world_size == 1:
            shards = [s for s in existing.shards if (self.path / s.file).exists()]
        elif existing is not None:
            shards = [s for s in existing.shards if s.rank == self.rank and (self.path / s.file).exists()]
        else:
            shards = []
        extra = dict(extra)
        manifest = CacheManifest(
            fingerprint=self.fingerprint, meta=self.meta, layers=self.layers, hidden_size=self.hidden_size,
            storage_dtype=self.storage_dtype, n_rows=int(n_rows), shards=shards,
            complete=bool(existing is not None and existing.complete),
            created=existing.created if existing is not None else _now(),
            model_stats=dict(extra.pop("model_stats", None) or {}), n_shortened=extra.pop("n_shortened", None),
            preview=list(extra.pop("preview", None) or []), extra=extra,
            part=self.rank if self.world_size > 1 else None,
        )
        if manifest.complete:
            return manifest
        self._write_manifest(manifest)
        return manifest

    def _shard_prefix(self) -> str:
        return "shard-" if self.world_size == 1 else f"shard-r{self.rank:02d}-"

    def _write_manifest(self, manifest: CacheManifest) -> None:
        manifest.updated = _now()
        manifest.write(self.path / self._manifest_name)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def done_indices(self) -> set[int]:
        """Example positions already stored in complete shards (skip them on resume)."""
        done: set[int] = set()
        for shard in self.manifest.shards:
            try:
                with h5py.File(self.path / shard.file, "r") as f:
                    check_self_contained(f)
                    done.update(int(i) for i in f["index"][:])
            except (OSError, KeyError, ValueError) as err:
                raise CacheError(f"cannot read shard {self.path / shard.file} of the cache being resumed ({err}); "
                                 f"run `chiptuning cache verify {self.path}`, or delete the cache and extract again"
                                 ) from None
        return done

    def write(
        self,
        index: np.ndarray,
        features: np.ndarray,
        labels: np.ndarray,
        example_ids: Sequence[str],
        n_tokens: np.ndarray,
        n_choices: np.ndarray,
        lens: np.ndarray | None = None,
    ) -> None:
        """Buffer a batch of rows; a shard is written whenever ``shard_size`` rows are buffered.

        Args:
            index: (B,) position of each row in the task's example list.
            features: (B, n_layers, H) float32, layers in ``self.layers`` order.
            labels, n_tokens, n_choices: (B,) integers. example_ids: B strings.
            lens: (B, n_layers, K) float32 label-word logits per layer, when the meta records a lens.
        """
        if self._failed is not None:  # a shard failed (a full disk): write nothing more, the run stops
            raise CacheError(f"not writing to {self.path} after an earlier shard failed ({self._failed})")
        B = len(index)
        if features.shape != (B, len(self.layers), self.hidden_size):
            raise ValueError(f"features shape {features.shape} != {(B, len(self.layers), self.hidden_size)}")
        self._buffer.append({
            "index": np.asarray(index, dtype=np.int64),
            "features": encode(np.asarray(features, dtype=np.float32), self.storage_dtype),
            "labels": np.asarray(labels, dtype=np.int64),
            "example_ids": [str(e) for e in example_ids],
            "n_tokens": np.asarray(n_tokens, dtype=np.int32),
            "n_choices": np.asarray(n_choices, dtype=np.int32),
            **({} if lens is None else {"lens": np.asarray(lens, dtype=np.float32)}),
        })
        self._buffered += B
        while self._buffered >= self.shard_size:
            try:
                self._flush(self.shard_size)
            except BaseException as err:
                self._failed = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise

    def _take(self, n: int) -> dict:
        """Pop the first n buffered rows as one batch."""
        cols = {k: [] for k in self._buffer[0]}
        taken = 0
        while taken < n:
            part = self._buffer[0]
            rows = len(part["index"])
            k = min(rows, n - taken)
            for key in cols:
                cols[key].append(part[key][:k])
            if k == rows:
                self._buffer.pop(0)
            else:
                self._buffer[0] = {key: value[k:] for key, value in part.items()}
            taken += k
        self._buffered -= n
        return {
            key: (sum(parts, []) if key == "example_ids" else np.concatenate(parts))
            for key, parts in cols.items()
        }

    def _flush(self, n: int) -> None:
        batch = self._take(n)
        number = len(self.manifest.shards)
        listed = {s.file for s in self.manifest.shards}
        name = f"{self._shard_prefix()}{number:05d}.h5"
        while name in listed or os.path.lexists(self.path / name):  # never overwrite any file
            number += 1
            name = f"{self._shard_prefix()}{number:05d}.h5"
        final = self.path / name
        if self._scratch is None:
            self._scratch = sibling_dir(self.path / SCRATCH)
        tmp = self._scratch / name
        rows = len(batch["index"])
        # Built in memory, then written with plain file I/O: a full disk fails one write() call
        # (and the .tmp is removed), never HDF5's own flush of a half-written file.
        with h5py.File(str(tmp), "w", driver="core", backing_store=False) as f:
            f.attrs["storage_dtype"] = self.storage_dtype
            f.attrs["fingerprint"] = self.fingerprint
            group = f.create_group("hidden")
            feats = batch["features"]  # (rows, n_layers, H)
            chunk = (min(rows, _CHUNK_ROWS), self.hidden_size)
            for j, layer in enumerate(self.layers):
                group.create_dataset(str(layer), data=np.ascontiguousarray(feats[:, j]), chunks=chunk)
            f.create_dataset("index", data=batch["index"])
            f.create_dataset("labels", data=batch["labels"])
            f.create_dataset("example_ids", data=np.array(batch["example_ids"], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("n_tokens", data=batch["n_tokens"])
            f.create_dataset("n_choices", data=batch["n_choices"])
            if "lens" in batch:
                f.create_dataset("lens", data=batch["lens"])
            f.flush()
            image = f.id.get_file_image()
        write_bytes(tmp, image)
        checksum = hashlib.sha256(image).hexdigest()
        del image
        # Recorded first, then renamed: cut off in between, the next run finds the shard listed but
        # missing and redoes its rows (and the writer's marked temporary folder is removed).
        self.manifest.shards.append(ShardRecord(file=name, rows=rows, sha256=checksum, rank=self.rank))
        self._write_manifest(self.manifest)
        os.link(tmp, final)  # fails rather than replace a file that appeared meanwhile
        tmp.unlink()
        log.debug("wrote %s (%d rows)", name, rows)

    def close(self, expected_rows: int | None = None) -> CacheManifest:
        """Write the last partial shard and mark the cache complete if every row is stored.

        Args:
            expected_rows: rows this writer (rank) should hold in total; defaults to the manifest's
                ``n_rows`` for a single process.
        Returns:
            The manifest as written.
        """
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
    merged.complete = True
    merged.updated = _now()
    merged.write(path / MANIFEST)
    for r in range(world_size):
        (path / f"manifest.rank{r:02d}.json").unlink()
    return merged


def read_manifest(path: Path, missing_ok: bool = False) -> CacheManifest | None:
    """The manifest at ``path``, validated; None when it is missing and ``missing_ok``.

    Raises:
        CacheError: missing (unless ``missing_ok``), not JSON, or not a valid cache manifest.
    """
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return None
        raise CacheError(f"no cache at {path.parent} ({path.name} is missing); run `chiptuning extract` first")
    return CacheManifest.read(path)


# -- reader ---------------------------------------------------------------------------------------

class CacheReader:
    """Read-only view of a complete cache, rows in canonical (dataset) order.

    Args:
        path: the cache directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path / MANIFEST)
        if not manifest.complete:
            raise CacheError(
                f"cache {self.path} is incomplete ({manifest.stored_rows} of {manifest.n_rows} rows); "
                "re-run the same extract command to resume"
            )
        self.manifest: CacheManifest = manifest
        self.fingerprint: str = manifest.fingerprint
        self.meta: CacheMeta = manifest.meta
        self.layers: list[int] = list(manifest.layers)
        self.hidden_size: int = manifest.hidden_size
        self.storage_dtype: str = manifest.storage_dtype
        self.model_stats: dict = manifest.model_stats
        self.shards: list[ShardRecord] = manifest.shards
        self._files: dict[str, h5py.File] = {}
        self._verified = False
        cols = {key: [] for key in ("index", "labels", "example_ids", "n_tokens", "n_choices")}
        for shard in self.shards:
            f = self._file(shard)
            try:
                if len(f["index"]) != shard.rows:
                    raise CacheError(f"shard {shard.file} holds {len(f['index'])} rows, manifest says {shard.rows}")
                for key in cols:
                    cols[key].append(f[key][:])
            except (OSError, KeyError, ValueError, TypeError) as err:
                raise self._unreadable(shard, err) from None
        index = np.concatenate(cols["index"])
        self._check_columns(index, np.concatenate(cols["labels"]), np.concatenate(cols["n_choices"]))
        # order[k] = position in shard order of canonical row k.
        self._order = np.argsort(index, kind="stable")
        self.index = index[self._order]
        self.labels = np.concatenate(cols["labels"])[self._order].astype(np.int64)
        ids = np.concatenate(cols["example_ids"])[self._order]
        self.example_ids = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids], dtype=object)
        self.n_tokens = np.concatenate(cols["n_tokens"])[self._order]
        self.n_choices = np.concatenate(cols["n_choices"])[self._order]
        # shard boundaries in shard order, to map a shard-order position to (shard, offset).
        self._starts = np.cumsum([0] + [s.rows for s in self.shards])
        # Shards written in dataset order (the usual single-process case) need no reordering.
        self._in_order = bool(np.array_equal(self._order, np.arange(len(self._order))))

    def _check_columns(self, index: np.ndarray, labels: np.ndarray, n_choices: np.ndarray) -> None:
        """Refuse rows no extraction writes: an index that is not a permutation of the examples,
        labels outside the label names, or a number of valid classes outside 1..C."""
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

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    @property
    def has_lens(self) -> bool:
        """Whether the cache stores the label-word logits of every layer (decoders, ``meta.lens``)."""
        return self.meta.lens is not None

    def lens(self) -> np.ndarray:
        """Label-word logits of every layer, (N, n_layers, K) float32 in canonical order; the K
        tokens are ``meta.lens["token_ids"]`` flattened (see :mod:`chiptuning.zeroshot`).

        Raises:
            CacheError: the cache holds none (an encoder's, or one extracted before lenses).
        """
        if not self.has_lens:
            raise CacheError(f"cache {self.path} stores no label-word logits (extract a decoder with --lens)")
        parts = []
        for shard in self.shards:
            f = self._file(shard)
            if "lens" not in f:
                raise CacheError(f"shard {shard.file} has no lens data though the manifest records one; "
                                 f"run `chiptuning cache verify {self.path}`")
            try:
                parts.append(f["lens"][:])
            except (OSError, KeyError, ValueError, TypeError) as err:
                raise self._unreadable(shard, err) from None
        return np.concatenate(parts)[self._order].astype(np.float32, copy=False)

    @property
    def num_blocks(self) -> int:
        return max(self.layers) if self.layers else 0

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.label_names)

    def _file(self, shard: ShardRecord) -> h5py.File:
        name = shard.file
        if name not in self._files:
            try:
                f = h5py.File(self.path / name, "r")
            except (OSError, FileNotFoundError) as err:
                raise self._unreadable(shard, err) from None
            try:
                check_self_contained(f)
            except (OSError, KeyError, ValueError, TypeError) as err:
                f.close()
                raise self._unreadable(shard, err) from None
            except BaseException:
                f.close()
                raise
            self._files[name] = f
        return self._files[name]

    def _unreadable(self, shard: ShardRecord, err: BaseException) -> CacheError:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return CacheError(f"cannot read shard {self.path / shard.file} ({detail}); the cache is damaged: "
                          f"run `chiptuning cache verify {self.path}`")

    def verify_checksums(self) -> None:
        """Compare every shard with the sha256 the manifest recorded when it was written (once per
        reader; reads every byte of the cache, about as fast as the disk delivers it).

        Raises:
            CacheError: naming the first shard that is missing or changed.
        """
        if self._verified:
            return
        for shard in self.shards:
            file = self.path / shard.file
            try:
                digest = sha256_file(file)
            except OSError as err:
                raise self._unreadable(shard, err) from None
            if digest != shard.sha256:
                raise CacheError(f"shard {file} does not match its checksum in the manifest (the file changed "
                                 f"or is corrupt); refusing to read it: run `chiptuning cache verify {self.path}`")
        self._verified = True

    def _check_values(self, stored: np.ndarray, layer: int, start: int = 0) -> None:
        """Refuse features that no model run writes (see :func:`first_bad_row`); ``start``: the
        shard-order row of ``stored[0]``."""
        bad = first_bad_row(stored, self.storage_dtype)
        if bad is None:
            return
        row = start + bad
        s = int(np.searchsorted(self._starts, row, side="right")) - 1
        shard = self.shards[s]
        raise CacheError(
            f"shard {self.path / shard.file}: hidden/{layer} row {row - int(self._starts[s])} holds a value that is "
            f"not finite or of magnitude >= {MAX_ABS_FEATURE:.0f}; the shard is corrupt: run "
            f"`chiptuning cache verify {self.path}`"
        )

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise CacheError(f"layer {layer} is not in cache {self.path} (layers {self.layers[0]}..{self.layers[-1]})")

    @property
    def stored_dtype(self) -> np.dtype:
        """numpy dtype of the stored arrays (uint16 holds bfloat16 bit patterns)."""
        return np.dtype({"bfloat16": np.uint16, "float16": np.float16}.get(self.storage_dtype, np.float32))

    def layer_stored(self, layer: int, rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """One layer as stored (see :attr:`stored_dtype`), (N, H) in canonical order, or ``rows``.

        Each shard is read straight into one preallocated array (``out`` when given: an (N, H)
        C-contiguous array of :attr:`stored_dtype`, e.g. a buffer reused from layer to layer); rows
        are reordered (one copy of the 16-bit data) only when the shards are not already in
        dataset order.
        """
        self._check_layer(layer)
        name = str(layer)
        shape = (int(self._starts[-1]), self.hidden_size)
        if out is None:
            stored = np.empty(shape, dtype=self.stored_dtype)
        elif rows is not None or out.shape != shape or out.dtype != self.stored_dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {shape} {self.stored_dtype} array and rows None")
        else:
            stored = out
        for s, shard in enumerate(self.shards):
            start, stop = int(self._starts[s]), int(self._starts[s + 1])
            if stop > start:
                try:
                    self._file(shard)["hidden"][name].read_direct(stored, dest_sel=np.s_[start:stop])
                except (OSError, KeyError, ValueError, TypeError) as err:
                    raise self._unreadable(shard, err) from None
        self._check_values(stored, layer)
        if rows is not None:
            rows = np.asarray(rows)
            return stored[rows if self._in_order else self._order[rows]]
        if self._in_order:
            return stored
        if out is not None:
            out[:] = stored[self._order]
            return out
        return stored[self._order]

    def layer(self, layer: int, rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Features of one layer, (N, H) float32 in canonical order, or only ``rows`` of them.

        Args:
            layer: layer index.
            rows: canonical row positions to return (default all, in order).
            out: optional preallocated float32 array of the result's shape to decode into.
        """
        return decode(self.layer_stored(layer, rows), self.storage_dtype, out=out)

    def iter_batches(
        self, layers: Sequence[int], batch_size: int, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream features of several layers without loading whole layers.

        Reads shard by shard (contiguous row ranges, in storage order), so memory stays at
        ``batch_size * len(layers) * H`` floats whatever the cache size.

        Args:
            layers: layer indices to read.
            batch_size: rows per batch.
            rows: canonical row positions to restrict to (default all).
        Yields:
            (row_idx (b,) canonical positions, feats (b, len(layers), H) float32).
        """
        for layer in layers:
            self._check_layer(layer)
        # canonical position of each shard-order row.
        canonical = np.empty(self.n_rows, dtype=np.int64)
        canonical[self._order] = np.arange(self.n_rows)
        wanted = None if rows is None else np.zeros(self.n_rows, dtype=bool)
        if wanted is not None:
            wanted[np.asarray(rows)] = True
        for s, shard in enumerate(self.shards):
            start, stop = int(self._starts[s]), int(self._starts[s + 1])
            offsets = np.arange(stop - start)
            if wanted is not None:
                offsets = offsets[wanted[canonical[start:stop]]]
            group = self._file(shard)["hidden"]
            for b in range(0, len(offsets), batch_size):
                chunk = offsets[b:b + batch_size]
                lo, hi = int(chunk[0]), int(chunk[-1]) + 1
                # one contiguous slice read per layer, then pick rows (h5py fancy indexing is slow).
                parts = []
                for layer in layers:
                    try:
                        raw = group[str(layer)][lo:hi]
                    except (OSError, KeyError, ValueError, TypeError) as err:
                        raise self._unreadable(shard, err) from None
                    self._check_values(raw, layer, start + lo)
                    parts.append(decode(raw, self.storage_dtype)[chunk - lo])
                yield canonical[start + chunk], np.stack(parts, axis=1)  # (b, n_layers, H)

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
