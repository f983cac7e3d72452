"""The embedded suite, the data command (idempotent, atomic, clear errors) and the sources."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from abmll_tune.data.build import BuildOptions, build_split, load_manifest
from abmll_tune.data.records import DataError, MCExample, read_jsonl_examples
from abmll_tune.data.sources import (
    METAICL_HUB_REVISION,
    MetaICLDirectory,
    MetaICLHub,
    convert_chembench,
    convert_legalbench,
    open_source,
)
from abmll_tune.embedded.suite import BPE_VOCAB, MODEL_VOCAB, generate_suite, make_lexicon

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


def test_embedded_suite_is_deterministic_and_shaped_as_specified(embedded_source, tmp_path):
    again = tmp_path / "again"
    generate_suite(again)
    assert tree_digest(again) == tree_digest(embedded_source)  # tokenizer files included
    lexicon = make_lexicon()
    assert [len(c) for c in lexicon.concepts] == [10] * 8
    assert (len(lexicon.noise), len(lexicon.symbols)) == (40, 60)
    train = read_jsonl_examples(
        embedded_source / "emb-train-00" / "emb-train-00_16384_100_train.jsonl"
    )
    assert len(train) == 200
    for e in train:
        assert 2 <= len(e.options) <= 4 and set(e.options) <= set(lexicon.symbols)
        assert 5 <= len(e.input.split()) <= 8
    # the concept-to-option map differs between tasks: the map is what must be learnt
    maps = []
    for name in ("emb-train-00", "emb-train-01", "emb-train-02"):
        examples = read_jsonl_examples(embedded_source / name / f"{name}_16384_100_train.jsonl")
        maps.append({e.options for e in examples})
    assert maps[0] != maps[1] or maps[1] != maps[2]


def test_embedded_tokenizer_makes_every_word_one_token(tokenizers):
    tok = tokenizers["llama3"]
    for word in make_lexicon().words:
        assert len(tok.encode(" " + word, add_bos=False, add_eos=False)) == 1, word
    assert tok.bos_id == BPE_VOCAB and tok.eos_id < MODEL_VOCAB and tok.pad_id < MODEL_VOCAB
    assert max(tok.special_tokens.values()) < MODEL_VOCAB


def test_build_embedded_split_counts_and_disjoint_parts(embedded_split):
    manifest = load_manifest(embedded_split)
    assert manifest["split"]["selection"] == [f"emb-val-{i:02d}" for i in range(16)]
    tasks = manifest["tasks"]
    assert len(tasks) == 86
    assert tasks["emb-train-07"]["train"]["counts"] == {"train": 200}
    counts = tasks["emb-test-03"]["eval"]["counts"]
    assert counts == {
        **{f"support_{s}": 16 for s in (100, 13, 21, 42, 87)},
        "validation": 50,
        "test": 50,
    }
    val = read_jsonl_examples(embedded_split / "eval/emb-test-03/validation.jsonl")
    test = read_jsonl_examples(embedded_split / "eval/emb-test-03/test.jsonl")
    support = read_jsonl_examples(embedded_split / "eval/emb-test-03/support_13.jsonl")
    assert not {e.id for e in val} & {e.id for e in test}
    assert not {e.id for e in support} & ({e.id for e in val} | {e.id for e in test})
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((embedded_split / rel).read_bytes()).hexdigest() == digest


def test_build_is_idempotent(embedded_source, embedded_split, tmp_path):
    out = tmp_path / "again"
    build_split(
        BuildOptions(split="embedded", source=str(embedded_source), out=str(out)), **quiet()
    )
    assert tree_digest(out) == tree_digest(embedded_split)
    build_split(
        BuildOptions(split="embedded", source=str(embedded_source), out=str(out)), **quiet()
    )
    assert tree_digest(out) == tree_digest(embedded_split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary leftovers


def test_caps_and_k_shot_sampling_are_seeded(embedded_source, tmp_path):
    opts = dict(
        split="embedded",
        source=str(embedded_source),
        max_examples_per_task=50,
        max_eval_examples=10,
    )
    a = build_split(BuildOptions(out=str(tmp_path / "a"), **opts), **quiet())
    b = build_split(BuildOptions(out=str(tmp_path / "b"), **opts, holdout_seed=1), **quiet())
    assert a["tasks"]["emb-train-00"]["train"]["counts"] == {"train": 50}
    assert a["tasks"]["emb-val-00"]["eval"]["counts"]["validation"] == 10
    assert a["files"]["train/emb-train-00.jsonl"] == b["files"]["train/emb-train-00.jsonl"]
    assert (
        a["files"]["eval/emb-val-00/validation.jsonl"]
        != b["files"]["eval/emb-val-00/validation.jsonl"]
    )


def copy_suite(src: Path, dst: Path, tasks: list[str]) -> Path:
    for task in tasks:
        (dst / task).mkdir(parents=True)
        for f in (src / task).iterdir():
            (dst / task / f.name).write_bytes(f.read_bytes())
    return dst


def small_split_file(tmp_path, train, test):
    path = tmp_path / "small.yaml"
    path.write_text(f"splits:\n  small:\n    train: {train}\n    test: {test}\n")
    return path


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "abmll_tune.data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (
            lambda p: p.write_text(p.read_text() + '{"task": "emb-val-00", "input"\n'),
            r":201: malformed JSON",
        ),
        (
            lambda p: p.write_bytes(p.read_bytes() + b'{"task": "emb-val-00", "input": "\xff"}\n'),
            r":201: not valid UTF-8",
        ),
        (lambda p: p.write_text(""), r"empty task"),
    ],
)
def test_data_command_fails_cleanly_on_bad_source(embedded_source, tmp_path, corrupt, match):
    src = copy_suite(embedded_source, tmp_path / "src", ["emb-train-00", "emb-val-00"])
    corrupt(src / "emb-train-00" / "emb-train-00_16384_100_train.jsonl")
    split_file = small_split_file(tmp_path, "[emb-train-00]", "[emb-val-00]")
    out = tmp_path / "out"
    result = run_cli(
        "build",
        "--split",
        "small",
        "--splits-file",
        str(split_file),
        "--source",
        str(src),
        "--out",
        str(out),
        "--quiet",
    )
    assert result.returncode == 2
    assert "emb-train-00_16384_100_train.jsonl" in result.stderr
    assert re.search(match, result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "small.yaml",
        "src",
    ]  # nothing half written


def test_data_command_writes_and_reports(embedded_source, tmp_path):
    src = copy_suite(embedded_source, tmp_path / "src", ["emb-train-00", "emb-val-00"])
    split_file = small_split_file(tmp_path, "[emb-train-00]", "[emb-val-00]")
    out = tmp_path / "out"
    args = (
        "build",
        "--split",
        "small",
        "--splits-file",
        str(split_file),
        "--source",
        str(src),
        "--out",
        str(out),
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert (
        "emb-train-00" in result.stdout and "CC0-1.0" in result.stdout
    )  # per-task counts and licenses
    assert "building small" in result.stderr  # the progress bar
    first = tree_digest(out)
    assert run_cli(*args, "--quiet").returncode == 0
    assert tree_digest(out) == first


def test_split_naming_unknown_task_fails_before_writing(embedded_source, tmp_path):
    split_file = small_split_file(tmp_path, "[emb-train-00, emb-train-99]", "[emb-val-00]")
    result = run_cli(
        "build",
        "--split",
        "small",
        "--splits-file",
        str(split_file),
        "--source",
        str(embedded_source),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert f"{split_file}:3: unknown task 'emb-train-99'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_source_file_is_named(embedded_source, tmp_path):
    src = copy_suite(embedded_source, tmp_path / "src", ["emb-train-00"])
    with pytest.raises(
        DataError, match=r"emb-val-00_16_100_train.jsonl: missing file for task 'emb-val-00'"
    ):
        MetaICLDirectory(src).read("emb-val-00", 16, 100, "train")


def hub_stand_in(embedded_source: Path, root: Path, tasks: list[str]) -> Path:
    """A local copy with the Hub dataset's layout: data/{task}/{task}_{k}_{seed}_{part}.jsonl."""
    copy_suite(embedded_source, root / "data", tasks)
    return root


def test_hub_code_path_reads_the_same_examples_from_a_local_stand_in(embedded_source, tmp_path):
    stand_in = hub_stand_in(embedded_source, tmp_path / "hub", ["emb-val-01"])
    hub = MetaICLHub(str(stand_in), cache_dir=str(tmp_path / "cache"))
    via_datasets = hub.read("emb-val-01", 16, 42, "train")
    direct = MetaICLDirectory(embedded_source).read("emb-val-01", 16, 42, "train")
    assert via_datasets == direct  # same fields and the same stable ids
    assert "emb-val-01_16_42_train.jsonl" in hub.task_files("emb-val-01")
    # the project's own layout (no data/ folder) is not the Hub's: nothing is found there
    flat = MetaICLHub(str(embedded_source), cache_dir=str(tmp_path / "cache"))
    assert flat.task_files("emb-val-01") == set()
    with pytest.raises(DataError, match=r"data/emb-val-01/emb-val-01_16_42_train.jsonl: missing"):
        flat.read("emb-val-01", 16, 42, "train")


def test_hub_stand_in_builds_a_split_through_datasets(embedded_source, tmp_path):
    tasks = ["emb-train-00", "emb-val-00"]
    stand_in = hub_stand_in(embedded_source, tmp_path / "hub", tasks)
    split_file = small_split_file(tmp_path, "[emb-train-00]", "[emb-val-00]")
    common = dict(split="small", split_files=[str(split_file)])
    via_hub = build_split(
        BuildOptions(source=f"hub:{stand_in}", out=str(tmp_path / "a"), **common), **quiet()
    )
    direct = build_split(
        BuildOptions(source=str(embedded_source), out=str(tmp_path / "b"), **common), **quiet()
    )
    assert via_hub["files"] == direct["files"]
    assert via_hub["tasks"]["emb-train-00"]["train"]["train_source"] == "meta"


def test_metaicl_hub_is_pinned_to_the_revision_whose_layout_the_code_reads():
    source = open_source("metaicl-hub")
    assert (source.repo, source.revision, source.prefix) == (
        "allenai/metaicl-data",
        METAICL_HUB_REVISION,
        "data",
    )
    assert open_source("metaicl-hub", "main").revision == "main"


def test_hub_without_network_gives_one_clear_error(tmp_path):
    code = (
        "from abmll_tune.data.sources import MetaICLHub\n"
        "from abmll_tune.data.records import DataError\n"
        f"hub = MetaICLHub(cache_dir={str(tmp_path)!r})\n"
        "for call in (lambda: hub.read('glue-rte', 16, 100, 'train'),\n"
        "             lambda: hub.task_files('glue-rte')):\n"
        "    try:\n"
        "        call()\n"
        "    except DataError as err:\n"
        "        print('DATAERROR', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stdout.count("DATAERROR") == 2, result.stdout + result.stderr
    assert result.stdout.count("pass its directory as --source DIR") == 2
    assert "allenai/metaicl-data/data/glue-rte/glue-rte_16_100_train.jsonl" in result.stdout


def write_tsv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "index\ttext\tanswer\n" + "".join(f"{i}\t{t}\t{a}\n" for i, (t, a) in enumerate(rows))
    )


def test_legalbench_conversion(tmp_path):
    root = tmp_path / "legalbench" / "tasks"
    labels3 = ["generic", "descriptive", "suggestive"]
    write_tsv(root / "abercrombie" / "train.tsv", [(f"mark {i}", labels3[i % 3]) for i in range(6)])
    write_tsv(
        root / "abercrombie" / "test.tsv", [(f"test mark {i}", labels3[i % 3]) for i in range(9)]
    )
    (root / "abercrombie" / "README.md").write_text("# abercrombie\n\n**License**: CC BY 4.0\n")
    labels5 = ["a", "b", "c", "d", "e"]
    write_tsv(root / "five_way" / "train.tsv", [(f"x {i}", labels5[i]) for i in range(5)])
    write_tsv(root / "five_way" / "test.tsv", [(f"y {i}", labels5[i]) for i in range(5)])
    write_tsv(
        root / "hearsay" / "train.tsv", [(f"said {i}", ["Yes", "No"][i % 2]) for i in range(8)]
    )
    write_tsv(
        root / "hearsay" / "test.tsv", [(f"heard {i}", ["Yes", "No"][i % 2]) for i in range(6)]
    )
    out = tmp_path / "converted"
    summary = convert_legalbench(tmp_path / "legalbench", out, k=4, seeds=(100, 13))
    assert summary["skipped"] == {"5 labels (need 2 to 4)": 1}
    assert summary["tasks"]["legalbench-abercrombie"]["license"] == "CC BY 4.0"
    assert summary["tasks"]["legalbench-hearsay"]["license"] == "see tasks/hearsay/README.md"
    support = read_jsonl_examples(
        out / "legalbench-abercrombie" / "legalbench-abercrombie_4_13_train.jsonl"
    )
    test = read_jsonl_examples(
        out / "legalbench-abercrombie" / "legalbench-abercrombie_4_13_test.jsonl"
    )
    assert len(support) == 4 and len(test) == 9
    assert all(e.options == tuple(sorted(labels3)) and e.output in labels3 for e in support + test)
    # the converted tasks plug into a user split and the data command
    split = tmp_path / "legal.yaml"
    split.write_text(
        (out / "tasks.yaml").read_text()
        + "splits:\n  legal:\n    train: [legalbench-hearsay]\n    test: [legalbench-abercrombie]\n"
    )
    options = dict(split_files=[str(split)], k=4, seeds=(100, 13), train_k=4, train_seed=100)
    manifest = build_split(
        BuildOptions(split="legal", source=str(out), out=str(tmp_path / "built"), **options),
        **quiet(),
    )
    assert manifest["tasks"]["legalbench-hearsay"]["train"]["counts"] == {"train": 4}
    eval_entry = manifest["tasks"]["legalbench-abercrombie"]["eval"]
    assert eval_entry["labels"] == sorted(labels3) and eval_entry["license"] == "CC BY 4.0"
    assert eval_entry["counts"]["validation"] + eval_entry["counts"]["test"] == 9


def test_chembench_conversion_from_json_and_parquet(tmp_path):
    import datasets

    src = tmp_path / "chembench"
    (src / "organic").mkdir(parents=True)
    good = [
        {
            "uuid": f"q{i}",
            "examples": [
                {
                    "input": f"Which is an alkane? {i}",
                    "target_scores": {"CH4": 1, "C2H4": 0, "C2H2": 0},
                }
            ],
        }
        for i in range(6)
    ]
    skipped = [
        {"uuid": "multi", "examples": [{"input": "two right", "target_scores": {"A": 1, "B": 1}}]},
        {"uuid": "numeric", "examples": [{"input": "how many", "target": "3"}]},
        {
            "uuid": "five",
            "examples": [
                {"input": "five", "target_scores": {"a": 1, "b": 0, "c": 0, "d": 0, "e": 0}}
            ],
        },
    ]
    for item in good + skipped:
        (src / "organic" / f"{item['uuid']}.json").write_text(json.dumps(item))
    rows = [
        {
            "uuid": f"p{i}",
            "subfield": "analytical",
            "examples": [{"input": f"pH {i}?", "target_scores": json.dumps({"7": 1, "1": 0})}],
        }
        for i in range(5)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(src / "analytical-00000.parquet"))
    out = tmp_path / "converted"
    summary = convert_chembench(src, out, k=2, seeds=(100, 13))
    assert summary["skipped"] == {
        "not exactly one correct option": 1,
        "not multiple choice": 1,
        "more than 4 options": 1,
    }
    assert set(summary["tasks"]) == {"chembench-organic", "chembench-analytical"}
    assert summary["tasks"]["chembench-organic"]["license"] == "MIT"
    support = read_jsonl_examples(out / "chembench-organic" / "chembench-organic_2_100_train.jsonl")
    test = read_jsonl_examples(out / "chembench-organic" / "chembench-organic_2_100_test.jsonl")
    assert (
        len(support) == 2
        and support[0].output == "CH4"
        and support[0].options == ("CH4", "C2H4", "C2H2")
    )
    pool = {
        e.id
        for s in (100, 13)
        for e in read_jsonl_examples(
            out / "chembench-organic" / f"chembench-organic_2_{s}_train.jsonl"
        )
    }
    assert not pool & {e.id for e in test} and len(pool) + len(test) == 6
    analytical = read_jsonl_examples(
        out / "chembench-analytical" / "chembench-analytical_2_13_test.jsonl"
    )
    assert all(isinstance(e, MCExample) and e.output == "7" for e in analytical)
