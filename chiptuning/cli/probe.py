"""`chiptuning probe train | probe sweep` and `chiptuning select`: chips from a cache."""

from __future__ import annotations

import json

import click

from chiptuning.errors import ChipTuningError


def _layers(value: str | None) -> list[int] | None:
    """``--layers 10-20`` or ``--layers 4,8,12`` -> layer list."""
    if not value:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            lo, sep, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ChipTuningError(f"--layers takes '4,8,12' or '10-20', got {value!r}") from None
    return out


def _floats(flag: str, text: str) -> list[float]:
    """'0,1e-4' -> [0.0, 1e-4]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ChipTuningError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _per_chip(flag: str, text: str, cast) -> tuple[list, dict[str, list]]:
    """'1e-3,mlp:5e-4' -> ([1e-3], {"mlp": [5e-4]})."""
    shared, chips = [], {}
    for item in (v.strip() for v in text.split(",")):
        if item:
            kind, _, value = item.rpartition(":")
            values = chips.setdefault(kind.strip(), []) if kind else shared
            values.extend(cast(v) for v in _floats(flag, value))
    return shared, chips


@click.group("probe", short_help="Train chips (per-layer classifiers) from a cache.")
def probe_group():
    """Train chips (per-layer classifiers) from an activation cache, on CPU."""


@probe_group.command("train", short_help="Train a chip at every layer of a cache.")
@click.argument("train_cache", type=click.Path(file_okay=False))
@click.option("--eval", "eval_cache", type=click.Path(file_okay=False), default=None,
              help="Cache of the eval split (same model, template and labels).")
@click.option("--chip", type=click.Choice(["linear", "mlp", "logreg"]), default="linear", show_default=True,
              help="The chip: a linear layer, a 2-layer MLP (hidden 256), or scikit-learn's logistic regression.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Chips directory to write (new or empty, or chips to replace with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the chips directory at --out (and its selection).")
@click.option("--regime", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="paper: AdamW betas 0.9/0.99, lr 1e-5, weight decay 0.01, batch 1, 1 epoch, "
                   "raw features, at most 20,000 rows.")
@click.option("--val-size", type=click.IntRange(min=0), default=200, show_default=True,
              help="Validation rows carved from the training cache (seeded, disjoint); 0 for none.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seed of the validation split, the row order and the chips' initialisation.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate (default: the regime's).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="AdamW weight decay (default: the regime's).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Most epochs (default: the regime's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Rows per step (default: the regime's).")
@click.option("--patience", "n_iter_no_change", type=click.IntRange(min=1), default=None,
              help="Early-stopping patience in epochs (default regime: 2, and never fewer than 150 steps).")
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True, help="MLP hidden width.")
@click.option("--C", "C", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Inverse regularization (logreg).")
@click.option("--layers", default=None, help="Layers to train, e.g. '10-20' or '4,8,12' (default all).")
@click.option("--n-jobs", type=int, default=None, help="joblib workers (logreg).")
@click.option("--device", default="cpu", show_default=True, help="Torch device of the torch chips.")
@click.option("--max-memory-mb", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Feature memory budget; larger caches are read in groups of layers or streamed.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Precision of the products with the features (default: the regime's; 'auto' is "
                   "bfloat16 on CPUs with AMX / AVX512-BF16).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads (default: the faster of 1 and one per CPU, timed once).")
@click.option("--no-intercept", is_flag=True, default=False,
              help="Linear chips without a bias (features scaled, not centered): what "
                   "`chiptuning prune --export sequence-classification` needs.")
def train_cmd(train_cache, eval_cache, out, overwrite, layers, no_intercept, **settings):
    """Train a chip at every layer of TRAIN_CACHE; write metrics, eval predictions and a plot.

    Every shard's checksum is verified before training (one more read of the cache); a corrupt
    shard is refused, naming it.
    """
    from chiptuning.probe import TrainConfig, train_chips  # here: `chiptuning --help` stays free of torch

    config = TrainConfig(**settings, layers=_layers(layers), fit_intercept=not no_intercept)
    chips = train_chips(train_cache, eval_cache, out=out, config=config, progress=True, overwrite=overwrite)
    key = "eval_accuracy" if eval_cache else "val_accuracy"
    scored = [m for m in chips.metrics if m.get(key) is not None]
    summary = f"{settings['chip']} chips at {len(chips.layers)} layers -> {out}"
    if scored:
        best = max(scored, key=lambda m: m[key])
        summary += f"; best {key.replace('_', ' ')} {best[key]:.4f} at layer {best['layer']}"
    click.echo(summary)
    lens = [m for m in chips.metrics if m.get("lens_accuracy") is not None]
    if lens:
        said = max(lens, key=lambda m: (m["lens_accuracy"], -m["layer"]))
        zero = chips.record.zero_shot
        click.echo(f"the model's own answer (logit lens): best {said['lens_accuracy']:.4f} at layer {said['layer']}"
                   + ("" if zero is None else f"; zero-shot at layer {zero.layer} {zero.accuracy:.4f}, prior-calibrated "
                      f"{zero.calibrated_accuracy or 0:.4f}"))


@probe_group.command("sweep", short_help="Sweep chip hyperparameters and layers on a cache.")
@click.argument("train_cache", type=click.Path(file_okay=False))
@click.option("--eval", "eval_cache", type=click.Path(file_okay=False), default=None,
              help="Cache of the eval split (reported, never used to pick).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for sweep.csv, sweep.json, best_per_layer.csv and the plot.")
@click.option("--overwrite", is_flag=True, help="Replace the sweep directory at --out.")
@click.option("--chips", "chip_kinds", default="linear,mlp", show_default=True,
              help="Chip types, comma-separated (linear, mlp, logreg).")
@click.option("--weight-decay", "weight_decays", default="0,1e-4,1e-3,1e-2,1e-1", show_default=True,
              help="Weight decays of the torch chips, comma-separated.")
@click.option("--C", "Cs", default="0.01,0.1,1,10,100", show_default=True,
              help="Inverse regularizations of logreg, comma-separated.")
@click.option("--lr", "lrs", default="1e-3", show_default=True,
              help="Learning rates, comma-separated; 'mlp:5e-4' sets one chip type's (e.g. "
                   "'linear:2e-3,mlp:5e-4').")
@click.option("--epochs", "epochs", default="30", show_default=True,
              help="Most epochs, comma-separated (early stopping on validation loss, see --patience); "
                   "'mlp:2' sets one chip type's.")
@click.option("--patience", "n_iter_no_change", type=int, default=2, show_default=True,
              help="Early-stopping patience in epochs (and never fewer than 150 optimizer steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Rows per optimizer step of the torch chips.")
@click.option("--layers", default=None, help="Layers, e.g. '10-20' (default all).")
@click.option("--val-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Validation rows carved from the training cache (seeded, disjoint): the sweep's score.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seed of the validation split, the row order and the chips' initialisation.")
@click.option("--n-jobs", type=int, default=1, show_default=True,
              help="joblib workers: one task per (layer group, batch of settings).")
@click.option("--backend", default=None,
              help="joblib backend: loky (default), threading, or 'dask' / 'ray' to run across "
                   "machines (needs dask.distributed / ray and a running cluster).")
@click.option("--scheduler", default=None,
              help="With --backend dask: the scheduler address (tcp://host:8786); with ray: the "
                   "cluster address (default auto).")
@click.option("--max-memory-mb", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Feature memory budget of each job; larger caches are streamed.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Precision of the products with the features of the torch chips.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads per task (default: timed once).")
def sweep_cmd(train_cache, eval_cache, out, overwrite, chip_kinds, weight_decays, Cs, lrs, epochs, layers, **settings):
    """Grid over chip type, regularization, learning rate, epochs and layers on TRAIN_CACHE."""
    from chiptuning.probe.sweep import SweepConfig, sweep  # here: `chiptuning --help` stays free of torch

    lr_values, chip_lrs = _per_chip("--lr", lrs, float)
    epoch_values, chip_epochs = _per_chip("--epochs", epochs, int)
    config = SweepConfig(
        chips=[c.strip() for c in chip_kinds.split(",") if c.strip()],
        weight_decays=_floats("--weight-decay", weight_decays), Cs=_floats("--C", Cs),
        lrs=lr_values or SweepConfig().lrs, epochs=epoch_values or SweepConfig().epochs,
        chip_lrs=chip_lrs, chip_epochs=chip_epochs, layers=_layers(layers), **settings,
    )
    result = sweep(train_cache, eval_cache, out=out, config=config, progress=True, overwrite=overwrite)
    best = result["best"]
    click.echo(f"{len(result['rows'])} chips trained -> {out}; best: {best['chip']} at layer {best['layer']} "
               f"({best['setting']}), val accuracy {best['val_accuracy']:.4f}")
    click.echo(f"chips of that setting at every layer (for select / prune):\n  {result['best_command']}")


@click.command("select", short_help="Pick the pruning layer of a chips directory.")
@click.argument("chips_dir", type=click.Path(file_okay=False))
@click.option("--strategy", default="validate", show_default=True,
              help="fixed:L | validate | optimal (an oracle on eval labels) | within:DELTA "
                   "(shallowest layer within DELTA of the best validation accuracy, e.g. within:0.01) | "
                   "cascade:DELTA (early exit: chips of several layers, each example stopping at the first "
                   "confident one, within DELTA of the best fixed chip's validation accuracy).")
@click.option("--allow-pickle", is_flag=True,
              help="Load chips stored as a pickle (runs code from the file: only chips you made).")
def select(chips_dir, strategy, allow_pickle):
    """Pick the pruning layer of CHIPS_DIR; write selection.json and report.md there."""
    from chiptuning.probe import select_layer  # here: `chiptuning --help` stays free of torch

    s = select_layer(chips_dir, strategy, allow_pickle=allow_pickle)
    acc = s.expected_accuracy
    click.echo(
        f"layer {s.layer} ({s.strategy}{', ORACLE' if s.oracle else ''}): expected accuracy "
        f"{'-' if acc is None else f'{acc:.4f}'} ({s.expected_accuracy_from}), "
        f"{100 * s.pruning.ratio:.1f}% of parameters removed ({s.pruning.blocks_removed} of {s.num_blocks} blocks)"
    )
    if s.cascade is not None:
        sim = s.cascade.simulated
        part = "eval" if sim.eval_accuracy is not None else "val"
        accuracy, reference, depth = (getattr(sim, f"{part}_accuracy"), getattr(sim, f"reference_{part}_accuracy"),
                                      getattr(sim, f"{part}_mean_depth"))
        click.echo(f"cascade: {s.why}")
        click.echo(f"simulated {part}: accuracy {accuracy:.4f} (best fixed chip {reference:.4f}), mean depth "
                   f"{depth:.2f} blocks against {s.layer}: {s.layer / depth:.2f}x fewer -> "
                   f"{chips_dir}/cascade.json, cascade_curve.csv, cascade.png")


@click.command("zeroshot", short_help="The decoder's own answer, from a cache's lens.")
@click.argument("eval_cache", type=click.Path(file_okay=False))
@click.option("--prior", "prior_cache", type=click.Path(file_okay=False), default=None,
              help="Training cache (same prompts) whose label distribution calibrates the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the per-layer curve).")
def zeroshot_cmd(eval_cache, prior_cache, as_json):
    """The decoder's own answer on EVAL_CACHE: zero-shot accuracy (plain and prior-calibrated)
    and the logit-lens curve, from the label-word logits stored at extraction (no model run)."""
    from chiptuning.cache import CacheReader  # here: `chiptuning --help` stays free of torch
    from chiptuning.probe.lens import lens_curve, zero_shot_report

    evals = CacheReader(eval_cache)
    prior = CacheReader(prior_cache) if prior_cache else None
    report = zero_shot_report(evals, prior)
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), curve=lens_curve(evals, prior)), indent=2))
        return
    calibrated = report.calibrated_accuracy
    click.echo(f"zero-shot ({report.prompt} prompts, layer {report.layer}): accuracy {report.accuracy:.4f}"
               + (f", prior-calibrated {calibrated:.4f}" if calibrated is not None else "")
               + f" on {report.n_examples} examples; answers "
               + ", ".join(f"{k} {100 * v:.0f}%" for k, v in report.prediction_share.items()))


COMMANDS = [probe_group, select, zeroshot_cmd]
