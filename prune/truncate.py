"""Model surgery: keep blocks 1..l of a model (so its feature(l) is the full model's), with the config
depth, per-layer config lists and every module's ``layer_idx`` made to agree, as transformers sizes the
KV cache and per-layer settings from them. The final norm stays: the checkpoint reloads with
``AutoModel.from_pretrained`` without new weights, and chips read the raw stream before the norm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from chiptuning.errors import ChipTuningError
from chiptuning.registry import base_model, get_blocks, get_language_model, num_blocks, set_blocks, text_config

log = logging.getLogger(__name__)

#: Config attributes known to hold one entry per layer. Any other list of length L whose name mentions
#: "layer" is one too; lists that only happen to be L long (token ids, architectures) are not.
PER_LAYER_CONFIG_KEYS = frozenset({"layer_types", "no_rope_layers", "mlp_only_layers", "block_types"})
_NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids",
                            "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"})


def check_layer(layer: int, n_blocks: int) -> int:
    """``layer`` when it is a pruning point of a model of ``n_blocks`` blocks (1..n_blocks; layer 0,
    the embeddings, keeps no block), else ChipTuningError."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_blocks:
        raise ChipTuningError(f"cannot prune at layer {layer!r}: the model has {n_blocks} blocks, so the layer must be "
                              f"in 1..{n_blocks} (layer l keeps blocks 1..l; pick another --layer)")
    return layer


def per_layer_keys(config, n_blocks: int) -> list[str]:
    """Config fields holding one entry per block (e.g. Gemma-2's ``layer_types``)."""
    return sorted(key for key, value in vars(config).items()
                  if isinstance(value, (list, tuple)) and len(value) == n_blocks and key not in _NOT_PER_LAYER
                  and (key in PER_LAYER_CONFIG_KEYS or "layer" in key))


def model_configs(model) -> list:
    """Every distinct config object of a model (its own, its backbone's, its text config, its language
    model's): depth and per-layer fields must agree in all."""
    configs = (model.config, base_model(model).config, text_config(model.config), get_language_model(model).config)
    return list({id(c): c for c in configs}.values())


def truncate_(model: nn.Module, layer: int) -> nn.Module:
    """Keep blocks 1..``layer`` (1..L; L removes nothing) of ``model`` (base or with a head) in place and
    return it: the block list, the config depth (GPT-2's ``n_layer`` follows ``num_hidden_layers``), every
    per-layer config list and each kept block's ``layer_idx``; embeddings, final norm and head stay.
    ChipTuningError for a layer out of range, UnsupportedModelError for an unknown architecture."""
    blocks = get_blocks(model)
    n_blocks = len(blocks)
    check_layer(layer, n_blocks)
    if num_blocks(model) != n_blocks:
        raise ChipTuningError(f"model config says {num_blocks(model)} blocks but the model holds {n_blocks}; "
                              "was it already truncated by other means?")
    kept = nn.ModuleList(list(blocks)[:layer])
    set_blocks(model, kept)
    for config in model_configs(model):
        for key in per_layer_keys(config, n_blocks):
            value = getattr(config, key)
            setattr(config, key, type(value)(value[:layer]))
            log.debug("sliced config.%s to %d entries", key, layer)
        if getattr(config, "num_hidden_layers", None) is not None:
            config.num_hidden_layers = layer
    for index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    if n_blocks != layer:
        log.debug("truncated %s to blocks 1..%d of %d", model.config.model_type, layer, n_blocks)
    return model


def rebuild_blocks_(model, plan: Sequence[tuple[nn.Module, int]]) -> nn.Module:
    """Make ``model``'s blocks exactly ``plan``: (block module, the original 0-based index whose per-layer
    config entries it takes) for each block of the result, in order: original blocks, merged or new ones."""
    blocks = list(get_blocks(model))
    L = len(blocks)
    if not 1 <= len(plan) <= L:
        raise ChipTuningError(f"cannot rebuild a model of {L} blocks into {len(plan)} blocks")
    used = {id(module) for module, _ in plan}
    leftovers = [(b, i) for i, b in enumerate(blocks) if id(b) not in used]
    order = list(plan) + leftovers[: L - len(plan)]
    for config in model_configs(model):
        for key in per_layer_keys(config, L):
            value = getattr(config, key)
            setattr(config, key, type(value)(value[src] for _, src in order))
    set_blocks(model, nn.ModuleList([module for module, _ in order]))
    return truncate_(model, len(plan))


def remove_blocks_(model, remove: Sequence[int]) -> nn.Module:
    """Delete blocks ``remove`` (1-based, any subset, not all) in place, config and layer ids updated."""
    blocks, gone = list(get_blocks(model)), {int(i) for i in remove}
    bad = sorted(gone - set(range(1, len(blocks) + 1)))
    if bad:
        raise ChipTuningError(f"blocks {bad} do not exist (the model has blocks 1..{len(blocks)})")
    return rebuild_blocks_(model, [(b, i) for i, b in enumerate(blocks) if i + 1 not in gone])
