"""The paper's benchmarks as built-in tasks: BoolQ, RACE (high, middle), C3, MMLU.

Each task has the prompt template of the Chip-Tuning reference code (no answer appended), its
label mapping and its default train / eval splits, and loads two ways:

- from the Hugging Face hub through ``datasets`` (google/boolq, ehovy/race, dataset-org/c3,
  cais/mmlu), or
- offline from a directory holding the original release files (``data_dir``):

  ======== ===================================================================================
  boolq    ``train.jsonl``, ``dev.jsonl`` (Google release; ``val.jsonl`` of SuperGLUE also read)
  race     ``{train,dev,test}_{high,middle}.jsonl[.gz]`` (one passage per line), or the CMU
           layout ``{train,dev,test}/{high,middle}/<n>.txt``
  c3       ``c3-{m,d}-{train,dev,test}.json``
  mmlu     ``{auxiliary_train,dev,val,test}/*.csv`` (hendrycks ``data.tar``: no header,
           question, A, B, C, D, answer letter; the subject is the file name)
  ======== ===================================================================================

  ``data_dir`` may also be a parent directory holding these as ``boolq/``, ``race/``, ``c3/``,
  ``mmlu/`` (the layout of ``shared/data``).

Both ways give the same examples, fields and ids (``validation#17`` for BoolQ, ``high10024.txt#2``
for RACE, ``mixed/11-67#0`` for C3, ``abstract_algebra#3`` for MMLU), except the ids of MMLU's
auxiliary_train, whose hub rows do not name their source file. Multiple-choice tasks store their
options as a list field ``options`` that the template renders as ``A. ...`` lines.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from chiptuning.errors import DataError
from chiptuning.tasks.base import LETTERS, Example
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
    """A benchmark the toolkit knows: its prompt, labels, splits and where its data lives.

    Attributes:
        name: the ``--task`` name.
        description: one line for ``chiptuning tasks``.
        template: prompt template over :attr:`fields` (the reference code's).
        fields: the fields every example has (what a ``--template`` override may use).
        label_names: class names; a multiple-choice example uses the first ``n_choices``.
        splits: canonical split names.
        train_split: the split chips are trained on by default.
        eval_split: the split results are reported on.
        truncate_field: the long field shortened to fit ``--max-length`` (None: none).
        hub: (dataset id, configurations concatenated in order) on the Hugging Face hub.
        local_files: the release files a ``--data-dir`` must hold, for messages and listings.
        folder: the usual name of the release's folder; a ``--data-dir`` holding such a folder
            (e.g. ``data/`` with ``data/race/``) reads from it.
        split_aliases: other names accepted for a split (``dev`` -> ``validation``).
    """

    name: str
    description: str
    template: str
    fields: tuple[str, ...]
    label_names: tuple[str, ...]
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    truncate_field: str | None
    hub: tuple[str, tuple[str | None, ...]]
    local_files: str
    load_local: Loader
    load_hub: Loader
    folder: str
    split_aliases: tuple[tuple[str, str], ...] = (("dev", "validation"), ("val", "validation"))

    def resolve_split(self, split: str | None) -> str:
        """The canonical split name (default: :attr:`train_split`).

        Raises:
            DataError: a split the task does not have.
        """
        if split is None:
            log.info("%s: no --split given, using the train split %r", self.name, self.train_split)
            return self.train_split
        split = dict(self.split_aliases).get(split, split)
        if split not in self.splits:
            raise DataError(f"task {self.name} has no split {split!r}; use --split with one of {', '.join(self.splits)}")
        return split

    def summary(self) -> dict[str, Any]:
        """JSON-able listing entry (``chiptuning tasks --json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "hub": self.hub[0] + (f" ({', '.join(c for c in self.hub[1] if c)})" if any(self.hub[1]) else ""),
            "splits": list(self.splits),
            "train_split": self.train_split,
            "eval_split": self.eval_split,
            "labels": list(self.label_names),
            "fields": list(self.fields),
            "template": self.template,
            "truncate_field": self.truncate_field,
            "local_files": self.local_files,
        }


# -- helpers ---------------------------------------------------------------------------------------


def _missing(task: str, data_dir: Path, wanted: Iterable[str], split: str) -> DataError:
    names = ", ".join(wanted)
    return DataError(
        f"{task}: no data for split {split!r} in {data_dir} (looked for {names}); "
        "point --data-dir at the release files or pick another --split"
    )


def _letter_index(answer: Any, n_options: int, where: str) -> int:
    letter = str(answer).strip()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise DataError(f"{where}: answer {answer!r} is not one of the letters {LETTERS[:n_options]}")
    return LETTERS.index(letter)


def _check_data_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is not a directory")
    return path


def _load_dataset(task: str, split: str, config: str | None = None):
    return load_hub_dataset(task, config, split=split)


# -- BoolQ -----------------------------------------------------------------------------------------


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
        raise DataError(
            f"boolq: {data_dir} has train_questions_only.jsonl, the train split without passages, which "
            "the boolq template needs; train and evaluate on disjoint parts of the validation split "
            "(--split 'validation[:2000]', then --split 'validation[2000:]'), or read that file as your own "
            "question-only data: --data FILE --template 'Question: {subject}\\nAnswer: ' "
            "--label-column target_new.str"
        )
    raise _missing("boolq", data_dir, names, split)


def _boolq_hub(split: str) -> list[Example]:
    rows = _load_dataset("google/boolq", split)
    return [_boolq_example(r, n, split, "google/boolq") for n, r in enumerate(rows)]


# -- RACE ------------------------------------------------------------------------------------------

_RACE_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}


def _race_examples(passage: dict[str, Any], where: str) -> list[Example]:
    """One example per question of a RACE passage (original JSON: article, questions, options, answers, id)."""
    questions, options, answers = passage["questions"], passage["options"], passage["answers"]
    if not len(questions) == len(options) == len(answers):
        raise DataError(f"{where}: passage {passage.get('id')!r} has unequal numbers of questions, options, answers")
    return [
        Example(
            id=f"{passage['id']}#{q}",
            fields={"article": passage["article"], "question": question, "options": list(opts)},
            label=_letter_index(answer, len(opts), f"{where} {passage['id']}#{q}"),
            n_choices=len(opts),
        )
        for q, (question, opts, answer) in enumerate(zip(questions, options, answers))
    ]


def _race_local(data_dir: Path, split: str, level: str) -> list[Example]:
    stem = f"{_RACE_FILE_SPLIT[split]}_{level}.jsonl"
    for path in (data_dir / stem, data_dir / f"{stem}.gz"):
        if path.exists():
            return [ex for passage in read_jsonl(path) for ex in _race_examples(passage, str(path))]
    folder = data_dir / _RACE_FILE_SPLIT[split] / level  # the CMU release: one JSON file per passage
    if folder.is_dir():
        files = sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
        examples = []
        for path in files:
            passage = json.loads(path.read_text(encoding="utf-8"))
            passage.setdefault("id", f"{level}{path.name}")
            examples.extend(_race_examples(passage, str(path)))
        return examples
    raise _missing(f"race-{level}", data_dir, [stem, f"{stem}.gz", f"{folder.relative_to(data_dir)}/*.txt"], split)


def _race_hub(split: str, level: str) -> list[Example]:
    rows = _load_dataset("ehovy/race", split, level)
    examples, seen = [], {}
    for row in rows:
        q = seen[row["example_id"]] = seen.get(row["example_id"], -1) + 1  # question number in its passage
        where = f"ehovy/race {row['example_id']}#{q}"
        examples.append(Example(
            id=f"{row['example_id']}#{q}",
            fields={"article": row["article"], "question": row["question"], "options": list(row["options"])},
            label=_letter_index(row["answer"], len(row["options"]), where),
            n_choices=len(row["options"]),
        ))
    return examples


# -- C3 --------------------------------------------------------------------------------------------

_C3_KINDS = (("m", "mixed"), ("d", "dialog"))  # mixed first, then dialogue (as the paper counts them)
_C3_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}


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
        examples.append(Example(
            id=ex_id,
            fields={"documents": list(documents), "question": item["question"], "options": choices},
            label=choices.index(item["answer"]),
            n_choices=len(choices),
        ))
    return examples


def _c3_local(data_dir: Path, split: str) -> list[Example]:
    paths = [data_dir / f"c3-{short}-{_C3_FILE_SPLIT[split]}.json" for short, _ in _C3_KINDS]
    if not all(p.exists() for p in paths):
        raise _missing("c3", data_dir, [p.name for p in paths], split)
    examples = []
    for path, (_, kind) in zip(paths, _C3_KINDS):
        for documents, questions, doc_id in json.loads(path.read_text(encoding="utf-8")):
            examples.extend(_c3_examples(documents, questions, doc_id, kind, str(path)))
    return examples


def _c3_hub(split: str) -> list[Example]:
    examples = []
    for _, kind in _C3_KINDS:
        for row in _load_dataset("dataset-org/c3", split, kind):
            questions = row["questions"]
            if isinstance(questions, dict):  # a Sequence of dicts arrives as a dict of lists
                questions = [dict(zip(("question", "answer", "choice"), t))
                             for t in zip(questions["question"], questions["answer"], questions["choice"])]
            examples.extend(_c3_examples(row["documents"], questions, row["document_id"], kind, "dataset-org/c3"))
    return examples


# -- MMLU ------------------------------------------------------------------------------------------

_MMLU_DIRS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


def _mmlu_example(subject: str, question: str, options: list[str], label: int, ex_id: str) -> Example:
    return Example(id=ex_id, fields={"subject": subject, "question": question, "options": options},
                   label=label, n_choices=len(options))


def _mmlu_local(data_dir: Path, split: str) -> list[Example]:
    folder = data_dir / _MMLU_DIRS[split]
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise _missing("mmlu", data_dir, [f"{_MMLU_DIRS[split]}/*.csv"], split)
    suffix = f"_{_MMLU_DIRS[split]}"
    examples = []
    for path in files:
        # The auxiliary training files (ARC, OBQA, ...) are not MMLU subjects: no subject, as on the hub.
        subject = "" if split == "auxiliary_train" else path.stem.removesuffix(suffix)
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f)):
                if len(row) != 6:
                    raise DataError(f"{path}:{n + 1}: {len(row)} columns; expected question, A, B, C, D, answer")
                label = _letter_index(row[5], 4, f"{path}:{n + 1}")
                examples.append(_mmlu_example(subject, row[0], row[1:5], label, f"{subject or path.stem}#{n}"))
    log.info("mmlu/%s: %d questions from %d files in %s", split, len(examples), len(files), folder)
    return examples


def _mmlu_hub(split: str) -> list[Example]:
    rows = _load_dataset("cais/mmlu", split, "all")
    examples, seen = [], {}
    for i, row in enumerate(rows):
        row = row.get("train", row)  # older auxiliary_train exports nest each row under "train"
        subject = row.get("subject") or ""
        n = seen[subject] = seen.get(subject, -1) + 1
        answer = row["answer"]
        label = answer if isinstance(answer, int) else _letter_index(answer, 4, f"cais/mmlu row {i}")
        examples.append(_mmlu_example(subject, row["question"], list(row["choices"]), label,
                                      f"{subject}#{n}" if subject else f"{split}#{i}"))
    return examples


def mmlu_template(examples: list[Example]) -> str:
    """The MMLU template for these examples: with the subject when every example has one.

    Raises:
        DataError: some examples have a subject and some do not.
    """
    with_subject = sum(bool(ex.fields["subject"]) for ex in examples)
    if with_subject == len(examples):
        return MMLU_TEMPLATE
    if with_subject == 0:
        return MMLU_TEMPLATE_NO_SUBJECT
    raise DataError(
        f"mmlu: {with_subject} of {len(examples)} questions have a subject; one prompt template needs all "
        "or none (load subject splits and auxiliary_train separately)"
    )


# -- the registry ----------------------------------------------------------------------------------


def _race(level: str) -> BuiltinTask:
    return BuiltinTask(
        name=f"race-{level}",
        description=f"RACE-{level[0].upper()}: English exam reading comprehension ({level} school), 4 options",
        template=RACE_TEMPLATE,
        fields=("article", "question", "options"),
        label_names=("A", "B", "C", "D"),
        splits=("train", "validation", "test"),
        train_split="train",
        eval_split="test",
        truncate_field="article",
        hub=("ehovy/race", (level,)),
        local_files=f"{{train,dev,test}}_{level}.jsonl[.gz] or {{train,dev,test}}/{level}/*.txt",
        load_local=partial(_race_local, level=level),
        load_hub=partial(_race_hub, level=level),
        folder="race",
    )


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            name="boolq",
            description="BoolQ: yes/no questions about a Wikipedia passage",
            template=BOOLQ_TEMPLATE,
            fields=("passage", "question", "title"),
            label_names=("False", "True"),
            splits=("train", "validation"),
            train_split="train",
            eval_split="validation",
            truncate_field="passage",
            hub=("google/boolq", (None,)),
            local_files="train.jsonl, dev.jsonl (validation)",
            load_local=_boolq_local,
            load_hub=_boolq_hub,
            folder="boolq",
        ),
        _race("high"),
        _race("middle"),
        BuiltinTask(
            name="c3",
            description="C3: Chinese multiple-choice reading comprehension, mixed-genre + dialogue, 2-4 options",
            template=C3_TEMPLATE,
            fields=("documents", "question", "options"),
            label_names=("A", "B", "C", "D"),
            splits=("train", "validation", "test"),
            train_split="train",
            eval_split="validation",
            truncate_field="documents",
            hub=("dataset-org/c3", ("mixed", "dialog")),
            local_files="c3-{m,d}-{train,dev,test}.json",
            load_local=_c3_local,
            load_hub=_c3_hub,
            folder="c3",
        ),
        BuiltinTask(
            name="mmlu",
            description="MMLU: 57-subject multiple-choice exam questions, 4 options "
                        "(auxiliary_train has no subject: 'about {subject}' is dropped)",
            template=MMLU_TEMPLATE,
            fields=("subject", "question", "options"),
            label_names=("A", "B", "C", "D"),
            splits=("auxiliary_train", "dev", "validation", "test"),
            train_split="auxiliary_train",
            eval_split="test",
            truncate_field=None,  # no passage: the long part of a question is the question
            hub=("cais/mmlu", ("all",)),
            local_files="{auxiliary_train,dev,val,test}/*.csv",
            load_local=_mmlu_local,
            load_hub=_mmlu_hub,
            folder="mmlu",
            split_aliases=(("val", "validation"),),
        ),
    )
}


def get_builtin(name: str) -> BuiltinTask | None:
    """The built-in task called ``name`` (case-insensitive), else None."""
    return BUILTIN_TASKS.get(name.lower())


def load_builtin_examples(task: BuiltinTask, split: str, data_dir: str | Path | None) -> tuple[list[Example], dict]:
    """Examples of one split, from ``data_dir`` or the hub, and the source record."""
    if data_dir is not None:
        path = _check_data_dir(data_dir)
        if (path / task.folder).is_dir():
            path = path / task.folder
        examples = task.load_local(path, split)
        source = {"data_dir": str(path.resolve()), "format": "release files"}
    else:
        examples = task.load_hub(split)
        source = {"hub": task.hub[0], "configs": [c for c in task.hub[1] if c]}
    if not examples:
        raise DataError(f"{task.name}/{split}: no examples found")
    return examples, source
