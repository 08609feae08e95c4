"""The paper's benchmarks as built-in tasks: BoolQ, RACE (high, middle), C3, MMLU.

Each has the prompt template of the Chip-Tuning reference code (no answer appended), its labels
and default splits, and loads from the Hugging Face hub or offline from the original release files
(each task's ``local_files``; MMLU's are hendrycks' ``data.tar``) in ``data_dir`` or in its
``boolq/``, ``race/``, ``c3/``, ``mmlu/``. Both give the same examples, fields and ids
(``validation#17``, ``high10024.txt#2``, ``mixed/11-67#0``, ``abstract_algebra#3``; not MMLU's
auxiliary_train, whose hub rows do not name their file). Options are a list field ``options``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from chiptuning.errors import DataError
from chiptuning.tasks.base import LETTERS, Example, TaskData, TaskOptions, template_fields, truncate_field_of
from chiptuning.tasks.files import load_hub_dataset, read_jsonl

log = logging.getLogger(__name__)

BOOLQ_TEMPLATE = "{passage}\n\nQuestion: {question}\nAnswer: "
RACE_TEMPLATE = "Article: {article}\n\nQuestion: {question}\n{options}\nAnswer: "
C3_TEMPLATE = "Article: {documents:lines}\n\nQuestion: {question}\n{options}\nAnswer: "
MMLU_TEMPLATE = (
    "The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n{options}\nAnswer:"
)
# Records without a subject (MMLU's auxiliary_train) drop the "about {subject}" part.
MMLU_TEMPLATE_NO_SUBJECT = "The following are multiple choice questions (with answers).\n\n{question}\n{options}\nAnswer:"

Loader = Callable[..., list[Example]]


@dataclass(frozen=True)
class BuiltinTask:
    """A benchmark the toolkit knows: its prompt, labels, splits and where its data lives."""

    name: str  # the --task name
    description: str  # one line for `chiptuning tasks`
    template: str  # the reference code's prompt over `fields`
    fields: tuple[str, ...]  # every example's fields (what a --template override may use)
    hub: tuple[str, tuple[str | None, ...]]  # dataset id, configurations concatenated in order
    local_files: str  # the release files a --data-dir holds, for messages and listings
    load_local: Loader  # (data_dir, split) -> examples
    load_hub: Loader  # split -> examples
    eval_split: str = "test"  # the split results are reported on
    truncate_field: str | None = None  # the long field shortened to fit --max-length
    label_names: tuple[str, ...] = ("A", "B", "C", "D")  # a multiple-choice example uses the first n_choices
    splits: tuple[str, ...] = ("train", "validation", "test")
    train_split: str = "train"  # the default split
    split_aliases: tuple[tuple[str, str], ...] = (("dev", "validation"), ("val", "validation"))

    @property
    def folder(self) -> str:
        """The release's usual folder name: a ``--data-dir`` holding it (``data/race/``) reads from it."""
        return self.name.split("-")[0]

    def resolve_split(self, split: str | None) -> str:
        """The canonical split name (default :attr:`train_split`); DataError for one the task lacks."""
        if split is None:
            log.info("%s: no --split given, using the train split %r", self.name, self.train_split)
            return self.train_split
        split = dict(self.split_aliases).get(split, split)
        if split not in self.splits:
            raise DataError(f"task {self.name} has no split {split!r}; use --split with one of {', '.join(self.splits)}")
        return split

    def summary(self) -> dict[str, Any]:
        """JSON-able listing entry (``chiptuning tasks --json``)."""
        configs = [c for c in self.hub[1] if c]
        return {
            "name": self.name, "description": self.description,
            "hub": self.hub[0] + (f" ({', '.join(configs)})" if configs else ""),
            "splits": list(self.splits), "train_split": self.train_split, "eval_split": self.eval_split,
            "labels": list(self.label_names), "fields": list(self.fields), "template": self.template,
            "truncate_field": self.truncate_field, "local_files": self.local_files,
        }


def _missing(task: str, data_dir: Path, wanted: list[str], split: str) -> DataError:
    return DataError(f"{task}: no data for split {split!r} in {data_dir} (looked for {', '.join(wanted)}); "
                     "point --data-dir at the release files or pick another --split")


def _letter_index(answer: Any, n_options: int, where: str) -> int:
    letter = str(answer).strip()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise DataError(f"{where}: answer {answer!r} is not one of the letters {LETTERS[:n_options]}")
    return LETTERS.index(letter)


def _choice_example(ex_id: str, fields: dict[str, Any], label: int) -> Example:
    """A multiple-choice example: its ``options`` field sets its number of valid classes."""
    return Example(id=ex_id, fields=fields, label=label, n_choices=len(fields["options"]))


# A release names the validation split "dev" (MMLU: "val").
_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}


def _boolq_example(record: dict[str, Any], n: int, split: str, where: str) -> Example:
    answer = record.get("answer", record.get("label"))
    if not isinstance(answer, bool) or "passage" not in record or "question" not in record:
        raise DataError(f"{where}: record {n} is not a BoolQ record (question, passage, answer true/false)")
    fields = {"question": record["question"], "passage": record["passage"], "title": record.get("title", "")}
    return Example(id=f"{split}#{n}", fields=fields, label=int(answer), n_choices=2)


def _boolq_local(data_dir: Path, split: str) -> list[Example]:
    names = {"train": ["train.jsonl"], "validation": ["dev.jsonl", "val.jsonl"]}[split]
    for name in names:
        path = data_dir / name
        if path.exists():
            return [_boolq_example(r, n, split, str(path)) for n, r in enumerate(read_jsonl(path))]
    if split == "train" and (data_dir / "train_questions_only.jsonl").exists():
        raise DataError(f"boolq: {data_dir} has train_questions_only.jsonl, the train split without passages, which "
                        "the boolq template needs; train and evaluate on disjoint parts of the validation split "
                        "(--split 'validation[:2000]', then --split 'validation[2000:]'), or read that file as your "
                        "own question-only data: --data FILE --template 'Question: {subject}\\nAnswer: ' "
                        "--label-column target_new.str")
    raise _missing("boolq", data_dir, names, split)


def _boolq_hub(split: str) -> list[Example]:
    rows = load_hub_dataset("google/boolq", None, split)
    return [_boolq_example(r, n, split, "google/boolq") for n, r in enumerate(rows)]


def _race_example(passage_id: str, q: int, article: str, question: str, options: list[str], answer: Any,
                  where: str) -> Example:
    ex_id = f"{passage_id}#{q}"
    return _choice_example(ex_id, {"article": article, "question": question, "options": list(options)},
                           _letter_index(answer, len(options), f"{where} {ex_id}"))


def _race_passage(passage: dict[str, Any], where: str) -> list[Example]:
    """One example per question of a RACE passage (original JSON: article, questions, options, answers, id)."""
    questions, options, answers = passage["questions"], passage["options"], passage["answers"]
    if not len(questions) == len(options) == len(answers):
        raise DataError(f"{where}: passage {passage.get('id')!r} has unequal numbers of questions, options, answers")
    return [_race_example(passage["id"], q, passage["article"], question, opts, answer, where)
            for q, (question, opts, answer) in enumerate(zip(questions, options, answers))]


def _race_local(data_dir: Path, split: str, level: str) -> list[Example]:
    stem = f"{_FILE_SPLIT[split]}_{level}.jsonl"
    for path in (data_dir / stem, data_dir / f"{stem}.gz"):
        if path.exists():
            return [ex for passage in read_jsonl(path) for ex in _race_passage(passage, str(path))]
    folder = data_dir / _FILE_SPLIT[split] / level  # the CMU release: one JSON file per passage
    if not folder.is_dir():
        raise _missing(f"race-{level}", data_dir, [stem, f"{stem}.gz", f"{folder.relative_to(data_dir)}/*.txt"], split)
    examples = []
    for path in sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
        passage = json.loads(path.read_text(encoding="utf-8"))
        passage.setdefault("id", f"{level}{path.name}")
        examples += _race_passage(passage, str(path))
    return examples


def _race_hub(split: str, level: str) -> list[Example]:
    examples, seen = [], {}
    for row in load_hub_dataset("ehovy/race", level, split):
        q = seen[row["example_id"]] = seen.get(row["example_id"], -1) + 1  # question number in its passage
        examples.append(_race_example(row["example_id"], q, row["article"], row["question"], row["options"],
                                      row["answer"], "ehovy/race"))
    return examples


_C3_KINDS = (("m", "mixed"), ("d", "dialog"))  # mixed first, then dialogue (as the paper counts them)


def _c3_examples(documents: list[str], questions: list[dict[str, Any]], doc_id: str, kind: str,
                 where: str) -> list[Example]:
    examples = []
    for q, item in enumerate(questions):
        choices = list(item["choice"])
        ex_id = f"{kind}/{doc_id}#{q}"
        if not 2 <= len(choices) <= 4:
            raise DataError(f"{where} {ex_id}: {len(choices)} options; C3 questions have 2 to 4")
        if item["answer"] not in choices:
            raise DataError(f"{where} {ex_id}: answer {item['answer']!r} is not one of its options {choices}")
        fields = {"documents": list(documents), "question": item["question"], "options": choices}
        examples.append(_choice_example(ex_id, fields, choices.index(item["answer"])))
    return examples


def _c3_local(data_dir: Path, split: str) -> list[Example]:
    paths = [data_dir / f"c3-{short}-{_FILE_SPLIT[split]}.json" for short, _ in _C3_KINDS]
    if not all(p.exists() for p in paths):
        raise _missing("c3", data_dir, [p.name for p in paths], split)
    examples = []
    for path, (_, kind) in zip(paths, _C3_KINDS):
        for documents, questions, doc_id in json.loads(path.read_text(encoding="utf-8")):
            examples += _c3_examples(documents, questions, doc_id, kind, str(path))
    return examples


def _c3_hub(split: str) -> list[Example]:
    examples = []
    for _, kind in _C3_KINDS:
        for row in load_hub_dataset("dataset-org/c3", kind, split):
            questions = row["questions"]
            if isinstance(questions, dict):  # a Sequence of dicts arrives as a dict of lists
                questions = [dict(zip(questions, values)) for values in zip(*questions.values())]
            examples += _c3_examples(row["documents"], questions, row["document_id"], kind, "dataset-org/c3")
    return examples


_MMLU_DIRS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


def _mmlu_local(data_dir: Path, split: str) -> list[Example]:
    folder = data_dir / _MMLU_DIRS[split]
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise _missing("mmlu", data_dir, [f"{_MMLU_DIRS[split]}/*.csv"], split)
    examples = []
    for path in files:
        # The auxiliary training files (ARC, OBQA, ...) are not MMLU subjects: no subject, as on the hub.
        subject = "" if split == "auxiliary_train" else path.stem.removesuffix(f"_{_MMLU_DIRS[split]}")
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f)):
                if len(row) != 6:
                    raise DataError(f"{path}:{n + 1}: {len(row)} columns; expected question, A, B, C, D, answer")
                label = _letter_index(row[5], 4, f"{path}:{n + 1}")
                fields = {"subject": subject, "question": row[0], "options": row[1:5]}
                examples.append(_choice_example(f"{subject or path.stem}#{n}", fields, label))
    log.info("mmlu/%s: %d questions from %d files in %s", split, len(examples), len(files), folder)
    return examples


def _mmlu_hub(split: str) -> list[Example]:
    examples, seen = [], {}
    for i, row in enumerate(load_hub_dataset("cais/mmlu", "all", split)):
        row = row.get("train", row)  # some auxiliary_train exports nest each row under "train"
        subject = row.get("subject") or ""
        n = seen[subject] = seen.get(subject, -1) + 1
        answer = row["answer"]
        label = answer if isinstance(answer, int) else _letter_index(answer, 4, f"cais/mmlu row {i}")
        fields = {"subject": subject, "question": row["question"], "options": list(row["choices"])}
        examples.append(_choice_example(f"{subject}#{n}" if subject else f"{split}#{i}", fields, label))
    return examples


def mmlu_template(examples: list[Example]) -> str:
    """The MMLU template for these examples: with the subject when every example has one, without
    when none has (DataError for a mix)."""
    with_subject = sum(bool(ex.fields["subject"]) for ex in examples)
    if with_subject == len(examples):
        return MMLU_TEMPLATE
    if with_subject == 0:
        return MMLU_TEMPLATE_NO_SUBJECT
    raise DataError(f"mmlu: {with_subject} of {len(examples)} questions have a subject; one prompt template needs all "
                    "or none (load subject splits and auxiliary_train separately)")


def _race(level: str) -> BuiltinTask:
    return BuiltinTask(
        name=f"race-{level}",
        description=f"RACE-{level[0].upper()}: English exam reading comprehension ({level} school), 4 options",
        template=RACE_TEMPLATE, fields=("article", "question", "options"), hub=("ehovy/race", (level,)),
        local_files=f"{{train,dev,test}}_{level}.jsonl[.gz] or {{train,dev,test}}/{level}/*.txt",
        load_local=partial(_race_local, level=level), load_hub=partial(_race_hub, level=level),
        truncate_field="article",
    )


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            name="boolq", description="BoolQ: yes/no questions about a Wikipedia passage",
            template=BOOLQ_TEMPLATE, fields=("passage", "question", "title"), hub=("google/boolq", (None,)),
            local_files="train.jsonl, dev.jsonl (validation)", load_local=_boolq_local, load_hub=_boolq_hub,
            eval_split="validation", truncate_field="passage", label_names=("False", "True"),
            splits=("train", "validation"),
        ),
        _race("high"),
        _race("middle"),
        BuiltinTask(
            name="c3",
            description="C3: Chinese multiple-choice reading comprehension, mixed-genre + dialogue, 2-4 options",
            template=C3_TEMPLATE, fields=("documents", "question", "options"),
            hub=("dataset-org/c3", ("mixed", "dialog")),
            local_files="c3-{m,d}-{train,dev,test}.json", load_local=_c3_local, load_hub=_c3_hub,
            eval_split="validation", truncate_field="documents",
        ),
        BuiltinTask(
            name="mmlu",
            description="MMLU: 57-subject multiple-choice exam questions, 4 options "
                        "(auxiliary_train has no subject: 'about {subject}' is dropped)",
            template=MMLU_TEMPLATE, fields=("subject", "question", "options"), hub=("cais/mmlu", ("all",)),
            local_files="{auxiliary_train,dev,val,test}/*.csv", load_local=_mmlu_local, load_hub=_mmlu_hub,
            truncate_field=None,  # no passage: the long part of a question is the question
            splits=("auxiliary_train", "dev", "validation", "test"), train_split="auxiliary_train",
            split_aliases=(("val", "validation"),),
        ),
    )
}


def get_builtin(name: str) -> BuiltinTask | None:
    """The built-in task called ``name`` (case-insensitive), else None."""
    return BUILTIN_TASKS.get(name.lower())


def _check_options(spec: BuiltinTask, opts: TaskOptions) -> None:
    if opts.image_column is not None:
        raise DataError(f"--image-column does not apply to the built-in task {spec.name} (it is text)")
    if opts.text_column is not None:
        raise DataError(f"--text-column does not apply to the built-in task {spec.name}; use --template to change its prompt")
    if opts.label_column != "label":
        raise DataError(f"--label-column does not apply to the built-in task {spec.name} (its labels: {', '.join(spec.label_names)})")
    if opts.labels is not None and opts.labels != list(spec.label_names):
        raise DataError(f"--labels {','.join(opts.labels)} differ from {spec.name}'s labels {','.join(spec.label_names)}; leave --labels out")
    if opts.subset is not None:
        raise DataError(f"--subset does not apply to the built-in task {spec.name} (it reads {spec.hub[0]} itself)")
    unknown = template_fields(opts.template) - set(spec.fields) if opts.template is not None else set()
    if unknown:
        raise DataError(f"--template field(s) {sorted(unknown)} are not fields of {spec.name} (fields: {', '.join(spec.fields)})")


def load_builtin_task(name: str, opts: TaskOptions) -> TaskData:
    """A built-in task's split (or a union ``a+b`` of splits), with its reference template unless
    ``opts.template`` replaces it; options that do not apply are a DataError."""
    spec = get_builtin(name)
    _check_options(spec, opts)
    splits = [spec.resolve_split(split) for split in (opts.split.split("+") if opts.split else [None])]
    data_dir = None if opts.data_dir is None else Path(opts.data_dir)
    if data_dir is None:
        source = {"hub": spec.hub[0], "configs": [c for c in spec.hub[1] if c]}
    elif not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory")
    else:
        data_dir = data_dir / spec.folder if (data_dir / spec.folder).is_dir() else data_dir
        source = {"data_dir": str(data_dir.resolve()), "format": "release files"}
    examples = []
    for split in splits:
        part = spec.load_hub(split) if data_dir is None else spec.load_local(data_dir, split)
        if not part:
            raise DataError(f"{spec.name}/{split}: no examples found")
        # a union of splits ("auxiliary_train+validation"): ids get their split, to stay unique
        examples += part if len(splits) == 1 else [dataclasses.replace(ex, id=f"{split}:{ex.id}") for ex in part]
    if len(splits) > 1:
        source["splits"] = splits
    source["template"] = "reference" if opts.template is None else "custom"
    template = opts.template
    if template is None:
        template = mmlu_template(examples) if spec.name == "mmlu" else spec.template
    truncate = truncate_field_of(template, opts.truncate_field, spec.truncate_field)
    return TaskData(name=spec.name, split="+".join(splits), label_names=list(spec.label_names), examples=examples,
                    template=template.rstrip(" ") if opts.strip_trailing_space else template, source=source,
                    truncate_field=truncate, chat_template=opts.chat_template,
                    strip_trailing_space=opts.strip_trailing_space)
