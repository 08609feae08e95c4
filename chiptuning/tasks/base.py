"""Examples, prompt templates, and the prompt builder that shortens a long field to fit.

A prompt is ``template.format(**fields)`` with two additions for multiple-choice data: a list
field renders as lettered option lines (``A. first\\nB. second``; :func:`format_options`), and
``{field:lines}`` joins a list with newlines instead (C3's document sentences). Every built-in
prompt is such a template string, so a saved template alone rebuilds the prompt of a raw record.

A template is data (a checkpoint carries its own), so formatting it is bounded: a format spec may
ask for at most :data:`MAX_FORMAT_WIDTH` characters of width or precision, and a field may not
reach into private attributes (``{text.__class__}``).
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chiptuning.errors import DataError

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: The widest field a format spec may ask for (width or precision, in characters).
MAX_FORMAT_WIDTH = 4096
_SPEC_NUMBERS = re.compile(r"(?<![.\d])(\d+)|\.(\d+)")

# A private-use character stands in for the field being shortened, to split a prompt into the
# text before and after that field.
_SENTINEL = "\ue000"


@dataclass
class Example:
    """One labelled record.

    Attributes:
        id: stable example id (e.g. ``high10024.txt#2`` for RACE; the record's ``id`` field or
            its row number for a user file).
        fields: the record's fields (what a template formats).
        label: class index in 0..K-1.
        n_choices: number of valid classes for this example; the first ``n_choices`` classes are
            valid (C3 questions have 2 to 4 options out of the labels A-D).
    """

    id: str
    fields: dict[str, Any]
    label: int
    n_choices: int


def format_options(options: Sequence[Any], letters: str = LETTERS) -> str:
    """Lettered option lines of a multiple-choice question, without a trailing newline.

    Example: ``format_options(["red", "blue"]) == "A. red\\nB. blue"``.

    Raises:
        DataError: more options than letters.
    """
    if len(options) > len(letters):
        raise DataError(f"{len(options)} options but only {len(letters)} letters to name them")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))


def check_format_spec(spec: str) -> None:
    """Refuse a format spec asking for more than :data:`MAX_FORMAT_WIDTH` characters of width or
    precision (``{text:>999999999}`` would build a string until memory runs out).

    Raises:
        DataError: naming the spec.
    """
    numbers = [int(a or b) for a, b in _SPEC_NUMBERS.findall(spec.lstrip()[1:] if spec[1:2] in "<>=^" else spec)]
    if any(n > MAX_FORMAT_WIDTH for n in numbers):
        raise DataError(f"format spec {spec!r} asks for {max(numbers):,} characters; a template field may ask for at "
                        f"most {MAX_FORMAT_WIDTH:,}")


class PromptFormatter(string.Formatter):
    """``str.format`` that renders list fields: options by default, ``:lines`` joined by newlines;
    bounded (:func:`check_format_spec`, no private attributes)."""

    def get_field(self, field_name: str, args, kwargs):
        if any(part.startswith("_") for part in re.split(r"[.\[\]]", field_name)[1:] if part):
            raise DataError(f"template field {{{field_name}}} reaches into a private attribute; refused")
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        check_format_spec(format_spec)
        if format_spec in ("options", "lines"):
            if not isinstance(value, (list, tuple)):
                return str(value)  # already rendered, e.g. a shortened field
            return format_options(value) if format_spec == "options" else "\n".join(map(str, value))
        if isinstance(value, (list, tuple)):
            if format_spec:
                raise DataError(
                    f"format spec {format_spec!r} does not apply to a list field; "
                    "use {field} or {field:options} for option lines, {field:lines} to join with newlines"
                )
            return format_options(value)
        return super().format_field(value, format_spec)


_FORMATTER = PromptFormatter()


def render_field(value: Any) -> str:
    """A field's value as a prompt shows it (a list renders as "A. ..." option lines)."""
    return _FORMATTER.format_field(value, "lines" if isinstance(value, (list, tuple)) else "")


def template_fields(template: str) -> set[str]:
    """Record fields a template refers to (``{a.b}`` and ``{a[0]}`` refer to field ``a``).

    Raises:
        DataError: a malformed template, or a positional field such as ``{}`` or ``{0}``.
    """
    try:
        parsed = [(name, spec) for _, name, spec, _ in _FORMATTER.parse(template) if name is not None]
    except ValueError as err:
        raise DataError(f"bad template {template!r}: {err}; write literal braces as {{{{ and }}}}") from None
    names = [name for name, _ in parsed]
    for name, spec in parsed:
        if "{" not in spec:  # a nested field's spec is checked when it is filled in
            check_format_spec(spec)
        if any(part.startswith("_") for part in re.split(r"[.\[\]]", name)[1:] if part):
            raise DataError(f"template field {{{name}}} reaches into a private attribute; refused")
    roots = {re.split(r"[.\[]", name, maxsplit=1)[0] for name in names}
    if "" in roots or any(root.isdigit() for root in roots):
        raise DataError(f"template {template!r} has a positional field; name every field, e.g. {{question}}")
    return roots


def choice_field(template: str | None, record: dict[str, Any]) -> str | None:
    """The first list field ``template`` renders as option lines (``{options}``), else None.

    Its length is the record's number of valid classes (C3 questions have 2 to 4 options); a list
    joined with ``{field:lines}`` (C3's documents) is text, not options.
    """
    if template is None:
        return None
    for _, name, spec, _ in _FORMATTER.parse(template):
        if name and isinstance(record.get(name), (list, tuple)) and spec in ("", "options"):
            return name
    return None


def format_template(template: str, record: dict[str, Any]) -> str:
    """Format ``template`` over ``record`` (see the module docstring for list fields).

    Raises:
        DataError: a field the record lacks.
    """
    missing = template_fields(template) - set(record)
    if missing:
        raise DataError(
            f"template field(s) {sorted(missing)} not in record (fields: {sorted(record)}); "
            "fix --template or the data"
        )
    try:
        return _FORMATTER.format(template, **record)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        raise DataError(f"cannot format template {template!r}: {type(err).__name__}: {err}") from None


@dataclass
class TaskData:
    """Examples of one task and split, with everything needed to rebuild their prompts.

    Attributes:
        name: task name (``boolq``, ``race-high``, ... or ``custom`` / the dataset name).
        split: split name (``train``, ``validation``, ``test``, ...).
        label_names: class names in class order.
        examples: the examples, in dataset order (or the seeded ``--limit`` draw).
        template: prompt template over the examples' fields (exclusive with ``text_column``).
        text_column: field holding the whole prompt text.
        source: where the data came from (file and hash, hub id, data_dir, limit and seed).
        truncate_field: the long field shortened when a prompt exceeds ``max_length``; None means
            prompts are never shortened here (the question would be the only field to cut).
        chat_template: wrap each prompt in the tokenizer's chat template (a user turn and the
            generation prompt) in :meth:`build_prompts`.
        strip_trailing_space: drop trailing spaces of the prompt (``Answer: `` -> ``Answer:``), so
            the chip does not read a lone whitespace token.
        image_column: image data: the field holding each example's image (a
            :class:`~chiptuning.tasks.images.ImageRef`); the template is then the prompt asked about
            the image, and :meth:`build_prompts` wraps it, with the image placeholder, in the
            processor's chat template. None for text data.
    """

    name: str
    split: str
    label_names: list[str]
    examples: list[Example]
    template: str | None = None
    text_column: str | None = None
    source: dict = field(default_factory=dict)
    truncate_field: str | None = None
    chat_template: bool = False
    strip_trailing_space: bool = False
    image_column: str | None = None

    @classmethod
    def from_description(cls, description: dict[str, Any], examples: list[Example] | None = None) -> TaskData:
        """Rebuild a task (its prompt format, no examples by default) from :meth:`describe`."""
        return cls(
            name=description.get("name", "custom"),
            split=description.get("split", "predict"),
            label_names=list(description.get("label_names") or []),
            examples=list(examples or []),
            template=description.get("template"),
            text_column=description.get("text_column"),
            source=dict(description.get("source") or {}),
            truncate_field=description.get("truncate_field"),
            chat_template=bool(description.get("chat_template", False)),
            strip_trailing_space=bool(description.get("strip_trailing_space", False)),
            image_column=description.get("image_column"),
        )

    def n_choices(self, record: dict[str, Any] | str) -> int:
        """Number of valid classes of a raw record: the length of its options list, when the
        template renders one, else every label (the ``n_choices`` its :class:`Example` would get).

        A checkpoint classifying raw records passes this on as the chip's class mask, so a C3
        question with 2 options is never answered ``C``.

        Raises:
            DataError: more options than labels.
        """
        name = choice_field(self.template, record) if isinstance(record, dict) else None
        if name is None:
            return len(self.label_names)
        n = len(record[name])
        if not 1 <= n <= len(self.label_names):
            raise DataError(f"record has {n} options in {name!r}; labels {self.label_names} allow 1 to {len(self.label_names)}")
        return n

    def format(self, record: dict[str, Any] | str) -> str:
        """The prompt of one record (a dict of fields, or a raw text when a text column is used).

        The chat template is not applied here (it needs the tokenizer): see :meth:`build_prompts`.
        For image data the record may also be the image alone (a template without fields).
        """
        if self.image_column is not None and not isinstance(record, dict):
            record = {}  # the image itself: the prompt is the template's fixed text
        if isinstance(record, str):
            if self.template is None:
                return record.rstrip(" ") if self.strip_trailing_space else record
            names = template_fields(self.template)
            if len(names) != 1:
                raise DataError(f"template needs fields {sorted(names)}; pass records as dicts")
            record = {next(iter(names)): record}
        if self.template is not None:
            text = format_template(self.template, record)
        else:
            if self.text_column not in record:
                raise DataError(f"record has no column {self.text_column!r} (columns: {', '.join(sorted(record))})")
            text = str(record[self.text_column])
        return text.rstrip(" ") if self.strip_trailing_space else text

    def build_prompts(self, tokenizer=None, max_length: int | None = None) -> tuple[list[str], int]:
        """The prompt of every example, each fitting ``max_length`` tokens where possible.

        A prompt longer than ``max_length`` tokens (special tokens counted, as
        ``tokenizer(prompt, add_special_tokens=True)`` makes them) is shortened inside
        :attr:`truncate_field` (the passage, article or documents), cut on the right at a token
        boundary, so the question, the options and the ``Answer:`` suffix stay whole. A prompt
        that still does not fit with that field emptied, or a task with no field to shorten, is
        left as it is (and logged): the extractor then drops tokens from its start.

        Args:
            tokenizer: a Hugging Face tokenizer; needed for ``max_length`` and the chat template.
            max_length: longest prompt in tokens; None: no limit.

        Returns:
            (prompts, n_shortened): one prompt per example, and how many were longer than
            ``max_length`` (shortened, or left too long).

        Image data (:attr:`image_column`): pass the model's *processor* as ``tokenizer``; each
        prompt is its chat template around the image placeholder and the prompt text (the processor
        expands the placeholder into image tokens later), never shortened.

        Raises:
            DataError: a chat template asked for without a tokenizer that has one.
        """
        if self.image_column is not None:
            texts = [self.format(ex.fields) for ex in self.examples]
            if tokenizer is None:
                return texts, 0
            rendered = {text: image_chat_prompt(tokenizer, text) for text in dict.fromkeys(texts)}  # often one prompt
            return [rendered[text] for text in texts], 0
        if self.chat_template:
            _check_chat_template(tokenizer)
        render = self._renderer(tokenizer)
        prompts = [render(self.format(ex.fields)) for ex in self.examples]
        if tokenizer is None or not max_length or not prompts:
            return prompts, 0
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        shortened = self._shorten(too_long, lengths, tokenizer, max_length, render)
        still_long = 0
        for i in too_long:
            if shortened.get(i) is None:
                still_long += 1
            else:
                prompts[i] = shortened[i]
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

        ``image_column`` is written only for image data, so text tasks keep the description (and the
        cache fingerprints) they had before images were supported.
        """
        out = {
            "name": self.name,
            "split": self.split,
            "template": self.template,
            "text_column": self.text_column,
            "label_names": self.label_names,
            "n_examples": len(self.examples),
            "source": self.source,
            "truncate_field": self.truncate_field,
            "chat_template": self.chat_template,
            "strip_trailing_space": self.strip_trailing_space,
        }
        if self.image_column is not None:
            out["image_column"] = self.image_column
        return out

    # -- prompt building --------------------------------------------------------------------------

    def _renderer(self, tokenizer) -> Callable[[str], str]:
        """prompt -> the text the model reads: the prompt, inside the chat template when asked."""
        if not self.chat_template:
            return lambda prompt: prompt
        # Chat templates often write the BOS token as text; the extractor tokenizes with
        # add_special_tokens=True, which would add a second one.
        bos = getattr(tokenizer, "bos_token", None)
        strip_bos = bool(bos) and _adds_bos(tokenizer)

        def render(prompt: str) -> str:
            text = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
            return text[len(bos):] if strip_bos and text.startswith(bos) else text

        return render

    def _lengths(self, texts: list[str], tokenizer) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]

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
                 render: Callable[[str], str]) -> dict[int, str | None]:
        """Prompts of ``rows`` with :attr:`truncate_field` cut on the right to fit ``max_length``.

        Batched over rows: keep k field tokens, starting from the estimate "drop the overshoot",
        and step k down by the remaining overshoot until the prompt fits (token merges at the cut
        make counts only nearly additive). None for a row that does not fit even with k = 0.
        """
        pieces = {i: self._split_at_field(self.examples[i].fields) for i in rows}
        result: dict[int, str | None] = {i: None for i in rows if pieces[i] is None}
        todo = [i for i in rows if pieces[i] is not None]
        if not todo:
            return result
        ends = _token_ends([pieces[i][1] for i in todo], tokenizer)
        if ends is None:  # slow tokenizer without offsets
            result.update({i: self._shorten_by_chars(*pieces[i], tokenizer, max_length, render) for i in todo})
            return result
        ends_of = dict(zip(todo, ends))
        keep = {i: min(len(ends_of[i]) - 1, len(ends_of[i]) - (lengths[i] - max_length)) for i in todo}
        while todo:
            candidates = []
            for i in todo:
                head, text, tail = pieces[i]
                cut = ends_of[i][keep[i] - 1] if keep[i] > 0 else 0
                candidates.append(render(head + text[:cut] + tail))
            pending = []
            for i, prompt, n in zip(todo, candidates, self._lengths(candidates, tokenizer)):
                if n <= max_length:
                    result[i] = prompt
                elif keep[i] > 0:
                    keep[i] = max(0, keep[i] - max(1, n - max_length))
                    pending.append(i)
                else:
                    result[i] = None
            todo = pending
        return result

    def _shorten_by_chars(self, head: str, text: str, tail: str, tokenizer, max_length: int,
                          render: Callable[[str], str]) -> str | None:
        """Bisect on the number of characters kept (tokenizers without offset mappings)."""

        def attempt(cut: int) -> tuple[bool, str]:
            prompt = render(head + text[:cut] + tail)
            return self._lengths([prompt], tokenizer)[0] <= max_length, prompt

        ok, best = attempt(0)
        if not ok:
            return None
        lo, hi = 0, len(text)  # attempt(lo) fits, attempt(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, prompt = attempt(mid)
            if ok:
                lo, best = mid, prompt
            else:
                hi = mid
        return best


def _token_ends(texts: list[str], tokenizer) -> list[list[int]] | None:
    """Character end of each token of each text (no special tokens); None without offsets."""
    try:
        offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        return None
    return [[end for _, end in row if end > 0] for row in offsets]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)


def _check_chat_template(tokenizer) -> None:
    if tokenizer is None:
        raise DataError("--chat-template needs the model's tokenizer to build prompts")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(
            f"tokenizer {name!r} has no chat template; leave out --chat-template or use an "
            "instruction-tuned model's tokenizer"
        )


def image_chat_prompt(processor, text: str) -> str:
    """The text a vision-language model reads for one image: the processor's chat template around
    a user turn holding the image placeholder and ``text``, with the generation prompt.

    The placeholder is expanded into the image's tokens by the processor when it sees the image,
    so the last token of the expanded sequence is the end of this text (no hard-coded offsets).

    Raises:
        DataError: a processor without a chat template.
    """
    if not getattr(processor, "chat_template", None):
        name = getattr(getattr(processor, "tokenizer", None), "name_or_path", None) or type(processor).__name__
        raise DataError(
            f"the processor of {name!r} has no chat template, so there is no place to put the image in the "
            "prompt; use an instruction-tuned vision-language model (or add a chat template to its processor)"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return apply_chat_template(processor, messages)


def apply_chat_template(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template of ``tokenizer`` (or a processor) around ``messages``, with the generation
    prompt, as text. The template is code from the model's files: transformers runs it in jinja's
    sandbox, and what the sandbox (or the template itself) refuses is one error line.

    Raises:
        DataError: the template fails or is refused.
    """
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja2's SecurityError / TemplateError, or what the template raises
        if type(err).__module__.split(".")[0] not in ("jinja2", "transformers") and not isinstance(
                err, (ValueError, TypeError, KeyError, IndexError, AttributeError)):
            raise
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise DataError(f"the chat template of {name!r} cannot render the prompt ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}); fix the template or leave --chat-template out") from None
