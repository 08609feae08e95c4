"""File helpers every stage shares: atomic JSON, hashing, plain byte writes (standard library only)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def json_default(value: Any) -> Any:
    """JSON for numpy (and torch) values (their ``tolist()``), paths and anything else (its ``str``)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def dumps(obj: Any) -> str:
    """Sorted, indented JSON with a final newline (every record this project writes)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"


def temporary_name(path: Path) -> Path:
    """A fresh name beside ``path``: ``.STEM.tmp-<pid>-<random>.SUFFIX`` (the suffix kept: writers
    such as matplotlib choose the format from it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as :func:`dumps` JSON to a fresh temporary name (created exclusively) and rename
    it into place: a reader never sees half a file."""
    path = Path(path)
    text = dumps(obj)
    tmp, created = temporary_name(path), False
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            created = True
            f.write(text)
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave the old file, and no half-written one
        if created:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` (a full disk is one ``OSError``); a partly written file is removed."""
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


def check_regular(path: str | Path) -> None:
    """OSError unless ``path`` is a regular file (or a link to one): reading a pipe blocks until a
    writer comes, reading a device such as /dev/zero never ends."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a pipe, a device or a directory)", str(path))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a regular file's bytes (:func:`check_regular`), read in 1 MiB blocks."""
    check_regular(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` but ``exclude`` (relative POSIX path -> hex digest), sorted."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): sha256_file(path)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
            if path.relative_to(root).as_posix() not in exclude}


__all__ = ["canonical_hash", "check_regular", "dumps", "file_checksums", "json_default", "sha256_file", "temporary_name", "write_bytes",
           "write_json_atomic"]
