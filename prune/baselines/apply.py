"""Run a baseline end to end: plan, cut, save a standard checkpoint with ``pruning.json``, check it.

A model larger than memory runs streamed (``offload``, :func:`chiptuning.models.load_model`): every
method plans on it without reading more than a few blocks into memory, the cut model's kept
original blocks are saved one shard at a time from the model's own files
(:func:`chiptuning.prune.checkpoint.save_weights`), and the saved checkpoint is reloaded streamed
for its checks.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from chiptuning import __version__
from chiptuning.errors import ChipTuningError, ProvenanceError
from chiptuning.io import write_json_atomic
from chiptuning.models import (
    empty_model,
    is_streamed,
    load_config,
    load_model,
    load_tokenizer,
    model_device,
    stream_device_map,
    weights_hash,
)
from chiptuning.outputs import DEPTH_PRUNED, check_output, write_output, written_files
from chiptuning.prune.baselines.calibration import Calibration, calibration_from_task
from chiptuning.prune.baselines.drop import plan_angular, plan_shortgpt, plan_tail
from chiptuning.prune.baselines.merging import plan_laco, plan_slm
from chiptuning.prune.baselines.plan import Plan
from chiptuning.prune.baselines.streamline import plan_streamline
from chiptuning.prune.checkpoint import save_weights
from chiptuning.prune.provenance import BaseModel, record_hash, verify_checksums
from chiptuning.prune.truncate import rebuild_blocks_
from chiptuning.records import Invalid, Record, read_json, rule
from chiptuning.registry import get_blocks, get_spec, num_blocks

log = logging.getLogger(__name__)

METHODS = ("tail", "shortgpt", "angular", "streamline", "slm", "laco")
RECORD_FILE = "pruning.json"
RECORD_FORMAT = "chiptuning-depth-pruned"
#: Defaults of the method options (each documented on its ``plan_*`` function).
DEFAULTS: dict[str, dict[str, Any]] = {
    "streamline": {"replacement": "layer", "epochs": 10, "lr": 5e-4, "holdout": 0.2, "seed": 0},
    "slm": {"threshold": 0.9},
    "laco": {"threshold": 0.9, "merge_layers": 4, "interval": 2},
}
GENERATION_CHECK_PROMPT = "The quick brown fox"


@dataclass
class ParamCounts(Record):
    """Parameters of the model before and after, and the share removed."""

    before: int = rule(ge=1)
    after: int = rule(ge=1)
    pruning_ratio: float = rule(ge=0, le=1)


@dataclass
class DepthPruningRecord(Record):
    """``pruning.json``: what a depth-pruning method did to a model, and the checkpoint's files.

    Attributes:
        method: one of :data:`METHODS`; options: its settings (:data:`DEFAULTS` filled in).
        base_model: the full model.
        num_blocks: blocks of the result; blocks_removed, block_ratio: what it lost.
        groups: per block of the result, the original blocks (1-based) it stands for.
        removed: original blocks that no longer exist as they were.
        details: the method's scores, thresholds and training metrics.
        calibration: the calibration text's source and size (None for methods without).
        cache: the last-token cache it read, if any.
        params: parameter counts.
        reload, generation: the checks run on the saved checkpoint.
        checksums: sha256 of every file written besides this record.
        record_sha256: sha256 of this record itself.
    """

    FORMAT = RECORD_FORMAT
    ERROR = ProvenanceError

    method: Literal["tail", "shortgpt", "angular", "streamline", "slm", "laco"]
    base_model: BaseModel
    num_blocks: int = rule(ge=1)
    groups: list[list[int]] = rule(default_factory=list, ge=1)
    removed: list[int] = rule(default_factory=list, ge=1)
    blocks_removed: int = rule(0, ge=0)
    block_ratio: float = rule(0.0, ge=0, le=1)
    params: ParamCounts | None = None
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    cache: str | None = None
    reload: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    record_sha256: str | None = rule(None, omit_none=True)
    chiptuning_version: str = __version__

    def check(self) -> None:
        L = self.base_model.num_blocks
        if len(self.groups) != self.num_blocks or self.blocks_removed != L - self.num_blocks:
            raise Invalid("groups", f"{len(self.groups)} groups for {self.num_blocks} blocks, {self.blocks_removed} "
                                    f"of {L} removed: they do not add up")
        flat = [i for group in self.groups for i in group]
        if flat != sorted(set(flat)) or (flat and flat[-1] > L):
            raise Invalid("groups", f"must name distinct blocks of 1..{L} in order")


def plan_method(model, method: str, n: int, tokenizer=None, calibration: Calibration | None = None,
                cache=None, **options) -> Plan:
    """The :class:`Plan` of ``method`` removing ``n`` blocks (options: see each ``plan_*``)."""
    if method not in METHODS:
        raise ChipTuningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - set(DEFAULTS.get(method, {}))
    if unknown:
        raise ChipTuningError(f"{method} does not take the option(s) {sorted(unknown)}")
    opts = {**DEFAULTS.get(method, {}), **options}
    needs_text = method in ("streamline", "slm", "laco") or (method in ("shortgpt", "angular") and cache is None)
    if needs_text and (calibration is None or tokenizer is None):
        raise ChipTuningError(f"{method} needs calibration text (and the tokenizer)")
    if method == "tail":
        return plan_tail(model, n)
    if method == "shortgpt":
        return plan_shortgpt(model, n, tokenizer, calibration, cache=cache)
    if method == "angular":
        return plan_angular(model, n, tokenizer, calibration, cache=cache)
    if method == "streamline":
        return plan_streamline(model, n, tokenizer, calibration, **opts)
    if method == "slm":
        return plan_slm(model, n, tokenizer, calibration, **opts)
    return plan_laco(model, n, tokenizer, calibration, **opts)


def apply_plan_(model, plan: Plan) -> nn.Module:
    """Cut ``model`` in place to the plan's blocks (config depth, per-layer lists, layer ids)."""
    originals = list(get_blocks(model))
    modules = plan.blocks if plan.blocks is not None else [originals[g[0] - 1] for g in plan.groups]
    if len(modules) != len(plan.groups):
        raise ChipTuningError("plan has a different number of blocks and groups; this is a bug")
    return rebuild_blocks_(model, [(m, g[0] - 1) for m, g in zip(modules, plan.groups)])


def n_from_ratio(ratio: float, n_blocks: int) -> int:
    """Blocks to remove for a target ratio of blocks (rounded, at least 1, at most L-1)."""
    if not 0 < ratio < 1:
        raise ChipTuningError(f"--ratio must be between 0 and 1 (a fraction of the blocks), got {ratio}")
    return int(min(max(round(ratio * n_blocks), 1), n_blocks - 1))


def _count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def check_reload(path: Path, cls, depth: int, stream: bool = False, device: str | torch.device = "cpu"):
    """Reload ``path`` with ``cls`` and refuse missing, unexpected, mismatched or new weights.

    ``stream``: reload it streamed, its blocks read from its files as a forward reaches them (a
    checkpoint larger than memory), the rest on ``device``; else in memory, on the CPU.
    """
    kwargs: dict[str, Any] = {}
    if stream:
        skeleton = empty_model(AutoConfig.from_pretrained(path), cls is not AutoModel)
        # weights transformers converts on load (fused experts) are written there, for the model's lifetime
        scratch = tempfile.TemporaryDirectory(prefix="chiptuning-offload-")
        kwargs = {"device_map": stream_device_map(skeleton, torch.device(device), range(depth)),
                  "offload_folder": scratch.name}
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ChipTuningError(f"the pruned checkpoint {path} does not reload cleanly: {bad}")
    if num_blocks(model) != depth or len(get_blocks(model)) != depth:
        raise ChipTuningError(f"the reloaded checkpoint has {len(get_blocks(model))} blocks, expected {depth}")
    if stream:
        model.chiptuning_offload_dir = scratch  # removed with the model
    return model.eval()


def generation_check(model, tokenizer, max_new_tokens: int = 4) -> dict[str, Any]:
    """Greedy generation with and without the KV cache must give the same tokens."""
    device = model_device(model)
    enc = tokenizer(GENERATION_CHECK_PROMPT, return_tensors="pt")
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**enc, use_cache=True, **kwargs)
        plain = model.generate(**enc, use_cache=False, **kwargs)
    if not torch.equal(cached, plain):
        raise ChipTuningError("generation with a KV cache differs from generation without one on the pruned model")
    return {"prompt": GENERATION_CHECK_PROMPT, "new_tokens": int(cached.shape[1] - enc["input_ids"].shape[1]),
            "kv_cache_matches": True}


def save_pruned_model(model, tokenizer, out_dir: str | Path, plan: Plan, record: DepthPruningRecord | dict,
                      overwrite: bool = False) -> Path:
    """Save ``model`` (already cut) + tokenizer + ``pruning.json``, check the reload and (decoders)
    KV-cache generation, atomically (temporary sibling directory renamed at the end,
    :func:`chiptuning.outputs.write_output`; an existing checkpoint is replaced only with
    ``overwrite``). ``record``: the record, or its fields as a dict (the plan's groups, removed
    blocks and details, and the model's depth, fill what it does not give).

    A streamed ``model`` is saved one shard at a time, its streamed blocks read back from the
    model's files (:func:`chiptuning.prune.checkpoint.save_weights`), and reloaded streamed for
    the checks: the whole model is never in memory.
    """
    if isinstance(record, dict):
        L = len({i for group in plan.groups for i in group} | set(plan.removed))  # the blocks it started with
        record = DepthPruningRecord.from_dict(
            {"base_model": {"id": "in memory", "model_type": model.config.model_type, "num_blocks": L},
             "num_blocks": len(plan.groups), "blocks_removed": L - len(plan.groups),
             "block_ratio": (L - len(plan.groups)) / L, "groups": plan.groups, "removed": plan.removed,
             "details": plan.details, **record}, "depth-pruning record")
    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    with write_output(out_dir, DEPTH_PRUNED, overwrite=overwrite) as tmp:
        decoder = get_spec(model).decoder
        has_head = decoder and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
        streamed = is_streamed(model)
        device = model_device(model)
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        depth = len(plan.groups)
        reloaded = check_reload(tmp, AutoModelForCausalLM if has_head else AutoModel, depth, stream=streamed,
                                device=device)
        record = dataclasses.replace(
            record, reload={"class": type(reloaded).__name__, "clean": True},
            generation=generation_check(reloaded, tokenizer) if has_head else None,
            chiptuning_version=__version__, checksums=written_files(tmp, RECORD_FILE), record_sha256=None)
        del reloaded
        data = record.to_dict()
        data["record_sha256"] = record_hash(data)
        write_json_atomic(tmp / RECORD_FILE, data)
    return out_dir


def read_record(path: str | Path) -> DepthPruningRecord:
    """The ``pruning.json`` of a depth-pruned checkpoint, verified like a pruned checkpoint's record
    (exactly the recorded files, each with its sha256, and the record its own).

    Raises:
        ChipTuningError: not such a checkpoint; ProvenanceError: edited, missing or unrecorded files.
    """
    file = Path(path) / RECORD_FILE
    if not file.is_file():
        raise ChipTuningError(f"{path} has no {RECORD_FILE}: not a checkpoint written by `chiptuning prune --method`")
    raw = read_json(file, ProvenanceError)
    record = DepthPruningRecord.from_dict(raw, str(file), file=True)
    verify_checksums(path, raw, RECORD_FILE)
    return record


def prune_with_method(
    model_name_or_path: str,
    method: str,
    out_dir: str | Path,
    *,
    n_layers: int | None = None,
    ratio: float | None = None,
    calibration_task=None,
    n_calibration: int | None = 128,
    max_length: int | None = 256,
    batch_size: int = 8,
    cache: str | Path | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
    model=None,
    tokenizer=None,
    overwrite: bool = False,
    offload: str = "auto",
    **options,
) -> Path:
    """Prune ``model_name_or_path`` with a baseline ``method`` and save a standard checkpoint.

    Args:
        method: one of :data:`METHODS`.
        out_dir: the checkpoint directory (HF model + tokenizer + ``pruning.json``).
        n_layers / ratio: blocks to remove, or the fraction of blocks (exactly one).
        calibration_task: a loaded task (``chiptuning.tasks.load_task``) whose prompts are the
            calibration text; not needed by ``tail``, nor by ``shortgpt``/``angular`` with a cache.
        n_calibration: calibration examples drawn from it (seeded); None for all.
        max_length: longest calibration prompt, in tokens.
        cache: a last-token cache of this model (``shortgpt``: last-token BI; ``angular``: exact).
        model, tokenizer: an already-loaded model (``*ForCausalLM`` for decoders, to keep the LM
            head) and tokenizer; loaded from ``model_name_or_path`` when None. The model is cut
            in place.
        overwrite: replace a depth-pruned checkpoint at ``out_dir`` (anything else there is
            refused before any work).
        offload: how the loaded model holds its blocks (``--offload``): "none" (in memory),
            "stream" (read from the model's files as each forward reaches them: a model larger
            than memory), "auto" (stream when the weights do not fit); see
            :func:`chiptuning.models.load_model`. Not used with ``model``.
        **options: method options (:data:`DEFAULTS`).

    Returns:
        ``out_dir``. Its ``pruning.json`` records the method, the blocks removed or merged, the
        scores, the calibration source and size, parameter counts and the reload/generation checks.
    """
    if method not in METHODS:
        raise ChipTuningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    check_output(out_dir, DEPTH_PRUNED, overwrite=overwrite)
    if model is None:
        decoder = get_spec(load_config(model_name_or_path)).decoder
        model = load_model(model_name_or_path, dtype=dtype, device=device, causal_lm=decoder, offload=offload)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name_or_path)
    model.eval()
    L = num_blocks(model)
    n = n_from_ratio(ratio, L) if ratio is not None else int(n_layers)
    calibration = None
    if calibration_task is not None and method != "tail":
        calibration = calibration_from_task(calibration_task, tokenizer, n_calibration, max_length, batch_size, seed)
    params_before = _count_params(model)
    model_hash = weights_hash(model_name_or_path, model)
    plan = plan_method(model, method, n, tokenizer, calibration, cache=cache, **options)
    apply_plan_(model, plan)
    params_after = _count_params(model)
    record = DepthPruningRecord(
        method=method, options={**DEFAULTS.get(method, {}), **options},
        base_model=BaseModel(id=str(model_name_or_path), hash=model_hash, model_type=model.config.model_type,
                             num_blocks=L),
        num_blocks=len(plan.groups), blocks_removed=L - len(plan.groups), block_ratio=(L - len(plan.groups)) / L,
        groups=plan.groups, removed=plan.removed, details=plan.details,
        calibration=None if calibration is None else calibration.source, cache=None if cache is None else str(cache),
        params=ParamCounts(before=params_before, after=params_after, pruning_ratio=1 - params_after / params_before),
    )
    path = save_pruned_model(model, tokenizer, out_dir, plan, record, overwrite=overwrite)
    log.info("%s: %d of %d blocks removed (groups %s) -> %s", method, L - len(plan.groups), L, plan.groups, path)
    return path
