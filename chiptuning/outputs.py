"""Output directories a command owns: written beside and renamed into place, never foreign.

Every command that writes a directory (extract, probe train / sweep, prune with any method,
eval, compare, run) goes through this module, so one set of rules holds everywhere:

* a directory is the command's own when it holds the command's record (``chips.json``,
  ``chiptuning.json``, ...; the table :data:`KINDS`), else a non-empty directory is foreign and
  refused before any work is done;
* a file in an own directory is the command's only when a record there lists it with its sha256
  and the file still has that content (the proof it wrote it); anything else (a ``NOTES.txt``, a
  subfolder, a listed file the user edited) is never deleted or replaced: the command refuses and
  names it;
* a result is written into a temporary sibling (``.OUT.tmp-<host>-<pid>-<random>``, holding a
  marker file that names it) and renamed into place; an own finished result is replaced only with
  ``overwrite`` (``--overwrite``): the old directory is marked, renamed aside, the new one renamed
  in, the old one removed;
* temporaries left by a killed process (its pid is gone) are removed by the next run of any
  command writing there, and only those whose marker proves them a temporary: a folder whose name
  merely looks like one is left alone; an interrupted run (SIGINT, or SIGTERM through the CLI)
  removes its own on the way out;
* what is written gets the permissions the umask gives (no 0700 / 0600 from ``mkdtemp``).

Resumable outputs (a feature cache, ``compare``, ``run``) are written in place and recognised by
the same records; they never delete a file they did not write. :class:`DirLock` keeps a second
writer out of a cache (a lock file with the owner's pid and host; a lock whose process is gone is
stale and taken over).

Standard library only: the cache stage, which needs only numpy and h5py, uses it too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiptuning.errors import ChipTuningError
from chiptuning.io import file_checksums, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output directory.

    Attributes:
        what: how to call such a directory in messages ("chips directory").
        command: the command that writes it ("chiptuning probe train").
        record: the file that marks the directory as this command's (written last, or first
            for resumable outputs).
        formats: accepted values of the record's "format" key.
        legacy_keys: a record without "format" that has all these keys is accepted too (written
            before the record had a format); empty: "format" is required.
        listed: the key of the record that lists every other file the command wrote, with its
            sha256 (``{"chips.safetensors": "<hex>", ...}``): what proves a file is the command's.
        companions: other records a later command writes into the directory, as (file, format,
            listed key): ``select`` writes ``selection.json`` (listing ``report.md``, ...) into a
            chips directory. Their files are the directory's own too.
        also: glob patterns of other files that mark the directory as this kind's (the per-rank
            manifests of a data-parallel extraction).
        resumable: written in place and resumed by a re-run (a cache, compare, run) instead of
            written beside and renamed; a re-run never needs ``--overwrite``, and files the user
            added are left alone.
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
        record, and every file a record there lists whose content still has the listed sha256."""
        owned = {self.record}
        marker = _SIBLING.match(read_text(root / MARKER))
        if marker and marker["name"] == root.name:  # left by a rename cut short: names our temporary
            owned.add(MARKER)
        sources = [(record, self.listed)]
        for name, fmt, key in self.companions:
            companion = read_record_json(root / name)
            if isinstance(companion, dict) and companion.get("format") == fmt:
                owned.add(name)
                sources.append((companion, key))
        for data, key in sources:
            listed = data.get(key) if key else None
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
    """A small JSON file's content, or None when it is missing, unreadable, huge or not JSON (only
    to recognise whose a directory is; records are read through :mod:`chiptuning.records`)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
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
    # keyed by size and modification time too: a file changed since is hashed again
    return sha256_file(path)


#: A sibling temporary holds this file, naming the temporary: the proof that it is one.
MARKER = ".chiptuning-temporary"
CACHE = OutputKind("feature cache", "chiptuning extract", "manifest.json", ("chiptuning-cache",), resumable=True,
                   also=("manifest.rank*.json",))
SELECTION_RECORD = ("selection.json", "chiptuning-selection", "files")
CHIPS = OutputKind("chips directory", "chiptuning probe train", "chips.json", ("chiptuning-chips",),
                   listed="files", companions=(SELECTION_RECORD,))
SWEEP = OutputKind("sweep directory", "chiptuning probe sweep", "sweep.json", ("chiptuning-sweep",),
                   legacy_keys=("rows", "best", "best_command"), listed="files")
PRUNED = OutputKind("pruned checkpoint", "chiptuning prune", "chiptuning.json", ("chiptuning-pruned",),
                    listed="checksums")
DEPTH_PRUNED = OutputKind("depth-pruned checkpoint", "chiptuning prune --method", "pruning.json",
                          ("chiptuning-depth-pruned",), listed="checksums")
EVAL = OutputKind("eval directory", "chiptuning eval", "metrics.json", ("chiptuning-eval",),
                  legacy_keys=("accuracy", "checkpoint", "n_examples"), listed="files")
COMPARE = OutputKind("compare directory", "chiptuning compare", "compare.json", ("chiptuning-compare",),
                     legacy_keys=("rows", "targets", "model"), resumable=True)
RUN = OutputKind("run directory", "chiptuning run", "run.json", ("chiptuning-run",),
                 legacy_keys=("paths", "timings", "layer_curve"), resumable=True)
#: Every kind, to name what a refused directory holds.
KINDS = (CACHE, CHIPS, SWEEP, PRUNED, DEPTH_PRUNED, EVAL, COMPARE, RUN)


# -- who wrote a temporary ------------------------------------------------------------------------

def _host() -> str:
    """A short tag of this machine (temporaries and locks on a shared filesystem name their host)."""
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
        return True
    return True


_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+$")


def _sibling_name(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def mark(directory: Path, name: str) -> None:
    """Write the marker that proves ``directory`` a temporary named ``name`` of this module."""
    with open(directory / MARKER, "x", encoding="utf-8") as f:
        f.write(name + "\n")


def is_marked(directory: Path) -> bool:
    """Whether ``directory`` (not a link) holds a marker naming it: a temporary this module made."""
    return not directory.is_symlink() and directory.is_dir() and read_text(directory / MARKER) == directory.name


def sibling_dir(target: Path, tag: str = "tmp") -> Path:
    """Create ``.NAME.<tag>-<host>-<pid>-<random>`` beside ``target`` (umask permissions), marked as
    a temporary (:data:`MARKER`), and return it."""
    target = Path(target)
    path = target.parent / _sibling_name(target, tag)
    path.mkdir()
    mark(path, path.name)
    return path


def clean_stale(target: Path) -> None:
    """Remove the temporaries beside ``target`` whose process is gone (killed part-way): written
    results of an interrupted replacement are put back first, never lost. Only a folder whose
    marker names it is a temporary: one whose name merely looks like one is not touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != target.name or not is_marked(entry):
            continue
        if match["host"] != _host() or pid_alive(int(match["pid"])):
            continue  # another live writer's (or another machine's)
        if match["tag"] == "old" and not target.exists():
            log.warning("restoring %s from %s (a replacement was interrupted)", target, entry.name)
            (entry / MARKER).unlink()
            os.rename(entry, target)
            continue
        log.info("removing %s, left by an interrupted run", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions the umask gives new files."""
    mask = _umask()
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
    names = [kind.record, *sorted(p.name for pattern in kind.also for p in path.glob(pattern))]
    for name in names:
        if (path / name).is_file():
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
    """Top-level names under ``path`` holding anything the command cannot prove it wrote (sorted):
    files no record there lists, listed files whose content changed, links, empty folders."""
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
    """Refuse to write ``kind`` into ``path`` unless it is new, empty, or the command's own.

    Returns:
        Whether ``path`` already holds a result of this kind.

    Raises:
        ChipTuningError: a file; a non-empty directory of something else; an own directory
            holding files the command did not write; an own finished result without
            ``overwrite`` (not for resumable kinds).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChipTuningError(f"--out {path} is a file, not a directory; choose a directory for the {kind.what}")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    record = own_record(path, kind)
    if record is None:
        raise ChipTuningError(f"--out {path} is not empty and is not {_a(kind.what)} (it holds {describe(path)}); "
                              "choose a new or empty directory")
    extra = [] if kind.resumable else foreign_entries(path, kind, record)
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ChipTuningError(f"--out {path} holds files `{kind.command}` did not write ({shown}); they are "
                              "never deleted: move them elsewhere or choose another --out (nothing was changed)")
    if not kind.resumable and not overwrite:
        raise ChipTuningError(f"--out {path} already holds {_a(kind.what)}; pass --overwrite to replace it, "
                              "or choose another --out")
    return True


def claim_output(path: str | Path, kind: OutputKind) -> Path:
    """Check a resumable output (:func:`check_output`), remove stale temporaries beside it and
    create it: the command then writes in place."""
    path = Path(path)
    check_output(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def write_output(path: str | Path, kind: OutputKind, *, overwrite: bool = False) -> Iterator[Path]:
    """Write ``kind`` beside ``path`` and rename it into place.

    Yields the temporary directory to fill; on success it replaces ``path`` (an own result only
    with ``overwrite``: renamed aside, the new one renamed in, the old one removed); on any error
    or interruption the temporary is removed and ``path`` is untouched.

    Raises:
        ChipTuningError: what :func:`check_output` refuses (checked before and after writing).
    """
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
    """Rename the finished directory ``tmp`` to ``target``, moving an existing ``target`` aside
    first and removing it after (``recheck()`` runs just before, to refuse a target that changed
    meanwhile)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
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
    else:
        if target.is_dir():
            target.rmdir()  # empty
        finish_dir(tmp, target)


def written_files(tmp: Path, record: str) -> dict[str, str]:
    """What a command wrote into its temporary ``tmp`` so far, as its ``record`` will list it:
    every file but the record itself and the temporary's marker, with its sha256."""
    return file_checksums(tmp, exclude=(record, MARKER))


def finish_dir(tmp: Path, target: Path) -> None:
    """Rename the finished temporary ``tmp`` to ``target`` (which must not exist) and drop its marker."""
    os.rename(tmp, target)
    (target / MARKER).unlink(missing_ok=True)


# -- one writer at a time -------------------------------------------------------------------------

class DirLock:
    """A lock file in a directory holding the owner's pid and host.

    ``acquire`` refuses while a live process holds it (one line naming the pid); a lock whose
    process is gone (killed) is stale and taken over.

    Args:
        directory: the directory written.
        name: the lock file's name.
    """

    #: A lock file still empty after this many seconds was left by a writer killed while creating it.
    EMPTY_GRACE_S = 10.0

    def __init__(self, directory: str | Path, name: str = ".lock") -> None:
        self.path = Path(directory) / name
        self.held = False

    def _owner(self) -> tuple[int | None, str | None]:
        try:
            text = self.path.read_text().split()
        except OSError:
            return None, None
        if len(text) < 2 or not text[0].isdigit():
            return None, None
        return int(text[0]), text[1]

    def acquire(self) -> DirLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                pid, host = self._owner()
                if pid is None:
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < self.EMPTY_GRACE_S:
                        raise ChipTuningError(f"{self.path.parent} is being written by another process (lock "
                                              f"{self.path} is being created); wait for it to finish") from None
                elif host != _host():
                    raise ChipTuningError(f"{self.path.parent} is being written by process {pid} on another "
                                          f"machine; wait for it, or remove {self.path} if it is gone") from None
                elif pid_alive(pid):
                    raise ChipTuningError(f"{self.path.parent} is being written by another process (pid {pid}); "
                                          f"wait for it to finish, or remove {self.path} if it is gone") from None
                log.warning("taking over the stale lock %s (process %s is gone)", self.path, pid)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {_host()}\n")
            self.held = True
            return self
        raise ChipTuningError(f"cannot take the lock {self.path}; another process keeps re-creating it")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._owner() == (os.getpid(), _host()):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "CACHE",
    "CHIPS",
    "COMPARE",
    "DEPTH_PRUNED",
    "EVAL",
    "KINDS",
    "MARKER",
    "PRUNED",
    "RUN",
    "SWEEP",
    "DirLock",
    "OutputKind",
    "check_output",
    "claim_output",
    "clean_stale",
    "describe",
    "finish_dir",
    "foreign_entries",
    "is_marked",
    "is_unchanged",
    "mark",
    "normal_permissions",
    "own_record",
    "pid_alive",
    "read_record_json",
    "read_text",
    "replace_dir",
    "sibling_dir",
    "write_output",
    "written_files",
]
