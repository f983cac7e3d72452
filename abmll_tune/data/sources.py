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


def open_source(spec: str, revision: str | None = None):
    """``metaicl-hub`` (or ``hub:<dataset id>``) for the Hub, else a local directory.

    ``metaicl-hub`` reads :data:`METAICL_HUB_REVISION` unless ``revision`` is given."""
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


def _license_from_readme(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.search(r"licen[cs]e\W*[:\-]?\s*(.+)", line, flags=re.IGNORECASE)
        if match and match.group(1).strip(" *`[]"):
            return match.group(1).strip(" *`")
    return None


def convert_legalbench(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int = 16,
    seeds=METAICL_SEEDS,
    max_options: int = 4,
) -> dict:
    """LegalBench (``tasks/<task>/{train,test}.tsv``, columns ``text``/``answer``) to MetaICL.

    A task's options are its label set (sorted); tasks with more than ``max_options``
    labels are skipped and reported. Returns a summary (tasks, counts, skipped, licenses).
    """
    source = Path(source)
    task_root = source / "tasks" if (source / "tasks").is_dir() else source
    task_dirs = (
        sorted(d for d in task_root.iterdir() if d.is_dir() and (d / "test.tsv").is_file())
        if task_root.is_dir()
        else []
    )
    if not task_dirs:
        raise DataError("no LegalBench tasks found (expected tasks/<task>/test.tsv)", source)
    converted: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    skipped: Counter = Counter()
    payload: dict[str, tuple[list, list]] = {}
    for task_dir in task_dirs:
        rows = {
            part: _read_tsv(task_dir / f"{part}.tsv")
            for part in ("train", "test")
            if (task_dir / f"{part}.tsv").is_file()
        }
        labels = sorted({answer for part_rows in rows.values() for _, _, answer in part_rows})
        if len(labels) > max_options or len(labels) < 2:
            skipped[f"{len(labels)} labels (need 2 to {max_options})"] += 1
            continue
        name = f"legalbench-{task_dir.name}"
        parts = {
            part: [
                MCExample(
                    task=name,
                    input=text,
                    output=answer,
                    options=tuple(labels),
                    id=f"{name}:{part}:{line}",
                )
                for line, text, answer in part_rows
            ]
            for part, part_rows in rows.items()
        }
        train = parts.get("train", [])
        if not train:
            skipped["no train.tsv for support examples"] += 1
            continue
        payload[name] = (train, parts["test"])
        license_text = (
            _license_from_readme(task_dir / "README.md") or f"see tasks/{task_dir.name}/README.md"
        )
        converted[name] = {
            "source": "legalbench",
            "license": license_text,
            "kind": "cls",
            "labels": labels,
        }
        counts[name] = {"train": len(train), "test": len(parts["test"])}

    def write(tmp: Path) -> None:
        for name, (train, test) in payload.items():
            _write_metaicl_task(tmp, name, train, test, k, seeds)
        (tmp / "tasks.yaml").write_text(_task_yaml(converted), encoding="utf-8")

    if not payload:
        raise DataError(f"no usable LegalBench task (skipped: {dict(skipped)})", source)
    with atomic_directory(out) as tmp:
        write(tmp)
    return {"tasks": converted, "counts": counts, "skipped": dict(skipped)}


def _read_tsv(path: Path) -> list[tuple[int, str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if reader.fieldnames is None or not {"text", "answer"} <= set(reader.fieldnames):
                raise DataError(
                    f"needs columns 'text' and 'answer', has {reader.fieldnames}", path, 1
                )
            rows = []
            for row in reader:
                line = reader.line_num
                if row.get("text") is None or row.get("answer") is None:
                    raise DataError("row has fewer columns than the header", path, line)
                rows.append((line, row["text"], row["answer"].strip()))
            return rows
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte {err.start})", path) from None


def _chembench_items(path: Path):
    """Yield (topic, item id, question dict) from a ChemBench parquet or JSON file."""
    if path.suffix == ".parquet":
        import datasets

        rows = datasets.Dataset.from_parquet(str(path))
        topic = path.stem.split("-")[0]
        for i, row in enumerate(rows):
            yield (
                row.get("subfield") or topic,
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
            path.parent.name,
            str(item.get("uuid") or item.get("name") or f"{path.stem}:{i}"),
            item,
        )


def convert_chembench(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    k: int = 16,
    seeds=METAICL_SEEDS,
    max_options: int = 4,
) -> dict:
    """ChemBench (parquet files or JSON questions) to MetaICL, one task per topic.

    Keeps multiple-choice questions (``target_scores``) with exactly one correct option
    and at most ``max_options`` options; numeric questions and the rest are counted as
    skipped. ChemBench has one split, so each topic's support pool is the union of the
    k-shot draws of every seed, and the test part is everything else (the same for
    every seed, as in MetaICL).
    """
    source = Path(source)
    files = (
        sorted(source.rglob("*.parquet")) + sorted(source.rglob("*.json"))
        if source.is_dir()
        else [source]
    )
    files = [f for f in files if f.name != "tasks.json"]
    if not files:
        raise DataError("no ChemBench parquet or JSON files found", source)
    by_topic: dict[str, list[MCExample]] = {}
    skipped: Counter = Counter()
    for path in files:
        for topic, item_id, item in _chembench_items(path):
            name = "chembench-" + re.sub(r"[^a-z0-9_]+", "_", str(topic).lower()).strip("_")
            for j, ex in enumerate(item.get("examples") or []):
                scores = ex.get("target_scores")
                if isinstance(scores, str):
                    scores = json.loads(scores) if scores.strip() else None
                if not scores:
                    skipped["not multiple choice"] += 1
                    continue
                correct = [opt for opt, score in scores.items() if float(score) == 1.0]
                if len(correct) != 1:
                    skipped["not exactly one correct option"] += 1
                    continue
                if len(scores) > max_options:
                    skipped[f"more than {max_options} options"] += 1
                    continue
                record = {
                    "task": name,
                    "input": ex.get("input"),
                    "output": correct[0],
                    "options": list(scores),
                }
                by_topic.setdefault(name, []).append(
                    validate_record(
                        record, file=path, line=None, example_id=f"{name}:{item_id}:{j}"
                    )
                )
    payload = {}
    counts = {}
    for name, examples in sorted(by_topic.items()):
        pool = sorted({int(i) for seed in seeds for i in kshot_indices(len(examples), k, seed)})
        if len(examples) - len(pool) < 1:
            skipped[f"topic with too few questions for {k}-shot support plus a test part"] += 1
            continue
        train = [examples[i] for i in pool]
        test = [e for i, e in enumerate(examples) if i not in set(pool)]
        payload[name] = (examples, test)
        counts[name] = {"support_pool": len(train), "test": len(test)}
    if not payload:
        raise DataError(f"no usable ChemBench topic (skipped: {dict(skipped)})", source)
    tasks = {name: {"source": "chembench", "license": "MIT", "kind": "mcqa"} for name in payload}

    def write(tmp: Path) -> None:
        for name, (examples, test) in payload.items():
            for seed in seeds:
                chosen = [examples[i] for i in sorted(kshot_indices(len(examples), k, seed))]
                write_jsonl_examples(tmp / metaicl_file(name, k, seed, "train"), chosen)
                write_jsonl_examples(tmp / metaicl_file(name, k, seed, "test"), test)
        (tmp / "tasks.yaml").write_text(_task_yaml(tasks), encoding="utf-8")

    with atomic_directory(out) as tmp:
        write(tmp)
    return {"tasks": tasks, "counts": counts, "skipped": dict(skipped)}


__all__ = [
    "METAICL_HUB_PREFIX",
    "METAICL_HUB_REPO",
    "METAICL_HUB_REVISION",
    "METAICL_SEEDS",
    "MetaICLDirectory",
    "MetaICLHub",
    "ParseStats",
    "convert_chembench",
    "convert_legalbench",
    "kshot_indices",
    "metaicl_file",
    "metaicl_name",
    "open_source",
]
