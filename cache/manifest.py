"""The cache's records: ``manifest.json`` and the ``meta`` it fingerprints (recomputed on every
read, so an edited meta is refused; optional fields are written only when set)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from chiptuning import __version__
from chiptuning.errors import CacheError
from chiptuning.io import canonical_hash
from chiptuning.records import Invalid, Record, name_clash, rule

FORMAT = "chiptuning-cache"
FORMAT_VERSION = 1
StorageDtype = Literal["float32", "bfloat16", "float16"]
STORAGE_DTYPES = typing.get_args(StorageDtype)
#: A shard's file name: ``shard-00000.h5``, or ``shard-r01-00000.h5`` for rank 1 of a data-parallel run.
SHARD_NAME = re.compile(r"shard-(r\d{2}-)?\d{5}\.h5")
_HEX = re.compile(r"[0-9a-f]+")


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def check_layers(layers: list[int], depth: int | None, where: str, *, first: int = 0) -> None:
    """Layers must be unique, ascending and within ``first``..``depth`` (when known); else
    :class:`Invalid` naming ``where``."""
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise Invalid(where, f"must be unique and ascending, got {layers[:8]}{'...' if len(layers) > 8 else ''}")
    if layers and (layers[0] < first or (depth is not None and layers[-1] > depth)):
        span = f"{first}..{depth}" if depth is not None else f">= {first}"
        raise Invalid(where, f"must lie in {span}, got {layers[0]}..{layers[-1]}")


def check_model_stats(stats: dict[str, Any], num_blocks: int | None, where: str) -> None:
    """Parameter counts (:func:`chiptuning.models.param_stats`): non-negative integers, one per block."""
    if not stats:
        return
    blocks = stats.get("blocks")
    counts = [stats.get(k) for k in ("embedding", "final_norm", "lm_head", "total") if k in stats]
    if not isinstance(blocks, list) or not all(_is_count(n) for n in [*blocks, *counts]):
        raise Invalid(where, "must hold non-negative integer parameter counts, with 'blocks' a list")
    if num_blocks is not None and len(blocks) != num_blocks:
        raise Invalid(f"{where}.blocks", f"counts {len(blocks)} blocks; the model has {num_blocks}")
    if not isinstance(stats.get("total"), int) or stats["total"] < sum(blocks):
        raise Invalid(f"{where}.total", f"must be at least the blocks' {sum(blocks)} parameters")


def check_label_names(names: list[str], where: str) -> None:
    """Class names must be non-empty, distinct, and distinct once stripped and lower-cased."""
    if any(not name.strip() for name in names):
        raise Invalid(where, "holds an empty label name")
    clash = name_clash(names)
    if clash is not None:
        raise Invalid(where, f"{clash[0]!r} and {clash[1]!r} are the same label up to case or surrounding space")


@dataclass
class CacheMeta(Record):
    """Everything that determines a cache's content; its hash is the cache's fingerprint. ``lens``:
    the label words whose logits are stored per layer ({"token_ids": [[ids of label c]...], ...})."""

    ERROR = CacheError

    model: str | None = None
    model_hash: str | None = None
    model_type: str | None = None
    adapter: str | None = None
    tokenizer: str | None = None
    task: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    prompts_sha256: str | None = None
    max_length: int | None = rule(None, ge=1)
    pooling: Literal["last_token"] | None = None
    feature_mode: Literal["raw", "normed"] | None = None
    dtype: StorageDtype | None = None
    storage_dtype: StorageDtype | None = None
    layers: list[int] = field(default_factory=list)
    num_blocks: int | None = rule(None, ge=1)
    hidden_size: int | None = rule(None, ge=1)
    model_source: dict[str, Any] | None = rule(None, omit_none=True)
    lens: dict[str, Any] | None = rule(None, omit_none=True)
    processor: dict[str, Any] | None = rule(None, omit_none=True)
    images_sha256: str | None = rule(None, omit_none=True)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        check_layers(self.layers, self.num_blocks, "layers")
        check_label_names(self.label_names, "label_names")
        ids = None if self.lens is None else self.lens.get("token_ids")
        if self.lens is not None and not (isinstance(ids, list) and len(ids) == len(self.label_names) and all(
                isinstance(group, list) and group and all(_is_count(t) for t in group) for group in ids)):
            raise Invalid("lens.token_ids", f"must hold a non-empty list of token ids for each of the "
                                            f"{len(self.label_names)} labels")

    def fingerprint(self) -> str:
        """Stable hash of the content-determining settings (sorted JSON, sha256, 16 hex chars)."""
        return canonical_hash(self.to_dict(), 16)

    @property
    def task_name(self) -> str | None:
        return self.task.get("name")

    @property
    def split(self) -> str | None:
        return self.task.get("split")

    def differences(self, other: CacheMeta) -> str:
        """The first differing fields, ``key: old -> new``, for error messages."""
        a, b = self.to_dict(), other.to_dict()
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if not keys:
            return "different fingerprint"
        return "; ".join(f"{k}: {str(a.get(k))[:40]!r} -> {str(b.get(k))[:40]!r}" for k in keys[:3])


@dataclass
class ShardRecord(Record):
    """One complete shard: file name, rows, sha256 of its bytes, the rank that wrote it."""

    ERROR = CacheError

    file: str
    rows: int = rule(ge=0)
    sha256: str = ""
    rank: int = rule(0, ge=0)

    def check(self) -> None:
        if not SHARD_NAME.fullmatch(self.file):
            raise Invalid("file", f"{self.file!r} is not a shard name of this cache (shard-NNNNN.h5); "
                                  "refusing to read files it does not name")
        if len(self.sha256) != 64 or not _HEX.fullmatch(self.sha256):
            raise Invalid("sha256", f"expected 64 hex digits, got {self.sha256[:70]!r}")


@dataclass
class CacheManifest(Record):
    """``manifest.json``: what the cache holds and how far extraction got. ``part``: the rank whose
    part a per-rank manifest describes (None for a whole cache)."""

    FORMAT = FORMAT
    VERSION = FORMAT_VERSION
    ERROR = CacheError

    fingerprint: str
    meta: CacheMeta
    layers: list[int]
    hidden_size: int = rule(ge=1)
    storage_dtype: StorageDtype = "float32"
    n_rows: int = rule(0, ge=0)
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    created: str | None = None
    updated: str | None = None
    model_stats: dict[str, Any] = field(default_factory=dict)
    n_shortened: int | None = rule(None, ge=0)
    preview: list[dict[str, Any]] = field(default_factory=list)
    world_size: int | None = rule(None, ge=1, omit_none=True)
    part: int | None = rule(None, ge=0, omit_none=True)
    chiptuning_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def check(self) -> None:
        if self.fingerprint != self.meta.fingerprint():
            raise Invalid("meta", f"was edited after extraction: it fingerprints to {self.meta.fingerprint()}, the "
                                  f"manifest records {self.fingerprint}; refusing a cache whose settings changed "
                                  "(extract again)")
        if not self.layers:
            raise Invalid("layers", "is empty; a cache stores at least one layer")
        check_layers(self.layers, self.meta.num_blocks, "layers")
        if self.meta.layers and self.layers != self.meta.layers:
            raise Invalid("layers", f"{self.layers[:4]}... differ from the meta's {self.meta.layers[:4]}...")
        if self.meta.hidden_size is not None and self.hidden_size != self.meta.hidden_size:
            raise Invalid("hidden_size", f"{self.hidden_size} differs from the meta's {self.meta.hidden_size}")
        check_model_stats(self.model_stats, self.meta.num_blocks, "model_stats")
        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise Invalid("shards", "name a shard twice")
        whole = self.part is None  # a rank's part of a data-parallel cache holds only that rank's rows
        if self.stored_rows > self.n_rows or (self.complete and whole and self.stored_rows != self.n_rows):
            raise Invalid("shards", f"hold {self.stored_rows} rows; the cache has {self.n_rows}"
                                    f"{' and is marked complete' if self.complete else ''}")


__all__ = ["FORMAT", "FORMAT_VERSION", "SHARD_NAME", "STORAGE_DTYPES", "CacheManifest", "CacheMeta", "ShardRecord",
           "check_label_names", "check_layers", "check_model_stats"]
