"""Pick the layer to prune at: ``chiptuning select CHIPS_DIR --strategy ...``.

Strategies (the paper's three, plus one for "most pruning at a marginal loss"):

* ``fixed:L`` -- layer L, whatever the metrics say.
* ``validate`` -- the best validation accuracy (validation rows carved from the training cache);
  ties go to the shallowest layer, which prunes more.
* ``optimal`` -- the best *eval* accuracy: an oracle that looks at the test labels, an upper
  bound only, never a fair model selection.
* ``within:DELTA`` -- the shallowest layer whose validation accuracy is within DELTA (a fraction:
  0.01 = one point) of the best; never a layer more than DELTA below the best.
* ``cascade:DELTA`` -- early exit: the chips of several layers in turn, each example stopping at
  the first one confident enough, with validation accuracy within DELTA of the best fixed chip and
  the fewest expected blocks (:mod:`chiptuning.probe.cascade`); the pruned model keeps blocks up
  to the last exit layer. Writes ``cascade.json``, ``cascade_curve.csv`` and ``cascade.png``.

Layer 0 (the embedding output) is never a candidate of ``validate``, ``optimal`` or ``within``
and ``fixed:0`` is refused: a pruned model keeps blocks 1..l and needs at least one.

Every selection reports the pruning ratio as the fraction of the model's parameters removed,
from the parameter counts the extractor recorded (``model_stats``): pruning at layer l removes
blocks l+1..L.
"""

from __future__ import annotations

import logging
import os
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
CASCADE_FILE = "cascade.json"
CASCADE_CURVE = "cascade_curve.csv"
CASCADE_PLOT = "cascade.png"

#: The shallowest layer a pruned model can end at: layer 0 is the embedding output, and a pruned
#: model keeps blocks 1..layer, so it needs layer >= 1.
MIN_PRUNE_LAYER = 1
_LAYER0_NOTE = "; layer 0 (embeddings only, no block) is never a candidate"


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
    """Parameters removed by pruning after ``layer`` (blocks layer+1..L are deleted).

    ``ratio`` = removed block parameters / all parameters of the full model (``total``, which
    includes an untied LM head). The LM head is counted in the total but not as removed, so the
    ratio is conservative; ``ratio_with_lm_head`` also counts it as removed (the chip replaces it).
    ``layer_ratio`` is the share of blocks removed, the paper's convention.
    """
    removed_blocks = num_blocks - layer
    layer_ratio = removed_blocks / num_blocks if num_blocks else 0.0
    blocks = list(model_stats.get("blocks") or [])
    total = model_stats.get("total")
    if not blocks or not total:
        return PruningStats(layer=layer, blocks_kept=layer, blocks_removed=removed_blocks, layer_ratio=layer_ratio,
                            ratio=layer_ratio, source="block count (no parameter counts recorded)",
                            lm_head_counted=False)
    removed = int(sum(blocks[layer:]))
    lm_head = int(model_stats.get("lm_head") or 0)
    return PruningStats(
        layer=layer, blocks_kept=layer, blocks_removed=removed_blocks, layer_ratio=layer_ratio,
        params_total=int(total), params_removed=removed, params_kept=int(total) - removed,
        ratio=removed / total, ratio_with_lm_head=min(1.0, (removed + lm_head) / total),
        lm_head_params=lm_head, lm_head_counted="in the total, not as removed",
        source="model_stats (parameter counts of the full model)",
    )


def _accuracy(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or value == "" else float(value)


def select_layer(chips: ChipSet | str | Path, strategy: str = "validate", write: bool = True,
                 allow_pickle: bool = False) -> Selection:
    """Choose the pruning layer of a chips directory and (by default) write selection.json + report.md.

    The chosen chip (and a cascade's exits) is checked on the eval cache the chips record, when it
    is at hand (:func:`~chiptuning.probe.chipset.check_chips_on_cache`): it must score what its
    metrics say.

    Args:
        chips: a ChipSet or a chips directory.
        strategy: ``fixed:L``, ``validate``, ``optimal`` or ``within:DELTA``.
        write: write ``selection.json`` and ``report.md`` into the chips directory; a file of
            those names that an earlier ``select`` did not write (or that was edited since) is
            never replaced: the command refuses, naming it.
        allow_pickle: load a directory of pickled chips (see :func:`~chiptuning.probe.load_chips`).

    Returns:
        The selection: layer, strategy, why, whether it is an oracle, expected accuracy and the
        pruning statistics.

    Raises:
        ChipTuningError: unknown strategy, a layer without a chip, metrics the strategy needs
            (validation or eval accuracy) that were not recorded, chips that do not score what
            they record, or a file of the user's in the way.
    """
    chips = chips if isinstance(chips, ChipSet) else load_chips(chips, allow_pickle=allow_pickle)
    name, arg = parse_strategy(strategy)
    if write and chips.path is not None:
        check_select_files(Path(chips.path))  # refused now, not after calibrating a cascade
    rows = sorted(chips.metrics, key=lambda r: int(r["layer"]))
    if not rows:
        raise ChipTuningError(f"{chips.path} has no per-layer metrics; train the chips again")
    by_layer = {int(r["layer"]): r for r in rows}
    val = {layer: _accuracy(r, "val_accuracy") for layer, r in by_layer.items()}
    ev = {layer: _accuracy(r, "eval_accuracy") for layer, r in by_layer.items()}
    has_val = all(v is not None for v in val.values())
    has_eval = all(v is not None for v in ev.values())
    extra: dict = {}
    # A pruned model keeps blocks 1..layer: layer 0 (the embeddings) would leave no block at all.
    candidates = [layer for layer in by_layer if layer >= MIN_PRUNE_LAYER]
    if name == "fixed":
        layer = int(arg)
        if layer not in by_layer:
            raise ChipTuningError(f"--strategy fixed:{layer}: no chip at layer {layer} "
                                  f"(chips cover layers {rows[0]['layer']}..{rows[-1]['layer']})")
        if layer < MIN_PRUNE_LAYER:
            raise ChipTuningError(f"--strategy fixed:{layer}: a pruned model needs at least one transformer "
                                  f"block; choose a layer >= {MIN_PRUNE_LAYER} (layer 0 is the embedding output)")
        why = f"layer {layer} was fixed by the user"
    elif not candidates:
        raise ChipTuningError(f"--strategy {name}: the chips cover only layer(s) {sorted(by_layer)}; a pruned model "
                              f"needs at least one transformer block (a chip at a layer >= {MIN_PRUNE_LAYER})")
    elif name in ("validate", "within"):
        if not has_val:
            raise ChipTuningError(f"--strategy {name} needs validation accuracy; the chips were trained "
                                  "with --val-size 0 (retrain with validation rows, or use fixed:L)")
        val = {layer: val[layer] for layer in candidates}
        best_layer = min(val, key=lambda layer: (-val[layer], layer))  # ties: shallowest
        best = val[best_layer]
        extra.update(best_val_layer=best_layer, best_val_accuracy=best)
        if name == "validate":
            layer = best_layer
            why = f"best validation accuracy ({best:.4f}) over layers {_span(val)}"
        else:
            delta = float(arg)
            # A tiny slack absorbs float noise in accuracies such as 0.7 - 0.01; never more.
            layer = min(layer for layer, acc in val.items() if acc >= best - delta - 1e-12)
            extra["delta"] = delta
            why = (f"shallowest layer whose validation accuracy ({val[layer]:.4f}) is within "
                   f"{delta:g} of the best ({best:.4f} at layer {best_layer}) over layers {_span(val)}")
        if min(by_layer) < MIN_PRUNE_LAYER:
            why += _LAYER0_NOTE
    elif name == "cascade":
        cascade, material = calibrate_cascade(chips, float(arg))
        layer, sim = cascade.reference_layer, cascade.simulated
        extra["cascade"] = cascade
        extra["cascade_curve"] = cascade_curve(cascade, material, chips)
        if cascade.fallback:
            why = (f"no early exit kept validation accuracy within {arg:g} of the best fixed chip, so the cascade is "
                   f"that chip alone (layer {layer}, validation accuracy {sim.reference_val_accuracy:.4f})")
        else:
            depth = sim.eval_mean_depth if sim.eval_mean_depth is not None else sim.val_mean_depth
            why = (f"early-exit cascade ({describe_exits(cascade.exits)}): validation accuracy "
                   f"{sim.val_accuracy:.4f} against {sim.reference_val_accuracy:.4f} for the best fixed chip "
                   f"(layer {layer}); mean depth {depth:.2f} blocks, {layer / depth:.2f}x fewer")
    else:  # optimal
        if not has_eval:
            raise ChipTuningError("--strategy optimal needs eval accuracy; train with --eval EVAL_CACHE")
        scored = {layer: ev[layer] for layer in candidates}
        layer = min(scored, key=lambda layer: (-scored[layer], layer))
        why = (f"best eval accuracy ({ev[layer]:.4f}) over layers {_span(scored)}: an ORACLE that looks at "
               "the eval labels, an upper bound only, not a fair selection")
        if min(by_layer) < MIN_PRUNE_LAYER:
            why += _LAYER0_NOTE
    num_blocks = chips.record.num_blocks
    curve = extra.pop("cascade_curve", None)
    selection = Selection(
        layer=layer, strategy=strategy, oracle=name == "optimal", why=why, chip=chips.kind,
        val_accuracy=val.get(layer), eval_accuracy=ev.get(layer),
        train_accuracy=_accuracy(by_layer[layer], "train_accuracy"),
        expected_accuracy=ev.get(layer) if ev.get(layer) is not None else val.get(layer),
        expected_accuracy_from=("eval (optimistic: the oracle chose on it)" if name == "optimal"
                                else "eval" if ev.get(layer) is not None else "validation"),
        num_blocks=num_blocks, pruning=pruning_stats(chips.record.model_stats, layer, num_blocks), **extra,
    )
    check_chips_on_cache(chips, selection.cascade.layers if selection.cascade is not None else [layer])
    if selection.cascade is not None:  # what the cascade itself scores, not its last chip alone
        sim = selection.cascade.simulated
        on_eval = sim.eval_accuracy is not None
        selection.expected_accuracy = sim.eval_accuracy if on_eval else sim.val_accuracy
        selection.expected_accuracy_from = "eval (simulated cascade)" if on_eval else "validation (simulated cascade)"
    chips.selection = selection
    if write and chips.path is not None:
        write_selection(Path(chips.path), chips, selection, curve)
        log.info("selected layer %d (%s); wrote %s", layer, strategy, Path(chips.path) / SELECTION)
    return selection


#: Everything ``select`` may write into a chips directory besides selection.json.
SELECT_FILES = (REPORT, CASCADE_FILE, CASCADE_CURVE, CASCADE_PLOT)


def check_select_files(root: Path) -> dict[str, str]:
    """The files an earlier ``select`` wrote into ``root`` and that are unchanged since (what this
    one may replace), after refusing any file of ``select``'s names that is not one of them.

    Raises:
        ChipTuningError: naming the files that are the user's (or were edited).
    """
    earlier = Selection.read(root / SELECTION).files if (root / SELECTION).exists() else {}
    ours = {name: digest for name, digest in earlier.items() if is_unchanged(root, name, digest)}
    foreign = [name for name in SELECT_FILES if os.path.lexists(root / name) and name not in ours]
    if foreign:
        raise ChipTuningError(f"{root} holds {', '.join(foreign)}, which `chiptuning select` did not write (or "
                              "which were edited since); they are never replaced: move them elsewhere and select "
                              "again (nothing was changed)")
    return ours


def write_selection(root: Path, chips: ChipSet, selection: Selection, curve: list | None) -> None:
    """Write ``selection.json``, ``report.md`` and the cascade's files into the chips directory
    ``root``: each beside its name and renamed over only a file an earlier ``select`` wrote; files
    of that earlier selection this one does not write again are removed; selection.json, listing
    every file with its sha256, last."""
    ours = check_select_files(root)
    outputs = {REPORT: lambda path: path.write_text(render_report(chips, selection))}
    if curve is not None:
        outputs[CASCADE_FILE] = selection.cascade.write
        outputs[CASCADE_CURVE] = lambda path: write_rows(path, curve)
        outputs[CASCADE_PLOT] = lambda path: plot_cascade_curve(curve, path)
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
    for name in set(ours) - set(written):  # an earlier cascade's files, unchanged since it wrote them
        (root / name).unlink(missing_ok=True)
    selection.files = written
    selection.chiptuning_version = __version__
    selection.write(root / SELECTION)


def _span(scores: dict) -> str:
    return f"{min(scores)}..{max(scores)}"


def render_report(chips: ChipSet, selection: Selection) -> str:
    """A short markdown report: what was trained, the selected layer and why, per-layer table."""
    cache = chips.record.train_cache
    pr = selection.pruning
    lines = [
        "# Chip-tuning report",
        "",
        f"- chip: **{chips.kind}**, {len(chips.layers)} layers, {chips.n_classes} classes "
        f"({', '.join(chips.label_names)})",
        f"- model: `{cache.meta.model if cache and cache.meta else '?'}`, train cache "
        f"`{cache.fingerprint if cache else '?'}`",
        f"- validation: {chips.record.validation.size if chips.record.validation else 0} rows carved from the "
        "training cache",
        "",
        "## Selection",
        "",
        f"- strategy `{selection.strategy}` -> **layer {selection.layer}**"
        + (" (ORACLE: chosen on the eval labels, an upper bound only)" if selection.oracle else ""),
        f"- why: {selection.why}",
        f"- expected accuracy: {_fmt(selection.expected_accuracy)} (from {selection.expected_accuracy_from})",
        f"- pruning: {pr.blocks_removed} of {selection.num_blocks} blocks removed; "
        f"{100 * pr.ratio:.1f}% of the model's parameters"
        + (f" ({100 * pr.ratio_with_lm_head:.1f}% counting the LM head the chip replaces)"
           if pr.ratio_with_lm_head is not None else f" ({pr.source})"),
        "",
        "## Per layer",
        "",
        "| layer | train acc | val acc | eval acc | params removed | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    stats = chips.record.model_stats
    for row in sorted(chips.metrics, key=lambda r: int(r["layer"])):
        layer = int(row["layer"])
        mark = "**selected**" if layer == selection.layer else ""
        ratio = pruning_stats(stats, layer, selection.num_blocks).ratio
        lines.append(f"| {layer} | {_fmt(row.get('train_accuracy'))} | {_fmt(row.get('val_accuracy'))} | "
                     f"{_fmt(row.get('eval_accuracy'))} | {100 * ratio:.1f}% | {mark} |")
    lines += ["", "![accuracy by layer](layer_accuracy.png)", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or value == "" else f"{float(value):.4f}"


__all__ = ["SELECT_FILES", "STRATEGIES", "check_select_files", "parse_strategy", "pruning_stats", "render_report",
           "select_layer", "write_selection"]
