"""Merging a PEFT (LoRA) adapter into the weights before anything else (the paper's CT(LoRA)).

An adapter saved from a ``*ForCausalLM`` names its weights ``base_model.model.model.layers...``;
one saved from a bare backbone ``base_model.model.layers...``. Applied to the other class, PEFT
finds no module to put them in and only warns, so the "fine-tuned" model silently stays the base
model. :func:`load_model_with_adapter` picks the class the adapter was saved from and refuses an
adapter whose weights do not all land.
"""

from __future__ import annotations

import logging

from chiptuning.errors import ChipTuningError
from chiptuning.registry import base_model

log = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
        from peft.utils import load_peft_weights
    except ImportError:
        raise ChipTuningError("--adapter needs the peft package: pip install peft") from None
    return peft, load_peft_weights


def adapter_keys(adapter: str) -> list[str]:
    """Names of the adapter's weights as saved (``base_model.model.<param path>``)."""
    _, load_peft_weights = _peft()
    try:
        return sorted(load_peft_weights(adapter, device="cpu"))
    except (OSError, ValueError) as err:
        raise ChipTuningError(f"cannot read adapter {adapter!r}: {str(err).splitlines()[0]}") from None


def saved_from_head_model(adapter: str, backbone_prefix: str) -> bool:
    """True if the adapter was saved from a model with a head (its names go through the backbone)."""
    keys = [k[len(_PEFT_PREFIX):] for k in adapter_keys(adapter) if k.startswith(_PEFT_PREFIX)]
    return bool(keys) and all(k.startswith(backbone_prefix + ".") for k in keys)


def merge_adapter_(model, adapter: str):
    """Apply ``adapter`` to ``model`` in place and merge it into the weights; returns ``model``.

    Raises:
        ChipTuningError: adapter weights that find no module in ``model``.
    """
    peft, _ = _peft()
    expected = adapter_keys(adapter)
    wrapped = peft.PeftModel.from_pretrained(model, adapter)
    loaded = {key.replace(".default", "") for key in wrapped.state_dict()}
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise ChipTuningError(
            f"adapter {adapter!r} does not fit {type(model).__name__}: {len(missing)} of {len(expected)} "
            f"weights have no place (first: {missing[0]}); was it trained on another model?"
        )
    merged = wrapped.merge_and_unload()
    log.info("merged adapter %s (%d weights) into %s", adapter, len(expected), type(model).__name__)
    return merged


def load_model_with_adapter(model_name_or_path: str, adapter: str, causal_lm: bool, **kwargs):
    """Load a model, merge ``adapter`` into it, and return the backbone or the ``*ForCausalLM``.

    Args:
        model_name_or_path: the base model.
        adapter: PEFT adapter directory.
        causal_lm: return the ``*ForCausalLM`` (else the ``AutoModel`` backbone).
        **kwargs: passed to ``from_pretrained`` (dtype, device_map).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModelForCausalLM if causal_lm else AutoModel).from_pretrained(model_name_or_path, **kwargs)
    backbone_prefix = getattr(model, "base_model_prefix", "model")
    if saved_from_head_model(adapter, backbone_prefix):
        if not causal_lm:  # the adapter names the head model's paths: merge there, keep the backbone
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
        model = merge_adapter_(model, adapter)
    else:
        merge_adapter_(base_model(model), adapter)  # in place: the outer model holds the merged backbone
    return model if causal_lm else base_model(model)
