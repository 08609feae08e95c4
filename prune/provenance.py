"""Provenance of a pruned checkpoint: where it came from and proof that nothing changed since.

``chiptuning.json`` in a pruned directory records the base model (id + weights hash), the layer,
the task each chip serves (template, label names, cache fingerprint and meta, chips config) and a
sha256 of every file written next to it. :func:`verify_checksums` refuses a directory whose files
were edited; :func:`check_model_matches_cache` refuses to prune a model with chips trained on
another model's cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from chiptuning.cache import sha256_file, write_json_atomic

from chiptuning import __version__
from chiptuning.errors import ProvenanceError

log = logging.getLogger(__name__)

PROVENANCE_FILE = "chiptuning.json"
FORMAT = "chiptuning-pruned"
FORMAT_VERSION = 1


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
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_provenance(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``record`` with the format, version and checksums of ``root`` and write it (last)."""
    record = {
        **record,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "chiptuning_version": __version__,
        "checksums": file_checksums(root),
    }
    record["record_sha256"] = record_hash(record)
    write_json_atomic(Path(root) / PROVENANCE_FILE, record)
    return record


def read_provenance(root: str | Path) -> dict[str, Any]:
    """Read ``chiptuning.json``; ProvenanceError if it is missing or not a pruned checkpoint."""
    path = Path(root) / PROVENANCE_FILE
    if not Path(root).is_dir():
        raise ProvenanceError(f"{root} is not a directory; give a pruned checkpoint written by `chiptuning prune`")
    if not path.is_file():
        raise ProvenanceError(
            f"{root} has no {PROVENANCE_FILE}: not a chip-tuning checkpoint (write one with `chiptuning prune`)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ProvenanceError(f"{path} is not valid JSON ({err.msg}); the checkpoint is damaged") from None
    if record.get("format") != FORMAT:
        raise ProvenanceError(f"{path} is not a chip-tuning pruned checkpoint record (format {record.get('format')!r})")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise ProvenanceError(
            f"{root} was written by a newer chip-tuning (format {record['format_version']}); upgrade chip-tuning"
        )
    return record


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


def check_model_matches_cache(model_id: str, model_hash: str, config, cache_meta: dict[str, Any],
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
    from chiptuning.registry import num_blocks, text_config

    def refuse(detail: str) -> None:
        raise ProvenanceError(
            f"{what} were trained on a cache from another model: {detail} "
            f"(cache model {cache_meta.get('model')!r}, given {model_id!r}); "
            "prune the model the cache was extracted from, or re-extract and re-train the chips"
        )

    text = text_config(config)
    facts = {
        "model_type": getattr(config, "model_type", None),
        "num_blocks": num_blocks(config),
        "hidden_size": int(text.hidden_size),
    }
    for key, value in facts.items():
        recorded = cache_meta.get(key)
        if recorded is not None and recorded != value:
            refuse(f"{key} {recorded!r} in the cache, {value!r} in the model")
    recorded_hash = cache_meta.get("model_hash")
    if recorded_hash and model_hash and recorded_hash != model_hash:
        kind_then, kind_now = recorded_hash.split(":", 1)[0], model_hash.split(":", 1)[0]
        if kind_then == kind_now and kind_then != "unknown":
            refuse(f"weights hash {recorded_hash} in the cache, {model_hash} now")
        log.warning(
            "cannot compare weights of %s (%s) with the cache's %s (%s); checked the architecture only",
            model_id, model_hash, cache_meta.get("model"), recorded_hash,
        )
    if _adapter_name(cache_meta.get("adapter")) != _adapter_name(adapter):
        refuse(f"adapter {cache_meta.get('adapter')!r} in the cache, {adapter!r} now (--adapter)")
