"""Tasks through the other stages: C3's 2-4 options through real chips, truncation and the token
the chip reads through `chiptuning extract`, and the built-in hub loaders against the release files.

The C3 and RACE data here are small files written in the original release formats, so these tests
run without ../shared/data; the hub loaders are compared with ../shared/data where it exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from chiptuning.tasks import LETTERS, load_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark data not found at {DATA}")

SENTENCES = ["今天天气很好。", "我们去公园散步。", "他喜欢看书。", "妈妈在做饭。", "学校离家很近。", "小猫在睡觉。"]
WORDS = ["苹果", "香蕉", "老师", "学生", "火车", "飞机", "医院", "商店", "北京", "上海", "春天", "冬天"]


def write_c3(folder: Path, split: str, questions: list[tuple[int, int]], seed: int) -> Path:
    """c3-m-<split>.json and c3-d-<split>.json in the release format: [[sentences], [questions], id].

    ``questions`` lists (number of options, answer index); they alternate between the two files.
    """
    rng = np.random.default_rng(seed)
    docs = {"m": [], "d": []}
    for q, (n_options, answer) in enumerate(questions):
        kind = "md"[q % 2]
        choices = [str(w) for w in rng.choice(WORDS, size=n_options, replace=False)]
        sentences = [str(s) for s in rng.choice(SENTENCES, size=2, replace=False)]
        question = {"question": f"第{q}题：哪一个？", "choice": choices, "answer": choices[answer]}
        docs[kind].append([sentences, [question], f"{q}-{seed}"])
    folder.mkdir(parents=True, exist_ok=True)
    for kind, items in docs.items():
        (folder / f"c3-{kind}-{split}.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def c3_dir(tmp_path_factory) -> Path:
    """A C3 release folder whose train answers are all C or D (4 options), and whose dev split has
    questions with 2, 3 and 4 options: a chip that ignored the options would answer C or D."""
    folder = tmp_path_factory.mktemp("c3")
    write_c3(folder, "train", [(4, 2 + q % 2) for q in range(24)], seed=0)
    write_c3(folder, "dev", [(2, 0), (2, 1), (3, 2), (3, 0), (2, 1), (3, 1), (4, 3), (4, 0)], seed=1)
    return folder


@pytest.fixture(scope="module")
def c3_caches(tiny_models, c3_dir, tmp_path_factory):
    """Train / dev caches of the C3 folder from a tiny random Llama (MiniLM's tokenizer)."""
    from chiptuning.cache import CacheReader
    from chiptuning.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("c3-caches")
    caches = {}
    for split in ("train", "validation"):
        task = load_task("c3", split=split, data_dir=c3_dir)
        config = ExtractConfig(out=str(root / split), model=tiny_models["llama"], device="cpu", batch_size=8)
        caches[split] = (task, CacheReader(extract(config, task)))
    return caches


def test_c3_cache_keeps_each_questions_number_of_options(c3_caches):
    task, reader = c3_caches["validation"]
    by_id = {ex.id: ex for ex in task.examples}
    assert sorted({ex.n_choices for ex in task.examples}) == [2, 3, 4]
    assert [by_id[str(i)].n_choices for i in reader.example_ids] == list(reader.n_choices)
    assert [by_id[str(i)].label for i in reader.example_ids] == list(reader.labels)


@pytest.mark.parametrize("chip", ["linear", "mlp", "logreg"])
def test_c3_chips_never_answer_outside_the_options(c3_caches, tmp_path, chip):
    from chiptuning.probe import TrainConfig, load_chips, train_chips
    from chiptuning.probe.data import mask_from_n_choices

    _, train = c3_caches["train"]
    _, dev = c3_caches["validation"]
    config = TrainConfig(chip=chip, val_size=0, epochs=200, early_stopping=False, seed=0)
    train_chips(train, dev, out=tmp_path / "chips", config=config)
    chips = load_chips(tmp_path / "chips")
    assert chips.label_names == list(LETTERS[:4])
    n_choices = np.asarray(dev.n_choices)
    mask = mask_from_n_choices(n_choices, len(chips.label_names))  # (N, 4)
    for layer in chips.layers:
        X = dev.layer(layer)  # (N, H)
        unmasked = np.asarray(chips.chip(layer).predict(X))
        # Trained only on C and D, the chip answers C or D for some rows with 2 or 3 options when
        # it is not told the options: those rows are a real test of the mask.
        assert (unmasked >= n_choices).any()
        masked = np.asarray(chips.chip(layer).predict(X, class_mask=mask))
        assert (masked < n_choices).all(), f"layer {layer}: {masked} vs options {n_choices}"
        if chip != "logreg":  # logreg gives NaN rows when no valid class was seen in training (reported)
            proba = np.asarray(chips.chip(layer).predict_proba(X, class_mask=mask))  # (N, 4)
            assert np.allclose(proba[~mask], 0) and np.allclose(proba.sum(axis=1), 1)
    # What `probe train --eval` wrote (the eval predictions of every layer) obeys the options too.
    import csv

    with open(tmp_path / "chips" / "eval_predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    options = dict(zip((str(i) for i in dev.example_ids), n_choices))
    assert len(rows) == len(n_choices)
    for row in rows:
        for layer in chips.layers:
            assert int(row[f"layer_{layer}"]) < options[row["example_id"]]


def test_raw_c3_records_know_their_number_of_options(c3_dir, tmp_path):
    """What a checkpoint needs to mask the chip on raw records: the template's options list."""
    task = load_task("c3", split="validation", data_dir=c3_dir)
    assert [task.n_choices(ex.fields) for ex in task.examples] == [ex.n_choices for ex in task.examples]
    boolq_like = load_task("boolq", split="validation", data_dir=_boolq_dir(tmp_path / "boolq"))
    assert {boolq_like.n_choices(ex.fields) for ex in boolq_like.examples} == {2}
    assert task.n_choices("a raw prompt") == 4


def test_c3_pruned_checkpoint_never_answers_outside_the_options(c3_caches, tiny_models, tmp_path):
    from chiptuning.probe import TrainConfig, train_chips
    from chiptuning.prune import ChipModel, prune

    _, train = c3_caches["train"]
    task, dev = c3_caches["validation"]
    train_chips(train, None, out=tmp_path / "chips",
                config=TrainConfig(chip="linear", val_size=0, epochs=200, early_stopping=False, seed=0))
    out = prune(tiny_models["llama"], [str(tmp_path / "chips")], tmp_path / "pruned", layer=2)
    clf = ChipModel.from_pretrained(out)
    records = [ex.fields for ex in task.examples]
    predicted = clf.predict(records)
    for ex, label in zip(task.examples, predicted):
        assert label in LETTERS[: ex.n_choices], f"{ex.id}: {label} but {ex.n_choices} options"


def _boolq_dir(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    rows = [{"question": f"is it {i}", "title": "t", "answer": bool(i % 2), "passage": f"Passage {i}."} for i in range(4)]
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


# -- what the chip reads, through `chiptuning extract` ----------------------------------------------


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a byte-level BPE tokenizer trained here: like most LLM tokenizers,
    it keeps a trailing space as a token of its own (BERT's drops it)."""
    tokenizers = pytest.importorskip("tokenizers")
    import torch
    import transformers as tf

    corpus = ["Review: a fine film\nSentiment: positive", "Question: what is it?\nA. one\nB. two\nAnswer: A",
              "Article: the old man walked to the market and bought some bread."] * 20
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                           pad_token="<|endoftext|>")
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bpe-gpt2")
    tf.AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _run_extract(*args: str) -> dict:
    from chiptuning.cli import main

    result = CliRunner().invoke(main, ["extract", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_extract_report_shows_the_token_the_chip_reads(bpe_model, sentiment_file, tmp_path):
    common = ["--model", str(bpe_model), "--data", str(sentiment_file), "--template", "Review: {text}\\nSentiment: ",
              "--limit", "4"]
    kept = _run_extract(*common, "--out", str(tmp_path / "kept"))
    stripped = _run_extract(*common, "--strip-trailing-space", "--out", str(tmp_path / "stripped"))
    assert len(kept["preview"]) == 3
    for entry in kept["preview"]:
        assert entry["chip_reads"] == "Ġ" == entry["last_tokens"][-1]  # the lone trailing space
        assert entry["last_tokens"][-3:-1] == ["Sentiment", ":"]
    for entry in stripped["preview"]:
        assert entry["chip_reads"] == ":" and entry["last_tokens"][-2:] == ["Sentiment", ":"]
    assert kept["meta"]["task"]["template"].endswith("Sentiment: ")
    assert stripped["meta"]["task"]["template"].endswith("Sentiment:")
    assert stripped["meta"]["task"]["strip_trailing_space"] is True
    assert kept["fingerprint"] != stripped["fingerprint"]


def test_extract_shortens_a_long_race_article_and_keeps_the_answer_suffix(bpe_model, tmp_path):
    article = " ".join(["The old man walked to the market and bought some bread."] * 40)
    passages = [
        {"id": "high1.txt", "article": article, "questions": ["Where did he go?", "What did he buy?"],
         "options": [["home", "school", "the market", "bed"], ["milk", "bread", "fish", "rice"]],
         "answers": ["C", "B"]},
        {"id": "high2.txt", "article": "A short one.", "questions": ["Short?"],
         "options": [["yes", "no", "maybe", "never"]], "answers": ["A"]},
    ]
    folder = tmp_path / "race"
    folder.mkdir()
    (folder / "test_high.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    manifest = _run_extract("--model", str(bpe_model), "--task", "race-high", "--data-dir", str(folder),
                            "--split", "test", "--max-length", "64", "--out", str(tmp_path / "cache"))
    assert manifest["n_shortened"] == 2 and manifest["meta"]["max_length"] == 64
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_model))
    for entry, last_option in zip(manifest["preview"], ("bed", "rice", "never")):
        tail = tokenizer.convert_tokens_to_string(entry["last_tokens"])  # the report's last 6 tokens
        assert tail.endswith(f"{last_option[-2:]}\nAnswer: ") and entry["chip_reads"] == "Ġ"
    # The prompts themselves: the article was cut, the question and options were not.
    task = load_task("race-high", split="test", data_dir=folder)
    prompts, n_short = task.build_prompts(tokenizer, max_length=64)
    assert n_short == 2
    for prompt, ex in zip(prompts[:2], task.examples[:2]):
        assert len(tokenizer(prompt)["input_ids"]) <= 64
        assert prompt.endswith(f"\n\nQuestion: {ex.fields['question']}\n"
                               + "\n".join(f"{k}. {o}" for k, o in zip(LETTERS, ex.fields["options"])) + "\nAnswer: ")


# -- built-in hub loaders give what the release files give ------------------------------------------


@needs_data
def test_boolq_and_mmlu_from_the_hub_equal_the_release_files(monkeypatch):
    datasets = pytest.importorskip("datasets")
    boolq = load_task("boolq", split="validation[:5]", data_dir=DATA)
    mmlu = load_task("mmlu", split="test[:5]", data_dir=DATA)
    # The hub schemas: google/boolq (question, answer: bool, passage); cais/mmlu (question,
    # subject, choices, answer: int).
    hub = {
        "google/boolq": datasets.Dataset.from_list([
            {"question": ex.fields["question"], "answer": bool(ex.label), "passage": ex.fields["passage"]}
            for ex in boolq.examples]),
        "cais/mmlu": datasets.Dataset.from_list([
            {"question": ex.fields["question"], "subject": ex.fields["subject"], "choices": ex.fields["options"],
             "answer": ex.label} for ex in mmlu.examples]),
    }
    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return hub[name]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for local, name in ((boolq, "boolq"), (mmlu, "mmlu")):
        remote = load_task(name, split=local.split.split("[")[0])
        assert [ex.id for ex in remote.examples] == [ex.id for ex in local.examples]
        assert [ex.label for ex in remote.examples] == [ex.label for ex in local.examples]
        assert remote.build_prompts() == local.build_prompts()
        assert remote.template == local.template
        assert remote.source["hub"] == {"boolq": "google/boolq", "mmlu": "cais/mmlu"}[name]
    assert calls == [("google/boolq", None, "validation"), ("cais/mmlu", "all", "test")]
