"""Output directories a command owns: written beside and renamed into place, never foreign.

A directory is a command's own when it holds the command's record (:data:`KINDS`); any other
non-empty directory is refused. A file there is the command's only when a record lists it with
its sha256 and it still has that content; anything else is never deleted or replaced (the command
refuses, naming it). A result is written into a marked temporary sibling and renamed into place
(an own finished result is replaced only with ``overwrite``); temporaries of a process that is
gone are removed, and only those whose marker names them. Resumable outputs (a cache, compare,
run) are written in place. Everything written gets the permissions the umask gives.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from chiptuning.errors import ChipTuningError
from chiptuning.io import file_checksums, sha256_file
from chiptuning.records import read_json

log = logging.getLogger(__name__)

#: A temporary holds this file, naming the temporary: the proof that it is one.
MARKER = ".chiptuning-temporary"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class OutputKind:
    """What one command (``command``) writes into its output directory (called ``what`` in messages).

    ``record`` marks the directory as the command's when its "format" is one of ``formats`` (or,
    without one, it has every key of ``legacy_keys``); its key ``listed`` lists every other file the
    command wrote with its sha256. ``companions``: records a later command writes there, as (file,
    format, listed key). ``also``: globs of other files marking the directory as this kind's.
    ``resumable``: written in place and resumed by a re-run (no ``--overwrite``).
    """

    what: str
    command: str
    record: str
    formats: tuple[str, ...]
    legacy_keys: tuple[str, ...] = ()
    listed: str | None = None
    companions: tuple[tuple[str, str, str], ...] = ()
    resumable: bool = False
    also: tuple[str, ...] = ()

    def recognises(self, record: Any) -> bool:
        """Whether a parsed record is this kind's."""
        if not isinstance(record, dict):
            return False
        if "format" in record:
            return record["format"] in self.formats
        return bool(self.legacy_keys) and all(key in record for key in self.legacy_keys)

    def own_files(self, root: Path, record: dict) -> set[str]:
        """The files under ``root`` (relative POSIX paths) the command can prove it wrote: its
        record, and every file a record there lists that still has the listed sha256."""
        owned = {self.record}
        marker = _SIBLING.match(read_text(root / MARKER))
        if marker and marker["name"] == root.name:  # left by a rename cut short: names our temporary
            owned.add(MARKER)
        listings = [record.get(self.listed) if self.listed else None]
        for name, fmt, key in self.companions:
            companion = read_record_json(root / name)
            if isinstance(companion, dict) and companion.get("format") == fmt:
                owned.add(name)
                listings.append(companion.get(key))
        for listed in listings:
            if isinstance(listed, dict):
                owned.update(rel for rel, digest in listed.items()
                             if isinstance(rel, str) and is_unchanged(root, rel, digest))
        return owned


def read_text(path: Path, limit: int = 4096) -> str:
    """The start of a small text file, stripped ("" when it is missing, a link or unreadable)."""
    try:
        if path.is_symlink() or not path.is_file():
            return ""
        with open(path, encoding="utf-8") as f:
            return f.read(limit).strip()
    except (OSError, UnicodeDecodeError):
        return ""


def read_record_json(path: Path) -> Any:
    """A JSON file's content (:func:`chiptuning.records.read_json`), or None for a link or a file
    that is not one; only to recognise whose a directory is."""
    try:
        return None if path.is_symlink() else read_json(path)
    except ChipTuningError:
        return None


def is_unchanged(root: Path, rel: str, digest: Any) -> bool:
    """Whether ``root / rel`` is a plain file inside ``root`` whose sha256 is ``digest``."""
    if not isinstance(digest, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    path = root / rel
    if path.is_symlink() or not path.is_file():
        return False
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns) == digest


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # keyed by size and modification time too: a changed file is hashed again


CACHE = OutputKind("feature cache", "chiptuning extract", "manifest.json", ("chiptuning-cache",), resumable=True,
                   also=("manifest.rank*.json",))
SELECTION_RECORD = ("selection.json", "chiptuning-selection", "files")
CHIPS = OutputKind("chips directory", "chiptuning probe train", "chips.json", ("chiptuning-chips",),
                   listed="files", companions=(SELECTION_RECORD,))
SWEEP = OutputKind("sweep directory", "chiptuning probe sweep", "sweep.json", ("chiptuning-sweep",),
                   legacy_keys=("rows", "best", "best_command"), listed="files")
PRUNED = OutputKind("pruned checkpoint", "chiptuning prune", "chiptuning.json", ("chiptuning-pruned",),
                    listed="checksums")
DEPTH_PRUNED = OutputKind("depth-pruned checkpoint", "chiptuning baseline", "pruning.json",
                          ("chiptuning-depth-pruned",), listed="checksums")
EVAL = OutputKind("eval directory", "chiptuning eval", "metrics.json", ("chiptuning-eval",),
                  legacy_keys=("accuracy", "checkpoint", "n_examples"), listed="files")
COMPARE = OutputKind("compare directory", "chiptuning compare", "compare.json", ("chiptuning-compare",),
                     legacy_keys=("rows", "targets", "model"), resumable=True)
RUN = OutputKind("run directory", "chiptuning run", "run.json", ("chiptuning-run",),
                 legacy_keys=("paths", "timings", "layer_curve"), resumable=True)
#: Every kind, to name what a refused directory holds.
KINDS = (CACHE, CHIPS, SWEEP, PRUNED, DEPTH_PRUNED, EVAL, COMPARE, RUN)


# -- temporaries ----------------------------------------------------------------------------------

def _host() -> str:
    """A short tag of this machine (temporaries on a shared filesystem name their host)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _sibling_name(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def mark(directory: Path, name: str) -> None:
    """Write the marker that proves ``directory`` a temporary named ``name``."""
    with open(directory / MARKER, "x", encoding="utf-8") as f:
        f.write(name + "\n")


def sibling_dir(target: Path, tag: str = "tmp") -> Path:
    """Create a marked temporary ``.NAME.<tag>-<host>-<pid>-<random>`` beside ``target``."""
    target = Path(target)
    path = target.parent / _sibling_name(target, tag)
    path.mkdir()
    mark(path, path.name)
    return path


def clean_stale(target: Path) -> None:
    """Remove the marked temporaries beside ``target`` whose process on this host is gone; the
    old result of an interrupted replacement is put back first, never lost."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != target.name:
            continue
        if entry.is_symlink() or not entry.is_dir() or read_text(entry / MARKER) != entry.name:
            continue  # only a folder whose marker names it is a temporary
        if match["host"] != _host() or pid_alive(int(match["pid"])):
            continue  # another live writer's (or another machine's)
        if match["tag"] == "old" and not target.exists():
            log.warning("restoring %s from %s (a replacement was interrupted)", target, entry.name)
            (entry / MARKER).unlink()
            os.rename(entry, target)
            continue
        log.info("removing %s, left by an interrupted run", entry)
        shutil.rmtree(entry, ignore_errors=True)


def normal_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions the umask gives new files."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask, follow_symlinks=False)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


# -- is this directory ours? ----------------------------------------------------------------------

def own_record(path: Path, kind: OutputKind) -> dict | None:
    """The record that makes ``path`` a ``kind`` output, or None."""
    for name in [kind.record, *sorted(p.name for pattern in kind.also for p in path.glob(pattern))]:
        record = read_record_json(path / name)
        if kind.recognises(record):
            return record
    return None


def _a(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


def describe(path: Path) -> str:
    """What a directory holds, for messages: "a chips directory (chips.json)" or its first entries."""
    for kind in KINDS:
        if own_record(path, kind) is not None:
            return f"{_a(kind.what)} ({kind.record})"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def foreign_entries(path: Path, kind: OutputKind, record: dict) -> list[str]:
    """Top-level names under ``path`` holding anything the command cannot prove it wrote (files no
    record lists, changed files, links, empty folders), sorted."""
    owned = kind.own_files(path, record)
    found: set[str] = set()
    for folder, dirs, files in os.walk(path):
        rel_dir = Path(folder).relative_to(path)
        names = list(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        if not files and not dirs and rel_dir.parts:
            names = [""]  # an empty folder the command did not make
        for name in names:
            rel = (rel_dir / name).as_posix() if name else rel_dir.as_posix()
            if rel not in owned:
                top = Path(rel).parts[0]
                found.add(top + ("/" if (path / top).is_dir() and not (path / top).is_symlink() else ""))
    return sorted(found)


def check_output(path: str | Path, kind: OutputKind, *, overwrite: bool = False) -> bool:
    """Whether ``path`` already holds a result of ``kind``; ChipTuningError unless it is new, empty
    or the command's own (no file the command did not write, ``overwrite`` for a finished one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChipTuningError(f"--out {path} is a file, not a directory; choose a directory for the {kind.what}")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    record = own_record(path, kind)
    if record is None:
        raise ChipTuningError(f"--out {path} is not empty and is not {_a(kind.what)} (it holds {describe(path)}); "
                              "choose a new or empty directory")
    foreign = [] if kind.resumable else foreign_entries(path, kind, record)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ChipTuningError(f"--out {path} holds files `{kind.command}` did not write ({shown}); they are "
                              "never deleted: move them elsewhere or choose another --out (nothing was changed)")
    if not kind.resumable and not overwrite:
        raise ChipTuningError(f"--out {path} already holds {_a(kind.what)}; pass --overwrite to replace it, "
                              "or choose another --out")
    return True


def claim_output(path: str | Path, kind: OutputKind) -> Path:
    """Check a resumable output, remove stale temporaries beside it and create it (written in place)."""
    path = Path(path)
    check_output(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def write_output(path: str | Path, kind: OutputKind, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` to fill; on success it replaces ``path``, on any
    error or interruption it is removed and ``path`` is untouched (:func:`check_output` is
    checked before and after writing)."""
    path = Path(path)
    check_output(path, kind, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = sibling_dir(path)
    try:
        yield tmp
        normal_permissions(tmp)
        replace_dir(tmp, path, lambda: check_output(path, kind, overwrite=overwrite))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, target: Path, recheck=None) -> None:
    """Rename the finished ``tmp`` to ``target``; an existing ``target`` is marked and moved aside
    first (``recheck()`` runs just before, to refuse one that changed) and removed after."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.is_dir():
            target.rmdir()
        finish_dir(tmp, target)
        return
    if recheck is not None:
        recheck()
    old = target.parent / _sibling_name(target, "old")
    mark(target, old.name)  # what proves the folder aside ours, should this process die now
    try:
        os.rename(target, old)
    except BaseException:
        (target / MARKER).unlink(missing_ok=True)
        raise
    try:
        finish_dir(tmp, target)
    except BaseException:
        os.rename(old, target)
        (target / MARKER).unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def written_files(tmp: Path, record: str) -> dict[str, str]:
    """Every file written into ``tmp`` so far but ``record`` and the marker, with its sha256."""
    return file_checksums(tmp, exclude=(record, MARKER))


def finish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished temporary ``tmp`` to ``target`` (which must not exist) and drop its marker."""
    os.rename(tmp, target)
    (target / MARKER).unlink(missing_ok=True)


# -- one writer at a time -------------------------------------------------------------------------

class DirLock:
    """An exclusive lock on the file ``name`` in ``directory`` (:class:`filelock.FileLock`: released
    by the kernel when its holder dies). The holder's pid is kept beside it (``name.pid``) for a
    refusal to name; held until ``release`` (which removes both), even when the object is dropped."""

    _held: set[DirLock] = set()

    def __init__(self, directory: str | Path, name: str = ".lock") -> None:
        self.path = Path(directory) / name
        self.pid_file = self.path.with_name(name + ".pid")
        self._lock = FileLock(self.path, timeout=0, thread_local=False)

    def acquire(self) -> DirLock:
        try:
            self._lock.acquire()
        except Timeout:
            pid = read_text(self.pid_file, 32)
            holder = f" (pid {pid})" if pid.isdigit() else ""
            raise ChipTuningError(f"{self.path.parent} is being written by another process{holder}; wait for it "
                                  "to finish") from None
        self.pid_file.write_text(f"{os.getpid()}\n")
        DirLock._held.add(self)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.pid_file.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            self._lock.release()
        DirLock._held.discard(self)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["CACHE", "CHIPS", "COMPARE", "DEPTH_PRUNED", "EVAL", "KINDS", "MARKER", "PRUNED", "RUN", "SWEEP", "DirLock",
           "OutputKind", "check_output", "claim_output", "clean_stale", "describe", "finish_dir", "foreign_entries",
           "is_unchanged", "mark", "normal_permissions", "own_record", "pid_alive", "read_record_json",
           "read_text", "replace_dir", "sibling_dir", "write_output", "written_files"]
