"""The layer convention, defined once, and the hooks that read it.

A model with L blocks has features at layers l = 0..L: l = 0 is the input of block 1; l >= 1 is the
raw residual-stream output of block l, *before* any final norm, including L (where
``output_hidden_states`` is final-normed: hence the hooks). A chip "at layer l" reads feature(l) at
the last real token; a model pruned at layer l gives, through the same hooks, exactly that feature.
``mode="normed"`` applies the final norm to every layer's feature (a logit-lens view).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Sequence

import torch

from chiptuning.registry import base_model, get_blocks, get_final_norm, get_spec

FEATURE_MODES = ("raw", "normed")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    # argmax returns the first maximum: on the flipped mask that is the last 1 of the row.
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class StopForward(Exception):
    """Raised by a hook to skip the blocks nobody asked for; :func:`run_backbone` catches it."""


def hidden_from_args(args, kwargs) -> torch.Tensor:
    """The hidden states a block was called with (first positional argument or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_from_output(output) -> torch.Tensor:
    """The hidden states a block returned (first element of a tuple, or the tensor itself)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _accepts(module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


@contextlib.contextmanager
def capture_layers(model, layers: Iterable[int], keep: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """Within the block, every forward of ``model`` calls ``keep(layer, hidden)`` with the (B, T, H)
    residual stream of each requested layer, in layer order. ``keep`` may raise
    :class:`StopForward` to skip the remaining blocks, and for l >= 1 may return a tensor replacing
    the block's output (fewer rows, for early exit)."""
    blocks = get_blocks(model)

    def after(layer: int):
        def hook(_module, _args, output):
            replacement = keep(layer, hidden_from_output(output))
            if replacement is None or not isinstance(output, (tuple, list)):
                return replacement
            return type(output)((replacement, *output[1:]))  # a tuple stays a tuple
        return hook

    with contextlib.ExitStack() as hooks:
        for layer in sorted(set(int(x) for x in layers)):
            if layer == 0:
                hooks.enter_context(blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs: keep(0, hidden_from_args(args, kwargs)), with_kwargs=True))
            else:
                hooks.enter_context(blocks[layer - 1].register_forward_hook(after(layer)))
        yield


@contextlib.contextmanager
def rewrite_block_calls(model, blocks: range, rewrite: Callable[[tuple, dict], tuple[tuple, dict] | None]):
    """Within the block, each of ``blocks`` (0-based) is called with what ``rewrite(args, kwargs)``
    returns instead of what the forward passes it (None: unchanged)."""
    modules = get_blocks(model)
    with contextlib.ExitStack() as hooks:
        for i in blocks:
            hooks.enter_context(modules[i].register_forward_pre_hook(lambda _m, args, kwargs: rewrite(args, kwargs),
                                                                     with_kwargs=True))
        yield


@contextlib.contextmanager
def capture_block_call(model, block: int, record: dict):
    """Within the block, a forward of ``model`` stores the call of ``block`` (0-based) in
    ``record["args"]`` (tensors detached) and ``record["kwargs"]``, so the block can be re-run alone."""
    def pre(_m, args, kwargs):
        record["args"] = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        record["kwargs"] = dict(kwargs)

    with get_blocks(model)[block].register_forward_pre_hook(pre, with_kwargs=True):
        yield record


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **other_inputs: torch.Tensor) -> dict:
    """Keyword arguments for the backbone's forward: mask-derived positions where needed, no KV
    cache, and those of ``other_inputs`` (a vision-language model's ``pixel_values``...) its forward
    names, floating-point ones in the model's dtype."""
    backbone = base_model(model)
    spec = get_spec(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    dtype = next(backbone.parameters()).dtype
    for name, value in other_inputs.items():
        if _accepts(backbone, name):
            kwargs[name] = value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
    mask = attention_mask
    if spec.decoder and bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Causal attention never lets a real token see the pads after it: a right-padded batch needs
        # no mask, and SDPA then takes its fused causal (flash) path.
        kwargs["attention_mask"] = None
    if spec.positions_from_mask and _accepts(backbone, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if _accepts(backbone, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def run_backbone(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **other_inputs: torch.Tensor) -> None:
    """One forward of the backbone for the hooks' sake (outputs discarded; :class:`StopForward` ends it)."""
    try:
        base_model(model)(**model_inputs(model, input_ids, attention_mask, **other_inputs))
    except StopForward:
        pass


@torch.no_grad()
def last_token_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        layers: Sequence[int] | None = None, mode: str = "raw", **other_inputs: torch.Tensor) -> torch.Tensor:
    """Feature(l) at the last real token of each row of the (B, T) inputs, left or right padded, for
    each of ``layers`` (default 0..L): (B, len(layers), H) in the model's dtype, on the inputs'
    device. Only these rows leave the hooks. ``other_inputs``: the model's other inputs (pixels...)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"mode must be one of {FEATURE_MODES}, got {mode!r}")
    blocks = get_blocks(model)
    L = len(blocks)
    layers = list(range(L + 1)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer <= L]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{L} for this model")
    norm = get_final_norm(model) if mode == "normed" else None
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = last_token_index(attention_mask)  # (B,)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def keep(layer: int, hidden: torch.Tensor) -> None:
        # blocks may sit on several GPUs (device_map="auto"): index there, bring the rows to the inputs
        h = hidden[rows.to(hidden.device), last.to(hidden.device)]  # (B, T, H) -> (B, H)
        captured[layer] = (norm(h) if norm is not None else h).to(input_ids.device)
        if layer == deepest and deepest < L:
            raise StopForward

    with capture_layers(model, layers, keep):
        run_backbone(model, input_ids, attention_mask, **other_inputs)
    return torch.stack([captured[layer] for layer in layers], dim=1)  # (B, n_layers, H)


def batch_features(model, batch, layers: Sequence[int] | None = None, mode: str = "raw") -> torch.Tensor:
    """:func:`last_token_features` of one :class:`chiptuning.encoding.Batch` (text or images)."""
    return last_token_features(model, batch.input_ids, batch.attention_mask, layers=layers, mode=mode, **batch.other_inputs)
