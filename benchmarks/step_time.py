"""Time of one optimizer step of a bank of linear chips, the trainer alone (no cache, no scoring).

Runs ``fit_banks`` on random in-memory features of G layers x 4096 x 4 classes for one epoch at
batch 1 in float32 (the paper regime's step) and prints milliseconds per step. The first
``torch.optim`` construction of the process happens before the clock starts, so the number is the
step's own cost. Works with this tree and with checkouts from before the trainer's module was
called ``bank`` (run it with that checkout's Python), which is how the hand-written step and the
autograd step were compared:

    python benchmarks/step_time.py --layers 12 --rows 3000
    ../base/.venv/bin/python benchmarks/step_time.py --layers 12 --rows 3000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

try:
    from chiptuning.probe.bank import Hyperparams as Spec
    from chiptuning.probe.bank import fit_banks
    from chiptuning.probe.data import InMemoryBatches
    TREE = "bank"
except ImportError:  # a tree with the hand-written step
    from chiptuning.probe.batched import ChipSpec as Spec
    from chiptuning.probe.batched import InMemoryBatches, fit_banks
    TREE = "batched"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="G: layers of the bank")
    parser.add_argument("--rows", type=int, default=3000, help="training rows = steps at batch 1")
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dict(kind="linear", lr=1e-5, weight_decay=0.01, betas=(0.9, 0.99), epochs=1, early_stopping=False,
                    precision="float32")
    if TREE == "bank":
        settings.update(batch_size=1, standardize=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.layers, args.rows, args.hidden, generator=gen)
    y = torch.randint(0, 4, (args.rows,), generator=gen)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the one-off import of torch._dynamo, not timed
    start = time.perf_counter()
    result = fit_banks(InMemoryBatches(x, y, None, 1, 0), [Spec(**settings)], args.hidden, 4, seed=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"tree": TREE, "layers": args.layers, "steps": args.rows, "ms_per_step": 1e3 * seconds / args.rows,
                      "weight_sum": float(result[0]["params"]["weight"].double().sum())}))


if __name__ == "__main__":
    main()
