"""The probe stage's records, on the codec of :mod:`chiptuning.records`: ``chips.json``
(:class:`ChipsRecord`), ``chip.json`` (:class:`LayerChipRecord`), ``metrics.json`` (:class:`Metrics`),
``selection.json`` (:class:`Selection`, with a :class:`Cascade` for early exit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chiptuning import __version__
from chiptuning.cache import CacheMeta, check_label_names, check_layers, check_model_stats
from chiptuning.errors import ChipTuningError
from chiptuning.records import Invalid, Record, rule


def plain_file_name(name: str, where: str) -> None:
    """A file a record names: a plain file name inside its directory, never a path."""
    if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise Invalid(where, f"{name!r} is not a file name inside the directory; refusing to follow it")


@dataclass
class CacheRef(Record):
    """A cache that chips were trained or scored on: the training cache with its meta, the eval
    cache with a summary (model and split)."""

    fingerprint: str
    path: str = ""  # as given
    n_rows: int = rule(0, ge=0)
    meta: CacheMeta | None = rule(None, omit_none=True)
    model: str | None = rule(None, omit_none=True)
    split: str | None = rule(None, omit_none=True)

    @classmethod
    def of(cls, cache, with_meta: bool = True) -> CacheRef:
        """The reference to a cache reader (meta in full, or only model and split)."""
        meta = cache.meta
        return cls(path=str(getattr(cache, "path", "")), fingerprint=cache.fingerprint, n_rows=int(cache.n_rows),
                   meta=meta if with_meta else None,
                   model=None if with_meta else meta.model, split=None if with_meta else meta.split)


@dataclass
class Validation(Record):
    """The validation rows carved from the training cache (seeded, disjoint from training)."""

    size: int = rule(ge=0)
    seed: int = 0
    rows: list[int] = rule(default_factory=list, ge=0)
    source: str = "train cache"
    n_train_rows: int = rule(0, ge=0)

    def check(self) -> None:
        if len(self.rows) != self.size or len(set(self.rows)) != len(self.rows):
            raise Invalid("rows", f"must be {self.size} distinct rows, got {len(self.rows)}")


@dataclass
class ZeroShot(Record):
    """The dense model's own answer on the eval cache (:func:`chiptuning.probe.lens.zero_shot_report`)."""

    accuracy: float = rule(ge=0, le=1)
    layer: int = rule(ge=0)
    calibrated_accuracy: float | None = rule(None, ge=0, le=1)
    n_examples: int = rule(0, ge=0)
    prompt: str = "plain"
    label_tokens: list[list[str]] = field(default_factory=list)
    prediction_share: dict[str, float] = rule(default_factory=dict, ge=0, le=1)


@dataclass
class MetricRow(Record):
    """One layer's chip: accuracy and loss on each part, training length, the model's own answer."""

    layer: int = rule(ge=0)
    chip: str = ""
    train_accuracy: float | None = rule(None, ge=0, le=1)
    train_loss: float | None = rule(None, ge=0)
    val_accuracy: float | None = rule(None, ge=0, le=1)
    val_loss: float | None = rule(None, ge=0)
    eval_accuracy: float | None = rule(None, ge=0, le=1)
    eval_loss: float | None = rule(None, ge=0)
    best_epoch: int | None = rule(None, ge=0)
    epochs_run: int | None = rule(None, ge=0)
    n_train: int = rule(0, ge=0)
    n_val: int = rule(0, ge=0)
    n_eval: int = rule(0, ge=0)
    lens_accuracy: float | None = rule(None, ge=0, le=1, omit_none=True)
    lens_calibrated_accuracy: float | None = rule(None, ge=0, le=1, omit_none=True)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Metrics(Record):
    """``metrics.json``: the metric row of every layer's chip."""

    FORMAT = "chiptuning-metrics"
    LEGACY = True

    chip: str
    layers: list[MetricRow] = field(default_factory=list)

    def check(self) -> None:
        check_layers([row.layer for row in self.layers], None, "layers")


@dataclass
class PruningStats(Record):
    """What pruning after ``layer`` removes (:func:`chiptuning.probe.select.pruning_stats`)."""

    layer: int = rule(ge=0)
    blocks_kept: int = rule(ge=0)
    blocks_removed: int = rule(ge=0)
    layer_ratio: float = rule(ge=0, le=1)
    ratio: float = rule(ge=0, le=1)
    source: str = ""
    lm_head_counted: bool | str = False
    params_total: int | None = rule(None, ge=1, omit_none=True)
    params_removed: int | None = rule(None, ge=0, omit_none=True)
    params_kept: int | None = rule(None, ge=0, omit_none=True)
    ratio_with_lm_head: float | None = rule(None, ge=0, le=1, omit_none=True)
    lm_head_params: int | None = rule(None, ge=0, omit_none=True)


@dataclass
class Simulated(Record):
    """A cascade run on the caches: accuracy and mean depth on the validation (and eval) rows,
    the best fixed chip's accuracy, how many fewer blocks it reads."""

    val_accuracy: float = rule(ge=0, le=1)
    val_mean_depth: float = rule(ge=0)
    reference_val_accuracy: float = rule(ge=0, le=1)
    n_val: int = rule(0, ge=0)
    eval_accuracy: float | None = rule(None, ge=0, le=1, omit_none=True)
    eval_mean_depth: float | None = rule(None, ge=0, omit_none=True)
    reference_eval_accuracy: float | None = rule(None, ge=0, le=1, omit_none=True)
    n_eval: int | None = rule(None, ge=0, omit_none=True)
    block_ratio: float | None = rule(None, ge=0)


@dataclass
class Cascade(Record):
    """Exit layers, ascending, and the top probability at which an example stops at each (None:
    never; the last exit answers every input left). ``reference_layer`` is the best fixed chip's
    (by validation accuracy), ``delta`` the validation accuracy the cascade may lose against it;
    ``fallback``: no threshold met ``delta``, the cascade is that chip alone."""

    layers: list[int]
    thresholds: list[float | None] = rule(ge=0, le=1)
    delta: float = rule(0.0, ge=0, le=1)
    reference_layer: int = rule(0, ge=1)
    fallback: bool = False
    simulated: Simulated | None = None

    def check(self) -> None:
        if not self.layers or len(self.layers) != len(self.thresholds):
            raise Invalid("thresholds", f"a cascade needs one threshold per exit layer ({len(self.layers)} layers, "
                                        f"{len(self.thresholds)} thresholds)")
        check_layers(self.layers, None, "layers", first=1)
        if self.thresholds[-1] is None:
            raise Invalid("thresholds", "the last exit must answer every input left (a threshold, not null)")

    @property
    def exits(self) -> list[tuple[int, float]]:
        """(layer, threshold) of the layers where an example can stop, the last one included."""
        return [(layer, t) for layer, t in zip(self.layers, self.thresholds) if t is not None]


@dataclass
class Selection(Record):
    """``selection.json``: the layer to prune at, how and why it was chosen, what it removes, and
    every file ``select`` wrote beside it (with its sha256)."""

    FORMAT = "chiptuning-selection"
    LEGACY = True

    layer: int = rule(ge=1)
    strategy: str = ""
    why: str = ""
    chip: str = ""
    num_blocks: int = rule(1, ge=1)
    pruning: PruningStats | None = None
    oracle: bool = False
    val_accuracy: float | None = rule(None, ge=0, le=1)
    eval_accuracy: float | None = rule(None, ge=0, le=1)
    train_accuracy: float | None = rule(None, ge=0, le=1)
    expected_accuracy: float | None = rule(None, ge=0, le=1)
    expected_accuracy_from: str = ""
    best_val_layer: int | None = rule(None, ge=0, omit_none=True)
    best_val_accuracy: float | None = rule(None, ge=0, le=1, omit_none=True)
    delta: float | None = rule(None, ge=0, le=1, omit_none=True)
    cascade: Cascade | None = rule(None, omit_none=True)
    files: dict[str, str] = field(default_factory=dict)
    chiptuning_version: str = __version__

    def check(self) -> None:
        if self.layer > self.num_blocks:
            raise Invalid("layer", f"{self.layer} is past the model's {self.num_blocks} blocks")
        if self.cascade is not None and self.cascade.layers[-1] != self.layer:
            raise Invalid("cascade.layers", f"the last exit {self.cascade.layers[-1]} is not the selected layer "
                                            f"{self.layer}")
        for name in self.files:
            plain_file_name(name, "files")


@dataclass
class ChipsBase(Record):
    """What every chips record holds; a subclass gives ``layers``, the layers it has a chip for."""

    chip: Literal["linear", "mlp", "logreg"]
    n_classes: int = rule(2, ge=2)  # = the label names
    label_names: list[str] = field(default_factory=list)  # in class-index order
    params: dict[str, Any] = field(default_factory=dict)  # what make_chip takes
    train: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig.to_dict()
    hidden_size: int | None = rule(None, ge=1)  # feature width
    train_cache: CacheRef | None = None  # with its meta: model, task, ...
    eval_cache: CacheRef | None = None  # a summary
    model_stats: dict[str, Any] = field(default_factory=dict)  # parameter counts, from the cache
    majority_baseline: dict[str, float] = rule(default_factory=dict, ge=0, le=1)  # per part
    zero_shot: ZeroShot | None = None  # decoders with a stored lens
    weights: str | None = None  # the weights file in the directory
    chiptuning_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (kept)

    def check(self) -> None:
        if self.label_names:
            check_label_names(self.label_names, "label_names")
            if len(self.label_names) != self.n_classes:
                raise Invalid("n_classes", f"{self.n_classes} differs from the {len(self.label_names)} label names")
        if self.weights is not None:
            plain_file_name(self.weights, "weights")
        meta = self.train_cache.meta if self.train_cache is not None else None
        if meta is not None:
            if meta.hidden_size is not None and self.hidden_size is not None and self.hidden_size != meta.hidden_size:
                raise Invalid("hidden_size", f"{self.hidden_size} differs from the training cache's {meta.hidden_size}")
            if meta.label_names and self.label_names and list(meta.label_names) != list(self.label_names):
                raise Invalid("label_names", f"{self.label_names} differ from the training cache's {meta.label_names}")
        check_model_stats(self.model_stats, None if meta is None else meta.num_blocks, "model_stats")
        check_layers(self.layers, self.num_blocks if (meta or self.model_stats) else None, "layers")

    @property
    def cache_meta(self) -> CacheMeta:
        """The training cache's meta (model, task, feature mode, ...)."""
        if self.train_cache is None or self.train_cache.meta is None:
            raise ChipTuningError("the chips record no training-cache meta (model, task); they cannot be checked "
                                  "against the model: re-train them with `chiptuning probe train`")
        return self.train_cache.meta

    @property
    def num_blocks(self) -> int:
        """L of the model the chips were trained on."""
        if self.model_stats.get("blocks"):
            return len(self.model_stats["blocks"])
        meta = self.train_cache.meta if self.train_cache is not None else None
        return int((meta.num_blocks if meta is not None else None) or max(self.layers))


@dataclass
class ChipsRecord(ChipsBase):
    """``chips.json``: what a chips directory holds (the layers with a chip, ascending; the
    validation rows; every file ``probe train`` wrote besides this record, with its sha256) and
    where it came from."""

    FORMAT = "chiptuning-chips"

    layers: list[int] = field(default_factory=list)
    validation: Validation | None = None
    files: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if not self.layers:
            raise Invalid("layers", "is empty")
        super().check()
        cache = self.train_cache
        if cache is not None and cache.meta is not None and cache.meta.layers \
                and not set(self.layers) <= set(cache.meta.layers):
            raise Invalid("layers", f"{self.layers[:6]}... are not all layers of the training cache")
        if self.validation is not None and cache is not None and cache.n_rows \
                and any(r >= cache.n_rows for r in self.validation.rows):
            raise Invalid("validation.rows", f"point past the training cache's {cache.n_rows} rows")
        for name in self.files:
            plain_file_name(name, "files")


@dataclass
class LayerChipRecord(ChipsBase):
    """``chip.json`` of a single-chip directory (inside a pruned checkpoint): the chips record of
    one layer, with that layer's metric row and the selection when the chip was saved."""

    FORMAT = "chiptuning-chip"

    layer: int = rule(0, ge=0)
    metrics: MetricRow | None = None
    selection: Selection | None = None

    @property
    def layers(self) -> list[int]:
        return [self.layer]

