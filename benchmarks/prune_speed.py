"""Classification throughput of pruned models against the dense one, with memory and disk size.

For a model with random weights of a given shape (a Llama-2-7B shape on GPU, a small one on CPU):

* ``dense``: the full ``*ForCausalLM`` as one would load it, classifying with the chip read off its
  last block (every block runs; the LM head is loaded but not applied);
* ``pruned@l`` for each layer l (default L/4, L/2, 3L/4): the LM head dropped and the model cut by
  :func:`chiptuning.prune.truncate_`, classifying with the chip at layer l.

Both read the feature through the same code as ``ChipModel`` (:func:`last_token_features`) and
apply a linear chip. For each: milliseconds per batch, examples per second, speedup against dense
and the ideal L/l, peak GPU memory (weights + activations of a forward pass), and the checkpoint
size on disk. The pruned feature is compared with the dense model's feature(l) on the same batch.

    # GPU (the lead's H100 run): 7B shape, bf16, sizes computed from parameter counts x 2 bytes
    python benchmarks/prune_speed.py --device cuda --shape llama2-7b
    # anyone: CPU, small shape, fp32, checkpoints really saved and measured
    python benchmarks/prune_speed.py --device cpu --shape small

Needs torch and transformers only (plus this repository: an installed ``chiptuning`` or a
checkout). Prints a table and writes JSON to ``benchmarks/results/prune_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from extract_speed import REPO, SHAPES, ensure_importable  # one definition of each (this directory)


def _import_chiptuning():
    """(truncate_, last_token_features, get_blocks, base_model), importing nothing heavier than torch."""
    ensure_importable("chiptuning.prune.truncate")
    from chiptuning.features import last_token_features
    from chiptuning.prune.truncate import truncate_
    from chiptuning.registry import base_model, get_blocks

    return truncate_, last_token_features, get_blocks, base_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params_bytes(module) -> tuple[int, int]:
    """(parameter count, bytes) of a module's unique parameters (tied weights counted once)."""
    seen, n, size = set(), 0, 0
    for p in module.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
        size += p.numel() * p.element_size()
    return n, size


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_causal_lm(shape: str, device: torch.device, dtype: torch.dtype):
    """A ``LlamaForCausalLM`` of ``shape`` with random weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def time_classifier(model, layer: int, chip: torch.Tensor, ids, mask, warmup: int, reps: int, device,
                    last_token_features) -> tuple[float, float, torch.Tensor]:
    """(median seconds per batch, peak GPU MiB or None, feature (B, H)): feature(layer) + linear chip."""
    with torch.no_grad():
        for _ in range(warmup):
            feats = last_token_features(model, ids, mask, layers=[layer])[:, 0]
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            feats = last_token_features(model, ids, mask, layers=[layer])[:, 0]  # (B, H)
            logits = feats.float() @ chip.T  # (B, C): the chip
            logits.argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)  # robust to a busy machine's stalls
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak, feats


def run(args) -> dict:
    truncate_, last_token_features, get_blocks, base_model = _import_chiptuning()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = build_causal_lm(args.shape, device, dtype)
    build_s = time.perf_counter() - t0
    L = len(get_blocks(model))
    H = model.config.hidden_size
    layers = sorted({max(1, min(L - 1, round(L * f))) for f in args.fractions}, reverse=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)  # full-length prompts: the classification batch of a server
    chip = torch.randn(args.n_classes, H, generator=g).to(device)  # a linear chip, (C, H)

    measure_disk = args.save if args.save is not None else device.type == "cpu"
    tmp = tempfile.TemporaryDirectory(prefix="prune-speed-") if measure_disk else None

    # Dense: the whole causal LM as shipped (LM head included on disk and in memory).
    references = last_token_features(model, ids, mask, layers=layers)  # (B, n_layers, H)
    dense_params, dense_bytes = _params_bytes(model)
    if measure_disk:
        model.save_pretrained(Path(tmp.name) / "dense")
        dense_disk = _dir_bytes(Path(tmp.name) / "dense")
    seconds, peak, _ = time_classifier(model, L, chip, ids, mask, args.warmup, args.reps, device,
                                       last_token_features)
    rows = [{"model": "dense", "layer": L, "params": dense_params, "ms_per_batch": 1e3 * seconds,
             "examples_per_s": args.batch_size / seconds, "speedup": 1.0, "ideal_speedup": 1.0,
             "efficiency": 1.0, "peak_mem_mib": peak, "weights_bytes": dense_bytes,
             "disk_bytes": dense_disk if measure_disk else dense_bytes, "max_abs_diff": 0.0}]
    dense_s = seconds

    # Pruned: drop the LM head (the default of `chiptuning prune`), then cut deeper and deeper.
    model = base_model(model)
    gc.collect()  # the head model and its LM head are garbage now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for k, layer in enumerate(layers):
        truncate_(model, layer)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        params, weights_bytes = _params_bytes(model)
        if measure_disk:
            model.save_pretrained(Path(tmp.name) / f"pruned-{layer}")
            disk = _dir_bytes(Path(tmp.name) / f"pruned-{layer}")
        seconds, peak, feats = time_classifier(model, layer, chip, ids, mask, args.warmup, args.reps, device,
                                               last_token_features)
        diff = float((feats.float() - references[:, k].float()).abs().max())
        ideal = L / layer
        rows.append({"model": f"pruned@{layer}", "layer": layer, "params": params,
                     "ms_per_batch": 1e3 * seconds, "examples_per_s": args.batch_size / seconds,
                     "speedup": dense_s / seconds, "ideal_speedup": ideal,
                     "efficiency": dense_s / seconds / ideal, "peak_mem_mib": peak,
                     "weights_bytes": weights_bytes, "disk_bytes": disk if measure_disk else weights_bytes,
                     "max_abs_diff": diff})
    if tmp is not None:
        tmp.cleanup()

    import transformers

    return {
        "benchmark": "prune_speed",
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "num_blocks": L,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "reps": args.reps,
        "build_seconds": build_s,
        "disk_size": ("measured: save_pretrained (safetensors) of the dense *ForCausalLM and each pruned backbone"
                      if measure_disk else
                      "computed: parameter count x dtype bytes (safetensors adds only a small header); not saved"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(f"\n{result['shape']} ({result['num_blocks']} blocks), {result['dtype']}, {result['device']} "
          f"({result['device_name']}), batch {result['batch_size']} x {result['seq_len']} tokens; "
          f"disk size {result['disk_size'].split(':')[0]}\n")
    head = ("| model | blocks | params | ms/batch | examples/s | speedup | ideal L/l | of ideal "
            "| peak GPU MiB | disk GB | max abs diff |")
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        print(f"| {r['model']} | {r['layer']} | {r['params'] / 1e6:,.1f}M | {r['ms_per_batch']:.1f} | "
              f"{r['examples_per_s']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
              f"{100 * r['efficiency']:.0f}% | {peak} | {r['disk_bytes'] / 1e9:.3f} | {r['max_abs_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on cuda, 8 on cpu")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per prompt (default: 512 cuda, 128 cpu)")
    parser.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.75],
                        help="pruning layers as fractions of L (default 0.25,0.5,0.75)")
    parser.add_argument("--n-classes", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=None, help="timed batches per model (default: 10 cuda, 5 cpu)")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=None,
                        help="save checkpoints to measure disk size (default: on cpu only; the 7B shape "
                             "would write 13+ GB, so on cuda sizes are computed from parameter counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/prune_speed_<device>.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or (16 if cuda else 8)
    args.seq_len = args.seq_len or (512 if cuda else 128)
    args.reps = args.reps or (10 if cuda else 5)
    result = run(args)
    print_table(result)
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"prune_speed_{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
