"""Prepare a split for training and evaluation: filter, cap, k-shot sample, write.

``python -m abmll_tune.data build --split cls45 --source metaicl-hub|DIR --out DIR``
writes::

    DIR/manifest.json                    options, per-task counts, labels, licenses, sha256
    DIR/train/{task}.jsonl               meta-training examples (at most max_examples_per_task)
    DIR/eval/{task}/support_{seed}.jsonl k-shot support examples, one file per seed
    DIR/eval/{task}/validation.jsonl     held-out examples for model selection
    DIR/eval/{task}/test.jsonl           held-out examples for the final report

Evaluation tasks read MetaICL's ``{task}_{k}_{seed}_train.jsonl`` as support and the
``{task}_{k}_{seed}_test.jsonl`` of the first seed as held-out data (the same file for
every seed in MetaICL); the held-out examples are split into disjoint validation and
test parts with ``holdout_seed``, since the paper validates and tests on the same task
list. Everything is deterministic; the directory is built beside the target and
renamed into place, so re-running with the same arguments gives identical files and
a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from abmll_tune.data.records import DataError, MCExample, ParseStats, write_jsonl_examples
from abmll_tune.data.sources import METAICL_SEEDS, open_source
from abmll_tune.data.splits import Split, load_registry
from abmll_tune.io import atomic_directory, atomic_write_json

FORMAT = "abmll-tune-split"
FORMAT_VERSION = 1


@dataclass
class BuildOptions:
    """Options of the data command (defaults: MetaICL's files, the paper's cap)."""

    split: str
    source: str
    out: str
    split_files: list[str] = field(default_factory=list)
    k: int = 16
    seeds: tuple[int, ...] = METAICL_SEEDS
    train_k: int = 16384
    train_seed: int = 100
    max_examples_per_task: int | None = 2000  # the paper: ~68K examples over 34 cls-45 tasks
    max_eval_examples: int | None = None  # cap on each held-out part per task
    validation_fraction: float = 0.5
    holdout_seed: int = 0
    max_options: int = 4
    shuffle_options: bool = False
    option_seed: int = 0
    revision: str | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seeded_subset(examples: list[MCExample], n: int | None, seed: str) -> list[MCExample]:
    """At most n examples, chosen with a seed, kept in file order."""
    if n is None or len(examples) <= n:
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _maybe_shuffle_options(examples: list[MCExample], opts: BuildOptions) -> list[MCExample]:
    if not opts.shuffle_options:
        return examples
    out = []
    for e in examples:
        options = list(e.options)
        random.Random(f"{opts.option_seed}:{e.task}:{e.id}").shuffle(options)
        out.append(MCExample(e.task, e.input, e.output, tuple(options), e.id))
    return out


def _labels(examples: list[MCExample]) -> list[str]:
    return sorted({o for e in examples for o in e.options})


def build_split(opts: BuildOptions, progress: bool = True, log=print) -> dict:
    """Build ``opts.split`` from ``opts.source`` into ``opts.out``; returns the manifest."""
    if not 0.0 < opts.validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {opts.validation_fraction}")
    if not opts.seeds:
        raise DataError("give at least one seed")
    registry = load_registry(opts.split_files)
    split: Split = registry.split(opts.split)
    if split.overlap:
        warnings.warn(
            f"split {split.name!r}: tasks {list(split.overlap)} are both meta-training and "
            "evaluation tasks (kept for fidelity with MetaICL)",
            stacklevel=2,
        )
    source = open_source(opts.source, opts.revision)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "manifest.json").is_file():
        raise DataError(
            "exists and is not a built split (no manifest.json); refusing to replace it", out
        )
    tasks: dict[str, dict] = {}
    with atomic_directory(out) as tmp:
        jobs = [(t, "train") for t in split.train] + [(t, "eval") for t in split.eval_tasks]
        for task, role in tqdm(
            jobs, desc=f"building {split.name}", unit="task", disable=not progress
        ):
            info = registry.tasks[task]
            stats = ParseStats()
            entry: dict = {
                "role": role,
                "source": info.source,
                "license": info.license,
                "kind": info.kind,
            }
            if role == "train":
                examples = source.read(
                    task,
                    opts.train_k,
                    opts.train_seed,
                    "train",
                    max_options=opts.max_options,
                    stats=stats,
                )
                examples = _maybe_shuffle_options(
                    _seeded_subset(
                        examples, opts.max_examples_per_task, f"{opts.train_seed}:{task}"
                    ),
                    opts,
                )
                write_jsonl_examples(tmp / "train" / f"{task}.jsonl", examples)
                entry["counts"] = {"train": len(examples)}
                seen = examples
            else:
                seen = []
                entry["counts"] = {}
                for seed in opts.seeds:
                    support = _maybe_shuffle_options(
                        source.read(
                            task, opts.k, seed, "train", max_options=opts.max_options, stats=stats
                        ),
                        opts,
                    )
                    write_jsonl_examples(tmp / "eval" / task / f"support_{seed}.jsonl", support)
                    entry["counts"][f"support_{seed}"] = len(support)
                    seen += support
                heldout = source.read(
                    task, opts.k, opts.seeds[0], "test", max_options=opts.max_options, stats=stats
                )
                heldout = _maybe_shuffle_options(heldout, opts)
                order = list(range(len(heldout)))
                random.Random(f"{opts.holdout_seed}:{task}").shuffle(order)
                n_val = round(len(heldout) * opts.validation_fraction)
                if n_val == 0 or n_val == len(heldout):
                    raise DataError(
                        f"task {task!r} has {len(heldout)} held-out examples: too few for "
                        "disjoint validation and test parts",
                        opts.source,
                    )
                for part, idx in (("validation", order[:n_val]), ("test", order[n_val:])):
                    chosen = [heldout[i] for i in sorted(idx)]
                    chosen = _seeded_subset(
                        chosen, opts.max_eval_examples, f"{opts.holdout_seed}:{task}:{part}"
                    )
                    write_jsonl_examples(tmp / "eval" / task / f"{part}.jsonl", chosen)
                    entry["counts"][part] = len(chosen)
                    seen += chosen
            entry["labels"] = _labels(seen)
            if info.labels is not None and set(entry["labels"]) - set(info.labels):
                raise DataError(
                    f"task {task!r} has options {sorted(set(entry['labels']) - set(info.labels))} "
                    f"outside its registered label set {list(info.labels)}"
                )
            entry["skipped"] = dict(sorted(stats.skipped.items()))
            tasks.setdefault(task, {}).update(
                {"eval": entry} if role == "eval" else {"train": entry}
            )
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*.jsonl"))}
        options = asdict(opts)
        options.pop("out")
        options["seeds"] = list(opts.seeds)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "split": {
                "name": split.name,
                "train": list(split.train),
                "validation": list(split.validation),
                "test": list(split.test),
                "selection": list(split.selection_tasks),
            },
            "source": source.describe(),
            "options": options,
            "tasks": tasks,
            "files": files,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    _report(manifest, log)
    return manifest


def _report(manifest: dict, log) -> None:
    log(f"built split {manifest['split']['name']!r} from {manifest['source']}:")
    log(f"  {'task':<40}{'role':<7}{'examples':>9}  skipped  license")
    for task, roles in manifest["tasks"].items():
        for role, entry in roles.items():
            n = sum(entry["counts"].values())
            skipped = sum(entry["skipped"].values())
            log(f"  {task:<40}{role:<7}{n:>9}  {skipped:>7}  {entry['license']}")


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and check a built split's manifest."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DataError(
            "not a built split (no manifest.json): run `python -m abmll_tune.data build` first",
            root,
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"unreadable manifest: {err}", path) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"manifest format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}: rebuild the split with this version of abmll-tune",
            path,
        )
    return manifest
