"""Where task data comes from: MetaICL directories, the Hugging Face Hub, LegalBench, ChemBench.

Every source yields :class:`~abmll_tune.data.records.MCExample` lists per task file in
MetaICL's layout, ``{task}/{task}_{k}_{seed}_{part}.jsonl`` with part in train, dev,
test (``docs/data.md``), and lists the files it has for a task (``task_files``), so the
data command can choose where meta-training examples come from and name every
missing task at once:

* :class:`MetaICLDirectory` - a local directory in that layout (users who ran
  MetaICL/CrossFit, the k-shot distribution most copies take, or the embedded suite);
* :class:`MetaICLHub` - ``allenai/metaicl-data`` (CC-BY-NC-4.0) through ``datasets``
  with ``data_files=`` for exactly the files a split needs, at a pinned revision. The
  Hub dataset keeps its files under ``data/`` (``data/{task}/{task}_{k}_{seed}_{part}.jsonl``);
  any ``load_dataset`` path with that layout works, a local directory included;
* :func:`convert_legalbench` and :func:`convert_chembench` write LegalBench TSV task
  directories and ChemBench parquet/JSON as a MetaICL directory (plus a ``tasks.yaml``
  for the split registry), keeping single-answer questions with at most 4 options.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abmll_tune.data.records import (
    DataError,
    MCExample,
    ParseStats,
    examples_from_records,
    read_jsonl_examples,
    validate_record,
    write_jsonl_examples,
)
from abmll_tune.io import atomic_directory

METAICL_HUB_REPO = "allenai/metaicl-data"
# The revision of allenai/metaicl-data whose file tree the code was written against;
# `--revision` overrides it.
METAICL_HUB_REVISION = "9e999b5f6c4083a8c2309df57f06316a72de78ec"
# The Hub dataset's files live under this folder.
METAICL_HUB_PREFIX = "data"
# MetaICL's own seeds for k-shot evaluation files.
METAICL_SEEDS = (100, 13, 21, 42, 87)


def metaicl_name(task: str, k: int, seed: int, part: str) -> str:
    """File name of one MetaICL file (inside its task's folder)."""
    return f"{task}_{k}_{seed}_{part}.jsonl"


def metaicl_file(task: str, k: int, seed: int, part: str) -> str:
    """Relative path of one MetaICL file."""
    return f"{task}/{metaicl_name(task, k, seed, part)}"


class MetaICLDirectory:
    """A local directory in MetaICL's layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                "source directory not found (expected MetaICL layout {task}/{task}_{k}_{seed}_{part}.jsonl)",
                self.root,
            )

    def describe(self) -> str:
        return f"directory {self.root}"

    def task_files(self, task: str) -> set[str]:
        """Names of the JSONL files in the task's folder (empty if there is none)."""
        folder = self.root / task
        return {p.name for p in folder.glob("*.jsonl") if p.is_file()} if folder.is_dir() else set()

    def read_file(self, task: str, name: str, *, max_options: int = 4, stats=None):
        path = self.root / task / name
        if not path.is_file():
            available = sorted(self.task_files(task))[:6]
            hint = (
                f" (found: {', '.join(available)})"
                if available
                else f" (no directory {task}/ either)"
            )
            raise DataError(f"missing file for task {task!r}{hint}", path)
        return read_jsonl_examples(path, expected_task=task, max_options=max_options, stats=stats)

    def read(self, task: str, k: int, seed: int, part: str, *, max_options: int = 4, stats=None):
        return self.read_file(
            task, metaicl_name(task, k, seed, part), max_options=max_options, stats=stats
        )


class MetaICLHub:
    """MetaICL files through ``datasets.load_dataset(repo, data_files=[file])``.

    ``repo`` is a Hub dataset id (default ``allenai/metaicl-data`` at
    :data:`METAICL_HUB_REVISION`) or anything else ``load_dataset`` accepts as a path,
    such as a local directory; either way the files are under ``prefix/`` (``data/``
    on the Hub).
    """

    def __init__(
        self,
        repo: str = METAICL_HUB_REPO,
        revision: str | None = None,
        cache_dir: str | None = None,
        prefix: str = METAICL_HUB_PREFIX,
    ):
        self.repo, self.revision, self.cache_dir = repo, revision, cache_dir
        self.prefix = prefix.strip("/")
        self._files: dict[str, set[str]] | None = None

    def describe(self) -> str:
        return f"datasets:{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def _relpath(self, task: str, name: str) -> str:
        return f"{self.prefix}/{task}/{name}" if self.prefix else f"{task}/{name}"

    def _offline_error(self, err: Exception, where: str) -> DataError:
        return DataError(
            f"could not reach the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, download the MetaICL data elsewhere (the dataset "
            f"{METAICL_HUB_REPO}, or MetaICL's own preprocessing) and pass its directory "
            "as --source DIR (layout {task}/{task}_{k}_{seed}_{part}.jsonl)",
            where,
        )

    def _listing(self) -> dict[str, set[str]]:
        """Every ``{task: {file names}}`` under ``prefix/``, listed once."""
        if self._files is not None:
            return self._files
        root = Path(self.repo)
        if root.is_dir():
            base = root / self.prefix if self.prefix else root
            paths = [str(p.relative_to(root)) for p in base.rglob("*.jsonl")]
        else:
            from huggingface_hub import HfApi

            try:
                paths = HfApi().list_repo_files(
                    self.repo, repo_type="dataset", revision=self.revision
                )
            except (ConnectionError, TimeoutError, OSError) as err:
                raise self._offline_error(err, self.repo) from None
            except Exception as err:  # noqa: BLE001 - hub errors (404, auth) have many types
                raise DataError(
                    f"could not list the dataset's files: {type(err).__name__}: {err}", self.repo
                ) from None
        files: dict[str, set[str]] = {}
        for path in paths:
            parts = Path(path).parts
            if self.prefix:
                if not parts or parts[0] != self.prefix:
                    continue
                parts = parts[1:]
            if len(parts) == 2 and parts[1].endswith(".jsonl"):
                files.setdefault(parts[0], set()).add(parts[1])
        self._files = files
        return files

    def task_files(self, task: str) -> set[str]:
        return set(self._listing().get(task, set()))

    def read_file(self, task: str, name: str, *, max_options: int = 4, stats=None):
        import datasets

        relpath = self._relpath(task, name)
        where = f"{self.repo}/{relpath}"
        if Path(self.repo).is_dir() and not (Path(self.repo) / relpath).is_file():
            raise DataError(f"missing file for task {task!r}", where)
        try:
            rows = datasets.load_dataset(
                self.repo,
                data_files=[relpath],
                split="train",
                revision=self.revision,
                cache_dir=self.cache_dir,
            )
        except (ConnectionError, TimeoutError) as err:
            raise self._offline_error(err, where) from None
        except FileNotFoundError as err:
            raise DataError(f"not found on the Hub or in the cache: {err}", where) from None
        except Exception as err:  # noqa: BLE001 - datasets' parse errors have many types
            raise DataError(
                f"could not be read as JSON lines: {type(err).__name__}: {err}", where
            ) from None
        records = ((i + 1, dict(row)) for i, row in enumerate(rows))
        return examples_from_records(
            records, file=where, expected_task=task, max_options=max_options, stats=stats
        )

    def read(self, task: str, k: int, seed: int, part: str, *, max_options: int = 4, stats=None):
        return self.read_file(
            task, metaicl_name(task, k, seed, part), max_options=max_options, stats=stats
        )


class SourceChain:
    """Several sources read as one: each task from the first source that has files for it
    (a MetaICL directory plus converted LegalBench or ChemBench folders)."""

    def __init__(self, sources: list):
        self.sources = sources

    def describe(self) -> str:
        return " + ".join(s.describe() for s in self.sources)

    def _owner(self, task: str):
        return next((s for s in self.sources if s.task_files(task)), self.sources[0])

    def task_files(self, task: str) -> set[str]:
        return self._owner(task).task_files(task)

    def read_file(self, task: str, name: str, **kwargs):
        return self._owner(task).read_file(task, name, **kwargs)

    def read(self, task: str, k: int, seed: int, part: str, **kwargs):
        return self.read_file(task, metaicl_name(task, k, seed, part), **kwargs)


def source_task_files(specs: str | list[str]) -> list[Path]:
    """The ``tasks.yaml`` of every local source directory that has one (what the
    converters write): its tasks join the registry when the directory is a source."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    return [
        Path(s) / "tasks.yaml"
        for s in specs
        if s != "metaicl-hub" and not s.startswith("hub:") and (Path(s) / "tasks.yaml").is_file()
    ]


def open_source(spec: str | list[str], revision: str | None = None):
    """``metaicl-hub`` (or ``hub:<dataset id>``) for the Hub, else a local directory; a
    list of them is read as one (:class:`SourceChain`).

    ``metaicl-hub`` reads :data:`METAICL_HUB_REVISION` unless ``revision`` is given."""
    if not isinstance(spec, str):
        sources = [open_source(s, revision) for s in spec]
        return sources[0] if len(sources) == 1 else SourceChain(sources)
    if spec == "metaicl-hub":
        return MetaICLHub(METAICL_HUB_REPO, revision or METAICL_HUB_REVISION)
    if spec.startswith("hub:"):
        return MetaICLHub(spec[4:], revision)
    return MetaICLDirectory(spec)


# --------------------------------------------------------------------------------- converters


def kshot_indices(n: int, k: int, seed: int) -> np.ndarray:
    """MetaICL's k-shot sampling: the first k after a seeded numpy shuffle."""
    return np.random.RandomState(seed).permutation(n)[:k]


def _task_yaml(tasks: dict[str, dict]) -> str:
    lines = ["tasks:"]
    for name, info in sorted(tasks.items()):
        lines.append(f"  {name}: {json.dumps(info, sort_keys=True)}")
    return "\n".join(lines) + "\n"


def _write_metaicl_task(
    root: Path, task: str, train: list[MCExample], test: list[MCExample], k: int, seeds
) -> None:
    for seed in seeds:
        chosen = [train[i] for i in sorted(kshot_indices(len(train), k, seed))]
        write_jsonl_examples(root / metaicl_file(task, k, seed, "train"), chosen)
        write_jsonl_examples(root / metaicl_file(task, k, seed, "test"), test)


# MetaICL's name for a task's meta-training file (all of a converted task's questions):
# what ``--train-source auto`` reads first for a training task
CONVERTED_TRAIN_K, CONVERTED_TRAIN_SEED = 16384, 100


def _readme(directory: Path) -> Path | None:
    found = [p for p in directory.glob("*") if p.is_file() and p.stem.lower() == "readme"]
    return sorted(found)[0] if found else None


def _license_from_readme(readme: Path | None) -> str | None:
    """The value of the README's licence line (``**License**: [CC By 4.0](url)`` gives
    ``CC BY 4.0``): only a line that starts with the key, never a mention in the text."""
    if readme is None or not readme.is_file():
        return None
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"^[\s*_#>-]*licen[cs]e[\s*_]*:[\s*_]*(.+)$", line, flags=re.IGNORECASE)
        if not match:
            continue
        value = match.group(1).strip()
        link = re.match(r"^\[([^\]]+)\]\([^)]*\)", value)  # a markdown link: its text
        value = (link.group(1) if link else value).strip(" *_`.")
        if re.match(r"(?i)^cc[\s-]", value):  # "CC By 4.0", "cc by-nc 4.0" -> "CC BY ..."
            value = value.upper()
        if value:
            return value
    return None


class _Skip(Exception):
    """A task that cannot be converted: its reason (counted) and the detail (listed)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


LEGALBENCH_LABEL_COLUMNS = ("answer", "label")  # the Hub's name first, then GitHub 2023's
LEGALBENCH_ID_COLUMNS = ("index", "idx", "id")
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def legalbench_query_template(prompt: str) -> str:
    """The question part of a LegalBench ``base_prompt.txt``: from the paragraph holding
    the first ``{{column}}`` placeholder to the end (the few-shot examples before it are
    the author's demonstrations, not the input), without the answer cue after the last
    placeholder (``A:``, ``Label:``; the project's prompt adds its own)."""
    first = _PLACEHOLDER.search(prompt)
    if first is None:
        raise _Skip("base_prompt.txt has no {{column}} placeholder")
    cut = prompt.rfind("\n\n", 0, first.start())
    start = 0 if cut < 0 else cut + 2
    lines = prompt[start:].rstrip().splitlines()
    while (
        lines and not _PLACEHOLDER.search(lines[-1]) and re.fullmatch(r"[^:]{0,40}:\s*", lines[-1])
    ):
        lines.pop()
    return "\n".join(lines).strip()


def _legalbench_task(task_dir: Path, name: str, max_options: int):
    """(train, test, labels, template used) of one LegalBench task; raises _Skip."""
    parts = {}
    for part in ("train", "test"):
        path = task_dir / f"{part}.tsv"
        if not path.is_file():
            raise _Skip(f"no {part}.tsv", f"{path.name} missing")
        try:
            parts[part] = _read_tsv_rows(path)
        except DataError as err:
            raise _Skip("unreadable TSV", str(err)) from None
    columns = list(parts["test"][0][1]) if parts["test"] else []
    label_col = next((c for c in LEGALBENCH_LABEL_COLUMNS if c in columns), None)
    if label_col is None:
        raise _Skip("no 'answer' or 'label' column", f"columns {columns}")
    template_path = task_dir / "base_prompt.txt"
    template = None
    if template_path.is_file():
        template = legalbench_query_template(
            template_path.read_text(encoding="utf-8", errors="replace")
        )
        missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in columns})
        if missing:
            raise _Skip(
                "base_prompt.txt uses a column the files lack",
                f"{{{{{missing[0]}}}}} not in {columns}",
            )
    else:
        inputs = [c for c in columns if c != label_col and c.lower() not in LEGALBENCH_ID_COLUMNS]
        if inputs != ["text"]:
            raise _Skip(
                "several input columns and no base_prompt.txt to combine them", f"columns {inputs}"
            )

    def compose(row: dict) -> str:
        if template is None:
            return row["text"]
        return _PLACEHOLDER.sub(lambda m: row[m.group(1)].strip(), template)

    labels = sorted({row[label_col].strip() for rows in parts.values() for _, row in rows})
    if len(labels) < 2:
        raise _Skip("fewer than 2 labels", f"labels {labels}")
    if len(labels) > max_options:
        raise _Skip(
            f"more than {max_options} labels (not multiple choice)", f"{len(labels)} labels"
        )
    examples = {
        part: [
            MCExample(
                task=name,
                input=compose(row),
                output=row[label_col].strip(),
                options=tuple(labels),
                id=f"{name}:{part}:{line}",
            )
            for line, row in rows
        ]
        for part, rows in parts.items()
    }
    if not examples["train"] or not examples["test"]:
        raise _Skip("an empty train.tsv or test.tsv")
    return examples["train"], examples["test"], labels, template


LEGALBENCH_MIN_TEST = 20  # a task's test part: at least this many questions
SUPPORT_KS = (5, 16)  # the support sizes written by default: the paper's k = 5 and 16


def _support_ks(k: int | Sequence[int]) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, int) else tuple(k)
    if not ks or any(x < 1 for x in ks):
        raise ValueError(f"support sizes must be positive integers, got {k!r}")
    return tuple(sorted(set(ks)))


def _pool_and_test(
    examples: list[MCExample], ks: tuple[int, ...], min_test: int
) -> tuple[list[MCExample], list[MCExample]]:
    """A fixed, seeded division of a task's questions: a support pool of up to 2 max(k)
    questions, from which every seed draws its k, and a test part (the rest, at least
    ``min_test``) disjoint from every seed's support."""
    order = kshot_indices(len(examples), len(examples), 0)
    pool_size = min(2 * max(ks), len(examples) - min_test)
    return [examples[i] for i in sorted(order[:pool_size])], [
        examples[i] for i in sorted(order[pool_size:])
    ]


def convert_legalbench(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int | Sequence[int] = SUPPORT_KS,
    seeds=METAICL_SEEDS,
    max_options: int = 4,
    min_test: int = LEGALBENCH_MIN_TEST,
) -> dict:
    """LegalBench task directories (``tasks/<task>/{train,test}.tsv``) to MetaICL.

    Reads both layouts users have: the Hub's (label column ``answer``, an ``index``) and
    the GitHub copy of 2023 (``label``). A task's input is composed from its columns the
    way its ``base_prompt.txt`` does (:func:`legalbench_query_template`); a task without
    one must have ``text`` as its only input column. Its options are its label set
    (sorted): tasks with 2 to ``max_options`` labels are kept. A task that cannot be
    converted is skipped with its reason and the others go on; only a source where
    nothing converts is an error.

    Support sets are drawn per seed from the task's own questions, as the paper's test
    protocol adapts on examples "from this dataset": ``train.tsv`` (LegalBench's 4-8
    in-context demonstrations) and ``test.tsv`` are pooled, each task keeps a fixed,
    seeded test part, and each seed draws its k support questions for every k in ``k``
    (default 5 and 16) from a pool of up to 2 max(k) (:func:`_pool_and_test`, as
    ChemBench's). A task with fewer than max(k) + ``min_test`` questions is skipped and
    counted. Writes ``conversion.json`` (tasks kept, skipped by reason, per task its
    questions, demonstrations pooled, support pool and test sizes) beside ``tasks.yaml``;
    returns that summary.
    """
    ks = _support_ks(k)
    source = Path(source)
    task_root = source / "tasks" if (source / "tasks").is_dir() else source
    task_dirs = sorted(d for d in task_root.iterdir() if d.is_dir()) if task_root.is_dir() else []
    if not task_dirs:
        raise DataError("no LegalBench task directories found (expected tasks/<task>/)", source)
    need = max(ks) + min_test
    converted: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    skipped: dict[str, dict[str, str]] = {}
    payload: dict[str, tuple[list, list, list]] = {}
    for task_dir in task_dirs:
        name = "legalbench-" + re.sub(r"[^a-z0-9_.-]+", "_", task_dir.name.lower()).strip("_")
        try:
            train, test, labels, template = _legalbench_task(task_dir, name, max_options)
        except _Skip as skip:
            skipped.setdefault(skip.reason, {})[task_dir.name] = skip.detail
            continue
        questions = train + test
        if len(questions) < need:
            skipped.setdefault(f"fewer than k + {min_test} = {need} questions", {})[
                task_dir.name
            ] = f"{len(questions)} questions"
            continue
        pool, heldout = _pool_and_test(questions, ks, min_test)
        payload[name] = (questions, pool, heldout)
        readme = _readme(task_dir)
        converted[name] = {
            "source": "legalbench",
            "license": _license_from_readme(readme)
            or f"see LegalBench's tasks/{task_dir.name}/README.md",
            "kind": "cls",
            "labels": labels,
        }
        counts[name] = {
            "questions": len(questions),
            "demonstrations": len(train),  # train.tsv, pooled with test.tsv
            "support_pool": len(pool),
            "test": len(heldout),
            "input": "base_prompt.txt" if template else "text",
        }
    if not payload:
        reasons = "; ".join(f"{r}: {len(t)}" for r, t in skipped.items())
        raise DataError(f"no usable LegalBench task (skipped {reasons})", source)
    summary = {
        "source": "legalbench",
        "k": list(ks),
        "seeds": list(seeds),
        "min_test": min_test,
        "tasks": converted,
        "counts": counts,
        "skipped": skipped,
    }

    def write(tmp: Path) -> None:
        for name, (questions, pool, heldout) in payload.items():
            for k_ in ks:
                _write_metaicl_task(tmp, name, pool, heldout, k_, seeds)
            write_jsonl_examples(
                tmp / metaicl_file(name, CONVERTED_TRAIN_K, CONVERTED_TRAIN_SEED, "train"),
                questions,
            )
        (tmp / "tasks.yaml").write_text(_task_yaml(converted), encoding="utf-8")
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    with atomic_directory(out) as tmp:
        write(tmp)
    return summary


def _read_tsv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a TSV with a header; a short row, or bad UTF-8, is a DataError."""
    csv.field_size_limit(2**31 - 1)  # contracts run past the default 128 KiB field
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames:
                raise DataError("no header line", path, 1)
            rows = []
            for row in reader:
                if None in row.values():
                    raise DataError(
                        f"row has fewer columns than the header {reader.fieldnames}",
                        path,
                        reader.line_num,
                    )
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
            return rows
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte {err.start})", path) from None
    except csv.Error as err:
        raise DataError(f"malformed TSV: {err}", path) from None


CHEMBENCH_MIN_TEST = 20  # a topic's test part: at least this many questions


def chembench_topic(path: Path, root: Path, item: dict) -> str:
    """A question's topic: its own ``subfield`` where it has one, else the folders below
    ``data/`` (or below the converted root) joined: ``icho/uk/2022/q.json`` is
    ``icho_uk_2022``, never ``2022``; the Hub's parquet layout
    (``<topic>/train-00000-of-00001.parquet``) gives the same names."""
    subfield = item.get("subfield")
    if isinstance(subfield, str) and subfield.strip():
        return subfield.strip()
    parts = list(path.relative_to(root).parent.parts) if path.is_relative_to(root) else []
    if "data" in parts:
        parts = parts[len(parts) - parts[::-1].index("data") :]
    return "/".join(parts) or path.stem.split("-")[0]


def _chembench_items(path: Path, root: Path):
    """Yield (topic, item id, question dict) from a ChemBench parquet or JSON file."""
    if path.suffix == ".parquet":
        import datasets

        rows = datasets.Dataset.from_parquet(str(path))
        for i, row in enumerate(rows):
            yield (
                chembench_topic(path, root, row),
                str(row.get("uuid") or row.get("name") or i),
                dict(row),
            )
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte {err.start})", path) from None
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg}", path, err.lineno) from None
    for i, item in enumerate(data if isinstance(data, list) else [data]):
        if not isinstance(item, dict):
            raise DataError("expected a JSON object (a ChemBench question)", path)
        yield (
            chembench_topic(path, root, item),
            str(item.get("uuid") or item.get("name") or f"{path.stem}:{i}"),
            item,
        )


def _topic_name(topic: str) -> str:
    return "chembench-" + re.sub(r"[^a-z0-9]+", "_", topic.lower()).strip("_")


def convert_chembench(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int | Sequence[int] = SUPPORT_KS,
    seeds=METAICL_SEEDS,
    max_options: int = 4,
    min_test: int = CHEMBENCH_MIN_TEST,
) -> dict:
    """ChemBench (JSON question files or the Hub's parquet) to MetaICL, one task per topic.

    A question's topic is :func:`chembench_topic`. Keeps multiple-choice questions
    (``target_scores``) with exactly one correct option and at most ``max_options``
    options; the others are counted by reason. A topic needs ``k + min_test`` questions
    (a support pool and a test part worth scoring); a smaller nested topic is merged into
    its parent folder's (``safety/carcinogens`` into ``safety``), and a top-level one that
    is still too small is skipped and counted. ChemBench has one split: each topic keeps
    a fixed, seeded test part (everything but a support pool of up to 2 max(k)
    questions) and each seed draws its k support questions from the pool, for every k in
    ``k`` (default 5 and 16). A topic's meta-training file holds all its questions (what
    ``--train-source auto`` reads for a training task).
    """
    ks = _support_ks(k)
    source = Path(source)
    root = source if source.is_dir() else source.parent
    files = (
        sorted(source.rglob("*.parquet")) + sorted(source.rglob("*.json"))
        if source.is_dir()
        else [source]
    )
    files = [f for f in files if f.name != "tasks.json"]
    if not files:
        raise DataError("no ChemBench parquet or JSON files found", source)
    by_topic: dict[str, list[dict]] = {}
    skipped_questions: Counter = Counter()
    unreadable: dict[str, str] = {}
    for path in files:
        try:
            items = list(_chembench_items(path, root))
        except DataError as err:
            unreadable[str(path.relative_to(root))] = str(err)
            continue
        for topic, item_id, item in items:
            for j, ex in enumerate(item.get("examples") or []):
                scores = ex.get("target_scores")
                if isinstance(scores, str):
                    scores = json.loads(scores) if scores.strip() else None
                if not scores:
                    skipped_questions["not multiple choice (numeric or free answer)"] += 1
                    continue
                correct = [opt for opt, score in scores.items() if float(score) == 1.0]
                if len(correct) != 1:
                    skipped_questions["not exactly one correct option"] += 1
                    continue
                if len(scores) > max_options:
                    skipped_questions[f"more than {max_options} options"] += 1
                    continue
                by_topic.setdefault(topic, []).append(
                    {"id": f"{item_id}:{j}", "input": ex.get("input"), "output": correct[0],
                     "options": list(scores), "file": path}
                )  # fmt: skip
    need = max(ks) + min_test
    merged: dict[str, list[str]] = {}
    # merge too-small nested topics upward, deepest first, until each is big enough or top
    while small := [t for t in by_topic if "/" in t and len(by_topic[t]) < need]:
        topic = max(small, key=lambda t: (t.count("/"), t))
        parent = topic.rsplit("/", 1)[0]
        by_topic.setdefault(parent, []).extend(by_topic.pop(topic))
        merged.setdefault(parent, []).extend([topic, *merged.pop(topic, [])])
    skipped: dict[str, dict[str, str]] = {}
    if unreadable:
        skipped["unreadable file"] = unreadable
    payload, counts, tasks, topics = {}, {}, {}, {}
    for topic, questions in sorted(by_topic.items()):
        name = _topic_name(topic)
        if len(questions) < need:
            skipped.setdefault(f"fewer than k + {min_test} = {need} questions", {})[topic] = (
                f"{len(questions)} questions"
            )
            continue
        examples = [
            validate_record(
                {k_: q[k_] for k_ in ("input", "output", "options")} | {"task": name},
                file=q["file"], line=None, example_id=f"{name}:{q['id']}",
            )
            for q in questions
        ]  # fmt: skip
        pool, test = _pool_and_test(examples, ks, min_test)
        payload[name] = (examples, pool, test)
        dead = sorted({o for e in examples for o in e.options} - {e.output for e in examples})
        counts[name] = {"questions": len(examples), "support_pool": len(pool), "test": len(test),
                        "dead_options": len(dead)}  # fmt: skip
        tasks[name] = {"source": "chembench", "license": "MIT", "kind": "mcqa"}
        topics[name] = {"topic": topic, "merged": sorted(merged.get(topic, []))}
    if not payload:
        reasons = "; ".join(f"{r}: {len(t)}" for r, t in skipped.items())
        raise DataError(f"no usable ChemBench topic (skipped {reasons})", source)
    summary = {
        "source": "chembench",
        "k": list(ks),
        "seeds": list(seeds),
        "min_test": min_test,
        "tasks": tasks,
        "topics": topics,
        "counts": counts,
        "skipped": skipped,
        "skipped_questions": dict(skipped_questions),
        "dead_options": {n: c["dead_options"] for n, c in counts.items() if c["dead_options"]},
    }

    def write(tmp: Path) -> None:
        for name, (examples, pool, test) in payload.items():
            for k_ in ks:
                _write_metaicl_task(tmp, name, pool, test, k_, seeds)
            write_jsonl_examples(
                tmp / metaicl_file(name, CONVERTED_TRAIN_K, CONVERTED_TRAIN_SEED, "train"),
                examples,
            )
        (tmp / "tasks.yaml").write_text(_task_yaml(tasks), encoding="utf-8")
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    with atomic_directory(out) as tmp:
        write(tmp)
    return summary


__all__ = [
    "METAICL_HUB_PREFIX",
    "METAICL_HUB_REPO",
    "METAICL_HUB_REVISION",
    "METAICL_SEEDS",
    "MetaICLDirectory",
    "MetaICLHub",
    "ParseStats",
    "SourceChain",
    "convert_chembench",
    "convert_legalbench",
    "kshot_indices",
    "metaicl_file",
    "metaicl_name",
    "open_source",
]
