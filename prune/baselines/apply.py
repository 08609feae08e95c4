"""Run a baseline end to end: plan, cut, save a standard checkpoint with ``pruning.json``, check it (a
streamed model stays streamed throughout)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from chiptuning import __version__
from chiptuning.errors import ChipTuningError, ProvenanceError
from chiptuning.models import (
    count_params,
    is_streamed,
    load_config,
    load_model,
    load_tokenizer,
    model_device,
    weights_hash,
)
from chiptuning.outputs import DEPTH_PRUNED, check_output, write_output
from chiptuning.prune.baselines import DEFAULTS, METHODS
from chiptuning.prune.baselines.calibration import Calibration, calibration_from_task
from chiptuning.prune.baselines.drop import plan_angular, plan_shortgpt, plan_tail
from chiptuning.prune.baselines.merging import plan_laco, plan_slm
from chiptuning.prune.baselines.plan import Plan
from chiptuning.prune.baselines.streamline import plan_streamline
from chiptuning.prune.checkpoint import reload_pruned, save_weights
from chiptuning.prune.provenance import BaseModel, verify_checksums, write_provenance
from chiptuning.prune.truncate import rebuild_blocks_
from chiptuning.records import Invalid, Record, read_json, rule
from chiptuning.registry import get_blocks, get_spec, num_blocks

log = logging.getLogger(__name__)

RECORD_FILE = "pruning.json"
GENERATION_CHECK_PROMPT = "The quick brown fox"
PLANNERS = {"tail": plan_tail, "shortgpt": plan_shortgpt, "angular": plan_angular,
            "streamline": plan_streamline, "slm": plan_slm, "laco": plan_laco}


@dataclass
class ParamCounts(Record):
    """Parameters of the model before and after, and the share removed."""

    before: int = rule(ge=1)
    after: int = rule(ge=1)
    pruning_ratio: float = rule(ge=0, le=1)


@dataclass
class DepthPruningRecord(Record):
    """``pruning.json``: what a method did to a model (``groups``, ``removed``, ``details``: the
    :class:`Plan`'s), the checks run on the saved checkpoint (``reload``, ``generation``) and the sha256
    of every other file written (``checksums``)."""

    FORMAT = "chiptuning-depth-pruned"
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


def needs_calibration(method: str, cache=None) -> bool:
    """Whether ``method`` scores blocks on calibration text (shortgpt and angular not with a cache)."""
    return method in ("streamline", "slm", "laco") or (method in ("shortgpt", "angular") and cache is None)


def _check_method(method: str, options: dict) -> dict[str, Any]:
    """The method's options with its defaults filled in; refuses an unknown method or option."""
    if method not in METHODS:
        raise ChipTuningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - set(DEFAULTS.get(method, {}))
    if unknown:
        raise ChipTuningError(f"{method} does not take the option(s) {sorted(unknown)}")
    return {**DEFAULTS.get(method, {}), **options}


def plan_method(model, method: str, n: int, tokenizer=None, calibration: Calibration | None = None,
                cache=None, **options) -> Plan:
    """The :class:`Plan` of ``method`` removing ``n`` blocks (options: see each ``plan_*``)."""
    options = _check_method(method, options)
    if needs_calibration(method, cache) and (calibration is None or tokenizer is None):
        raise ChipTuningError(f"{method} needs calibration text (and the tokenizer)")
    if method == "tail":
        return plan_tail(model, n)
    if method in ("shortgpt", "angular"):
        return PLANNERS[method](model, n, tokenizer, calibration, cache=cache)
    return PLANNERS[method](model, n, tokenizer, calibration, **options)


def apply_plan_(model, plan: Plan) -> nn.Module:
    """Cut ``model`` in place to the plan's blocks (config depth, per-layer lists, layer ids)."""
    originals = list(get_blocks(model))
    modules = plan.blocks if plan.blocks is not None else [originals[g[0] - 1] for g in plan.groups]
    return rebuild_blocks_(model, [(m, g[0] - 1) for m, g in zip(modules, plan.groups, strict=True)])


def n_from_ratio(ratio: float, n_blocks: int) -> int:
    """Blocks to remove for a target ratio of blocks (rounded, at least 1, at most L-1)."""
    if not 0 < ratio < 1:
        raise ChipTuningError(f"--ratio must be between 0 and 1 (a fraction of the blocks), got {ratio}")
    return int(min(max(round(ratio * n_blocks), 1), n_blocks - 1))


def check_reload(path: Path, cls, depth: int, stream: bool = False, device: str | torch.device = "cpu"):
    """Reload ``path`` with ``cls`` (``stream``: streamed, the rest on ``device``; else in memory on
    the CPU) and refuse missing, unexpected or mismatched weights, or another depth."""
    return reload_pruned(path, cls, depth, lambda bad: f"the pruned checkpoint {path} does not reload cleanly: {bad}",
                         stream=stream, device=device)


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


def plan_record(plan: Plan, base_model: BaseModel, **fields) -> DepthPruningRecord:
    """The record of ``plan`` cut from ``base_model``; ``fields`` add to (or override) it."""
    L, depth = base_model.num_blocks, len(plan.groups)
    return DepthPruningRecord.from_dict({  # checked: a bad field is one line, before anything is saved
        "method": plan.method, "base_model": base_model, "num_blocks": depth, "blocks_removed": L - depth,
        "block_ratio": (L - depth) / L, "groups": plan.groups, "removed": plan.removed, "details": plan.details,
        **fields}, "the pruning record")


def save_pruned_model(model, tokenizer, out_dir: str | Path, plan: Plan, record: DepthPruningRecord | dict,
                      overwrite: bool = False) -> Path:
    """Save the cut ``model`` (a streamed one shard by shard, from its files), its tokenizer and
    ``pruning.json`` atomically, after checking that it reloads (streamed, if it was) and, for decoders,
    that KV-cache generation matches. ``record``: the record, or fields added to :func:`plan_record`."""
    if isinstance(record, dict):
        L = len({i for group in plan.groups for i in group} | set(plan.removed))  # the blocks it started with
        record = plan_record(plan, BaseModel(id="in memory", model_type=model.config.model_type, num_blocks=L),
                             **record)
    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    with write_output(out_dir, DEPTH_PRUNED, overwrite=overwrite) as tmp:
        has_head = get_spec(model).decoder and model.get_output_embeddings() is not None
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = check_reload(tmp, AutoModelForCausalLM if has_head else AutoModel, len(plan.groups),
                                stream=is_streamed(model), device=model_device(model))
        record = dataclasses.replace(record, reload={"class": type(reloaded).__name__, "clean": True},
                                     generation=generation_check(reloaded, tokenizer) if has_head else None)
        del reloaded
        write_provenance(tmp, record, RECORD_FILE)
    return out_dir


def read_record(path: str | Path) -> DepthPruningRecord:
    """The verified ``pruning.json`` of a depth-pruned checkpoint (exactly the recorded files, each with
    its sha256, and the record its own). ChipTuningError: not such a checkpoint; ProvenanceError: edited,
    missing or unrecorded files."""
    file = Path(path) / RECORD_FILE
    if not file.is_file():
        raise ChipTuningError(f"{path} has no {RECORD_FILE}: not a checkpoint written by `chiptuning baseline`")
    raw = read_json(file, ProvenanceError)
    record = DepthPruningRecord.from_dict(raw, str(file), file=True)
    verify_checksums(path, raw, RECORD_FILE)
    return record


def prune_with_method(model_name_or_path: str, method: str, out_dir: str | Path, *, n_layers: int | None = None,
                      ratio: float | None = None, calibration_task=None, n_calibration: int | None = 128,
                      max_length: int | None = 256, batch_size: int = 8, cache: str | Path | None = None,
                      dtype: str = "fp32", device: str = "cpu", seed: int = 0, model=None, tokenizer=None,
                      overwrite: bool = False, offload: str = "auto", **options) -> Path:
    """Prune ``model_name_or_path`` with ``method`` (:data:`METHODS`) and save it at ``out_dir``: the
    model, its tokenizer and ``pruning.json`` (:class:`DepthPruningRecord`).

    Args:
        n_layers / ratio: blocks to remove, or the fraction of blocks (exactly one).
        calibration_task: a loaded task whose prompts are the calibration text (``n_calibration``
            of them, seeded; None: all); needed by all methods but ``tail``, and ``shortgpt`` /
            ``angular`` given a last-token ``cache`` of this model.
        model, tokenizer: already loaded (``*ForCausalLM`` for a decoder), cut in place; else
            loaded, the model held as ``offload`` says (:func:`chiptuning.models.load_model`).
        overwrite: replace a depth-pruned checkpoint at ``out_dir`` (anything else is refused).
        **options: the method's options (:data:`DEFAULTS`).
    """
    options = _check_method(method, options)
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    if calibration_task is None and needs_calibration(method, cache):
        raise ChipTuningError(f"{method} needs calibration text: --calibration-task or --calibration-data"
                              + (" (or --cache)" if method in ("shortgpt", "angular") else ""))
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
    params_before = count_params(model)
    base = BaseModel(id=str(model_name_or_path), hash=weights_hash(model_name_or_path, model),
                     model_type=model.config.model_type, num_blocks=L)
    plan = plan_method(model, method, n, tokenizer, calibration, cache=cache, **options)
    apply_plan_(model, plan)
    params_after = count_params(model)
    record = plan_record(
        plan, base, options=options, calibration=None if calibration is None else calibration.source,
        cache=None if cache is None else str(cache),
        params=ParamCounts(before=params_before, after=params_after, pruning_ratio=1 - params_after / params_before))
    path = save_pruned_model(model, tokenizer, out_dir, plan, record, overwrite=overwrite)
    log.info("%s: %d of %d blocks removed (groups %s) -> %s", method, L - len(plan.groups), L, plan.groups, path)
    return path
