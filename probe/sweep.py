"""Hyperparameter sweeps over chips: ``chiptuning probe sweep``.

The grid: chip type x regularization (weight decay of the torch chips, C of logreg) x learning rate
x epochs x layers. Every torch setting sees the same minibatches, so a task reads a group of layers
once and trains one bank per chip type on them (:func:`chiptuning.probe.bank.fit_banks`); logreg
runs a task per layer (every C). Tasks run with joblib: ``n_jobs`` and any joblib backend apply
(``"dask"``, ``"ray"``: a cluster whose workers read the cache path). The best setting per layer and
overall is chosen on the validation rows; eval accuracy is reported, never used to choose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from joblib import Parallel, delayed, parallel_backend

from chiptuning import __version__
from chiptuning.errors import ChipTuningError
from chiptuning.outputs import SWEEP, check_output, write_output, written_files
from chiptuning.probe.bank import PRECISIONS, Hyperparams, choose_threads, resolve_precision, torch_threads
from chiptuning.probe.chipset import majority_baselines, pick_baseline, write_rows
from chiptuning.probe.data import cache_n_classes, cache_source, carve_rows, layers_per_group, open_caches, opened
from chiptuning.probe.plots import plot_layer_accuracy
from chiptuning.probe.scoring import chip_metrics
from chiptuning.probe.train import REGIMES, fit_group, fit_logreg_layer, warn_few_steps
from chiptuning.records import Record, rule

log = logging.getLogger(__name__)

RECORD = "sweep.json"


@dataclass
class SweepRow(Record):
    """One chip of a sweep: its setting, layer and scores."""

    chip: Literal["linear", "mlp", "logreg"]
    setting: str
    layer: int = rule(ge=0)
    lr: float | None = rule(None, gt=0)
    weight_decay: float | None = rule(None, ge=0)
    epochs: int | None = rule(None, ge=1)
    C: float | None = rule(None, gt=0)
    train_accuracy: float | None = rule(None, ge=0, le=1)
    val_accuracy: float | None = rule(None, ge=0, le=1)
    val_loss: float | None = rule(None, ge=0)
    eval_accuracy: float | None = rule(None, ge=0, le=1)
    eval_loss: float | None = rule(None, ge=0)
    best_epoch: int | None = rule(None, ge=0)
    epochs_run: int | None = rule(None, ge=0)
    extra: dict[str, Any] = field(default_factory=dict)


#: The columns of sweep.csv and best_per_layer.csv: the fields of a sweep row.
SWEEP_COLUMNS = tuple(f.name for f in fields(SweepRow) if f.name != "extra")


@dataclass
class SweepRecord(Record):
    """``sweep.json``: every chip of the grid, the best per layer and overall (on validation), the
    ``probe train`` command that trains the best, and the files written beside it."""

    FORMAT = SWEEP.formats[0]
    LEGACY = True

    rows: list[SweepRow]
    best: SweepRow
    best_per_layer: list[SweepRow] = field(default_factory=list)
    best_command: str = ""
    seconds: float = rule(0.0, ge=0)
    config: dict[str, Any] = field(default_factory=dict)
    train_cache: str = ""
    eval_cache: str | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    majority_baseline: dict[str, float] = rule(default_factory=dict, ge=0, le=1)
    files: dict[str, str] = field(default_factory=dict)
    chiptuning_version: str = __version__


DEFAULT = REGIMES["default"]


@dataclass
class SweepConfig:
    """Settings of ``chiptuning probe sweep``: a grid over the torch chips' learning rate, weight
    decay and epochs (per chip type where ``chip_lrs`` / ``chip_epochs`` say so: ``--lr mlp:5e-4``)
    and logreg's C, with the default regime's other :class:`~chiptuning.probe.bank.Hyperparams`.

    Attributes:
        chips: chip types to sweep (``--chips``); layers: the layers (default all).
        val_size, seed: the validation rows carved from the training cache, and the seed of the
            split, the order and the initialisation.
        n_jobs, backend, scheduler: joblib workers (torch threads are split between them), the
            joblib backend (None: loky; "threading", "dask", "ray") and a cluster address (a Dask
            scheduler "tcp://host:8786", or a Ray address; default "auto").
        max_memory_mb: feature memory budget of one task; threads: torch threads per task (None:
            :func:`~chiptuning.probe.bank.choose_threads` with one job, else the CPUs shared).
    """

    chips: list[str] = field(default_factory=lambda: ["linear", "mlp"])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    Cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    lrs: list[float] = field(default_factory=lambda: [DEFAULT.lr])
    epochs: list[int] = field(default_factory=lambda: [DEFAULT.epochs])
    chip_lrs: dict[str, list[float]] = field(default_factory=dict)
    chip_epochs: dict[str, list[int]] = field(default_factory=dict)
    batch_size: int = DEFAULT.batch_size
    hidden: int = DEFAULT.hidden
    n_iter_no_change: int = DEFAULT.n_iter_no_change
    min_patience_steps: int = DEFAULT.min_patience_steps
    layers: list[int] | None = None
    val_size: int = 200
    seed: int = 42
    n_jobs: int = 1
    backend: str | None = None
    scheduler: str | None = None
    max_memory_mb: int = 2048
    precision: str = DEFAULT.precision
    threads: int | None = None

    def validate(self) -> None:
        if not self.chips or set(self.chips) - {"linear", "mlp", "logreg"}:
            raise ChipTuningError(f"--chips takes linear, mlp, logreg; got {self.chips}")
        for flag, values in (("--weight-decay", self.weight_decays), ("--C", self.Cs), ("--lr", self.lrs),
                             ("--epochs", self.epochs)):
            if not values:
                raise ChipTuningError(f"{flag} needs at least one value")
        for flag, per_chip in (("--lr", self.chip_lrs), ("--epochs", self.chip_epochs)):
            for kind, values in per_chip.items():
                if kind not in ("linear", "mlp") or not values:
                    raise ChipTuningError(f"{flag} {kind}:VALUE takes a torch chip type (linear, mlp) and a value")
        lrs = [v for kind in ("linear", "mlp") for v in self.lrs_of(kind)]
        epochs = [v for kind in ("linear", "mlp") for v in self.epochs_of(kind)]
        if min(self.Cs) <= 0 or min(lrs) <= 0 or min(epochs) <= 0 or min(self.weight_decays) < 0:
            raise ChipTuningError("--C, --lr and --epochs must be > 0 and --weight-decay >= 0")
        if self.n_iter_no_change < 1:
            raise ChipTuningError(f"--patience must be >= 1, got {self.n_iter_no_change}")
        if self.min_patience_steps < 0:
            raise ChipTuningError(f"min_patience_steps must be >= 0, got {self.min_patience_steps}")
        if self.precision not in PRECISIONS:
            raise ChipTuningError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def specs(self) -> list[Hyperparams]:
        """The torch chips' hyperparameters, one per (chip, lr, weight decay, epochs)."""
        base = replace(DEFAULT, batch_size=self.batch_size, hidden=self.hidden, n_iter_no_change=self.n_iter_no_change,
                       min_patience_steps=self.min_patience_steps, precision=resolve_precision(self.precision))
        return [replace(base, kind=kind, lr=lr, weight_decay=wd, epochs=ep)
                for kind in self.chips if kind != "logreg"
                for lr in self.lrs_of(kind) for wd in self.weight_decays for ep in self.epochs_of(kind)]

    def lrs_of(self, kind: str) -> list[float]:
        """Learning rates swept for one chip type."""
        return list(self.chip_lrs.get(kind) or self.lrs)

    def epochs_of(self, kind: str) -> list[int]:
        """Epoch caps swept for one chip type."""
        return list(self.chip_epochs.get(kind) or self.epochs)


def train_command(best: dict, config: SweepConfig, train_path, eval_path=None, out=None) -> str:
    """The ``chiptuning probe train`` command that trains ``best``'s setting at every layer (the
    chips ``select`` and ``prune`` need: a sweep keeps metrics, not weights). With the sweep's
    seed, validation rows and batch size it trains the chips the sweep scored."""
    parts = ["chiptuning", "probe", "train", shlex.quote(str(train_path))]
    if eval_path is not None:
        parts += ["--eval", shlex.quote(str(eval_path))]
    parts += ["--chip", best["chip"]]
    if best["chip"] == "logreg":
        parts += ["--C", f"{best['C']:g}"]
    else:
        parts += ["--lr", f"{best['lr']:g}", "--weight-decay", f"{best['weight_decay']:g}",
                  "--epochs", str(best["epochs"]), "--batch-size", str(config.batch_size),
                  "--patience", str(config.n_iter_no_change), "--precision", config.precision]
        if best["chip"] == "mlp":
            parts += ["--hidden", str(config.hidden)]
    parts += ["--seed", str(config.seed), "--val-size", str(config.val_size),
              "--out", shlex.quote(str(out)) if out is not None else "CHIPS_DIR"]
    return " ".join(parts)


def sweep(train_cache, eval_cache=None, out: str | Path | None = None, *, config: SweepConfig | None = None,
          progress: bool = False, overwrite: bool = False) -> dict:
    """Run a sweep and (with ``out``) write sweep.csv, sweep.json, best_per_layer.csv and a plot
    (a sweep directory there is replaced only with ``overwrite``; anything else is refused first).

    Returns:
        {"rows": one dict per (setting, layer), "best_per_layer", "best", "seconds", "config",
        "best_command": the ``probe train`` command that trains the best setting's chips, ...}:
        what sweep.json holds.
    """
    config = config or SweepConfig()
    config.validate()
    if out is not None:
        check_output(out, SWEEP, overwrite=overwrite)  # refused now, not after the sweep
    # Verified once here; the tasks reopen the caches by path without hashing them again.
    train, evals, layers = open_caches(train_cache, eval_cache, config.layers)
    train_rows, val_rows = carve_rows(train.n_rows, config.val_size, config.seed, None)
    if not len(val_rows):
        raise ChipTuningError("a sweep picks settings on validation rows; --val-size must be > 0")
    t_src, e_src = cache_source(train), cache_source(evals)
    specs = config.specs()
    tasks = []
    if specs:
        G = layers_per_group(train, specs, True, len(train_rows), len(val_rows), len(layers), config.max_memory_mb)
        warn_few_steps(len(train_rows), config.batch_size, min(spec.epochs for spec in specs))
        # With several workers, smaller groups keep them all busy.
        G = max(1, min(G, -(-len(layers) // max(1, config.n_jobs))))
        for i in range(0, len(layers), G):
            tasks.append(delayed(_torch_task)(t_src, e_src, layers[i:i + G], train_rows, val_rows, specs,
                                              config.seed, config.n_jobs, config.max_memory_mb, config.threads))
    if "logreg" in config.chips:
        classes = list(range(cache_n_classes(train)))
        params = [dict(C=C, classes=classes, random_state=config.seed) for C in config.Cs]
        for layer in layers:
            tasks.append(delayed(_logreg_task)(t_src, e_src, layer, train_rows, val_rows, params))
    start = time.perf_counter()
    with _backend(config.backend, config.n_jobs, config.scheduler):
        results = Parallel(n_jobs=config.n_jobs, verbose=5 if progress else 0)(tasks)
    seconds = time.perf_counter() - start
    rows = sorted((row for part in results for row in part), key=lambda r: (r["chip"], r["setting"], r["layer"]))
    best = _pick(rows)
    result = {"rows": rows, "best_per_layer": _best_per_layer(rows), "best": best, "seconds": seconds,
              "config": asdict(config), "train_cache": train.fingerprint,
              "eval_cache": None if evals is None else evals.fingerprint,
              "validation": {"size": len(val_rows), "seed": config.seed},
              "majority_baseline": majority_baselines(eval=None if evals is None else evals.labels,
                                                      val=np.asarray(train.labels)[val_rows])}
    result["best_command"] = train_command(
        best, config, getattr(train, "path", "TRAIN_CACHE"),
        None if evals is None else getattr(evals, "path", "EVAL_CACHE"),
        None if out is None else Path(out) / f"chips-{best['chip']}")
    log.info("sweep: %d chips in %.1f s; best %s %s at layer %d (val %.4f)", len(rows), seconds,
             best["chip"], best["setting"], best["layer"], best["val_accuracy"])
    if out is not None:
        with write_output(out, SWEEP, overwrite=overwrite) as tmp:
            _write(tmp, result, cache_n_classes(train))
    return result


def _backend(name: str | None, n_jobs: int, scheduler: str | None = None):
    """joblib's ``parallel_backend(name)``, or a clear error when it cannot be used here."""
    if not name:
        return contextlib.nullcontext()
    try:
        # dask and ray are optional and heavy: imported only when their backend is asked for
        if name == "dask" and scheduler:
            from distributed import Client

            Client(scheduler)  # becomes the default client the joblib backend uses
        if name == "ray":
            import ray
            from ray.util.joblib import register_ray

            register_ray()
            ray.init(address=scheduler or "auto", ignore_reinit_error=True)
        return parallel_backend(name, n_jobs=n_jobs)
    except (ImportError, ValueError, OSError) as err:
        raise ChipTuningError(
            f"joblib backend {name!r} is not available ({str(err).splitlines()[0]}); for dask: "
            "`pip install dask distributed` and start a `dask.distributed.Client`; for ray: "
            "`pip install ray` and call `ray.util.joblib.register_ray()`"
        ) from None


def _pick(rows: list[dict]) -> dict:
    """Best row on validation: highest accuracy, then lowest loss, then the shallowest layer."""
    return min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["layer"]))


def _best_per_layer(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["chip"], row["layer"]), []).append(row)
    return [_pick(group) for _, group in sorted(groups.items())]


def _write(out: Path, result: dict, n_classes: int) -> None:
    for name, rows in (("sweep.csv", result["rows"]), ("best_per_layer.csv", result["best_per_layer"])):
        write_rows(out / name, rows, SWEEP_COLUMNS)
    series = {kind: [r for r in result["best_per_layer"] if r["chip"] == kind]
              for kind in sorted({r["chip"] for r in result["rows"]})}
    part, baseline = pick_baseline(result.get("majority_baseline"))
    plot_layer_accuracy(series, out / "layer_accuracy.png", n_classes=n_classes,
                        title="best setting per layer (chosen on validation)", baseline=baseline,
                        baseline_label=f"majority class ({part})")
    SweepRecord.from_dict(dict(result, files=written_files(out, RECORD)), "sweep").write(out / RECORD)  # last


def _torch_task(t_src, e_src, layers, train_rows, val_rows, specs, seed, n_jobs,
                max_memory_mb=2048, threads=None) -> list[dict]:
    """Train every torch setting on a group of layers; one row per (setting, layer)."""
    if not threads and n_jobs and n_jobs > 1:
        # Workers share the machine: oversubscribed threads slow every worker down.
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
    with opened(t_src, e_src) as (train, evals), torch_threads(choose_threads(threads)):
        fitted = fit_group(train, evals, layers, train_rows, val_rows, specs, n_classes=cache_n_classes(train),
                           seed=seed, max_memory_mb=max_memory_mb)
    rows = []
    for spec, result, scored in zip(specs, fitted["results"], fitted["scores"]):
        for j, layer in enumerate(layers):
            setting = f"lr={spec.lr:g},wd={spec.weight_decay:g},epochs={spec.epochs}"
            row = {"chip": spec.kind, "setting": setting, "layer": layer, "lr": spec.lr,
                   "weight_decay": spec.weight_decay, "epochs": spec.epochs, "C": None,
                   "best_epoch": int(result["best_epoch"][j]), "epochs_run": int(result["chip_epochs"][j])}
            row.update(chip_metrics(scored, j, losses=("val", "eval")))  # no train loss in a sweep row
            rows.append(row)
    return rows


def _logreg_task(t_src, e_src, layer, train_rows, val_rows, params) -> list[dict]:
    """Every C of logreg at one layer (the layer is read once)."""
    fitted = fit_logreg_layer(t_src, e_src, layer, train_rows, val_rows, params)
    return [{"chip": "logreg", "setting": f"C={p['C']:g}", "layer": layer, "lr": None, "weight_decay": None,
             "epochs": None, "C": p["C"], "best_epoch": None, "epochs_run": int(chip.n_iter_), **scores}
            for p, (chip, scores, _) in zip(params, fitted)]


__all__ = ["SweepConfig", "sweep"]
