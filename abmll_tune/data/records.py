"""Multiple-choice records in MetaICL's JSONL format, parsed and validated line by line.

One example per line (``../shared/spec/data.md`` section 1)::

    {"task": "superglue-cb", "input": "premise: ... [SEP] hypothesis: ...",
     "output": "contradiction", "options": ["contradiction", "entailment", "neutral"]}

Every problem is reported as a :class:`DataError` naming the file, the line and what
is wrong, so a user can fix their file.
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
    """What a filter dropped, by reason (reported by the data command)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def merge(self, other: ParseStats) -> None:
        self.kept += other.kept
        self.skipped.update(other.skipped)


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
    """Turn one decoded JSON value into an :class:`MCExample`, or raise a :class:`DataError`."""
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
    if len(set(options)) != len(options):
        raise DataError(f"options contain duplicates: {options}", file, line)
    return MCExample(
        task=record["task"],
        input=record["input"],
        output=record["output"],
        options=tuple(options),
        id=example_id or _record_id(record) or f"{Path(file).stem}:{line}",
    )


def iter_jsonl_records(path: str | os.PathLike):
    """Yield ``(line number, decoded JSON value)`` for each non-blank line of a JSONL file.

    Non-UTF-8 bytes and malformed JSON raise a :class:`DataError` naming the line.
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
    """Validate ``(line, record)`` pairs; keep questions with ``min_options``..``max_options``.

    Malformed records (missing or mistyped fields, an output that is not an option, a
    wrong task name) raise a :class:`DataError`. Questions outside the option range are
    skipped and counted in ``stats``; a file that is empty or of which no question
    survives raises.
    """
    stats = stats if stats is not None else ParseStats()
    examples: list[MCExample] = []
    n_records = 0
    for line_no, record in records:
        n_records += 1
        example = validate_record(record, file=file, line=line_no, expected_task=expected_task)
        n_options = len(example.options)
        if n_options < min_options:
            stats.skipped[f"fewer than {min_options} options"] += 1
            continue
        if n_options > max_options:
            stats.skipped[f"more than {max_options} options"] += 1
            continue
        examples.append(example)
    if n_records == 0:
        raise DataError("the file has no examples (empty task)", file)
    if not examples:
        raise DataError(
            f"none of the {n_records} examples has {min_options} to {max_options} options: "
            "the task is unusable",
            file,
        )
    stats.kept += len(examples)
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
