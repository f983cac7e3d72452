"""Multiple-choice records in MetaICL's JSONL format, parsed and validated line by line.

One example per line (see ``docs/data.md``)::

    {"task": "superglue-cb", "input": "premise: ... [SEP] hypothesis: ...",
     "output": "contradiction", "options": ["contradiction", "entailment", "neutral"]}

Two kinds of problem are kept apart:

* a **broken file** (not JSON lines, a missing or mistyped field, bytes that are not
  UTF-8, an answer that is not among the options, another task's name) raises a
  :class:`DataError` naming the file, the line and what is wrong, so a user can fix it;
* a **well-formed but unusable question** (real copies of CrossFit data have a few) is
  skipped or repaired by :func:`apply_question_policy` and counted by reason in
  :class:`ParseStats`, which the data command reports per task (``docs/data.md`` has
  the table).

A UTF-8 byte-order mark at the start of a file is accepted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data: ``file``, ``line`` (1-based, or None) and what to do."""

    def __init__(
        self, message: str, file: str | os.PathLike | None = None, line: int | None = None
    ):
        self.file = None if file is None else str(file)
        self.line = line
        where = ""
        if self.file is not None:
            where = f"{self.file}:{line}: " if line is not None else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question. ``id`` is stable across builds (file stem and line)."""

    task: str
    input: str
    output: str
    options: tuple[str, ...]
    id: str = ""

    @property
    def gold(self) -> int:
        """Index of the correct option."""
        return self.options.index(self.output)

    def to_json(self) -> str:
        record = asdict(self)
        record["options"] = list(self.options)
        return json.dumps(record, ensure_ascii=False, sort_keys=True)


@dataclass
class ParseStats:
    """What the question policy dropped or repaired, by reason (reported by the data command)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    def merge(self, other: ParseStats) -> None:
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.repaired.update(other.repaired)


# Reasons of the per-question policy, as they appear in manifests and summaries.
SKIP_EMPTY_INPUT = "empty input"
SKIP_AMBIGUOUS_GOLD = "duplicate of the correct option (gold ambiguous)"
REPAIR_DUPLICATE_OPTION = "duplicate wrong option removed"


def skip_fewer_options(n: int) -> str:
    return f"fewer than {n} options"


def skip_more_options(n: int) -> str:
    return f"more than {n} options"


def apply_question_policy(
    example: MCExample, *, min_options: int, max_options: int, stats: ParseStats
) -> MCExample | None:
    """Repair or skip one well-formed question; the reason is counted in ``stats``.

    * empty (or whitespace-only) input: skipped;
    * an option repeated where the correct option stays unique: the repeats of the
      wrong option are removed (first occurrence kept, order kept) and the question
      kept; a repeated correct option makes the gold ambiguous: skipped;
    * fewer than ``min_options`` or more than ``max_options`` options (after the
      repair): skipped.
    """
    if not example.input.strip():
        stats.skipped[SKIP_EMPTY_INPUT] += 1
        return None
    options = example.options
    if len(set(options)) != len(options):
        if options.count(example.output) > 1:
            stats.skipped[SKIP_AMBIGUOUS_GOLD] += 1
            return None
        options = tuple(dict.fromkeys(options))
        stats.repaired[REPAIR_DUPLICATE_OPTION] += 1
        example = MCExample(example.task, example.input, example.output, options, example.id)
    if len(options) < min_options:
        stats.skipped[skip_fewer_options(min_options)] += 1
        return None
    if len(options) > max_options:
        stats.skipped[skip_more_options(max_options)] += 1
        return None
    return example


def _record_id(record: dict) -> str | None:
    # Files written by abmll-tune carry the example's stable id; MetaICL's do not.
    value = record.get("id")
    return value if isinstance(value, str) and value else None


def validate_record(
    record: object,
    *,
    file: str | os.PathLike,
    line: int,
    expected_task: str | None = None,
    example_id: str | None = None,
) -> MCExample:
    """Turn one decoded JSON value into an :class:`MCExample`, or raise a :class:`DataError`.

    Only broken records raise; duplicate options and empty inputs are left to
    :func:`apply_question_policy`.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", file, line)
    for key in ("task", "input", "output", "options"):
        if key not in record:
            raise DataError(
                f"missing field {key!r} (need task, input, output, options)", file, line
            )
    for key in ("task", "input", "output"):
        if not isinstance(record[key], str):
            raise DataError(
                f"field {key!r} must be a string, got {type(record[key]).__name__}", file, line
            )
    options = record["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError("field 'options' must be a list of strings", file, line)
    if expected_task is not None and record["task"] != expected_task:
        raise DataError(
            f"task {record['task']!r} in a file of task {expected_task!r}: one task name "
            "must not be used for different contents; rename one of them",
            file,
            line,
        )
    if record["output"] not in options:
        raise DataError(
            f"output {record['output']!r} is not one of the options {options}", file, line
        )
    return MCExample(
        task=record["task"],
        input=record["input"],
        output=record["output"],
        options=tuple(options),
        id=example_id or _record_id(record) or f"{Path(file).stem}:{line}",
    )


def iter_jsonl_records(path: str | os.PathLike):
    """Yield ``(line number, decoded JSON value)`` for each non-blank line of a JSONL file.

    Non-UTF-8 bytes and malformed JSON raise a :class:`DataError` naming the line; a
    UTF-8 byte-order mark at the start of the file is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"not valid UTF-8 (byte {err.start} of the line); re-encode the file as UTF-8",
                    path,
                    line_no,
                ) from None
            if line_no == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"malformed JSON: {err.msg} (column {err.colno})", path, line_no
                ) from None


def examples_from_records(
    records,
    *,
    file: str | os.PathLike,
    expected_task: str | None = None,
    min_options: int = 2,
    max_options: int = 4,
    stats: ParseStats | None = None,
) -> list[MCExample]:
    """Validate ``(line, record)`` pairs and apply :func:`apply_question_policy`.

    Malformed records (missing or mistyped fields, an output that is not an option, a
    wrong task name) raise a :class:`DataError`. Unusable questions are skipped or
    repaired and counted in ``stats``; a file that is empty or of which no question
    survives raises.
    """
    local = ParseStats()
    examples: list[MCExample] = []
    n_records = 0
    for line_no, record in records:
        n_records += 1
        example = validate_record(record, file=file, line=line_no, expected_task=expected_task)
        example = apply_question_policy(
            example, min_options=min_options, max_options=max_options, stats=local
        )
        if example is not None:
            examples.append(example)
    if n_records == 0:
        raise DataError("the file has no examples (empty task)", file)
    if not examples:
        raise DataError(
            f"none of the {n_records} examples is usable (skipped: "
            f"{dict(sorted(local.skipped.items()))}; a question needs a non-empty input and "
            f"{min_options} to {max_options} distinct options)",
            file,
        )
    local.kept = len(examples)
    if stats is not None:
        stats.merge(local)
    return examples


def read_jsonl_examples(
    path: str | os.PathLike,
    *,
    expected_task: str | None = None,
    min_options: int = 2,
    max_options: int = 4,
    stats: ParseStats | None = None,
) -> list[MCExample]:
    """Read and validate a MetaICL JSONL file (see :func:`examples_from_records`)."""
    return examples_from_records(
        iter_jsonl_records(path),
        file=path,
        expected_task=expected_task,
        min_options=min_options,
        max_options=max_options,
        stats=stats,
    )


def write_jsonl_examples(path: str | os.PathLike, examples: list[MCExample]) -> Path:
    """Write examples as JSONL atomically (one sorted-key JSON object per line)."""
    from abmll_tune.io import atomic_write_text

    return atomic_write_text(path, "".join(e.to_json() + "\n" for e in examples))
