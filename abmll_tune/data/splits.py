"""The split registry: which tasks meta-train and which evaluate, plus per-task metadata.

The paper's splits (cls45, cls23, nli, para, mcqa, winogrande_v1) and the embedded CPU
suite ship as ``registry/splits.yaml``; task metadata (source, kind, license) as
``registry/tasks.yaml``. Users add splits and tasks with their own YAML file of the
same shape::

    tasks:                      # optional: tasks the registry does not know
      legalbench-abercrombie: {source: legalbench, license: CC-BY-4.0, kind: cls}
    splits:
      my_split:
        train: [glue-rte, legalbench-abercrombie]     # or a reference: cls45.train
        validation: [superglue-cb]                    # optional
        test: [glue-mrpc]
      with_legalbench:
        train: cls45.train
        test: {source: legalbench}                    # every known task of a source

A part given as ``{source: <name>}`` holds every task of that source the registry knows
when the split is used, those of a converted folder's ``tasks.yaml`` included (the data
command adds it when the folder is a ``--source``). Errors name the YAML file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from abmll_tune.data.records import DataError

PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    source: str
    license: str
    kind: str = "cls"
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Split:
    """Task lists of one split. ``validation`` is empty when model selection uses the
    validation part of the test tasks' held-out examples (the paper's protocol)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    validation: tuple[str, ...] = ()

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """Tasks that need support and held-out examples (validation and test tasks)."""
        return tuple(dict.fromkeys(self.validation + self.test))

    @property
    def selection_tasks(self) -> tuple[str, ...]:
        """Tasks whose validation part is used for model selection."""
        return self.validation or self.test

    @property
    def overlap(self) -> tuple[str, ...]:
        """Tasks in both train and evaluation (e.g. `sick` in nli, as in MetaICL)."""
        return tuple(t for t in self.train if t in set(self.eval_tasks))


def _compose_with_lines(path: Path):
    """Parse YAML keeping the line (1-based) of every scalar: returns (value, lines) where
    ``lines`` maps a key path tuple to a line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte {err.start})", path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(
            f"malformed YAML: {err}", path, None if mark is None else mark.line + 1
        ) from None
    lines: dict[tuple, int] = {}
    constructor = yaml.constructor.SafeConstructor()

    def convert(n, key_path):
        lines[key_path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = k.value
                if key in out:
                    raise DataError(f"duplicate key {key!r}", path, k.start_mark.line + 1)
                out[key] = convert(v, (*key_path, key))
                lines[(*key_path, key)] = k.start_mark.line + 1  # a key's own line, not its value's
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(v, (*key_path, i)) for i, v in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    return (convert(node, ()) if node is not None else {}), lines


@dataclass
class Registry:
    """Tasks and splits, from the package's registry and any user YAML files."""

    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    splits: dict[str, Split] = field(default_factory=dict)
    _origin: dict[str, str] = field(default_factory=dict)  # where each task/split was defined
    # (split, part) -> (source, where): parts given as {source: name}, filled by split()
    _selectors: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> Registry:
        registry = cls()
        root = resources.files("abmll_tune.data") / "registry"
        with resources.as_file(root / "tasks.yaml") as tasks_file:
            registry.add_file(Path(tasks_file))
        with resources.as_file(root / "splits.yaml") as splits_file:
            registry.add_file(Path(splits_file))
        return registry

    def add_file(self, path: str | os.PathLike) -> Registry:
        """Add the ``tasks`` and ``splits`` of a YAML file (see module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("split file not found", path)
        data, lines = _compose_with_lines(path)
        if not isinstance(data, dict) or not set(data) <= {"defaults", "tasks", "splits"}:
            raise DataError(
                "expected a mapping with keys 'tasks' and/or 'splits' (and 'defaults')", path, 1
            )
        defaults = data.get("defaults") or {}
        for name, info in (data.get("tasks") or {}).items():
            line = lines[("tasks", name)]
            if not isinstance(info, dict):
                raise DataError(
                    f"task {name!r}: expected a mapping of source, license, kind", path, line
                )
            unknown = set(info) - {"source", "license", "kind", "labels"}
            if unknown:
                raise DataError(f"task {name!r}: unknown keys {sorted(unknown)}", path, line)
            merged = {**defaults, **info}
            for key in ("source", "license"):
                if not isinstance(merged.get(key), str):
                    raise DataError(f"task {name!r}: {key!r} must be given as a string", path, line)
            labels = merged.get("labels")
            task = TaskInfo(
                name=name,
                source=merged["source"],
                license=merged["license"],
                kind=merged.get("kind", "cls"),
                labels=tuple(labels) if labels is not None else None,
            )
            if name in self.tasks and self.tasks[name] != task:
                raise DataError(
                    f"task {name!r} is already defined differently in {self._origin[name]}; "
                    "one name must not mean two tasks: rename one",
                    path,
                    line,
                )
            self.tasks[name] = task
            self._origin[name] = f"{path}:{line}"
        raw_splits = data.get("splits") or {}
        for name, parts in raw_splits.items():
            line = lines[("splits", name)]
            if not isinstance(parts, dict) or "train" not in parts or "test" not in parts:
                raise DataError(f"split {name!r} needs 'train' and 'test' task lists", path, line)
            unknown = set(parts) - set(PARTS)
            if unknown:
                raise DataError(
                    f"split {name!r}: unknown parts {sorted(unknown)} (use {PARTS})", path, line
                )
            resolved = {}
            for part in PARTS:
                if part not in parts:
                    resolved[part] = ()
                    continue
                resolved[part] = self._resolve_part(
                    parts[part], raw_splits, path, lines, ("splits", name, part)
                )
            split = Split(name, resolved["train"], resolved["test"], resolved["validation"])
            if name in self.splits and self.splits[name] != split:
                raise DataError(
                    f"split {name!r} is already defined differently in {self._origin['split:' + name]}",
                    path,
                    line,
                )
            self.splits[name] = split
            self._origin["split:" + name] = f"{path}:{line}"
        return self

    def _resolve_part(self, value, raw_splits, path, lines, key_path) -> tuple[str, ...]:
        line = lines[key_path]
        if isinstance(value, dict):  # {source: legalbench}: every task of that source
            if set(value) != {"source"} or not isinstance(value["source"], str):
                raise DataError(
                    f"expected {{source: <name>}} (every known task of a source), got {value!r}",
                    path,
                    line,
                )
            self._selectors[(key_path[1], key_path[2])] = (value["source"], f"{path}:{line}")
            return ()
        if isinstance(value, str):  # a reference such as cls45.train
            ref_split, _, ref_part = value.partition(".")
            if ref_part not in PARTS:
                raise DataError(f"{value!r} is not a reference of the form split.part", path, line)
            if ref_split in self.splits:
                return getattr(self.splits[ref_split], ref_part)
            if ref_split in raw_splits and isinstance(raw_splits[ref_split].get(ref_part), list):
                return self._resolve_part(
                    raw_splits[ref_split][ref_part],
                    raw_splits,
                    path,
                    lines,
                    ("splits", ref_split, ref_part),
                )
            raise DataError(f"reference {value!r} names an unknown split or part", path, line)
        if not isinstance(value, list) or not value:
            raise DataError(
                "expected a non-empty list of task names or a reference split.part", path, line
            )
        tasks = []
        for i, task in enumerate(value):
            item_line = lines[(*key_path, i)]
            if not isinstance(task, str):
                raise DataError(f"task names must be strings, got {task!r}", path, item_line)
            if task not in self.tasks:
                raise DataError(
                    f"unknown task {task!r}: add it under 'tasks:' with its source and license",
                    path,
                    item_line,
                )
            if task in tasks:
                raise DataError(f"task {task!r} is listed twice", path, item_line)
            tasks.append(task)
        return tuple(tasks)

    def split(self, name: str) -> Split:
        """The split, its ``{source: ...}`` parts filled with the tasks known now (the
        registry's and those of the files added since, a converted folder's included)."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; known splits: {sorted(self.splits)}")
        split = self.splits[name]
        for part in PARTS:
            if (name, part) not in self._selectors:
                continue
            source, origin = self._selectors[(name, part)]
            tasks = tuple(sorted(t for t, info in self.tasks.items() if info.source == source))
            if not tasks:
                raise DataError(
                    f"split {name!r} takes its {part} tasks from source {source!r} ({origin}), "
                    f"and no {source} task is known: convert them (python -m abmll_tune.data "
                    f"convert-{source} --source ... --out DIR) and add DIR as a --source (its "
                    "tasks.yaml names them)"
                )
            split = replace(split, **{part: tasks})
        return split


def load_registry(extra_files: list[str | os.PathLike] | None = None) -> Registry:
    """The package registry plus user YAML files (later files may add, not redefine)."""
    registry = Registry.default()
    for extra in extra_files or []:
        registry.add_file(extra)
    return registry
