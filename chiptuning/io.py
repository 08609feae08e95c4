"""File helpers every stage shares: atomic JSON, hashing, JSON records.

Light on purpose (standard library only): the cache stage, which may not import torch,
uses it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def json_default(value: Any) -> Any:
    """JSON for the values records hold besides plain JSON: numpy (and torch) scalars and arrays
    through their ``tolist()``, paths as text; anything else as its ``str``."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def dumps(obj: Any) -> str:
    """Sorted, indented JSON with a final newline (every record this project writes)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as sorted, indented JSON to a temporary name and rename it into place, so a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(dumps(obj), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave the old file, and no half-written one
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` with plain file I/O (a full disk is one ``OSError``, ENOSPC);
    a partly written file is removed."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def canonical_hash(obj: Any, length: int | None = None) -> str:
    """sha256 of ``obj`` as compact sorted JSON (hex, cut to ``length`` characters when given)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return digest[:length] if length else digest


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["canonical_hash", "dumps", "json_default", "sha256_file", "write_bytes", "write_json_atomic"]
