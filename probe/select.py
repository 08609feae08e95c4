"""Pick the layer to prune at: ``chiptuning select CHIPS_DIR --strategy ...``.

* ``fixed:L``: layer L, whatever the metrics say.
* ``validate``: the best validation accuracy (rows carved from the training cache); ties go to the
  shallowest layer, which prunes more.
* ``optimal``: the best *eval* accuracy: an oracle on the test labels, an upper bound only.
* ``within:DELTA``: the shallowest layer whose validation accuracy is within DELTA (0.01 = one
  point) of the best.
* ``cascade:DELTA``: early exit (:mod:`chiptuning.probe.cascade`): several layers' chips in turn,
  an example stopping at the first confident one; validation accuracy within DELTA of the best
  fixed chip at the fewest expected blocks. Writes ``cascade.json``, ``cascade_curve.csv``,
  ``cascade.png``.

A pruned model keeps blocks 1..l, so layer 0 (the embedding output) is never chosen. The pruning
ratio is the share of the model's parameters removed, from the extractor's ``model_stats``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from chiptuning import __version__
from chiptuning.errors import ChipTuningError
from chiptuning.io import sha256_file, temporary_name
from chiptuning.outputs import is_unchanged
from chiptuning.probe.cascade import calibrate_cascade, cascade_curve, describe_exits
from chiptuning.probe.chipset import REPORT, SELECTION, ChipSet, check_chips_on_cache, load_chips, write_rows
from chiptuning.probe.plots import plot_cascade_curve
from chiptuning.probe.records import PruningStats, Selection

log = logging.getLogger(__name__)

STRATEGIES = ("fixed:L", "validate", "optimal", "within:DELTA", "cascade:DELTA")
#: Everything ``select`` may write into a chips directory besides selection.json.
SELECT_FILES = (REPORT, "cascade.json", "cascade_curve.csv", "cascade.png")


def parse_strategy(strategy: str) -> tuple[str, float | int | None]:
    """``"within:0.01"`` -> ("within", 0.01); errors name ``--strategy``."""
    name, _, arg = strategy.strip().partition(":")
    if name == "fixed":
        try:
            return name, int(arg)
        except ValueError:
            raise ChipTuningError(f"--strategy fixed:L needs an integer layer, got {strategy!r}") from None
    if name in ("within", "cascade"):
        try:
            delta = float(arg[:-1]) / 100 if arg.endswith("%") else float(arg)
        except ValueError:
            raise ChipTuningError(f"--strategy {name}:DELTA needs a number (0.01 = one point), got {strategy!r}") from None
        if not 0 <= delta < 1:
            raise ChipTuningError(f"--strategy {name}:DELTA takes an accuracy fraction in [0, 1) "
                                  f"(0.01 = one point, or 1%), got {arg!r}")
        return name, delta
    if name in ("validate", "optimal") and not arg:
        return name, None
    raise ChipTuningError(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def pruning_stats(model_stats: dict, layer: int, num_blocks: int) -> PruningStats:
    """Parameters removed by pruning after ``layer`` (blocks layer+1..L).

    ``ratio``: removed block parameters over all of the full model's (an untied LM head counts in
    the total, not as removed: conservative); ``ratio_with_lm_head`` counts it as removed too (the
    chip replaces it); ``layer_ratio``: the share of blocks removed, the paper's convention.
    """
    removed_blocks = num_blocks - layer
    layer_ratio = removed_blocks / num_blocks if num_blocks else 0.0
    blocks, total = list(model_stats.get("blocks") or []), model_stats.get("total")
    common = dict(layer=layer, blocks_kept=layer, blocks_removed=removed_blocks, layer_ratio=layer_ratio)
    if not blocks or not total:
        return PruningStats(**common, ratio=layer_ratio, source="block count (no parameter counts recorded)",
                            lm_head_counted=False)
    removed, lm_head = int(sum(blocks[layer:])), int(model_stats.get("lm_head") or 0)
    return PruningStats(**common, params_total=int(total), params_removed=removed, params_kept=int(total) - removed,
                        ratio=removed / total, ratio_with_lm_head=min(1.0, (removed + lm_head) / total),
                        lm_head_params=lm_head, lm_head_counted="in the total, not as removed",
                        source="model_stats (parameter counts of the full model)")


class Scores:
    """The per-layer accuracies a strategy chooses from; ``candidates`` leaves out layer 0."""

    def __init__(self, chips: ChipSet) -> None:
        rows = sorted(chips.metrics, key=lambda r: int(r["layer"]))
        if not rows:
            raise ChipTuningError(f"{chips.path} has no per-layer metrics; train the chips again")
        self.chips, self.rows = chips, {int(r["layer"]): r for r in rows}
        self.val = {layer: _accuracy(r, "val_accuracy") for layer, r in self.rows.items()}
        self.eval = {layer: _accuracy(r, "eval_accuracy") for layer, r in self.rows.items()}
        self.candidates = [layer for layer in self.rows if layer >= 1]
        self.note = "; layer 0 (embeddings only, no block) is never a candidate" if min(self.rows) < 1 else ""

    def check_candidates(self, name: str) -> None:
        if not self.candidates:
            raise ChipTuningError(f"--strategy {name}: the chips cover only layer(s) {sorted(self.rows)}; a pruned "
                                  "model needs at least one transformer block (a chip at a layer >= 1)")

    def best(self, name: str, scores: dict[int, float | None], needs: str) -> tuple[int, dict[int, float]]:
        """The candidate of the highest score (ties: the shallowest), and the candidates' scores."""
        self.check_candidates(name)
        if any(scores[layer] is None for layer in self.rows):
            raise ChipTuningError(f"--strategy {name} needs {needs}")
        scored = {layer: scores[layer] for layer in self.candidates}
        return min(scored, key=lambda layer: (-scored[layer], layer)), scored


NO_VALIDATION = ("validation accuracy; the chips were trained with --val-size 0 (retrain with validation rows, "
                 "or use fixed:L)")
# A strategy: (scores, its argument) -> (layer, why, fields of the Selection, cascade curve rows or None).
Strategy = Callable[[Scores, "float | int | None"], tuple[int, str, dict, list | None]]


def choose_fixed(s: Scores, layer: int):
    if layer not in s.rows:
        raise ChipTuningError(f"--strategy fixed:{layer}: no chip at layer {layer} "
                              f"(chips cover layers {min(s.rows)}..{max(s.rows)})")
    if layer < 1:
        raise ChipTuningError(f"--strategy fixed:{layer}: a pruned model needs at least one transformer block; "
                              "choose a layer >= 1 (layer 0 is the embedding output)")
    return layer, f"layer {layer} was fixed by the user", {}, None


def choose_validate(s: Scores, _):
    layer, val = s.best("validate", s.val, NO_VALIDATION)
    why = f"best validation accuracy ({val[layer]:.4f}) over layers {_span(val)}{s.note}"
    return layer, why, dict(best_val_layer=layer, best_val_accuracy=val[layer]), None


def choose_within(s: Scores, delta: float):
    best, val = s.best("within", s.val, NO_VALIDATION)
    # A tiny slack absorbs float noise in accuracies such as 0.7 - 0.01; never more.
    layer = min(layer for layer, acc in val.items() if acc >= val[best] - delta - 1e-12)
    why = (f"shallowest layer whose validation accuracy ({val[layer]:.4f}) is within {delta:g} of the best "
           f"({val[best]:.4f} at layer {best}) over layers {_span(val)}{s.note}")
    return layer, why, dict(best_val_layer=best, best_val_accuracy=val[best], delta=delta), None


def choose_optimal(s: Scores, _):
    layer, scored = s.best("optimal", s.eval, "eval accuracy; train with --eval EVAL_CACHE")
    why = (f"best eval accuracy ({scored[layer]:.4f}) over layers {_span(scored)}: an ORACLE that looks at the eval "
           f"labels, an upper bound only, not a fair selection{s.note}")
    return layer, why, {}, None


def choose_cascade(s: Scores, delta: float):
    s.check_candidates("cascade")
    cascade, material = calibrate_cascade(s.chips, delta)
    layer, sim = cascade.reference_layer, cascade.simulated
    if cascade.fallback:
        why = (f"no early exit kept validation accuracy within {delta:g} of the best fixed chip, so the cascade is "
               f"that chip alone (layer {layer}, validation accuracy {sim.reference_val_accuracy:.4f})")
    else:
        depth = sim.eval_mean_depth if sim.eval_mean_depth is not None else sim.val_mean_depth
        why = (f"early-exit cascade ({describe_exits(cascade.exits)}): validation accuracy {sim.val_accuracy:.4f} "
               f"against {sim.reference_val_accuracy:.4f} for the best fixed chip (layer {layer}); mean depth "
               f"{depth:.2f} blocks, {layer / depth:.2f}x fewer")
    on_eval = sim.eval_accuracy is not None  # what the cascade scores, not its last chip alone
    fields = dict(cascade=cascade, expected_accuracy=sim.eval_accuracy if on_eval else sim.val_accuracy,
                  expected_accuracy_from=f"{'eval' if on_eval else 'validation'} (simulated cascade)")
    return layer, why, fields, cascade_curve(cascade, material, s.chips)


STRATEGY_FUNCTIONS: dict[str, Strategy] = {"fixed": choose_fixed, "validate": choose_validate,
                                           "within": choose_within, "optimal": choose_optimal,
                                           "cascade": choose_cascade}


def select_layer(chips: ChipSet | str | Path, strategy: str = "validate", write: bool = True,
                 allow_pickle: bool = False) -> Selection:
    """Choose the pruning layer of a chips directory and (by default) write selection.json + report.md.

    The chosen chip (a cascade's exits) must score on the eval cache what its metrics say
    (:func:`~chiptuning.probe.chipset.check_chips_on_cache`, when that cache is at hand).

    Args:
        chips: a ChipSet or a chips directory.
        strategy: one of :data:`STRATEGIES`.
        write: write ``selection.json``, ``report.md`` (and a cascade's files) into the chips
            directory; a file of those names an earlier ``select`` did not write, or that was
            edited since, is never replaced: the command refuses, naming it.
        allow_pickle: load a directory of pickled chips (see :func:`~chiptuning.probe.load_chips`).

    Raises:
        ChipTuningError: unknown strategy, no chip at the layer, metrics the strategy needs that
            were not recorded, chips that do not score what they record, a user's file in the way.
    """
    chips = chips if isinstance(chips, ChipSet) else load_chips(chips, allow_pickle=allow_pickle)
    name, arg = parse_strategy(strategy)
    if write and chips.path is not None:
        check_select_files(Path(chips.path))  # refused now, not after calibrating a cascade
    scores = Scores(chips)
    layer, why, fields, curve = STRATEGY_FUNCTIONS[name](scores, arg)
    val, ev = scores.val.get(layer), scores.eval.get(layer)
    expected = dict(expected_accuracy=ev if ev is not None else val,
                    expected_accuracy_from=("eval (optimistic: the oracle chose on it)" if name == "optimal"
                                            else "eval" if ev is not None else "validation"))
    selection = Selection(
        layer=layer, strategy=strategy, oracle=name == "optimal", why=why, chip=chips.kind, val_accuracy=val,
        eval_accuracy=ev, train_accuracy=_accuracy(scores.rows[layer], "train_accuracy"),
        num_blocks=chips.record.num_blocks, pruning=pruning_stats(chips.record.model_stats, layer,
                                                                  chips.record.num_blocks), **(expected | fields))
    check_chips_on_cache(chips, selection.cascade.layers if selection.cascade is not None else [layer])
    chips.selection = selection
    if write and chips.path is not None:
        write_selection(Path(chips.path), chips, selection, curve)
        log.info("selected layer %d (%s); wrote %s", layer, strategy, Path(chips.path) / SELECTION)
    return selection


def check_select_files(root: Path) -> dict[str, str]:
    """The files an earlier ``select`` wrote into ``root``, unchanged since (what this one may
    replace), after refusing any file of ``select``'s names that is not one of them."""
    earlier = Selection.read(root / SELECTION).files if (root / SELECTION).exists() else {}
    ours = {name: digest for name, digest in earlier.items() if is_unchanged(root, name, digest)}
    foreign = [name for name in SELECT_FILES if os.path.lexists(root / name) and name not in ours]
    if foreign:
        raise ChipTuningError(f"{root} holds {', '.join(foreign)}, which `chiptuning select` did not write (or "
                              "which were edited since); they are never replaced: move them elsewhere and select "
                              "again (nothing was changed)")
    return ours


def write_selection(root: Path, chips: ChipSet, selection: Selection, curve: list | None) -> None:
    """Write report.md and a cascade's files, each beside its name and renamed over only a file an
    earlier ``select`` wrote, remove that selection's files this one does not write again, and write
    selection.json (listing every file with its sha256) last."""
    ours = check_select_files(root)
    outputs = {REPORT: lambda path: path.write_text(render_report(chips, selection))}
    if curve is not None:
        outputs.update({"cascade.json": selection.cascade.write, "cascade_curve.csv": lambda p: write_rows(p, curve),
                        "cascade.png": lambda p: plot_cascade_curve(curve, p)})
    written = {}
    for name, write in outputs.items():
        tmp = temporary_name(root / name)
        try:
            write(tmp)
            written[name] = sha256_file(tmp)
            os.replace(tmp, root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    for name in set(ours) - set(written):
        (root / name).unlink(missing_ok=True)
    selection.files, selection.chiptuning_version = written, __version__
    selection.write(root / SELECTION)


def render_report(chips: ChipSet, selection: Selection) -> str:
    """A short markdown report: what was trained, the selected layer and why, a per-layer table."""
    cache, pr, record = chips.record.train_cache, selection.pruning, chips.record
    lines = [
        "# Chip-tuning report", "",
        f"- chip: **{chips.kind}**, {len(chips.layers)} layers, {chips.n_classes} classes "
        f"({', '.join(chips.label_names)})",
        f"- model: `{cache.meta.model if cache and cache.meta else '?'}`, train cache "
        f"`{cache.fingerprint if cache else '?'}`",
        f"- validation: {record.validation.size if record.validation else 0} rows carved from the training cache",
        "", "## Selection", "",
        f"- strategy `{selection.strategy}` -> **layer {selection.layer}**"
        + (" (ORACLE: chosen on the eval labels, an upper bound only)" if selection.oracle else ""),
        f"- why: {selection.why}",
        f"- expected accuracy: {_fmt(selection.expected_accuracy)} (from {selection.expected_accuracy_from})",
        f"- pruning: {pr.blocks_removed} of {selection.num_blocks} blocks removed; "
        f"{100 * pr.ratio:.1f}% of the model's parameters"
        + (f" ({100 * pr.ratio_with_lm_head:.1f}% counting the LM head the chip replaces)"
           if pr.ratio_with_lm_head is not None else f" ({pr.source})"),
        "", "## Per layer", "",
        "| layer | train acc | val acc | eval acc | params removed | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(chips.metrics, key=lambda r: int(r["layer"])):
        layer = int(row["layer"])
        ratio = pruning_stats(record.model_stats, layer, selection.num_blocks).ratio
        lines.append(f"| {layer} | {_fmt(row.get('train_accuracy'))} | {_fmt(row.get('val_accuracy'))} | "
                     f"{_fmt(row.get('eval_accuracy'))} | {100 * ratio:.1f}% | "
                     f"{'**selected**' if layer == selection.layer else ''} |")
    return "\n".join(lines + ["", "![accuracy by layer](layer_accuracy.png)", ""])


def _accuracy(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or value == "" else float(value)


def _span(scores: dict) -> str:
    return f"{min(scores)}..{max(scores)}"


def _fmt(value) -> str:
    return "-" if value is None or value == "" else f"{float(value):.4f}"


__all__ = ["SELECT_FILES", "STRATEGIES", "STRATEGY_FUNCTIONS", "check_select_files", "parse_strategy",
           "pruning_stats", "render_report", "select_layer", "write_selection"]
