"""``chiptuning.json``: where a pruned checkpoint came from, each task's chip and prompt format, and the
sha256 of every file beside it."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chiptuning import __version__
from chiptuning.cache import CacheMeta, check_label_names, check_model_stats
from chiptuning.errors import ProvenanceError, renamed
from chiptuning.io import canonical_hash, sha256_file, write_json_atomic
from chiptuning.outputs import written_files
from chiptuning.probe import ChipsRecord, MetricRow, Simulated
from chiptuning.records import Invalid, Record, read_json, rule
from chiptuning.registry import num_blocks, text_config

log = logging.getLogger(__name__)

PROVENANCE_FILE = "chiptuning.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Files a checkpoint may hold unrecorded: what git and the hub's downloader leave, which nothing reads.
INERT = (".gitattributes", ".git/*", ".cache/huggingface/*", ".DS_Store", "*/.DS_Store")
#: Files chip-tuning never writes and transformers would act on (adapters, code, pickles): always refused.
NEVER_WRITTEN = ("adapter_config.json", "adapter_model.*", "*.py", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.ckpt.*",
                 "*.h5", "*.msgpack", "*.pkl", "*.pickle")


def inside(rel: str, where: str) -> None:
    """A path a record names inside the checkpoint; :class:`Invalid` if it points outside."""
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel:
        raise Invalid(where, f"{rel!r} points outside the checkpoint")


class CheckpointPart(Record):
    """A checkpoint record or a part of one: a malformed one is a ProvenanceError."""

    ERROR = ProvenanceError


@dataclass
class BaseModel(CheckpointPart):
    """The full model a checkpoint was pruned from (``source``: the GGUF file it was read from)."""

    id: str
    model_type: str
    num_blocks: int = rule(ge=1)
    hash: str | None = None
    hidden_size: int | None = rule(None, ge=1)
    adapter: str | None = None
    source: dict[str, Any] | None = rule(None, omit_none=True)  # name, sha256, architecture, quantization


@dataclass
class CascadeExit(CheckpointPart):
    """One exit of a checkpoint's early-exit cascade: its layer, threshold and chip directory."""

    layer: int = rule(ge=1)
    threshold: float = rule(ge=0, le=1)
    chip_dir: str = ""

    def check(self) -> None:
        inside(self.chip_dir, "chip_dir")


@dataclass
class CascadeEntry(CheckpointPart):
    """A task's early-exit cascade in a checkpoint (``select --strategy cascade:DELTA``)."""

    exits: list[CascadeExit]
    delta: float | None = rule(None, ge=0, le=1)
    fallback: bool | None = None
    reference_layer: int | None = rule(None, ge=1)
    simulated: Simulated | None = None

    def check(self) -> None:
        layers = [e.layer for e in self.exits]
        if not layers or layers != sorted(set(layers)):
            raise Invalid("exits", f"must be distinct ascending layers, got {layers}")


@dataclass
class TaskRecord(CheckpointPart):
    """One task of a checkpoint: its chip, the layer it reads and the prompt format it was trained on."""

    chip_dir: str
    layer: int = rule(ge=1)
    label_names: list[str] = field(default_factory=list)  # in class-index order
    strategy: str = ""
    feature_mode: Literal["raw", "normed"] = "raw"
    task: dict[str, Any] = field(default_factory=dict)  # the training task's TaskData.describe()
    template: str | None = None
    text_column: str | None = None
    cache_fingerprint: str | None = None
    cache_meta: CacheMeta = field(default_factory=CacheMeta)
    chips: ChipsRecord | None = rule(None, key="chips_config")  # the chips the chip was taken from
    chip_metrics: MetricRow | None = None
    cascade: CascadeEntry | None = rule(None, omit_none=True)  # its last exit is this entry's chip

    def check(self) -> None:
        inside(self.chip_dir, "chip_dir")
        check_label_names(self.label_names, "label_names")
        if len(self.label_names) < 2:
            raise Invalid("label_names", "a chip needs at least two classes")
        if self.cache_fingerprint is not None and self.cache_fingerprint != self.cache_meta.fingerprint():
            raise Invalid("cache_meta", "does not fingerprint to cache_fingerprint: it was edited")
        if self.chips is not None:
            if list(self.chips.label_names) != list(self.label_names):
                raise Invalid("label_names", f"{self.label_names} differ from the chips' {self.chips.label_names}")
            if self.layer not in self.chips.layers:
                raise Invalid("layer", f"{self.layer} has no chip in the chips record")
        if self.cascade is not None and self.cascade.exits[-1].layer != self.layer:
            raise Invalid("cascade.exits", f"the last exit is not the task's layer {self.layer}")

    def chip_dirs(self) -> list[str]:
        """Every chip directory of the entry: its own, and the cascade's exits."""
        exits = [e.chip_dir for e in self.cascade.exits] if self.cascade is not None else []
        return list(dict.fromkeys([self.chip_dir, *exits]))


@dataclass
class TokenizerSettings(CheckpointPart):
    """How prompts are tokenized (as for the cache)."""

    padding_side: Literal["left", "right"] = "right"
    max_length: int | None = rule(None, ge=1)


@dataclass
class PruneParams(CheckpointPart):
    """Parameter counts before and after pruning, what was removed, the pruning ratio."""

    before: dict[str, Any]
    after: dict[str, Any]
    pruning_ratio: float = rule(ge=0, le=1)
    removed: dict[str, int] = rule(default_factory=dict, ge=0)

    def check(self) -> None:
        check_model_stats(self.before, None, "before")


@dataclass
class CheckpointRecord(CheckpointPart):
    """``chiptuning.json``: what a pruned checkpoint is, where it came from, and its files' sha256."""

    FORMAT = "chiptuning-pruned"
    VERSION = 1

    base_model: BaseModel
    layer: int = rule(ge=1)  # the pruned depth: the deepest chip's layer
    num_blocks: int = rule(ge=1)
    default_task: str = ""  # what predict uses when no task is named
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    params: PruneParams | None = None
    architecture: str = ""  # the transformers class it saves as
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    feature_mode: Literal["raw", "normed"] = "raw"
    keep_lm_head: bool = False
    export: Literal["sequence-classification"] | None = None  # set for an exported classifier
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    figures: list[str] = rule(default_factory=list, key="images")  # the layer-curve plots in the checkpoint
    checksums: dict[str, str] = field(default_factory=dict)  # every other file: the checkpoint is exactly these
    record_sha256: str | None = rule(None, omit_none=True)
    chiptuning_version: str = __version__

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @property
    def max_length(self) -> int | None:
        return self.tokenizer.max_length

    def check(self) -> None:
        if self.layer > self.num_blocks or self.base_model.num_blocks != self.num_blocks:
            raise Invalid("layer", f"{self.layer} of {self.num_blocks} blocks (base model: "
                                   f"{self.base_model.num_blocks}) is not a pruning of that model")
        if not self.tasks or self.default_task not in self.tasks:
            raise Invalid("default_task", f"{self.default_task!r} is not one of the tasks {sorted(self.tasks)}")
        deepest = max(e.layer for t in self.tasks.values() for e in (t.cascade.exits if t.cascade else [t]))
        if deepest != self.layer:
            raise Invalid("layer", f"{self.layer} is not the deepest chip's layer ({deepest})")
        for rel, digest in self.checksums.items():
            inside(rel, "checksums")
            if not _SHA256.fullmatch(digest):
                raise Invalid(f"checksums.{rel}", "is not a sha256 (64 hex digits)")
        for figure in self.figures:
            if figure not in self.checksums:
                raise Invalid("images", f"{figure!r} is not among the checkpoint's files")
        for name, task in self.tasks.items():
            for rel in task.chip_dirs():
                if not any(path.startswith(rel.rstrip("/") + "/") for path in self.checksums):
                    raise Invalid(f"tasks.{name}.chip_dir", f"{rel!r} holds none of the checkpoint's files")


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the record itself (minus this field), so edits to chiptuning.json show too."""
    return canonical_hash({k: v for k, v in record.items() if k != "record_sha256"})


def write_provenance(root: Path, record: CheckpointRecord | dict[str, Any], record_file: str = PROVENANCE_FILE):
    """Stamp ``record`` (typed, or a checkpoint record's JSON) with the version, ``root``'s checksums and
    its own hash; write it there as ``record_file``, last."""
    checksums = written_files(Path(root), record_file)
    if isinstance(record, dict):
        record = CheckpointRecord.from_dict(dict(record, checksums=checksums), "checkpoint record")
    record = dataclasses.replace(record, chiptuning_version=__version__, checksums=checksums, record_sha256=None)
    data = record.to_dict()
    record.record_sha256 = data["record_sha256"] = record_hash(data)
    write_json_atomic(Path(root) / record_file, data)
    return record


def read_provenance(root: str | Path) -> dict[str, Any]:
    """``chiptuning.json`` as stored, its format and version checked; ProvenanceError if not a checkpoint's."""
    root, path = Path(root), Path(root) / PROVENANCE_FILE
    hint = "give a pruned checkpoint written by `chiptuning prune`"
    if not root.is_dir():
        raise ProvenanceError(f"{root} is not a directory; {hint}" if root.exists() else
                              f"{root}: no such directory; {hint}")
    if not path.is_file():
        raise ProvenanceError(
            f"{root} has no {PROVENANCE_FILE}: not a chip-tuning checkpoint (write one with `chiptuning prune`)")
    record = read_json(path, ProvenanceError)
    if not isinstance(record, dict) or record.get("format") != CheckpointRecord.FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ProvenanceError(f"{path} is not a chip-tuning pruned checkpoint record (format {found!r})")
    version = record.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CheckpointRecord.VERSION:
        raise ProvenanceError(f"{path}: format_version {version!r} is not one this chip-tuning reads "
                              f"(1..{CheckpointRecord.VERSION}); upgrade chip-tuning")
    return record


def load_record(root: str | Path) -> CheckpointRecord:
    """Read, verify (:func:`verify_checksums`) and type a checkpoint's record; ProvenanceError if any fails."""
    raw = read_provenance(root)
    verify_checksums(root, raw)
    return CheckpointRecord.from_dict(raw, str(Path(root) / PROVENANCE_FILE), file=True)


def unrecorded_files(root: Path, recorded: dict[str, Any], record_file: str = PROVENANCE_FILE) -> list[str]:
    """Files under ``root`` its record does not list (but itself and :data:`INERT` ones), and any link."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_dir = Path(folder).relative_to(root)
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(folder, d)))]:
            rel = (rel_dir / name).as_posix()
            inert = rel == record_file or any(fnmatch.fnmatchcase(rel, p) for p in INERT)
            if not inert and (rel not in recorded or os.path.islink(os.path.join(folder, name))):
                found.append(rel)
    return sorted(found)


def verify_checksums(root: str | Path, record: dict[str, Any], record_file: str = PROVENANCE_FILE) -> None:
    """ProvenanceError, naming the first culprit, unless ``root`` is exactly what was pruned: ``record`` (as
    stored in ``record_file``) and every file it lists unchanged, no other file, none :data:`NEVER_WRITTEN`."""
    root = Path(root)
    rerun = "refusing to load it, re-run `chiptuning prune` to rebuild the checkpoint"
    if record.get("record_sha256") != record_hash(record):
        raise ProvenanceError(f"{root}: {record_file} was modified after pruning (its own checksum does not "
                              f"match); {rerun}")
    expected = record.get("checksums")
    if not isinstance(expected, dict) or not expected:
        raise ProvenanceError(f"{root}/{record_file} records no checksums; re-run `chiptuning prune`")
    if unrecorded := unrecorded_files(root, expected, record_file):
        shown = ", ".join(unrecorded[:3]) + (", ..." if len(unrecorded) > 3 else "")
        raise ProvenanceError(f"{root}: {shown} {'is' if len(unrecorded) == 1 else 'are'} not among the files "
                              f"{record_file} records; a checkpoint is exactly what was pruned (transformers could "
                              "act on anything else): remove it, or re-run `chiptuning prune`")
    for rel, digest in sorted(expected.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ProvenanceError(f"{root}: {record_file} lists {rel!r}, a path outside the checkpoint")
        if any(fnmatch.fnmatchcase(Path(rel).name, p) for p in NEVER_WRITTEN):
            raise ProvenanceError(f"{root}: {rel} is a file chip-tuning never writes into a checkpoint (transformers "
                                  "would act on it); refusing the checkpoint")
        if not (root / rel).is_file():
            raise ProvenanceError(f"{root}: file {rel} listed in {record_file} is missing; re-run `chiptuning prune`")
        if sha256_file(root / rel) != digest:
            raise ProvenanceError(f"{root}: file {rel} was modified after pruning (checksum mismatch); {rerun}")


def other_weights(then: str | None, now: str | None) -> bool:
    """Whether two weights hashes (:func:`~chiptuning.models.weights_hash`, ``kind:digest``) are of one
    kind and differ: then they name other weights (hashes of two kinds cannot be compared)."""
    return bool(then and now and then.split(":")[0] == now.split(":")[0] and then != now)


def check_model_matches_cache(model_id: str, model_hash: str, config, cache_meta: CacheMeta | dict[str, Any],
                              adapter: str | None = None, what: str = "chips") -> None:
    """ProvenanceError ("cache from another model") unless the model (``model_id``, its weights hash and
    full config, the ``adapter`` merged now) is the one ``what`` were trained on: model type, depth, width
    and adapter as in the cache's meta, and weights hash too when both are of the same kind (else a warning)."""
    meta = cache_meta if isinstance(cache_meta, CacheMeta) else CacheMeta.from_dict(cache_meta, "cache meta")

    def refuse(detail: str) -> None:
        raise ProvenanceError(f"{what} were trained on a cache from another model: {detail} (cache model "
                              f"{meta.model!r}, given {model_id!r}); prune the model the cache was extracted from, "
                              "or re-extract and re-train the chips")

    facts = {"model_type": getattr(config, "model_type", None), "num_blocks": num_blocks(config),
             "hidden_size": int(text_config(config).hidden_size)}
    for key, value in facts.items():
        if getattr(meta, key) is not None and getattr(meta, key) != value:
            refuse(f"{key} {getattr(meta, key)!r} in the cache, {value!r} in the model")
    if meta.model_hash and model_hash and meta.model_hash != model_hash:
        if other_weights(meta.model_hash, model_hash) and meta.model_hash.split(":")[0] != "unknown":
            refuse(f"weights hash {meta.model_hash} in the cache, {model_hash} now")
        log.warning("cannot compare weights of %s (%s) with the cache's %s (%s); checked the architecture only",
                    model_id, model_hash, meta.model, meta.model_hash)
    # Adapter paths are recorded as given (relative to wherever extract ran): compare directory names.
    then, now = (Path(str(a).rstrip("/")).name if a else None for a in (meta.adapter, adapter))
    if then != now:
        refuse(f"adapter {meta.adapter!r} in the cache, {adapter!r} now (--adapter)")

__getattr__ = renamed(__name__, {"TaskEntry": "TaskRecord"}, globals())
