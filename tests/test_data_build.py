"""The embedded suite, the data command (idempotent, atomic, clear errors) and the sources."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abmll_tune.data.build import BuildOptions, build_split, load_manifest
from abmll_tune.data.records import DataError, MCExample, read_jsonl_examples, write_jsonl_examples
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


def write_tsv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


README = """# {name}

### {name}

**License**: [CC By 4.0](https://creativecommons.org/licenses/by/4.0/)

**Task summary**: whether the Licensee or the Licensor may grant a license.
"""


def legalbench_fixture(root: Path) -> None:
    """Tasks in both real layouts, one broken task and the cases that must be skipped."""
    tasks = root / "tasks"
    # the GitHub copy of 2023: label column `label`, a question beside the clause, combined
    # by the task's base_prompt.txt (demonstrations first, then the query with its cue)
    rows = [(["Yes", "No"][i % 2], f"clause {i}", f"question {i}?") for i in range(40)]
    write_tsv(tasks / "contract_qa" / "train.tsv", ["label", "text", "question"], rows[:6])
    write_tsv(tasks / "contract_qa" / "test.tsv", ["label", "text", "question"], rows[6:])
    (tasks / "contract_qa" / "base_prompt.txt").write_text(
        "Answer Yes or No.\n\nClause: a demo clause\nQuestion: a demo?\nA: Yes\n\n"
        "Clause: {{text}}\nQuestion: {{question}}\nA:"
    )
    (tasks / "contract_qa" / "README.md").write_text(README.format(name="contract_qa"))
    # the Hub's layout: `index`, `answer`, `text` and a metadata column its prompt ignores
    hub = [(str(i), ["Yes", "No"][i % 2], f"evidence {i}", "slice") for i in range(30)]
    write_tsv(tasks / "hearsay" / "train.tsv", ["index", "answer", "text", "slice"], hub[:20])
    write_tsv(tasks / "hearsay" / "test.tsv", ["index", "answer", "text", "slice"], hub[20:])
    (tasks / "hearsay" / "base_prompt.txt").write_text("Q: {{text}} Is there hearsay?\nA:")
    # no prompt, text only: kept as is; no README
    plain = [(str(i), f"case {i}", ["overruled", "not"][i % 2]) for i in range(8)]
    write_tsv(tasks / "overruling" / "train.tsv", ["index", "text", "answer"], plain[:4])
    write_tsv(tasks / "overruling" / "test.tsv", ["index", "text", "answer"], plain[4:])
    # skipped: a short row (broken file), several inputs without a prompt, a prompt naming
    # a column the files lack, five labels
    write_tsv(tasks / "broken" / "train.tsv", ["index", "text", "answer"], [("0", "x")])
    write_tsv(tasks / "broken" / "test.tsv", ["index", "text", "answer"], [("0", "x", "Yes")])
    multi = [(f"t{i}", f"s{i}", ["Yes", "No"][i % 2]) for i in range(4)]
    write_tsv(tasks / "lobbying" / "train.tsv", ["bill_title", "bill_summary", "label"], multi)
    write_tsv(tasks / "lobbying" / "test.tsv", ["bill_title", "bill_summary", "label"], multi)
    write_tsv(tasks / "rule" / "train.tsv", ["text", "answer"], [("r", "Yes"), ("s", "No")])
    write_tsv(tasks / "rule" / "test.tsv", ["text", "answer"], [("r", "Yes"), ("s", "No")])
    (tasks / "rule" / "base_prompt.txt").write_text("Rule: {{rule}}\nText: {{text}}\nA:")
    five = [(f"m{i}", "abcde"[i]) for i in range(5)]
    write_tsv(tasks / "five_way" / "train.tsv", ["text", "label"], five)
    write_tsv(tasks / "five_way" / "test.tsv", ["text", "label"], five)


def test_legalbench_conversion_reads_both_layouts_and_skips_what_it_cannot_use(tmp_path):
    legalbench_fixture(tmp_path / "legalbench")
    out = tmp_path / "converted"
    summary = convert_legalbench(tmp_path / "legalbench", out, k=5, seeds=(100, 13))
    assert set(summary["tasks"]) == {"legalbench-contract_qa", "legalbench-hearsay"}
    assert {r: sorted(t) for r, t in summary["skipped"].items()} == {
        "unreadable TSV": ["broken"],
        "several input columns and no base_prompt.txt to combine them": ["lobbying"],
        "base_prompt.txt uses a column the files lack": ["rule"],
        "more than 4 labels (not multiple choice)": ["five_way"],
        "fewer than k + 20 = 25 questions": ["overruling"],
    }
    assert summary["skipped"]["fewer than k + 20 = 25 questions"]["overruling"] == "8 questions"
    assert (
        "broken/train.tsv:2: row has fewer columns"
        in summary["skipped"]["unreadable TSV"]["broken"]
    )
    assert summary["tasks"]["legalbench-contract_qa"]["license"] == "CC BY 4.0"
    assert summary["tasks"]["legalbench-hearsay"]["license"].startswith("see LegalBench's")
    # every input column the prompt names, the author's way, without its demonstrations
    support = read_jsonl_examples(
        out / "legalbench-contract_qa" / "legalbench-contract_qa_5_100_train.jsonl"
    )
    assert {e.input for e in support} <= {
        f"Clause: clause {i}\nQuestion: question {i}?" for i in range(40)
    } and len(support) == 5  # fmt: skip
    assert support[0].options == ("No", "Yes")
    hearsay = read_jsonl_examples(out / "legalbench-hearsay" / "legalbench-hearsay_5_13_test.jsonl")
    assert len(hearsay) == 20 and all(e.input.endswith("Is there hearsay?") for e in hearsay)
    # train.tsv and test.tsv pooled: a support pool and a fixed test part, per task
    assert summary["counts"]["legalbench-hearsay"] == {
        "questions": 30, "demonstrations": 20, "support_pool": 10, "test": 20, "input": "base_prompt.txt",
    }  # fmt: skip
    meta = read_jsonl_examples(
        out / "legalbench-hearsay" / "legalbench-hearsay_16384_100_train.jsonl"
    )
    assert len(meta) == 30  # a training task's meta-training file: all its questions
    assert json.loads((out / "conversion.json").read_text())["skipped"] == summary["skipped"]
    # the converted tasks plug into a user split and the data command
    split = tmp_path / "legal.yaml"
    split.write_text(
        (out / "tasks.yaml").read_text()
        + "splits:\n  legal:\n    train: [legalbench-hearsay]\n    test: [legalbench-contract_qa]\n"
    )
    options = dict(split_files=[str(split)], k=5, seeds=(100, 13))
    manifest = build_split(
        BuildOptions(split="legal", source=str(out), out=str(tmp_path / "built"), **options),
        **quiet(),
    )
    assert manifest["tasks"]["legalbench-hearsay"]["train"]["counts"] == {"train": 30}
    eval_entry = manifest["tasks"]["legalbench-contract_qa"]["eval"]
    assert eval_entry["labels"] == ["No", "Yes"] and eval_entry["license"] == "CC BY 4.0"
    # nothing usable at all is the only error
    only_broken = tmp_path / "only_broken" / "tasks"
    shutil.copytree(tmp_path / "legalbench" / "tasks" / "broken", only_broken / "broken")
    with pytest.raises(DataError, match="no usable LegalBench task .*unreadable TSV: 1"):
        convert_legalbench(only_broken.parent, tmp_path / "x", k=5)
    assert not (tmp_path / "x").exists()


def test_legalbench_support_is_drawn_per_seed_from_the_tasks_own_questions(tmp_path):
    """The paper adapts on K examples of the task and scores the rest: each seed draws its
    k support questions (k = 5 and 16 by default) from the task's pooled train.tsv and
    test.tsv, the test part is fixed and shares no question with any seed's support."""
    legalbench_fixture(tmp_path / "legalbench")
    out = tmp_path / "converted"
    seeds = (100, 13, 21)
    summary = convert_legalbench(tmp_path / "legalbench", out, seeds=seeds)
    assert summary["k"] == [5, 16] and set(summary["tasks"]) == {"legalbench-contract_qa"}
    assert sorted(summary["skipped"]["fewer than k + 20 = 36 questions"]) == [
        "hearsay", "overruling"
    ]  # fmt: skip
    task = out / "legalbench-contract_qa"
    counts = summary["counts"]["legalbench-contract_qa"]
    assert counts == {"questions": 40, "demonstrations": 6, "support_pool": 20, "test": 20,
                      "input": "base_prompt.txt"}  # fmt: skip
    for k in (5, 16):
        tests = [
            read_jsonl_examples(task / f"legalbench-contract_qa_{k}_{s}_test.jsonl") for s in seeds
        ]
        assert all(t == tests[0] for t in tests) and len(tests[0]) == 20  # one fixed test part
        test_inputs = {e.input for e in tests[0]}
        supports = [
            read_jsonl_examples(task / f"legalbench-contract_qa_{k}_{s}_train.jsonl") for s in seeds
        ]
        assert all(len(sup) == k for sup in supports)
        assert all(not ({e.input for e in sup} & test_inputs) for sup in supports)
        assert len({tuple(e.input for e in sup) for sup in supports}) == len(seeds)  # seeds differ
    # the demonstrations of train.tsv are questions like the others: some in the pool
    demos = {f"Clause: clause {i}\nQuestion: question {i}?" for i in range(6)}
    pooled = read_jsonl_examples(task / "legalbench-contract_qa_16384_100_train.jsonl")
    assert demos <= {e.input for e in pooled}


def test_legalbench_command_reports_once_per_reason(tmp_path):
    legalbench_fixture(tmp_path / "legalbench")
    result = subprocess.run(
        [sys.executable, "-m", "abmll_tune.data", "convert-legalbench", "--source",
         str(tmp_path / "legalbench"), "--out", str(tmp_path / "out"), "--k", "5"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "converted 2 tasks (70 questions)" in lines
    assert sum(line.startswith("skipped ") for line in lines) == 5
    support = [line for line in lines if line.startswith("support:")]
    assert len(support) == 1 and "each seed draws k = 5" in support[0]


def test_license_line_is_read_from_its_key_only(tmp_path):
    from abmll_tune.data.sources import _license_from_readme

    readme = tmp_path / "README.md"
    readme.write_text("The Licensee may grant a license.\n\n**License**: [CC BY-NC 4.0](x)\n")
    assert _license_from_readme(readme) == "CC BY-NC 4.0"
    readme.write_text("## Licensor\n\nGrant of licence below\n\n**License**: MIT\n")
    assert _license_from_readme(readme) == "MIT"
    readme.write_text("Licensed to the Licensee.\n")
    assert _license_from_readme(readme) is None


def _chem_question(uuid, options, correct, **meta):
    scores = {o: int(o == correct) for o in options}
    return {
        "uuid": uuid,
        **meta,
        "examples": [{"input": f"question {uuid}", "target_scores": scores}],
    }


def test_chembench_topics_from_nested_folders_and_parquet_are_the_same(tmp_path):
    import datasets

    opts = ["A", "B", "C", "D"]
    json_root = tmp_path / "json" / "data"

    def put(folder, q):
        (json_root / folder).mkdir(parents=True, exist_ok=True)
        (json_root / folder / f"{q['uuid']}.json").write_text(json.dumps(q))

    for country in ("uk", "us", "moldova"):  # three small nested topics: merged into icho
        for i in range(8):
            put(f"icho/{country}/2022", _chem_question(f"{country}{i}", opts, opts[i % 3]))
    for i in range(20):
        put("organic", _chem_question(f"org{i}", opts, opts[i % 2]))
    for i in range(20):  # a question's own subfield names its topic, wherever its file is
        put("elsewhere", _chem_question(f"sf{i}", opts, "B", subfield="organic"))
    put("tiny_topic", _chem_question("tiny", opts, "A"))
    put("tiny_topic", {"uuid": "numeric", "examples": [{"input": "n?", "target": "3"}]})
    put(
        "tiny_topic",
        {"uuid": "two", "examples": [{"input": "t", "target_scores": {"A": 1, "B": 1}}]},
    )
    summary = convert_chembench(tmp_path / "json", tmp_path / "from_json", k=2, min_test=10)
    assert set(summary["tasks"]) == {"chembench-icho", "chembench-organic"}
    assert summary["topics"]["chembench-icho"]["merged"] == [
        "icho/moldova", "icho/moldova/2022", "icho/uk", "icho/uk/2022", "icho/us", "icho/us/2022"
    ]  # fmt: skip
    assert summary["counts"]["chembench-icho"]["questions"] == 24
    assert summary["counts"]["chembench-organic"]["questions"] == 40
    assert summary["skipped"] == {"fewer than k + 10 = 12 questions": {"tiny_topic": "1 questions"}}
    assert summary["skipped_questions"] == {
        "not multiple choice (numeric or free answer)": 1, "not exactly one correct option": 1
    }  # fmt: skip
    counts = summary["counts"]["chembench-icho"]
    assert counts["support_pool"] == 4 and counts["test"] == 20 and counts["dead_options"] == 1
    # the Hub's layout: one parquet per topic, the same topic names
    for topic in ("icho", "organic"):
        rows = []
        for i in range(14):
            q = _chem_question(f"{topic}{i}", opts, "C")
            example = dict(
                q["examples"][0], target_scores=json.dumps(q["examples"][0]["target_scores"])
            )
            rows.append(dict(q, examples=[example]))
        path = tmp_path / "hub" / topic / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    hub = convert_chembench(tmp_path / "hub", tmp_path / "from_hub", k=2, min_test=10)
    assert set(hub["tasks"]) == set(summary["tasks"])
    folder = tmp_path / "from_hub" / "chembench-organic"
    pool = {
        e.id
        for s in (100, 13)
        for e in read_jsonl_examples(folder / f"chembench-organic_2_{s}_train.jsonl")
    }
    test = read_jsonl_examples(folder / "chembench-organic_2_100_test.jsonl")
    assert len(test) == 10 and not pool & {e.id for e in test} and len(pool) <= 4


def test_table3_split_reads_a_metaicl_directory_and_a_converted_folder(tmp_path):
    from abmll_tune.data.splits import load_registry

    legalbench_fixture(tmp_path / "legalbench")
    converted = tmp_path / "legal_src"
    convert_legalbench(tmp_path / "legalbench", converted, k=4, seeds=(100, 13))
    metaicl = tmp_path / "metaicl"  # two training tasks in MetaICL's meta-training layout
    for task in ("glue-rte", "superglue-rte"):
        rows = [
            MCExample(
                task, f"{task} premise {i}", ["yes", "no"][i % 2], ("no", "yes"), f"{task}:{i}"
            )
            for i in range(12)
        ]
        write_jsonl_examples(metaicl / task / f"{task}_16384_100_train.jsonl", rows)
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "splits:\n  tiny_table3:\n    train: [glue-rte, superglue-rte]\n"
        "    test: {source: legalbench}\n"
    )
    manifest = build_split(
        BuildOptions(split="tiny_table3", source=[str(metaicl), str(converted)],
                     out=str(tmp_path / "built"), split_files=[str(mine)], k=4, seeds=(100, 13)),
        **quiet(),
    )  # fmt: skip
    assert manifest["split"]["train"] == ["glue-rte", "superglue-rte"]
    # overruling (8 questions) is too small for a support pool and a test part
    assert manifest["split"]["test"] == ["legalbench-contract_qa", "legalbench-hearsay"]
    assert manifest["tasks"]["legalbench-contract_qa"]["eval"]["license"] == "CC BY 4.0"
    # the shipped Table-3 splits name cls-45's training tasks and say what is missing
    registry = load_registry([converted / "tasks.yaml"])
    split = registry.split("cls45_legalbench")
    assert split.train == registry.split("cls45").train and len(split.test) == 2
    with pytest.raises(DataError, match="no chembench task is known: convert them"):
        load_registry().split("cls45_chembench")
