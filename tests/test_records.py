"""The record codec: every record dataclass round-trips, and a bad value is one error naming the field.

A property test: random instances of every record class are built from the classes' own field types
and rules (so a new record or field is covered without a word here), written with ``to_dict`` and read
back with ``from_dict``; then every field is broken in turn (wrong type, out of range, not finite)
and must be refused with the record's error naming that field, never a traceback of another kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import types
import typing
from typing import Any, Literal, Union

import pytest

from chiptuning.cache import CacheManifest, CacheMeta, ShardRecord
from chiptuning.errors import ChipTuningError
from chiptuning.model_files import GGUFSource
from chiptuning.pipeline import LayerPoint, RunSummary, Speed
from chiptuning.probe.records import (
    CacheRef,
    Cascade,
    ChipsRecord,
    LayerChipRecord,
    MetricRow,
    Metrics,
    PruningStats,
    Selection,
    Simulated,
    Validation,
    ZeroShot,
)
from chiptuning.probe.sweep import SweepRecord, SweepRow
from chiptuning.probe.train import TrainConfig
from chiptuning.prune import provenance as prov
from chiptuning.prune.baselines import DepthPruningRecord
from chiptuning.prune.baselines.apply import ParamCounts
from chiptuning.prune.evaluation import DenseRun, EvalMetrics, ExitStats
from chiptuning.records import MAX_DEPTH, Record, json_depth, read_json
from chiptuning.zeroshot import LabelWords

#: Every record class of the project (a test below checks none is missing).
RECORDS = [CacheMeta, ShardRecord, CacheManifest, CacheRef, Validation, ZeroShot, MetricRow, Metrics, PruningStats,
           Simulated, Cascade, Selection, ChipsRecord, LayerChipRecord, prov.BaseModel, prov.CascadeExit,
           prov.CascadeEntry, prov.TaskRecord, prov.TokenizerSettings, prov.PruneParams, prov.CheckpointRecord,
           DepthPruningRecord, EvalMetrics, ExitStats, DenseRun, SweepRow, SweepRecord, LayerPoint, Speed, RunSummary,
           GGUFSource, LabelWords, ParamCounts, TrainConfig]
#: Bases of other records, never read on their own (covered through their subclasses).
BASES = {"ChipsBase"}


def all_record_classes() -> set[type]:
    found, todo = set(), list(Record.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return {cls for cls in found if dataclasses.is_dataclass(cls) and cls.__module__.startswith("chiptuning")}


def test_every_record_class_is_covered():
    missing = {cls.__qualname__ for cls in all_record_classes()} - {cls.__qualname__ for cls in RECORDS} - BASES
    assert not missing, f"record classes the property test does not cover: {sorted(missing)}"


# -- valid instances from the records themselves ---------------------------------------------------

def _hex(rng, n):
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _number(rng, tp, rules):
    ge, gt, le = rules.get("ge"), rules.get("gt"), rules.get("le")
    lo = ge if ge is not None else gt if gt is not None else -5
    hi = le if le is not None else lo + 10
    if tp is int:
        lo = math.floor(lo) + 1 if ge is None and gt is not None else math.ceil(lo)
        return rng.randint(int(lo), int(max(lo, hi)))
    value = rng.uniform(float(lo), float(hi))
    return value if gt is None or value > gt else float(hi)


def value_of(tp, rng, rules, depth=0):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return rng.choice([None, 1, "x", [1, 2], {"k": "v"}])
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return None if (type(None) in args and rng.random() < 0.3) else value_of(rng.choice(arms), rng, rules, depth)
    if origin is Literal:
        return rng.choice(args)
    if dataclasses.is_dataclass(tp):
        return instance_of(tp, rng, depth + 1)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return tuple(value_of(a, rng, rules, depth) for a in args)
        return [value_of(args[0], rng, rules, depth) for _ in range(rng.randint(0, 2 if depth else 3))]
    if origin is dict:
        return {f"k{i}": value_of(args[1], rng, rules, depth) for i in range(rng.randint(0, 2))}
    if tp is bool:
        return rng.random() < 0.5
    if tp in (int, float):
        return _number(rng, tp, rules)
    if tp is str:
        return rng.choice(["a", "text", "Ünïcödé ✓", ""])
    raise AssertionError(f"no generator for {tp!r}")


#: What a valid instance of each record needs beyond its field types (the rules between fields).
def _fixed(cls, rng) -> dict[str, Any]:
    meta = CacheMeta(model="m", model_hash="files:0", model_type="llama", task={"name": "t"},
                     label_names=["neg", "pos"], layers=[0, 1, 2], num_blocks=2, hidden_size=4, dtype="float32",
                     storage_dtype="float32", feature_mode="raw", pooling="last_token", max_length=16)
    stats = {"embedding": 10, "blocks": [5, 5], "final_norm": 1, "lm_head": 0, "other": 0, "total": 21}
    chips_common = dict(chip="linear", n_classes=2, label_names=["neg", "pos"], hidden_size=4,
                        train_cache=CacheRef(fingerprint=meta.fingerprint(), n_rows=10, meta=meta), model_stats=stats,
                        weights="chips.safetensors")
    simulated = Simulated(val_accuracy=0.5, val_mean_depth=1.5, reference_val_accuracy=0.5, block_ratio=1.0)
    cascade = Cascade(layers=[1, 2], thresholds=[0.9, 0.0], delta=0.01, reference_layer=2, simulated=simulated)
    pruning = PruningStats(layer=2, blocks_kept=2, blocks_removed=0, layer_ratio=0.0, ratio=0.0)
    selection = Selection(layer=2, num_blocks=2, pruning=pruning, cascade=cascade if rng.random() < 0.5 else None,
                          files={"report.md": _hex(rng, 64)})
    chips = ChipsRecord(**chips_common, layers=[0, 1, 2], validation=Validation(size=2, rows=[3, 7]))
    entry = prov.TaskRecord(chip_dir="chip", layer=2, label_names=["neg", "pos"], cache_meta=meta,
                      cache_fingerprint=meta.fingerprint(), chips=chips,
                      cascade=prov.CascadeEntry(exits=[prov.CascadeExit(layer=1, threshold=0.9, chip_dir="chip/exits/layer-1"),
                                                  prov.CascadeExit(layer=2, threshold=0.0, chip_dir="chip")]))
    base = prov.BaseModel(id="m", model_type="llama", num_blocks=2)
    row = SweepRow(chip="linear", setting="lr=0.001", layer=1)
    return {
        CacheMeta: {f.name: getattr(meta, f.name) for f in dataclasses.fields(CacheMeta)},
        ShardRecord: {"file": "shard-00001.h5", "sha256": _hex(rng, 64)},
        CacheManifest: {"fingerprint": meta.fingerprint(), "meta": meta, "layers": [0, 1, 2], "hidden_size": 4,
                        "n_rows": 10, "shards": [ShardRecord(file="shard-00000.h5", rows=10, sha256=_hex(rng, 64))],
                        "complete": True, "model_stats": stats},
        Validation: {"size": 2, "rows": [1, 5]},
        Metrics: {"chip": "linear", "layers": [MetricRow(layer=0), MetricRow(layer=3)]},
        Cascade: {f.name: getattr(cascade, f.name) for f in dataclasses.fields(Cascade)},
        Selection: {f.name: getattr(selection, f.name) for f in dataclasses.fields(Selection)},
        ChipsRecord: {f.name: getattr(chips, f.name) for f in dataclasses.fields(ChipsRecord)},
        LayerChipRecord: dict(chips_common, layer=1, metrics=MetricRow(layer=1), selection=None),
        prov.CascadeExit: {"chip_dir": "chip/exits/layer-1"},
        prov.CascadeEntry: {"exits": entry.cascade.exits},
        prov.TaskRecord: {f.name: getattr(entry, f.name) for f in dataclasses.fields(prov.TaskRecord)},
        prov.PruneParams: {"before": stats, "after": {"total": 11}},
        prov.CheckpointRecord: {"base_model": base, "layer": 2, "num_blocks": 2, "default_task": "t", "tasks": {"t": entry},
                           "images": [], "checksums": {"chip/chip.json": _hex(rng, 64),
                                                       "chip/exits/layer-1/chip.json": _hex(rng, 64),
                                                       "config.json": _hex(rng, 64)}},
        DepthPruningRecord: {"method": "tail", "base_model": base, "num_blocks": 1, "groups": [[1]], "removed": [2],
                             "blocks_removed": 1},
        SweepRecord: {"rows": [row], "best": row, "best_per_layer": [row]},
        GGUFSource: {"sha256": _hex(rng, 64)},
        LabelWords: {"token_ids": [[1, 2], [3]], "tokens": [["a", "b"], ["c"]]},
        RunSummary: {"selection": selection},
    }.get(cls, {})


def instance_of(cls, rng, depth=0):
    hints = typing.get_type_hints(cls)
    fixed = _fixed(cls, rng)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif f.name == "extra":
            values[f.name] = {}
        elif depth > 2 and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING):
            continue
        else:
            values[f.name] = value_of(hints[f.name], rng, f.metadata, depth)
    return cls(**values)


def valid_instance(cls, rng):
    """A random instance the record's own rules accept (random values are retried a few times where
    a rule ties fields together)."""
    last = None
    for _ in range(50):
        candidate = instance_of(cls, rng)
        try:
            return cls.from_dict(candidate.to_dict(), "x")
        except ChipTuningError as err:
            last = err
    raise AssertionError(f"could not build a valid {cls.__name__}: {last}")


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_every_record_round_trips(cls):
    rng = random.Random(f"{cls.__name__}")
    for _ in range(20):
        record = valid_instance(cls, rng)
        data = record.to_dict()
        text = json.dumps(data, sort_keys=True)  # plain JSON: no NaN, no objects
        again = cls.from_dict(json.loads(text), "x", file=cls.FORMAT is not None)
        assert again == record
        assert again.to_dict() == data


def test_a_cache_meta_fingerprint_survives_its_round_trip():
    meta = CacheMeta(model="m", task={"name": "t", "source": {"nested": [1, 2]}}, label_names=["a", "b"],
                     layers=[0, 1], num_blocks=1, hidden_size=8, extra={"future_field": 3})
    again = CacheMeta.from_dict(json.loads(json.dumps(meta.to_dict())), "x")
    assert again.fingerprint() == meta.fingerprint() and again.extra == {"future_field": 3}


# -- every field, broken ---------------------------------------------------------------------------

def broken_values(tp, rules) -> list[Any]:
    """Values a field of type ``tp`` (with ``rules``) must refuse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        values = [v for arm in arms for v in broken_values(arm, rules) if v is not None]
        if type(None) not in args:
            values.append(None)
        # a value broken for one arm may be valid for another (``bool | str``)
        return [v for v in values if not _fits_any(arms, v, rules)]
    if tp is Any:
        return []
    if origin is Literal:
        return ["not-one-of-them", 3]
    if dataclasses.is_dataclass(tp):
        return ["a string", [1, 2], 5]
    if origin in (list, tuple):
        return ["a string", {"a": 1}, 3]
    if origin is dict:
        return ["a string", [1, 2]]
    if tp is bool:
        return ["true", 1, None]
    if tp is int:
        out = ["7", 1.5, True, None, []]
        if rules.get("ge") is not None:
            out.append(math.ceil(rules["ge"]) - 1)
        if rules.get("gt") is not None:
            out.append(math.floor(rules["gt"]))
        if rules.get("le") is not None:
            out.append(math.floor(rules["le"]) + 1)
        return out
    if tp is float:
        out = ["0.5", True, None, {}]
        if rules.get("ge") is not None:
            out.append(rules["ge"] - 0.5)
        if rules.get("gt") is not None:
            out.append(rules["gt"])
        if rules.get("le") is not None:
            out.append(rules["le"] + 0.5)
        return out
    if tp is str:
        return [5, None, ["a"]]
    return []


def _fits_any(arms, value, rules) -> bool:
    from chiptuning.records import Invalid, decode

    for arm in arms:
        try:
            decode(arm, value, "x", rules)
            return True
        except Invalid:
            continue
    return False


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_every_broken_field_is_one_error_naming_it(cls):
    rng = random.Random(f"broken {cls.__name__}")
    good = valid_instance(cls, rng).to_dict()
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key") or f.name
        if f.name == "extra":
            continue
        for bad in broken_values(hints[f.name], f.metadata):
            data = dict(good, **{key: bad})
            with pytest.raises(ChipTuningError) as info:
                cls.from_dict(data, "the-file.json", file=cls.FORMAT is not None)
            message = str(info.value)
            assert message.startswith("the-file.json: ") and key in message, (cls.__name__, key, bad, message)
            assert "\n" not in message
            checked += 1
    assert checked or not dataclasses.fields(cls)


@pytest.mark.parametrize("cls", [c for c in RECORDS if c.FORMAT is not None], ids=lambda c: c.__name__)
def test_unknown_formats_and_versions_are_refused(cls):
    good = valid_instance(cls, random.Random(1)).to_dict()
    for bad in ({"format": "something-else"}, {"format_version": cls.VERSION + 1}, {"format_version": "1"},
                {"format_version": 0}, {"format_version": True}):
        with pytest.raises(ChipTuningError, match="format"):
            cls.from_dict(dict(good, **bad), "f.json", file=True)


# -- files: size and depth before parsing ----------------------------------------------------------

def test_huge_and_deeply_nested_files_are_refused_before_parsing(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # json.loads would hit RecursionError
    with pytest.raises(ChipTuningError, match="nests lists and objects deeper"):
        read_json(deep)
    assert json_depth(b'{"a": "[[[[[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"rows": ["x" * 1000] * 200}))
    monkeypatch.setattr("chiptuning.records.MAX_RECORD_BYTES", 100_000)
    with pytest.raises(ChipTuningError, match="more than a record may be"):
        read_json(big)
    for text in ("NaN", '{"a": Infinity}', "[-Infinity]"):
        (tmp_path / "nan.json").write_text(text)
        with pytest.raises(ChipTuningError, match="not valid JSON"):
            read_json(tmp_path / "nan.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ChipTuningError, match="not UTF-8"):
        read_json(tmp_path / "latin.json")
    assert MAX_DEPTH >= 8
