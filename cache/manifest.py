"""The cache's records: ``manifest.json`` and the content-determining ``meta`` it fingerprints.

Typed, with ``to_dict`` / ``from_dict``; read through attributes. :meth:`CacheManifest.from_dict`
validates what it reads and raises :class:`~chiptuning.errors.CacheError` naming the field, so a
damaged or foreign manifest fails with one line instead of a ``KeyError`` later.

Compatibility: :meth:`CacheMeta.to_dict` writes the core fields always and the optional ones
only when set, so ``CacheMeta.from_dict(d).to_dict() == d`` for every meta this version writes
and the fingerprint of a cache never changes when it is read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from chiptuning import __version__
from chiptuning.errors import CacheError
from chiptuning.io import canonical_hash

FORMAT = "chiptuning-cache"
FORMAT_VERSION = 1

#: Fields of the meta written whether set or not (what every cache of this format records).
_CORE = ("model", "model_hash", "model_type", "adapter", "tokenizer", "task", "label_names", "prompts_sha256",
         "max_length", "pooling", "feature_mode", "dtype", "storage_dtype", "layers", "num_blocks",
         "hidden_size")
#: Fields written only when set (added after the first caches were written: leaving them out when
#: unset keeps the fingerprints of those caches).
_OPTIONAL = ("model_source", "lens", "processor", "images_sha256")


@dataclass
class CacheMeta:
    """Everything that determines a cache's content; its hash is the cache's fingerprint.

    Attributes:
        model: the model as given (hub id, directory or GGUF file).
        model_hash: identity of its weights (:func:`chiptuning.models.weights_hash`).
        model_type: the config's ``model_type``.
        adapter: a PEFT adapter merged first, or None.
        tokenizer: the tokenizer's name or path.
        task: the task description (:meth:`chiptuning.tasks.TaskData.describe`): name, split,
            template or text column, label names, source.
        label_names: class names, in class-index order.
        prompts_sha256: hash of every prompt and label.
        max_length: longest prompt in tokens.
        pooling: which token a feature is read at ("last_token").
        feature_mode: "raw" (the layer convention) or "normed".
        dtype: compute dtype of the model.
        storage_dtype: float32, bfloat16 or float16.
        layers: layer indices stored, 0..L.
        num_blocks: L.
        hidden_size: feature width.
        model_source: where the weights came from when that is more than a name (a GGUF file:
            its name, sha256, architecture and quantization).
        lens: the label words whose logits are stored per layer (the model's own answer, see
            :mod:`chiptuning.zeroshot`): {"token_ids": [[ids of label c]...], "variants": [...]}.
        processor: a vision-language model's processor (:func:`chiptuning.vision.processor_identity`:
            its class, its image processor's class, a hash of its settings).
        images_sha256: image data: a hash over every image's bytes, in dataset order.
        extra: any other content-determining field (kept and fingerprinted as given).
    """

    model: str | None = None
    model_hash: str | None = None
    model_type: str | None = None
    adapter: str | None = None
    tokenizer: str | None = None
    task: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    prompts_sha256: str | None = None
    max_length: int | None = None
    pooling: str | None = None
    feature_mode: str | None = None
    dtype: str | None = None
    storage_dtype: str | None = None
    layers: list[int] = field(default_factory=list)
    num_blocks: int | None = None
    hidden_size: int | None = None
    model_source: dict[str, Any] | None = None
    lens: dict[str, Any] | None = None
    processor: dict[str, Any] | None = None
    images_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what is fingerprinted): core fields, the optional ones that are set, then
        ``extra`` at the top level."""
        out = {name: getattr(self, name) for name in _CORE}
        out.update({name: getattr(self, name) for name in _OPTIONAL if getattr(self, name) is not None})
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "cache meta") -> CacheMeta:
        """Read a meta dict; fields this version does not know go to ``extra``.

        Raises:
            CacheError: ``data`` is not a mapping, or a known field has the wrong type.
        """
        if isinstance(data, CacheMeta):
            return data
        if not isinstance(data, dict):
            raise CacheError(f"{where}: meta is a {type(data).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        for name, kind in (("task", dict), ("label_names", list), ("layers", list)):
            if values.get(name) is not None and not isinstance(values[name], kind):
                raise CacheError(f"{where}: meta field {name!r} is a {type(values[name]).__name__}, not a {kind.__name__}")
        for name in ("max_length", "num_blocks", "hidden_size"):
            if values.get(name) is not None and not isinstance(values[name], int):
                raise CacheError(f"{where}: meta field {name!r} must be an integer, got {values[name]!r}")
        for name in ("task", "label_names", "layers"):
            if values.get(name) is None:
                values.pop(name, None)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

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
class ShardRecord:
    """One complete shard: file name, rows, sha256 of its bytes, the rank that wrote it."""

    file: str
    rows: int
    sha256: str
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ShardRecord:
        try:
            shard = cls(file=str(data["file"]), rows=int(data["rows"]), sha256=str(data["sha256"]),
                        rank=int(data.get("rank", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"{where}: a shard entry is malformed ({err!r}); run `chiptuning cache verify`") from None
        if "/" in shard.file or "\\" in shard.file or shard.file in ("", ".", ".."):
            raise CacheError(f"{where}: shard name {shard.file!r} points outside the cache directory")
        return shard


@dataclass
class CacheManifest:
    """``manifest.json``: what the cache holds and how far extraction got.

    Attributes:
        fingerprint: hash of ``meta``.
        meta: the content-determining settings.
        layers, hidden_size, storage_dtype: the stored arrays.
        n_rows: rows of the finished cache.
        shards: complete shards, in writing order.
        complete: every row is stored.
        created, updated: UTC timestamps.
        model_stats: parameter counts of the model ({"embedding", "blocks": [...], "final_norm",
            "lm_head", "other", "total"}), for pruning ratios.
        n_shortened: prompts shortened to fit ``max_length``.
        preview: the last tokens of the first prompts and the token each chip reads.
        world_size: ranks that wrote a data-parallel cache (None for one process).
        chiptuning_version: the version that wrote it.
        extra: other fields (kept as they are).
    """

    fingerprint: str
    meta: CacheMeta
    layers: list[int]
    hidden_size: int
    storage_dtype: str
    n_rows: int
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    created: str | None = None
    updated: str | None = None
    model_stats: dict[str, Any] = field(default_factory=dict)
    n_shortened: int | None = None
    preview: list[dict[str, Any]] = field(default_factory=list)
    world_size: int | None = None
    chiptuning_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "chiptuning_version": self.chiptuning_version,
            "fingerprint": self.fingerprint,
            "meta": self.meta.to_dict(),
            "layers": list(self.layers),
            "hidden_size": int(self.hidden_size),
            "storage_dtype": self.storage_dtype,
            "n_rows": int(self.n_rows),
            "shards": [s.to_dict() for s in self.shards],
            "complete": bool(self.complete),
            "created": self.created,
            "updated": self.updated,
            "model_stats": self.model_stats,
            "n_shortened": self.n_shortened,
            "preview": self.preview,
            **self.extra,
        }
        if self.world_size is not None:
            out["world_size"] = self.world_size
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest.json") -> CacheManifest:
        """Read and validate a manifest.

        Raises:
            CacheError: not a chip-tuning cache manifest, a newer format, or a missing or
                malformed field (named).
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CacheError(f"{where} is not a chip-tuning cache manifest")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CacheError(f"{where} was written by a newer chip-tuning (cache format "
                             f"{data['format_version']}); upgrade chip-tuning")
        for name in ("fingerprint", "meta", "layers", "hidden_size", "storage_dtype", "n_rows", "shards"):
            if name not in data:
                raise CacheError(f"{where} has no {name!r}; delete the cache and extract again")
        try:
            layers = [int(x) for x in data["layers"]]
            hidden, n_rows = int(data["hidden_size"]), int(data["n_rows"])
        except (TypeError, ValueError) as err:
            raise CacheError(f"{where}: malformed layers / hidden_size / n_rows ({err})") from None
        if not isinstance(data["shards"], list):
            raise CacheError(f"{where}: 'shards' is not a list")
        known = {f.name for f in dataclasses.fields(cls)} | {"format", "format_version"}
        return cls(
            fingerprint=str(data["fingerprint"]),
            meta=CacheMeta.from_dict(data["meta"], where),
            layers=layers,
            hidden_size=hidden,
            storage_dtype=str(data["storage_dtype"]),
            n_rows=n_rows,
            shards=[ShardRecord.from_dict(s, where) for s in data["shards"]],
            complete=bool(data.get("complete")),
            created=data.get("created"),
            updated=data.get("updated"),
            model_stats=dict(data.get("model_stats") or {}),
            n_shortened=data.get("n_shortened"),
            preview=list(data.get("preview") or []),
            world_size=data.get("world_size"),
            chiptuning_version=str(data.get("chiptuning_version", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )


__all__ = ["FORMAT", "FORMAT_VERSION", "CacheManifest", "CacheMeta", "ShardRecord"]
