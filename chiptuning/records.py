"""Every JSON record chip-tuning writes or reads, through one codec: dataclasses deriving from
:class:`Record`, whose field types drive the conversion both ways (:func:`rule` adds bounds, a JSON
key, fields written only when set; :meth:`Record.check` ties fields together). Reading refuses, in
one line naming the file and the field, a file over :data:`MAX_RECORD_BYTES` or deeper than
:data:`MAX_DEPTH` (before parsing), ``NaN``, an unknown ``format`` or newer ``format_version``, a
wrong type, a value out of range. Unknown keys go to ``extra`` where a record has one, with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from chiptuning.errors import ChipTuningError
from chiptuning.io import check_regular, write_json_atomic

log = logging.getLogger(__name__)

#: Largest record file read (bytes); checked before parsing.
MAX_RECORD_BYTES = 64 * 2**20
#: Deepest nesting of lists and objects in a record; checked before parsing.
MAX_DEPTH = 32

R = TypeVar("R", bound="Record")
_NO_RULE: dict[str, Any] = {}
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le))
#: JSON scalar type -> (its name in messages, whether a parsed value is one).
_SCALARS = {bool: ("true or false", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
            str: ("text", lambda v: isinstance(v, str))}


class Invalid(Exception):
    """A field that breaks its record's rules (turned into the record's error, naming the file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


def rule(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, key: str | None = None,
         ge: float | None = None, le: float | None = None, gt: float | None = None,
         omit_none: bool = False) -> Any:
    """A dataclass field with the codec's rules: ``key``, the JSON key when it differs from the
    attribute; bounds ``ge``, ``le``, ``gt`` of a number (of every number in a list or dict);
    ``omit_none``: no key when the value is None (older files keep their content and fingerprint)."""
    metadata = {"key": key, "ge": ge, "le": le, "gt": gt, "omit_none": omit_none}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


class Record:
    """Base of every record. ``FORMAT``: the ``format`` of a top-level record file (None for a part
    of one); ``VERSION``: its ``format_version``, the newest one read; ``LEGACY``: a file with no
    ``format`` key is read too; ``ERROR``: the exception raised for a bad record."""

    FORMAT: ClassVar[str | None] = None
    VERSION: ClassVar[int] = 1
    LEGACY: ClassVar[bool] = False
    ERROR: ClassVar[type[ChipTuningError]] = ChipTuningError

    def check(self) -> None:
        """Rules between fields; raise :class:`Invalid` naming the field. Nothing by default."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (with ``format`` and ``format_version`` for a top-level record); ERROR
        for a value this record cannot hold."""
        try:
            self.check()
            out = encode(self, "")
        except Invalid as err:
            raise self.ERROR(f"cannot write {type(self).__name__}: {err}") from None
        if self.FORMAT is not None:
            out.update(format=self.FORMAT, format_version=self.VERSION)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "record", *, file: bool = False) -> R:
        """Read and validate a record's parsed JSON (ERROR ``"<where>: <field>: <what is wrong>"``).
        ``file``: a whole record file, whose ``format`` must be the record's (else only a
        ``format`` key that is present is checked)."""
        try:
            if cls.FORMAT is not None and (file or (isinstance(data, dict) and "format" in data)):
                _check_format(cls, data)
            return decode(cls, data, "")
        except Invalid as err:
            raise cls.ERROR(f"{where}: {err}") from None

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """:func:`read_json` then :meth:`from_dict` of a whole record file."""
        return cls.from_dict(read_json(path, cls.ERROR), str(path), file=True)

    def write(self, path: str | Path) -> Path:
        """Write the record atomically as sorted, indented JSON."""
        return write_json_atomic(path, self.to_dict())


def _check_format(cls: type[Record], data: Any) -> None:
    if not isinstance(data, dict):
        raise Invalid("", f"not a {cls.FORMAT} record (a JSON object), but {_kind(data)}")
    if data.get("format") != cls.FORMAT and not (cls.LEGACY and "format" not in data):
        raise Invalid("format", f"expected {cls.FORMAT!r}, got {data.get('format')!r}")
    version = data.get("format_version", 1)  # files written before records had a version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise Invalid("format_version", f"expected an integer >= 1, got {version!r}")
    if version > cls.VERSION:
        raise Invalid("format_version", f"{version} was written by a newer chip-tuning (this one reads up to "
                                        f"{cls.VERSION}); upgrade chip-tuning")


# -- reading files ---------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(blob: bytes) -> int:
    """Deepest nesting of lists and objects in a JSON text (strings skipped), without parsing it."""
    steps = (1 if match.group() in b"[{" else -1 for match in _BRACKET.finditer(_STRING.sub(b'""', blob)))
    return max(itertools.accumulate(steps, initial=0))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: str | Path, error: type[ChipTuningError] = ChipTuningError) -> Any:
    """Parse a JSON file after checking its size and nesting; ``error`` for a missing or unreadable
    file, one too large or too deep, invalid UTF-8 or JSON, ``NaN`` or ``Infinity``."""
    path = Path(path)
    try:
        check_regular(path)
        with open(path, "rb") as f:
            blob = f.read(MAX_RECORD_BYTES + 1)  # the size is checked on what was read: a file may grow
        if len(blob) > MAX_RECORD_BYTES:
            raise error(f"{path} is more than {MAX_RECORD_BYTES:,} bytes, more than a record may be; refusing to "
                        "read it")
    except OSError as err:
        raise error(f"cannot read {path} ({err.strerror or err})") from None
    if json_depth(blob) > MAX_DEPTH:
        raise error(f"{path} nests lists and objects deeper than {MAX_DEPTH} levels; not a chip-tuning record")
    try:
        return json.loads(blob.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except ValueError as err:
        raise error(f"{path} is not valid JSON ({err})") from None


# -- the codec -------------------------------------------------------------------------------------

@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any, str], ...]:
    """(field, resolved type, JSON key) of a record class."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name], f.metadata.get("key") or f.name) for f in dataclasses.fields(cls))


def _is_extra(f: dataclasses.Field) -> bool:
    """The field holding unknown keys: ``extra``, with no JSON key of its own."""
    return f.name == "extra" and not f.metadata.get("key")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return {type(None): "null", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def decode(tp: Any, value: Any, path: str, rules: dict = _NO_RULE) -> Any:
    """``value`` (parsed JSON) as type ``tp``; :class:`Invalid` naming ``path`` when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise Invalid(path, "must be given, got null")
        arms = [a for a in args if a is not type(None)]
        for arm in arms[:-1]:
            with contextlib.suppress(Invalid):
                return decode(arm, value, path, rules)
        return decode(arms[-1], value, path, rules)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise Invalid(path, f"must be one of {', '.join(map(repr, args))}, got {_kind(value)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # built in memory, not read: checked when it was made
            return value
        return _decode_record(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise Invalid(path, f"expected a list, got {_kind(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise Invalid(path, f"expected a list of {len(args)} values, got {len(value)}")
            return tuple(decode(a, v, _join(path, i), rules) for i, (a, v) in enumerate(zip(args, value)))
        items = [decode(args[0] if args else Any, v, _join(path, i), rules) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid(path, f"expected an object, got {_kind(value)}")
        return {k: decode(args[1] if args else Any, v, _join(path, k), rules) for k, v in value.items()}
    if tp in _SCALARS:
        what, fits = _SCALARS[tp]
        if not fits(value):
            raise Invalid(path, f"expected {what}, got {_kind(value)}")
        if tp is float and not math.isfinite(value):
            raise Invalid(path, f"must be finite, got {value!r}")
        for name, sign, holds in _BOUNDS if tp in (int, float) else ():
            if rules.get(name) is not None and not holds(value, rules[name]):
                raise Invalid(path, f"must be {sign} {rules[name]:g}, got {value!r}")
        return float(value) if tp is float else value
    raise TypeError(f"the record codec cannot decode {tp!r} ({path})")  # a record declared a type it lacks


def _decode_record(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise Invalid(path, f"expected an object, got {_kind(value)}")
    known, kwargs, has_extra = {"format", "format_version"}, {}, False
    for f, tp, key in _fields(cls):
        if _is_extra(f):
            has_extra = True
            continue
        known.add(key)
        if key in value:
            kwargs[f.name] = decode(tp, value[key], _join(path, key), f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise Invalid(_join(path, key), "is missing")
    unknown = {k: v for k, v in value.items() if k not in known}
    if has_extra:
        kwargs["extra"] = unknown
    if unknown:
        log.warning("%s: %s keys this chip-tuning does not know: %s", path or cls.__name__,
                    "keeping" if has_extra else "ignoring", sorted(unknown))
    record = cls(**kwargs)
    if isinstance(record, Record):
        try:
            record.check()
        except Invalid as err:
            raise Invalid(_join(path, err.field) if err.field else path, err.message) from None
    return record


def name_clash(names: list[str]) -> tuple[str, str] | None:
    """Two names that are the same up to case and surrounding space (``"pos "``, ``"Pos"``), or None."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.strip().casefold()
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def encode(value: Any, path: str) -> Any:
    """A record (or any value a record holds) as JSON, a non-finite number as null;
    :class:`Invalid` for a value JSON cannot hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f, _, key in _fields(type(value)):
            item = getattr(value, f.name)
            if _is_extra(f):
                out.update(encode(item, path))
            elif not (item is None and f.metadata.get("omit_none")):
                out[key] = encode(item, _join(path, key))
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v, _join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): encode(v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy and torch values
        return encode(value.tolist(), path)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity (and reading refuses them)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise Invalid(path, f"{type(value).__name__} cannot be written to JSON")


__all__ = ["MAX_DEPTH", "MAX_RECORD_BYTES", "Invalid", "Record", "decode", "encode", "json_depth", "name_clash",
           "read_json", "rule"]
