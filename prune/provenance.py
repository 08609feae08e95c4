"""Provenance of a pruned checkpoint: where it came from and proof that nothing changed since.

``chiptuning.json`` in a pruned directory records the base model (id + weights hash), the layer,
the task each chip serves (template, label names, cache fingerprint and meta, chips config) and a
sha256 of every file written next to it. :func:`verify_checksums` refuses a directory whose files
were edited; :func:`check_model_matches_cache` refuses to prune a model with chips trained on
another model's cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chiptuning import __version__
from chiptuning.cache import CacheMeta
from chiptuning.errors import ProvenanceError
from chiptuning.io import canonical_hash, sha256_file, write_json_atomic
from chiptuning.probe import ChipsRecord
from chiptuning.registry import num_blocks, text_config

log = logging.getLogger(__name__)

PROVENANCE_FILE = "chiptuning.json"
FORMAT = "chiptuning-pruned"
FORMAT_VERSION = 1


# -- the record -----------------------------------------------------------------------------------

def _require(data: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ProvenanceError(f"{where} is not an object; the checkpoint is damaged")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ProvenanceError(f"{where} has no {missing[0]!r}; the checkpoint is damaged or not from chip-tuning")


@dataclass
class BaseModel:
    """The full model a checkpoint was pruned from."""

    id: str
    hash: str | None
    model_type: str
    num_blocks: int
    hidden_size: int | None = None
    adapter: str | None = None
    source: dict[str, Any] | None = None  # a GGUF file: name, sha256, architecture, quantization

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.source is None:
            del out["source"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> BaseModel:
        _require(data, ("id", "model_type", "num_blocks"), f"{where}: base_model")
        return cls(id=str(data["id"]), hash=data.get("hash"), model_type=str(data["model_type"]),
                   num_blocks=int(data["num_blocks"]), hidden_size=data.get("hidden_size"),
                   adapter=data.get("adapter"), source=data.get("source"))


@dataclass
class TaskEntry:
    """One task of a checkpoint: its chip, the layer it reads and the prompt format it was trained on.

    Attributes:
        chip_dir: the chip's directory inside the checkpoint.
        layer: the layer the chip reads.
        strategy: how the layer was chosen.
        feature_mode: "raw" or "normed".
        task: the training task's description (:meth:`chiptuning.tasks.TaskData.describe`).
        template, text_column: its prompt format.
        label_names: class names, in class-index order.
        cache_fingerprint, cache_meta: the training cache.
        chips: the chips record the chip was taken from.
        chip_metrics: the chip's metric row.
        cascade: an early-exit cascade (``select --strategy cascade:DELTA``): its exits
            ({"layer", "threshold", "chip_dir"}, ascending; the last is this entry's own chip), the
            delta and the simulated scores; None for a single chip.
    """

    chip_dir: str
    layer: int
    strategy: str
    feature_mode: str
    label_names: list[str]
    task: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    text_column: str | None = None
    cache_fingerprint: str | None = None
    cache_meta: CacheMeta = field(default_factory=CacheMeta)
    chips: ChipsRecord | None = None
    chip_metrics: dict[str, Any] = field(default_factory=dict)
    cascade: dict[str, Any] | None = None

    def chip_dirs(self) -> list[str]:
        """Every chip directory of the entry: its own, and the cascade's exits."""
        exits = [e["chip_dir"] for e in (self.cascade or {}).get("exits", [])]
        return list(dict.fromkeys([self.chip_dir, *exits]))

    def to_dict(self) -> dict[str, Any]:
        out = self._fields()
        if self.cascade is not None:
            out["cascade"] = self.cascade
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "chip_dir": self.chip_dir, "layer": self.layer, "strategy": self.strategy,
            "feature_mode": self.feature_mode, "task": self.task, "template": self.template,
            "text_column": self.text_column, "label_names": list(self.label_names),
            "cache_fingerprint": self.cache_fingerprint, "cache_meta": self.cache_meta.to_dict(),
            "chips_config": None if self.chips is None else self.chips.to_dict(),
            "chip_metrics": self.chip_metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TaskEntry:
        _require(data, ("chip_dir", "layer", "label_names"), where)
        chip_dir = _inside(str(data["chip_dir"]), where)
        cascade = data.get("cascade")
        for exit_ in (cascade or {}).get("exits", []):
            _inside(str(exit_["chip_dir"]), where)
        chips = data.get("chips_config")
        return cls(chip_dir=chip_dir, layer=int(data["layer"]), strategy=str(data.get("strategy", "")),
                   feature_mode=str(data.get("feature_mode") or "raw"),
                   label_names=[str(x) for x in data["label_names"]], task=dict(data.get("task") or {}),
                   template=data.get("template"), text_column=data.get("text_column"),
                   cache_fingerprint=data.get("cache_fingerprint"),
                   cache_meta=CacheMeta.from_dict(data.get("cache_meta") or {}, where),
                   chips=None if chips is None else ChipsRecord.from_dict(chips, f"{where}: chips_config"),
                   chip_metrics=dict(data.get("chip_metrics") or {}), cascade=cascade)


def _inside(rel: str, where: str) -> str:
    """A path a record names inside the checkpoint; ProvenanceError if it points outside."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ProvenanceError(f"{where}: chip directory {rel!r} points outside the checkpoint")
    return rel


@dataclass
class CheckpointRecord:
    """``chiptuning.json``: what a pruned checkpoint is, where it came from, and its files' sha256.

    Attributes:
        base_model: the full model.
        layer: the depth of the pruned backbone (the deepest chip's layer).
        num_blocks: L of the full model.
        architecture: the transformers class the checkpoint saves as.
        keep_lm_head: whether the LM head was kept.
        export: "sequence-classification" for an exported classifier, else None.
        dtype: the weights' dtype.
        feature_mode: "raw" or "normed".
        padding_side, max_length: how prompts are tokenized (as for the cache).
        default_task: the task ``predict`` uses when none is named.
        tasks: task name -> :class:`TaskEntry`.
        params: parameter counts before and after, what was removed, the pruning ratio.
        images: layer-curve images in the checkpoint.
        checksums: sha256 of every file written (relative path -> hex).
        record_sha256: sha256 of this record itself.
        chiptuning_version: the version that wrote it.
    """

    base_model: BaseModel
    layer: int
    num_blocks: int
    architecture: str
    dtype: str
    feature_mode: str
    default_task: str
    tasks: dict[str, TaskEntry]
    params: dict[str, Any]
    keep_lm_head: bool = False
    export: str | None = None
    padding_side: str = "right"
    max_length: int | None = None
    images: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    record_sha256: str | None = None
    chiptuning_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        out = {
            "base_model": self.base_model.to_dict(), "layer": self.layer, "num_blocks": self.num_blocks,
            "architecture": self.architecture, "keep_lm_head": self.keep_lm_head, "export": self.export,
            "dtype": self.dtype, "feature_mode": self.feature_mode,
            "tokenizer": {"padding_side": self.padding_side, "max_length": self.max_length},
            "default_task": self.default_task, "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "params": self.params, "images": list(self.images),
            "format": FORMAT, "format_version": FORMAT_VERSION, "chiptuning_version": self.chiptuning_version,
            "checksums": dict(self.checksums),
        }
        if self.record_sha256 is not None:
            out["record_sha256"] = self.record_sha256
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = PROVENANCE_FILE) -> CheckpointRecord:
        """Read and validate a record (checksums are checked separately, by :func:`verify_checksums`).

        Raises:
            ProvenanceError: a missing or malformed field, named.
        """
        _require(data, ("base_model", "layer", "num_blocks", "tasks", "default_task", "params"), where)
        if not isinstance(data["tasks"], dict) or not data["tasks"]:
            raise ProvenanceError(f"{where}: 'tasks' names no task; the checkpoint is damaged")
        tokenizer = data.get("tokenizer") or {}
        try:
            return cls(
                base_model=BaseModel.from_dict(data["base_model"], where), layer=int(data["layer"]),
                num_blocks=int(data["num_blocks"]), architecture=str(data.get("architecture", "")),
                dtype=str(data.get("dtype", "float32")), feature_mode=str(data.get("feature_mode") or "raw"),
                default_task=str(data["default_task"]),
                tasks={str(k): TaskEntry.from_dict(v, f"{where}: task {k!r}") for k, v in data["tasks"].items()},
                params=dict(data["params"]), keep_lm_head=bool(data.get("keep_lm_head")),
                export=data.get("export"), padding_side=str(tokenizer.get("padding_side") or "right"),
                max_length=tokenizer.get("max_length"), images=list(data.get("images") or []),
                checksums=dict(data.get("checksums") or {}), record_sha256=data.get("record_sha256"),
                chiptuning_version=str(data.get("chiptuning_version", "")),
            )
        except (TypeError, ValueError) as err:
            raise ProvenanceError(f"{where}: malformed record ({err}); the checkpoint is damaged") from None


# -- files and checksums --------------------------------------------------------------------------

def file_checksums(root: Path, exclude: tuple[str, ...] = (PROVENANCE_FILE,)) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX path -> hex digest), sorted."""
    root = Path(root)
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or rel.endswith(".tmp"):
            continue
        sums[rel] = sha256_file(path)
    return sums


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the record itself (minus this field), so edits to chiptuning.json show too."""
    return canonical_hash({k: v for k, v in record.items() if k != "record_sha256"})


def write_provenance(root: Path, record: CheckpointRecord | dict[str, Any]) -> CheckpointRecord:
    """Stamp ``record`` (typed, or its JSON) with the version and the checksums of ``root`` and
    write it (last)."""
    if isinstance(record, dict):
        record = CheckpointRecord.from_dict(record)
    record = dataclasses.replace(record, chiptuning_version=__version__, checksums=file_checksums(root),
                                 record_sha256=None)
    data = record.to_dict()
    record.record_sha256 = data["record_sha256"] = record_hash(data)
    write_json_atomic(Path(root) / PROVENANCE_FILE, data)
    return record


def read_provenance(root: str | Path) -> dict[str, Any]:
    """``chiptuning.json`` as stored (the JSON object); ProvenanceError if it is missing or not a
    pruned checkpoint's. :func:`load_record` also verifies and types it."""
    path = Path(root) / PROVENANCE_FILE
    if not Path(root).is_dir():
        raise ProvenanceError(f"{root} is not a directory; give a pruned checkpoint written by `chiptuning prune`")
    if not path.is_file():
        raise ProvenanceError(
            f"{root} has no {PROVENANCE_FILE}: not a chip-tuning checkpoint (write one with `chiptuning prune`)"
        )
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProvenanceError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ProvenanceError(f"{path} is not a chip-tuning pruned checkpoint record (format {found!r})")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise ProvenanceError(
            f"{root} was written by a newer chip-tuning (format {record['format_version']}); upgrade chip-tuning"
        )
    return record


def load_record(root: str | Path) -> CheckpointRecord:
    """Read, verify (every recorded file's sha256, the record's own) and type a checkpoint's record.

    Raises:
        ProvenanceError: not a checkpoint, edited or missing files, a malformed record.
    """
    raw = read_provenance(root)
    verify_checksums(root, raw)
    return CheckpointRecord.from_dict(raw, str(Path(root) / PROVENANCE_FILE))


def verify_checksums(root: str | Path, record: dict[str, Any]) -> None:
    """Refuse a checkpoint whose recorded files are missing or were edited.

    Files added later (a ``.gitattributes`` from the hub) are ignored: only what chip-tuning wrote
    and recorded is checked.

    Raises:
        ProvenanceError: naming the first missing or modified file.
    """
    root = Path(root)
    if record.get("record_sha256") != record_hash(record):
        raise ProvenanceError(
            f"{root}: {PROVENANCE_FILE} was modified after pruning (its own checksum does not match); "
            "refusing to load it, re-run `chiptuning prune` to rebuild the checkpoint"
        )
    expected = record.get("checksums") or {}
    if not expected:
        raise ProvenanceError(f"{root}/{PROVENANCE_FILE} records no checksums; re-run `chiptuning prune`")
    for rel, digest in sorted(expected.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ProvenanceError(f"{root}: {PROVENANCE_FILE} lists {rel!r}, a path outside the checkpoint")
        path = root / rel
        if not path.is_file():
            raise ProvenanceError(f"{root}: file {rel} listed in {PROVENANCE_FILE} is missing; re-run `chiptuning prune`")
        if sha256_file(path) != digest:
            raise ProvenanceError(
                f"{root}: file {rel} was modified after pruning (checksum mismatch); "
                "refusing to load it, re-run `chiptuning prune` to rebuild the checkpoint"
            )


def _adapter_name(adapter: str | None) -> str | None:
    # Paths are recorded as given (relative to wherever extract ran): compare the directory name.
    return Path(str(adapter).rstrip("/")).name if adapter else None


def check_model_matches_cache(model_id: str, model_hash: str, config, cache_meta: CacheMeta | dict[str, Any],
                              adapter: str | None = None, what: str = "chips") -> None:
    """Refuse to combine a model with chips (or a cache) made from another model.

    Architecture facts (model type, number of blocks, hidden size) must match; the weights hash
    must match whenever both sides identify the weights the same way (both file hashes, or both
    hub commits). When they cannot be compared (a hub id at extraction, a local copy now) the
    architecture check stands alone and a warning says so.

    Args:
        model_id: the model given now (hub id or directory).
        model_hash: :func:`chiptuning.models.weights_hash` of it.
        config: its (full, untruncated) config.
        cache_meta: the ``meta`` of the cache the chips were trained on.
        adapter: the PEFT adapter merged now, if any.
        what: how to call the other side in messages.

    Raises:
        ProvenanceError: "cache from another model", with both identities.
    """
    meta = CacheMeta.from_dict(cache_meta)

    def refuse(detail: str) -> None:
        raise ProvenanceError(
            f"{what} were trained on a cache from another model: {detail} "
            f"(cache model {meta.model!r}, given {model_id!r}); "
            "prune the model the cache was extracted from, or re-extract and re-train the chips"
        )

    text = text_config(config)
    facts = {
        "model_type": getattr(config, "model_type", None),
        "num_blocks": num_blocks(config),
        "hidden_size": int(text.hidden_size),
    }
    for key, value in facts.items():
        recorded = getattr(meta, key)
        if recorded is not None and recorded != value:
            refuse(f"{key} {recorded!r} in the cache, {value!r} in the model")
    recorded_hash = meta.model_hash
    if recorded_hash and model_hash and recorded_hash != model_hash:
        kind_then, kind_now = recorded_hash.split(":", 1)[0], model_hash.split(":", 1)[0]
        if kind_then == kind_now and kind_then != "unknown":
            refuse(f"weights hash {recorded_hash} in the cache, {model_hash} now")
        log.warning(
            "cannot compare weights of %s (%s) with the cache's %s (%s); checked the architecture only",
            model_id, model_hash, meta.model, recorded_hash,
        )
    if _adapter_name(meta.adapter) != _adapter_name(adapter):
        refuse(f"adapter {meta.adapter!r} in the cache, {adapter!r} now (--adapter)")
