"""Records, the split registry and every bad-input case: errors name file, line and problem."""

import json

import pytest

from abmll_tune.data.records import DataError, ParseStats, read_jsonl_examples
from abmll_tune.data.splits import Registry, load_registry

GOOD = {"task": "t1", "input": "some words", "output": "yes", "options": ["yes", "no"]}


def write_lines(path, lines):
    path.write_bytes(
        b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    )
    return path


def test_parse_metaicl_jsonl(tmp_path):
    other = dict(GOOD, input="more", output="c", options=["a", "b", "c"])
    path = write_lines(
        tmp_path / "t1_16_100_train.jsonl", [json.dumps(GOOD), "", json.dumps(other)]
    )
    examples = read_jsonl_examples(path, expected_task="t1")
    assert [(e.task, e.input, e.output, e.options, e.gold, e.id) for e in examples] == [
        ("t1", "some words", "yes", ("yes", "no"), 0, "t1_16_100_train:1"),
        ("t1", "more", "c", ("a", "b", "c"), 2, "t1_16_100_train:3"),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"task": "t1", "input": "x"', r"malformed JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "output"}), r"missing field 'output'"),
        (json.dumps(dict(GOOD, input=3)), r"field 'input' must be a string, got int"),
        (json.dumps(dict(GOOD, options="yes/no")), r"'options' must be a list of strings"),
        (json.dumps(dict(GOOD, output="maybe")), r"output 'maybe' is not one of the options"),
        (json.dumps(dict(GOOD, task="t2")), r"task 't2' in a file of task 't1'"),
        (json.dumps(["not", "an", "object"]), r"expected a JSON object"),
        (b'{"task": "t1", "input": "caf\xe9"}', r"not valid UTF-8"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, match):
    path = write_lines(tmp_path / "t1.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(DataError, match=match) as info:
        read_jsonl_examples(path, expected_task="t1")
    assert info.value.file == str(path) and info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: ")


def test_option_filters_skip_and_count(tmp_path):
    one = dict(GOOD, options=["yes"])
    five = dict(GOOD, options=["yes", "no", "a", "b", "c"])
    path = write_lines(tmp_path / "t1.jsonl", [json.dumps(GOOD), json.dumps(one), json.dumps(five)])
    stats = ParseStats()
    examples = read_jsonl_examples(path, stats=stats)
    assert len(examples) == 1 and stats.kept == 1
    assert stats.skipped == {"fewer than 2 options": 1, "more than 4 options": 1}


def test_wholly_unusable_and_empty_files_raise(tmp_path):
    unusable = write_lines(tmp_path / "u.jsonl", [json.dumps(dict(GOOD, options=["yes"]))] * 3)
    with pytest.raises(DataError, match="none of the 3 examples is usable"):
        read_jsonl_examples(unusable)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty task"):
        read_jsonl_examples(empty)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl_examples(tmp_path / "missing.jsonl")


def test_registry_has_the_papers_splits_with_their_counts():
    registry = load_registry()
    counts = {name: (len(s.train), len(s.test)) for name, s in registry.splits.items()}
    assert counts["cls45"] == (34, 15)
    assert counts["cls23"] == (28, 15)
    assert counts["nli"] == (42, 8)
    assert counts["para"] == (46, 4)
    assert counts["mcqa"] == (18, 12)
    assert registry.split("winogrande_v1").train == registry.split("cls45").train
    assert registry.split("winogrande_v1").test == ("wino_grande",)
    assert registry.split("cls23").test == registry.split("cls45").test
    assert registry.split("nli").overlap == ("sick",)  # as in MetaICL, kept and warned about
    embedded = registry.split("embedded")
    assert (len(embedded.train), len(embedded.validation), len(embedded.test)) == (40, 16, 30)
    for split in registry.splits.values():
        for task in split.train + split.eval_tasks:
            info = registry.tasks[task]
            assert info.source and info.license


def write_yaml(path, text):
    path.write_text(text)
    return path


def test_user_split_file_adds_tasks_and_resolves_references(tmp_path):
    path = write_yaml(
        tmp_path / "mine.yaml",
        "tasks:\n  my-task: {source: local, license: CC-BY-4.0}\n"
        "splits:\n  mine:\n    train: cls45.train\n    test: [my-task, glue-rte]\n",
    )
    registry = load_registry([path])
    split = registry.split("mine")
    assert split.train == registry.split("cls45").train and split.test == ("my-task", "glue-rte")
    assert registry.tasks["my-task"].license == "CC-BY-4.0"


@pytest.mark.parametrize(
    "text, line, match",
    [
        (
            "splits:\n  s:\n    train: [glue-rte]\n    test:\n      - glue-mrpc\n      - not-a-task\n",
            6,
            "unknown task 'not-a-task'",
        ),
        (
            "tasks:\n  glue-rte: {source: elsewhere, license: MIT}\n",
            2,
            "already defined differently",
        ),
        ("splits:\n  s:\n    train: [glue-rte]\n", 2, "needs 'train' and 'test'"),
        (
            "splits:\n  s:\n    train: [glue-rte, glue-rte]\n    test: [glue-mrpc]\n",
            3,
            "listed twice",
        ),
        (
            "splits:\n  s:\n    train: cls99.train\n    test: [glue-mrpc]\n",
            3,
            "unknown split or part",
        ),
        ("splits: [oops\n", 2, "malformed YAML"),
        (
            "tasks:\n  a: {source: x, license: y}\n  a: {source: x, license: z}\n",
            3,
            "duplicate key 'a'",
        ),
    ],
)
def test_bad_split_files_name_file_and_line(tmp_path, text, line, match):
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(DataError, match=match) as info:
        Registry.default().add_file(path)
    assert info.value.file == str(path) and info.value.line == line
