"""Building splits from the forms real MetaICL copies take, on fixtures the tests write.

MetaICL's k-shot distribution has no ``{task}_16384_100_train.jsonl`` files (a training
task's largest pool is its ``_test`` file), some copies lack a few tasks' files, and
genuine CrossFit data has a few unusable questions. No real data is read here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abmll_tune.data.build import BuildOptions, build_split, content_key
from abmll_tune.data.loader import BuiltSplit
from abmll_tune.data.records import (
    REPAIR_DUPLICATE_OPTION,
    SKIP_AMBIGUOUS_GOLD,
    SKIP_EMPTY_INPUT,
    DataError,
    ParseStats,
    read_jsonl_examples,
)
from abmll_tune.data.sources import METAICL_SEEDS, kshot_indices, metaicl_file

REPO = Path(__file__).resolve().parents[1]
LABELS = ("yes", "no", "maybe")


def question(task: str, i: int, n_options: int = 2, **override) -> dict:
    options = list(LABELS[:n_options])
    record = {"task": task, "input": f"{task} question {i}", "output": options[i % n_options]}
    record["options"] = options
    record.update(override)
    return record


def write_records(path: Path, records: list[dict], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def write_kshot_task(
    root: Path,
    task: str,
    pool: list[dict],
    heldout: list[dict] | None,
    *,
    k: int = 4,
    seeds=METAICL_SEEDS,
    meta: list[dict] | None = None,
) -> None:
    """MetaICL's k-shot layout: per seed, train = first k of a seeded shuffle of the pool,
    dev = the next k; one shared test file; optionally a meta-training file."""
    for seed in seeds:
        order = kshot_indices(len(pool), 2 * k, seed)
        write_records(root / metaicl_file(task, k, seed, "train"), [pool[i] for i in order[:k]])
        write_records(root / metaicl_file(task, k, seed, "dev"), [pool[i] for i in order[k:]])
    if heldout is not None:
        write_records(root / metaicl_file(task, k, seeds[0], "test"), heldout)
    if meta is not None:
        write_records(root / metaicl_file(task, 16384, 100, "train"), meta)


def split_file(tmp_path: Path, train: list[str], test: list[str]) -> Path:
    names = sorted(set(train) | set(test))
    lines = ["tasks:"] + [f"  {t}: {{source: test, license: CC0-1.0}}" for t in names]
    lines += ["splits:", "  small:", f"    train: {train}", f"    test: {test}"]
    path = tmp_path / "splits.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(tmp_path, src, train, test, out="out", **kw):
    opts = BuildOptions(
        split="small",
        source=str(src),
        out=str(tmp_path / out),
        split_files=[str(split_file(tmp_path, train, test))],
        k=4,
        **kw,
    )
    lines: list[str] = []
    manifest = build_split(opts, progress=False, log=lines.append)
    return manifest, lines


def pool(task: str, n: int, start: int = 0, **kw) -> list[dict]:
    return [question(task, i, **kw) for i in range(start, start + n)]


@pytest.fixture
def kshot_dir(tmp_path):
    """Two training tasks and one evaluation task, k-shot files only (no 16384 files)."""
    root = tmp_path / "metaicl"
    for task in ("tr-a", "tr-b", "ev-a"):
        write_kshot_task(root, task, pool(task, 20), pool(task, 30, start=100))
    return root


def test_kshot_only_directory_trains_on_test_files_under_auto(tmp_path, kshot_dir):
    manifest, lines = build(tmp_path, kshot_dir, ["tr-a", "tr-b"], ["ev-a"])
    entry = manifest["tasks"]["tr-a"]["train"]
    assert entry["train_source"] == "test"
    assert entry["train_files"] == ["tr-a_4_100_test.jsonl"]
    assert entry["pool"] == 30 and entry["counts"] == {"train": 30}
    assert manifest["tasks"]["ev-a"]["eval"]["counts"]["support_13"] == 4
    assert manifest["missing_tasks"] == {}
    assert lines[-1].startswith("summary: 2 train + 1 eval tasks, ")
    built = BuiltSplit(tmp_path / "out")
    assert [e.input for e in built.train("tr-a")][:2] == ["tr-a question 100", "tr-a question 101"]


def test_explicit_meta_source_names_every_missing_task_and_the_options_that_help(
    tmp_path, kshot_dir
):
    with pytest.raises(DataError) as info:
        build(tmp_path, kshot_dir, ["tr-a", "tr-b"], ["ev-a"], train_source="meta")
    message = str(info.value)
    assert "2 task(s) lack the files" in message
    assert "tr-a (train): tr-a_16384_100_train.jsonl" in message
    assert "tr-b (train): tr-b_16384_100_train.jsonl" in message
    assert "--train-source auto" in message and "--skip-missing-tasks" in message
    assert not (tmp_path / "out").exists()


def test_auto_takes_the_first_source_each_task_has(tmp_path):
    root = tmp_path / "metaicl"
    write_kshot_task(root, "with-meta", pool("with-meta", 20), pool("with-meta", 10, 100),
                     meta=pool("with-meta", 50, 500))  # fmt: skip
    write_kshot_task(root, "kshot-only", pool("kshot-only", 6), None)
    write_kshot_task(root, "ev-a", pool("ev-a", 20), pool("ev-a", 30, 100))
    manifest, _ = build(tmp_path, root, ["with-meta", "kshot-only"], ["ev-a"])
    tasks = manifest["tasks"]
    assert tasks["with-meta"]["train"]["train_source"] == "meta"
    assert tasks["with-meta"]["train"]["pool"] == 50
    kshot = tasks["kshot-only"]["train"]
    assert kshot["train_source"] == "kshot"
    # 6 questions drawn into 8 train/dev slots per seed: the de-duplicated union is all 6
    assert kshot["pool"] == 6 and len(kshot["train_files"]) == 10
    inputs = [e.input for e in BuiltSplit(tmp_path / "out").train("kshot-only")]
    assert sorted(inputs) == sorted(f"kshot-only question {i}" for i in range(6))
    # an explicit source is used as named
    manifest, _ = build(tmp_path, root, ["with-meta"], ["ev-a"], out="o2", train_source="kshot")
    assert manifest["tasks"]["with-meta"]["train"]["train_source"] == "kshot"


def test_a_task_in_train_and_eval_never_trains_on_its_held_out_questions(tmp_path):
    root = tmp_path / "metaicl"
    heldout = pool("both", 30, start=100)
    # the k-shot pool (6 questions, all drawn into 8 slots per seed) shares two questions
    # with the held-out file, one with its options in another order (as real copies do)
    shared = [dict(heldout[3], options=list(reversed(heldout[3]["options"]))), heldout[7]]
    write_kshot_task(root, "both", pool("both", 4) + shared, heldout)
    write_kshot_task(root, "tr-a", pool("tr-a", 20), pool("tr-a", 30, 100))
    with pytest.warns(UserWarning, match="held-out questions are removed from their training"):
        manifest, _ = build(tmp_path, root, ["tr-a", "both"], ["both"])
    entry = manifest["tasks"]["both"]["train"]
    # its test file is all held-out questions, so auto falls through to the k-shot files
    assert entry["train_source"] == "kshot"
    assert entry["held_out_dropped"] == 2 and entry["pool"] == 4
    built = BuiltSplit(tmp_path / "out")
    held = {content_key(e) for e in built.validation("both") + built.test("both")}
    assert held and not held & {content_key(e) for e in built.train("both")}
    # asked to train on the test file, it refuses rather than leak
    with pytest.raises(DataError, match=r"no training examples left .* held out"), pytest.warns():
        build(tmp_path, root, ["tr-a", "both"], ["both"], out="o2", train_source="test")
    assert not (tmp_path / "o2").exists()


def test_question_policy_skips_and_repairs_by_reason(tmp_path):
    root = tmp_path / "metaicl"
    defects = [
        question("tr-a", 0, input="   "),  # empty input: skipped
        question("tr-a", 1, options=["west", "west", "north", "south"], output="north"),
        question("tr-a", 2, options=["west", "west", "north"], output="west"),  # ambiguous
        question("tr-a", 3, options=["a", "b", "c", "d", "e"], output="a"),  # too many
        question("tr-a", 4, options=["a", "a"], output="b", input="x") | {"options": ["b", "a", "a"]},
    ]  # fmt: skip
    write_kshot_task(root, "tr-a", pool("tr-a", 20), pool("tr-a", 10, 100) + defects)
    write_kshot_task(root, "ev-a", pool("ev-a", 20), pool("ev-a", 30, 100))
    manifest, lines = build(tmp_path, root, ["tr-a"], ["ev-a"])
    entry = manifest["tasks"]["tr-a"]["train"]
    assert entry["skipped"] == {
        SKIP_EMPTY_INPUT: 1,
        SKIP_AMBIGUOUS_GOLD: 1,
        "more than 4 options": 1,
    }
    assert entry["repaired"] == {REPAIR_DUPLICATE_OPTION: 2}
    assert entry["counts"] == {"train": 12}
    repaired = {e.input: e.options for e in BuiltSplit(tmp_path / "out").train("tr-a")}
    assert repaired["tr-a question 1"] == ("west", "north", "south")
    assert repaired["x"] == ("b", "a")
    summary = lines[-1]
    assert f"{SKIP_EMPTY_INPUT}: 1" in summary and f"{REPAIR_DUPLICATE_OPTION}: 2" in summary


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"task": "tr-a", "input": "x", "output": "yes"', "malformed JSON"),
        (json.dumps(question("tr-a", 0, output="perhaps")), "output 'perhaps' is not one of"),
        (json.dumps({"task": "tr-a", "input": "x", "options": ["a"]}), "missing field 'output'"),
    ],
)
def test_broken_files_stay_errors_with_file_and_line(tmp_path, bad, match):
    path = write_records(tmp_path / "tr-a.jsonl", pool("tr-a", 3))
    path.write_text(path.read_text() + bad + "\n")
    with pytest.raises(DataError, match=match) as info:
        read_jsonl_examples(path)
    assert info.value.line == 4 and info.value.file == str(path)


def test_a_byte_order_mark_at_the_start_of_a_file_is_accepted(tmp_path):
    path = write_records(tmp_path / "t.jsonl", pool("tr-a", 3), bom=True)
    stats = ParseStats()
    assert [e.input for e in read_jsonl_examples(path, stats=stats)][0] == "tr-a question 0"
    assert stats.kept == 3 and not stats.skipped


def test_partial_directory_builds_without_missing_tasks_when_asked(tmp_path, kshot_dir):
    # ev-b has k-shot files but no test file; tr-c has no folder at all
    write_kshot_task(kshot_dir, "ev-b", pool("ev-b", 20), None)
    args = (["tr-a", "tr-b", "tr-c"], ["ev-a", "ev-b"])
    with pytest.raises(DataError) as info:
        build(tmp_path, kshot_dir, *args)
    message = str(info.value)
    assert "ev-b (eval): ev-b_4_100_test.jsonl" in message
    assert "tr-c (train): no files at all" in message and "--skip-missing-tasks" in message
    with pytest.warns(UserWarning, match=r"built without 2 task\(s\).*ev-b \(eval\).*tr-c"):
        manifest, lines = build(tmp_path, kshot_dir, *args, skip_missing_tasks=True)
    assert set(manifest["missing_tasks"]) == {"ev-b", "tr-c"}
    assert manifest["split"]["train"] == ["tr-a", "tr-b"]
    assert manifest["split"]["test"] == manifest["split"]["selection"] == ["ev-a"]
    assert "missing tasks left out: ev-b, tr-c" in lines[-1]
    built = BuiltSplit(tmp_path / "out")
    assert built.train_tasks == ["tr-a", "tr-b"] and built.test_tasks == ["ev-a"]


def test_dead_options_are_reported_and_dropped_only_on_request(tmp_path):
    root = tmp_path / "metaicl"
    irony = [question("irony", i, options=["0", "1", "hate", "non-irony"],
                      output=["hate", "non-irony"][i % 2]) for i in range(40)]  # fmt: skip
    write_kshot_task(root, "irony", irony[:20], irony[20:])
    write_kshot_task(root, "ev-a", pool("ev-a", 20), pool("ev-a", 30, 100))
    manifest, lines = build(tmp_path, root, ["irony"], ["ev-a"])
    assert manifest["tasks"]["irony"]["train"]["dead_options"] == ["0", "1"]
    assert manifest["tasks"]["ev-a"]["eval"]["dead_options"] == []
    assert any("never the answer: 2 options: '0', '1'" in line for line in lines)
    assert BuiltSplit(tmp_path / "out").train("irony")[0].options == ("0", "1", "hate", "non-irony")
    manifest, _ = build(tmp_path, root, ["irony"], ["ev-a"], out="o2", drop_dead_options=True)
    assert BuiltSplit(tmp_path / "o2").train("irony")[0].options == ("hate", "non-irony")
    assert manifest["tasks"]["irony"]["train"]["labels"] == ["hate", "non-irony"]


def test_the_same_command_twice_gives_byte_identical_outputs(tmp_path, kshot_dir):
    args = [
        sys.executable, "-m", "abmll_tune.data", "build", "--split", "small",
        "--splits-file", str(split_file(tmp_path, ["tr-a", "tr-b"], ["ev-a"])),
        "--source", str(kshot_dir), "--k", "4", "--quiet",
    ]  # fmt: skip
    outputs = []
    for name in ("a", "b"):
        result = subprocess.run(
            [*args, "--out", str(tmp_path / name)], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 0, result.stderr
        assert "summary: 2 train + 1 eval tasks" in result.stdout
        outputs.append(
            {
                p.relative_to(tmp_path / name): p.read_bytes()
                for p in (tmp_path / name).rglob("*")
                if p.is_file()
            }  # fmt: skip
        )
    assert outputs[0] == outputs[1] and len(outputs[0]) == 10
