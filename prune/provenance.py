"""Provenance of a pruned checkpoint: where it came from and proof that nothing changed since.

``chiptuning.json`` in a pruned directory records the base model (id + weights hash), the layer,
the task each chip serves (template, label names, cache fingerprint and meta, chips config) and a
sha256 of every file written next to it. :func:`verify_checksums` refuses a directory whose files
were edited; :func:`check_model_matches_cache` refuses to prune a model with chips trained on
another model's cache.
"""

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
from chiptuning.errors import ProvenanceError
from chiptuning.io import canonical_hash, sha256_file, write_json_atomic
from chiptuning.outputs import written_files
from chiptuning.probe import ChipsRecord, MetricRow, Simulated
from chiptuning.records import Invalid, Record, read_json, rule
from chiptuning.registry import num_blocks, text_config

log = logging.getLogger(__name__)

PROVENANCE_FILE = "chiptuning.json"
FORMAT = "chiptuning-pruned"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Files a checkpoint may hold without a record of them: what git and the hub's downloader leave
#: beside a model, which neither chip-tuning nor transformers reads.
INERT = (".gitattributes", ".git/*", ".cache/huggingface/*", ".DS_Store", "*/.DS_Store")
#: Files chip-tuning never writes into a checkpoint and transformers would act on (an adapter it
#: applies, code, pickled or other framework weights): refused even when a record lists them.
NEVER_WRITTEN = ("adapter_config.json", "adapter_model.*", "*.py", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.ckpt.*",
                 "*.h5", "*.msgpack", "*.pkl", "*.pickle")


def inside(rel: str, where: str) -> str:
    """A path a record names inside the checkpoint; :class:`Invalid` if it points outside."""
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or "\\" in rel:
        raise Invalid(where, f"{rel!r} points outside the checkpoint")
    return rel


# -- the record -----------------------------------------------------------------------------------

@dataclass
class BaseModel(Record):
    """The full model a checkpoint was pruned from."""

    ERROR = ProvenanceError

    id: str
    model_type: str
    num_blocks: int = rule(ge=1)
    hash: str | None = None
    hidden_size: int | None = rule(None, ge=1)
    adapter: str | None = None
    source: dict[str, Any] | None = rule(None, omit_none=True)  # a GGUF file: name, sha256, architecture, quantization


@dataclass
class CascadeExit(Record):
    """One exit of a checkpoint's early-exit cascade: its layer, threshold and chip directory."""

    ERROR = ProvenanceError

    layer: int = rule(ge=1)
    threshold: float = rule(ge=0, le=1)
    chip_dir: str = ""

    def check(self) -> None:
        inside(self.chip_dir, "chip_dir")


@dataclass
class CascadeEntry(Record):
    """A task's early-exit cascade in a checkpoint (``select --strategy cascade:DELTA``)."""

    ERROR = ProvenanceError

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
class TaskEntry(Record):
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
        cascade: an early-exit cascade (its exits, ascending; the last is this entry's own chip),
            or None for a single chip.
    """

    ERROR = ProvenanceError

    chip_dir: str
    layer: int = rule(ge=1)
    label_names: list[str] = field(default_factory=list)
    strategy: str = ""
    feature_mode: Literal["raw", "normed"] = "raw"
    task: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    text_column: str | None = None
    cache_fingerprint: str | None = None
    cache_meta: CacheMeta = field(default_factory=CacheMeta)
    chips: ChipsRecord | None = rule(None, key="chips_config")
    chip_metrics: MetricRow | None = None
    cascade: CascadeEntry | None = rule(None, omit_none=True)

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
class TokenizerSettings(Record):
    """How prompts are tokenized (as for the cache)."""

    padding_side: Literal["left", "right"] = "right"
    max_length: int | None = rule(None, ge=1)


@dataclass
class PruneParams(Record):
    """Parameter counts before and after pruning, what was removed, the pruning ratio."""

    ERROR = ProvenanceError

    before: dict[str, Any]
    after: dict[str, Any]
    pruning_ratio: float = rule(ge=0, le=1)
    removed: dict[str, int] = rule(default_factory=dict, ge=0)

    def check(self) -> None:
        check_model_stats(self.before, None, "before")


@dataclass
class CheckpointRecord(Record):
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
        tokenizer: how prompts are tokenized (``padding_side``, ``max_length``).
        default_task: the task ``predict`` uses when none is named.
        tasks: task name -> :class:`TaskEntry`.
        params: parameter counts before and after, what was removed, the pruning ratio.
        images: layer-curve images in the checkpoint.
        checksums: sha256 of every file written (relative path -> hex): the checkpoint is exactly
            these files (besides this record).
        record_sha256: sha256 of this record itself.
        chiptuning_version: the version that wrote it.
    """

    FORMAT = FORMAT
    VERSION = FORMAT_VERSION
    ERROR = ProvenanceError

    base_model: BaseModel
    layer: int = rule(ge=1)
    num_blocks: int = rule(ge=1)
    default_task: str = ""
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    params: PruneParams | None = None
    architecture: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    feature_mode: Literal["raw", "normed"] = "raw"
    keep_lm_head: bool = False
    export: Literal["sequence-classification"] | None = None
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    images: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
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
        deepest = max(max(e.layer for e in (t.cascade.exits if t.cascade else [])) if t.cascade else t.layer
                      for t in self.tasks.values())
        if deepest != self.layer:
            raise Invalid("layer", f"{self.layer} is not the deepest chip's layer ({deepest})")
        for rel, digest in self.checksums.items():
            inside(rel, "checksums")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise Invalid(f"checksums.{rel}", "is not a sha256 (64 hex digits)")
        for image in self.images:
            if image not in self.checksums:
                raise Invalid("images", f"{image!r} is not among the checkpoint's files")
        for name, task in self.tasks.items():
            for rel in task.chip_dirs():
                if not any(path.startswith(rel.rstrip("/") + "/") for path in self.checksums):
                    raise Invalid(f"tasks.{name}.chip_dir", f"{rel!r} holds none of the checkpoint's files")


# -- files and checksums --------------------------------------------------------------------------

def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the record itself (minus this field), so edits to chiptuning.json show too."""
    return canonical_hash({k: v for k, v in record.items() if k != "record_sha256"})


def write_provenance(root: Path, record: CheckpointRecord | dict[str, Any]) -> CheckpointRecord:
    """Stamp ``record`` (typed, or its JSON) with the version and the checksums of ``root`` and
    write it (last)."""
    if isinstance(record, dict):
        record = CheckpointRecord.from_dict(dict(record, checksums=written_files(Path(root), PROVENANCE_FILE)),
                                            "checkpoint record")
    record = dataclasses.replace(record, chiptuning_version=__version__,
                                 checksums=written_files(Path(root), PROVENANCE_FILE), record_sha256=None)
    data = record.to_dict()
    record.record_sha256 = data["record_sha256"] = record_hash(data)
    write_json_atomic(Path(root) / PROVENANCE_FILE, data)
    return record


def read_provenance(root: str | Path) -> dict[str, Any]:
    """``chiptuning.json`` as stored (the JSON object), its format and version checked;
    ProvenanceError if it is missing or not a pruned checkpoint's. :func:`load_record` also
    verifies and types it."""
    root = Path(root)
    path = root / PROVENANCE_FILE
    if not root.exists():
        raise ProvenanceError(f"{root}: no such directory; give a pruned checkpoint written by `chiptuning prune`")
    if not root.is_dir():
        raise ProvenanceError(f"{root} is not a directory; give a pruned checkpoint written by `chiptuning prune`")
    if not path.is_file():
        raise ProvenanceError(
            f"{root} has no {PROVENANCE_FILE}: not a chip-tuning checkpoint (write one with `chiptuning prune`)"
        )
    record = read_json(path, ProvenanceError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ProvenanceError(f"{path} is not a chip-tuning pruned checkpoint record (format {found!r})")
    version = record.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ProvenanceError(f"{path}: format_version {version!r} is not one this chip-tuning reads "
                              f"(1..{FORMAT_VERSION}); upgrade chip-tuning")
    return record


def load_record(root: str | Path) -> CheckpointRecord:
    """Read, verify (the directory holds exactly the recorded files, each with its sha256, and the
    record its own) and type a checkpoint's record.

    Raises:
        ProvenanceError: not a checkpoint, edited, missing or unrecorded files, a malformed record.
    """
    raw = read_provenance(root)
    verify_checksums(root, raw)
    return CheckpointRecord.from_dict(raw, str(Path(root) / PROVENANCE_FILE), file=True)


def unrecorded_files(root: Path, recorded: dict[str, Any], record_file: str = PROVENANCE_FILE) -> list[str]:
    """Files under ``root`` that the record does not list (besides the record itself and the
    :data:`INERT` ones), and links, which a checkpoint never holds."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_dir = Path(folder).relative_to(root)
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(folder, d)))]:
            rel = (rel_dir / name).as_posix()
            if rel == record_file or any(fnmatch.fnmatchcase(rel, p) for p in INERT):
                continue
            if rel not in recorded or os.path.islink(os.path.join(folder, name)):
                found.append(rel)
    return sorted(found)


def verify_checksums(root: str | Path, record: dict[str, Any], record_file: str = PROVENANCE_FILE) -> None:
    """Refuse a checkpoint that is not exactly what was pruned: a record edited after pruning, a
    recorded file missing or changed, a file the record does not list (transformers could act on
    it: an adapter, extra weights, code), or a file chip-tuning never writes (:data:`NEVER_WRITTEN`).

    Args:
        root: the checkpoint.
        record: its record as stored (``chiptuning.json``, or a depth-pruned one's ``pruning.json``).
        record_file: the record's file name.

    Raises:
        ProvenanceError: naming the first such file.
    """
    root = Path(root)
    if record.get("record_sha256") != record_hash(record):
        raise ProvenanceError(
            f"{root}: {record_file} was modified after pruning (its own checksum does not match); "
            "refusing to load it, re-run `chiptuning prune` to rebuild the checkpoint"
        )
    expected = record.get("checksums")
    if not isinstance(expected, dict) or not expected:
        raise ProvenanceError(f"{root}/{record_file} records no checksums; re-run `chiptuning prune`")
    extra = unrecorded_files(root, expected, record_file)
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise ProvenanceError(f"{root}: {shown} {'is' if len(extra) == 1 else 'are'} not among the files "
                              f"{record_file} records; a checkpoint is exactly what was pruned (transformers could "
                              "act on anything else): remove it, or re-run `chiptuning prune`")
    for rel, digest in sorted(expected.items()):
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ProvenanceError(f"{root}: {record_file} lists {rel!r}, a path outside the checkpoint")
        if any(fnmatch.fnmatchcase(Path(rel).name, p) for p in NEVER_WRITTEN) and not rel.endswith("chip.joblib"):
            raise ProvenanceError(f"{root}: {rel} is a file chip-tuning never writes into a checkpoint (transformers "
                                  "would act on it); refusing the checkpoint")
        path = root / rel
        if not path.is_file():
            raise ProvenanceError(f"{root}: file {rel} listed in {record_file} is missing; re-run `chiptuning prune`")
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
    meta = cache_meta if isinstance(cache_meta, CacheMeta) else CacheMeta.from_dict(cache_meta, "cache meta")

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
