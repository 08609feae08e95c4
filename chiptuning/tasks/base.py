"""Examples, the options that load them, prompt templates, and the prompt builder.

A prompt is ``template.format(**fields)``, where a list field renders as lettered option lines
(``A. first\\nB. second``) and ``{field:lines}`` joins a list with newlines (C3's documents), so a
saved template alone rebuilds the prompt of a raw record. A template is data (a checkpoint carries
its own), so formatting is bounded: a format spec asks for at most :data:`MAX_FORMAT_WIDTH`
characters, and a field may not reach into private attributes (``{text.__class__}``).
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chiptuning.errors import DataError

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: The widest field a format spec may ask for (width or precision, in characters).
MAX_FORMAT_WIDTH = 4096
_SPEC_NUMBERS = re.compile(r"(?<![.\d])(\d+)|\.(\d+)")
# Stands in for the field being shortened, to split a prompt into the text before and after it.
_SENTINEL = "\ue000"


@dataclass
class Example:
    """One labelled record: a stable ``id`` (``high10024.txt#2`` for RACE; a file's ``id`` field or
    row number), the ``fields`` a template formats, the class index ``label``, and ``n_choices``:
    the first ``n_choices`` classes are valid (C3 questions have 2 to 4 of A-D)."""

    id: str
    fields: dict[str, Any]
    label: int
    n_choices: int


@dataclass
class TaskOptions:
    """How :func:`~chiptuning.tasks.load_task` reads a task and builds its prompts (a limit below 1,
    a label name given twice or empty: DataError). Column options are for user data; ``split`` defaults
    to a built-in task's train split, a hub dataset's ``train``, a file's stem."""

    split: str | None = None  # sliced: validation[:2000], train[10%:]; a built-in task's may be a union a+b
    text_column: str | None = None  # the field holding the prompt, or:
    template: str | None = None  # the prompt over the record's fields (image data: the question asked)
    label_column: str = "label"  # dotted names reach nested fields
    labels: list[str] | None = None  # in class order; default a ClassLabel's names, else inferred
    limit: int | None = None  # keep the first `limit` of a shuffle seeded with `seed`
    seed: int = 42
    id_column: str = "id"  # example ids where present, else row numbers
    data_dir: str | Path | None = None  # a built-in task's original release files (offline)
    subset: str | None = None  # a hub dataset's configuration
    truncate_field: str | None = None  # default the built-in task's, or a template's longest; "none": never
    strip_trailing_space: bool = False  # "Answer: " -> "Answer:"
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    image_column: str | None = None  # image data: paths or bytes; found by itself in a folder or Image column

    def __post_init__(self) -> None:
        self.label_column = self.label_column or "label"
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit must be a positive number of examples, got {self.limit}")
        if self.labels is None:
            return
        self.labels = [str(name) for name in self.labels]
        repeated = sorted({name for name in self.labels if self.labels.count(name) > 1})
        if repeated:
            raise DataError(f"--labels names {', '.join(map(repr, repeated))} more than once; give each label once, "
                            "in class order")
        if any(not name.strip() for name in self.labels):
            raise DataError(f"--labels has an empty label name ({','.join(self.labels)!r}); give every label a name")


def format_options(options: Sequence[Any], letters: str = LETTERS) -> str:
    """Lettered option lines: ``format_options(["red", "blue"]) == "A. red\\nB. blue"``."""
    if len(options) > len(letters):
        raise DataError(f"{len(options)} options but only {len(letters)} letters to name them")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))


def check_format_spec(spec: str) -> None:
    """Refuse (DataError) a format spec asking for more than :data:`MAX_FORMAT_WIDTH` characters of
    width or precision: ``{text:>999999999}`` would build a string until memory runs out."""
    numbers = [int(a or b) for a, b in _SPEC_NUMBERS.findall(spec.lstrip()[1:] if spec[1:2] in "<>=^" else spec)]
    if any(n > MAX_FORMAT_WIDTH for n in numbers):
        raise DataError(f"format spec {spec!r} asks for {max(numbers):,} characters; a template field may ask for at "
                        f"most {MAX_FORMAT_WIDTH:,}")


def _check_field_name(name: str) -> None:
    if any(part.startswith("_") for part in re.split(r"[.\[\]]", name)[1:] if part):
        raise DataError(f"template field {{{name}}} reaches into a private attribute; refused")


class PromptFormatter(string.Formatter):
    """``str.format`` that renders list fields (options by default, ``:lines`` joined by
    newlines), bounded by :func:`check_format_spec` and without private attributes."""

    def get_field(self, field_name: str, args, kwargs):
        _check_field_name(field_name)
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        check_format_spec(format_spec)
        if format_spec in ("options", "lines"):
            if not isinstance(value, (list, tuple)):
                return str(value)  # already rendered, e.g. a shortened field
            return format_options(value) if format_spec == "options" else "\n".join(map(str, value))
        if isinstance(value, (list, tuple)):
            if format_spec:
                raise DataError(f"format spec {format_spec!r} does not apply to a list field; use {{field}} or "
                                "{field:options} for option lines, {field:lines} to join with newlines")
            return format_options(value)
        return super().format_field(value, format_spec)


_FORMATTER = PromptFormatter()


def longest_field(template: str, records: list[dict[str, Any]]) -> str | None:
    """The template field with the most characters over all records (a list's as lines), or None."""
    names = sorted(template_fields(template))
    totals = {name: sum(len(_FORMATTER.format_field(r[name], "lines" if isinstance(r[name], (list, tuple)) else ""))
                        for r in records if name in r) for name in names}
    return max(names, key=lambda name: (totals[name], name), default=None)


def template_fields(template: str) -> set[str]:
    """Record fields a template refers to (``{a.b}`` and ``{a[0]}`` refer to field ``a``); a
    malformed template, a positional field (``{}``), a spec too wide, a private attribute: DataError."""
    try:
        parsed = [(name, spec) for _, name, spec, _ in _FORMATTER.parse(template) if name is not None]
    except ValueError as err:
        raise DataError(f"bad template {template!r}: {err}; write literal braces as {{{{ and }}}}") from None
    for name, spec in parsed:
        if "{" not in spec:  # a nested field's spec is checked when it is filled in
            check_format_spec(spec)
        _check_field_name(name)
    roots = {re.split(r"[.\[]", name, maxsplit=1)[0] for name, _ in parsed}
    if "" in roots or any(root.isdigit() for root in roots):
        raise DataError(f"template {template!r} has a positional field; name every field, e.g. {{question}}")
    return roots


def choice_field(template: str | None, record: dict[str, Any]) -> str | None:
    """The first list field ``template`` renders as option lines, else None. Its length is the
    record's number of valid classes; a list joined with ``{field:lines}`` is text, not options."""
    for _, name, spec, _ in _FORMATTER.parse(template or ""):
        if name and isinstance(record.get(name), (list, tuple)) and spec in ("", "options"):
            return name
    return None


def format_template(template: str, record: dict[str, Any]) -> str:
    """Format ``template`` over ``record``; a field the record lacks, or a value the spec cannot
    format, is a DataError."""
    missing = template_fields(template) - set(record)
    if missing:
        raise DataError(f"template field(s) {sorted(missing)} not in record (fields: {sorted(record)}); "
                        "fix --template or the data")
    try:
        return _FORMATTER.format(template, **record)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        raise DataError(f"cannot format template {template!r}: {type(err).__name__}: {err}") from None


def truncate_field_of(template: str | None, requested: str | None, default: str | None = None,
                      records: list[dict[str, Any]] | None = None) -> str | None:
    """The field to shorten in over-long prompts: ``requested`` (``"none"``: never; DataError when the
    template lacks it), else ``default`` when the template has it, or the longest over ``records``."""
    if template is None or (requested or "").lower() == "none":
        return None
    fields = template_fields(template)
    if requested is None:
        default = longest_field(template, records) if records is not None else default
        return default if default in fields else None
    if requested not in fields:
        raise DataError(f"--truncate-field {requested!r} is not a field of the template (fields: "
                        f"{', '.join(sorted(fields))})")
    return requested


@dataclass
class TaskData:
    """Examples of one task and split, with everything needed to rebuild their prompts."""

    name: str  # boolq, race-high, ... or custom
    split: str
    label_names: list[str]
    examples: list[Example]  # in dataset order, or the seeded `limit` draw
    template: str | None = None  # the prompt over the examples' fields, or:
    text_column: str | None = None  # the field holding the prompt
    source: dict = field(default_factory=dict)  # file and hash, hub id, data_dir, limit and seed
    truncate_field: str | None = None  # shortened when a prompt exceeds max_length (None: never)
    chat_template: bool = False
    strip_trailing_space: bool = False  # so the chip does not read a lone space
    image_column: str | None = None  # image data: each example's ImageRef; the template asks about it

    @classmethod
    def from_description(cls, description: dict[str, Any], examples: list[Example] | None = None) -> TaskData:
        """Rebuild a task (its prompt format; no examples by default) from :meth:`describe`."""
        get = description.get
        return cls(name=get("name", "custom"), split=get("split", "predict"), examples=list(examples or []),
                   label_names=list(get("label_names") or []), template=get("template"), text_column=get("text_column"),
                   source=dict(get("source") or {}), truncate_field=get("truncate_field"),
                   chat_template=bool(get("chat_template", False)),
                   strip_trailing_space=bool(get("strip_trailing_space", False)), image_column=get("image_column"))

    def n_choices(self, record: dict[str, Any] | str) -> int:
        """Number of valid classes of a raw record: the length of the options list the template
        renders (more than the labels: DataError), else every label."""
        name = choice_field(self.template, record) if isinstance(record, dict) else None
        if name is None:
            return len(self.label_names)
        n = len(record[name])
        if not 1 <= n <= len(self.label_names):
            raise DataError(f"record has {n} options in {name!r}; labels {self.label_names} allow 1 to {len(self.label_names)}")
        return n

    def format(self, record: dict[str, Any] | str) -> str:
        """The prompt of one record: a dict of fields, a raw text (text column, or a one-field
        template), or for image data the image alone. No chat template (see :meth:`build_prompts`)."""
        if self.image_column is not None and not isinstance(record, dict):
            record = {}  # the image itself: the prompt is the template's fixed text
        if isinstance(record, str) and self.template is not None:
            names = template_fields(self.template)
            if len(names) != 1:
                raise DataError(f"template needs fields {sorted(names)}; pass records as dicts")
            record = {next(iter(names)): record}
        if isinstance(record, str):
            text = record
        elif self.template is not None:
            text = format_template(self.template, record)
        elif self.text_column not in record:
            raise DataError(f"record has no column {self.text_column!r} (columns: {', '.join(sorted(record))})")
        else:
            text = str(record[self.text_column])
        return text.rstrip(" ") if self.strip_trailing_space else text

    def build_prompts(self, tokenizer=None, max_length: int | None = None) -> tuple[list[str], int]:
        """(prompts, n_too_long): every example's prompt, and how many were over ``max_length`` tokens.

        A prompt too long is cut on the right inside :attr:`truncate_field` at a token boundary, so the
        question, the options and the ``Answer:`` suffix stay whole (one that still does not fit is
        left, and logged). Image data: ``tokenizer`` is the model's processor, never shortened."""
        if self.image_column is not None:
            texts = [self.format(ex.fields) for ex in self.examples]
            if tokenizer is None:
                return texts, 0
            rendered = {text: image_chat_prompt(tokenizer, text) for text in dict.fromkeys(texts)}  # often one prompt
            return [rendered[text] for text in texts], 0
        render = self._renderer(tokenizer)
        prompts = [render(self.format(ex.fields)) for ex in self.examples]
        if tokenizer is None or not max_length or not prompts:
            return prompts, 0
        lengths = _token_counts(prompts, tokenizer)
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        shortened = self._shorten(too_long, lengths, tokenizer, max_length, render)
        prompts = [shortened.get(i, prompt) for i, prompt in enumerate(prompts)]
        still_long = len(too_long) - len(shortened)
        if too_long:
            log.info("%s/%s: shortened %d of %d prompts to fit %d tokens (field %r)", self.name, self.split,
                     len(too_long) - still_long, len(prompts), max_length, self.truncate_field)
        if still_long:
            log.warning("%s/%s: %d prompts are longer than %d tokens even with field %r cut; "
                        "their start will be dropped", self.name, self.split, still_long, max_length,
                        self.truncate_field)
        return prompts, len(too_long)

    def images(self) -> list[Any]:
        """The image of every example (image data only), in example order."""
        if self.image_column is None:
            raise DataError(f"task {self.name!r} holds text, not images")
        return [ex.fields[self.image_column] for ex in self.examples]

    def describe(self) -> dict:
        """JSON-able description (part of the cache fingerprint); :meth:`from_description` inverts it.
        ``image_column`` is written only for image data, so text tasks keep their fingerprints."""
        out = {"name": self.name, "split": self.split, "template": self.template, "text_column": self.text_column,
               "label_names": self.label_names, "n_examples": len(self.examples), "source": self.source,
               "truncate_field": self.truncate_field, "chat_template": self.chat_template,
               "strip_trailing_space": self.strip_trailing_space}
        if self.image_column is not None:
            out["image_column"] = self.image_column
        return out

    def _renderer(self, tokenizer) -> Callable[[str], str]:
        """prompt -> the text the model reads: the prompt, inside the chat template when asked."""
        if not self.chat_template:
            return lambda prompt: prompt
        if tokenizer is None:
            raise DataError("--chat-template needs the model's tokenizer to build prompts")
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            raise DataError(f"tokenizer {name!r} has no chat template; leave out --chat-template or use an "
                            "instruction-tuned model's tokenizer")
        # Chat templates often write the BOS token as text; the extractor tokenizes with
        # add_special_tokens=True, which would add a second one.
        bos = getattr(tokenizer, "bos_token", None)
        first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
        strip_bos = bool(bos) and first == [getattr(tokenizer, "bos_token_id", None)]

        def render(prompt: str) -> str:
            text = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
            return text[len(bos):] if strip_bos and text.startswith(bos) else text

        return render

    def _split_at_field(self, fields: dict[str, Any]) -> tuple[str, str, str] | None:
        """(text before, the field as rendered, text after) of a prompt; None if not cleanly split."""
        if self.template is None or self.truncate_field is None or self.truncate_field not in fields:
            return None
        full = self.format(fields)
        parts = self.format({**fields, self.truncate_field: _SENTINEL}).split(_SENTINEL)
        if len(parts) != 2 or not (full.startswith(parts[0]) and full.endswith(parts[1])):
            return None  # the field appears twice, or is the stripped end: nothing safe to cut
        head, tail = parts
        return head, full[len(head): len(full) - len(tail)], tail

    def _shorten(self, rows: list[int], lengths: list[int], tokenizer, max_length: int,
                 render: Callable[[str], str]) -> dict[int, str]:
        """Prompts of ``rows`` with :attr:`truncate_field` cut on the right to fit ``max_length`` (left
        out where even an empty field does not fit): keep k field tokens, from "drop the overshoot" down
        by the remaining overshoot until it fits (merges at the cut make counts only nearly additive)."""
        pieces = {i: self._split_at_field(self.examples[i].fields) for i in rows}
        result: dict[int, str] = {}
        todo = [i for i in rows if pieces[i] is not None]
        if not todo:
            return result
        ends_of = dict(zip(todo, _token_ends([pieces[i][1] for i in todo], tokenizer)))
        keep = {i: min(len(ends_of[i]) - 1, len(ends_of[i]) - (lengths[i] - max_length)) for i in todo}
        while todo:
            candidates = []
            for i in todo:
                head, text, tail = pieces[i]
                cut = ends_of[i][keep[i] - 1] if keep[i] > 0 else 0
                candidates.append(render(head + text[:cut] + tail))
            pending = []
            for i, prompt, n in zip(todo, candidates, _token_counts(candidates, tokenizer)):
                if n <= max_length:
                    result[i] = prompt
                elif keep[i] > 0:
                    keep[i] = max(0, keep[i] - max(1, n - max_length))
                    pending.append(i)
            todo = pending
        return result


def _token_counts(texts: list[str], tokenizer) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]


def _token_ends(texts: list[str], tokenizer) -> list[list[int]]:
    """Character end of each token of each text (no special tokens); a slow tokenizer, without
    offsets, may cut after any character."""
    try:
        offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        return [list(range(1, len(text) + 1)) for text in texts]
    return [[end for _, end in row if end > 0] for row in offsets]


def image_chat_prompt(processor, text: str) -> str:
    """The text a vision-language model reads for one image: the processor's chat template around
    a user turn of the image placeholder and ``text``, with the generation prompt (no chat template:
    DataError). The processor expands the placeholder, so the last token stays this text's end."""
    if not getattr(processor, "chat_template", None):
        name = getattr(getattr(processor, "tokenizer", None), "name_or_path", None) or type(processor).__name__
        raise DataError(f"the processor of {name!r} has no chat template, so there is no place to put the image in "
                        "the prompt; use an instruction-tuned vision-language model (or add a chat template to its "
                        "processor)")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return apply_chat_template(processor, messages)


def apply_chat_template(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template of ``tokenizer`` (or a processor) around ``messages``, with the generation
    prompt, as text. The template is code from the model's files: transformers runs it in jinja's
    sandbox, and what the sandbox or the template refuses is one DataError line."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja2's SecurityError / TemplateError, or what the template raises
        if type(err).__module__.split(".")[0] not in ("jinja2", "transformers") and not isinstance(
                err, (ValueError, TypeError, KeyError, IndexError, AttributeError)):
            raise
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise DataError(f"the chat template of {name!r} cannot render the prompt ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}); fix the template or leave --chat-template out") from None
