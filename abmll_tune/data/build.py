"""Prepare a split for training and evaluation: choose files, filter, cap, k-shot, write.

``python -m abmll_tune.data build --split cls45 --source metaicl-hub|DIR --out DIR``
writes::

    DIR/manifest.json                    options, per-task sources, counts, labels, licenses, sha256
    DIR/train/{task}.jsonl               meta-training examples (at most max_examples_per_task)
    DIR/eval/{task}/support_{seed}.jsonl k-shot support examples, one file per seed
    DIR/eval/{task}/validation.jsonl     held-out examples for model selection
    DIR/eval/{task}/test.jsonl           held-out examples for the final report

**Evaluation tasks** read MetaICL's ``{task}_{k}_{seed}_train.jsonl`` as support and
the ``{task}_{k}_{seed}_test.jsonl`` of the first seed as held-out data (the same file
for every seed in MetaICL); the held-out examples are split into disjoint validation
and test parts with ``holdout_seed``, since the paper validates and tests on the same
task list.

**Meta-training examples** come from ``train_source`` (:data:`TRAIN_SOURCES`):

* ``meta``: MetaICL's meta-training file ``{task}_{train_k}_{train_seed}_train.jsonl``;
* ``test``: the task's ``{task}_{k}_{seed}_test.jsonl`` (the largest pool in MetaICL's
  k-shot distribution, which has no meta-training files);
* ``kshot``: the de-duplicated union of every seed's k-shot ``train`` and ``dev`` files;
* ``auto`` (default): per task, the first of these whose files exist and leave at
  least one example.

A task that is both a training and an evaluation task (``sick`` in nli) never trains
on its own held-out questions: they are removed from its training pool by content
and counted in the manifest (``held_out_dropped``).

Files are planned before anything is read: every missing task is named at once, and
``skip_missing_tasks`` builds the split without them (listed in the manifest). Options
that are never the answer anywhere in a task are reported (``dead_options``) and, with
``drop_dead_options``, removed. Everything is deterministic; the directory is built
beside the target and renamed into place, so re-running with the same arguments gives
identical files and a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from abmll_tune.data.records import (
    DataError,
    MCExample,
    ParseStats,
    skip_fewer_options,
    write_jsonl_examples,
)
from abmll_tune.data.sources import METAICL_SEEDS, metaicl_name, open_source, source_task_files
from abmll_tune.data.splits import Split, load_registry
from abmll_tune.io import atomic_directory, atomic_write_json

FORMAT = "abmll-tune-split"
FORMAT_VERSION = 1
TRAIN_SOURCES = ("auto", "meta", "test", "kshot")


@dataclass
class BuildOptions:
    """Options of the data command (defaults: MetaICL's files, the paper's cap)."""

    split: str
    source: str | list[str]  # several: each task from the first that has its files
    out: str
    split_files: list[str] = field(default_factory=list)
    k: int = 16
    seeds: tuple[int, ...] = METAICL_SEEDS
    train_source: str = "auto"
    train_k: int = 16384
    train_seed: int = 100
    max_examples_per_task: int | None = 2000  # the paper: ~68K examples over 34 cls-45 tasks
    max_eval_examples: int | None = None  # cap on each held-out part per task
    validation_fraction: float = 0.5
    holdout_seed: int = 0
    max_options: int = 4
    shuffle_options: bool = False
    option_seed: int = 0
    skip_missing_tasks: bool = False
    drop_dead_options: bool = False
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


def content_key(example: MCExample) -> tuple[str, frozenset[str]]:
    """Two questions are the same question when their input (up to whitespace) and
    their option set agree, whatever the file, line or option order."""
    return " ".join(example.input.split()), frozenset(example.options)


def _dedupe(examples: list[MCExample]) -> list[MCExample]:
    seen: set = set()
    out = []
    for e in examples:
        key = content_key(e)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# ----------------------------------------------------------------------------- planning


def _train_candidates(opts: BuildOptions, task: str, files: set[str]) -> list[tuple[str, list]]:
    """``(source name, file names)`` for each train source whose files exist, in the
    order ``auto`` tries them (only the chosen one for an explicit source)."""
    wanted = TRAIN_SOURCES[1:] if opts.train_source == "auto" else (opts.train_source,)
    candidates = []
    for name in wanted:
        if name == "meta":
            names = [metaicl_name(task, opts.train_k, opts.train_seed, "train")]
        elif name == "test":
            names = [metaicl_name(task, opts.k, opts.seeds[0], "test")]
        else:
            names = [
                metaicl_name(task, opts.k, seed, part)
                for seed in opts.seeds
                for part in ("train", "dev")
            ]
            names = [n for n in names if n in files]
        if names and all(n in files for n in names):
            candidates.append((name, names))
    return candidates


def _train_wanted(opts: BuildOptions, task: str) -> str:
    """What an explicit train source looks for, for the missing-task message."""
    if opts.train_source == "meta":
        return metaicl_name(task, opts.train_k, opts.train_seed, "train")
    if opts.train_source == "test":
        return metaicl_name(task, opts.k, opts.seeds[0], "test")
    if opts.train_source == "kshot":
        return f"{task}_{opts.k}_{{{','.join(map(str, opts.seeds))}}}_{{train,dev}}.jsonl"
    return (
        f"{metaicl_name(task, opts.train_k, opts.train_seed, 'train')}, "
        f"{metaicl_name(task, opts.k, opts.seeds[0], 'test')} or k-shot train/dev files"
    )


def _eval_files(opts: BuildOptions, task: str) -> tuple[list[str], str]:
    support = [metaicl_name(task, opts.k, seed, "train") for seed in opts.seeds]
    return support, metaicl_name(task, opts.k, opts.seeds[0], "test")


def _missing_message(missing: dict[str, dict], opts: BuildOptions) -> str:
    lines = [f"{len(missing)} task(s) lack the files this build needs:"]
    for task, info in missing.items():
        lines.append(f"  {task} ({'/'.join(info['roles'])}): {', '.join(info['files'])}")
    hints = []
    if any("train" in info["roles"] for info in missing.values()) and opts.train_source != "auto":
        hints.append("--train-source auto (use a task's test or k-shot files for meta-training)")
    hints.append("--skip-missing-tasks (build the split without these tasks)")
    lines.append("options that help: " + "; ".join(hints))
    return "\n".join(lines)


def _split_without(split: Split, missing: dict[str, dict]) -> Split:
    def drop(tasks, role):
        return tuple(t for t in tasks if role not in missing.get(t, {}).get("roles", ()))

    return Split(
        split.name,
        drop(split.train, "train"),
        drop(split.test, "eval"),
        drop(split.validation, "eval"),
    )


# ----------------------------------------------------------------------------- building


def build_split(opts: BuildOptions, progress: bool = True, log=print) -> dict:
    """Build ``opts.split`` from ``opts.source`` into ``opts.out``; returns the manifest."""
    started = time.perf_counter()
    if not 0.0 < opts.validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {opts.validation_fraction}")
    if not opts.seeds:
        raise DataError("give at least one seed")
    if opts.train_source not in TRAIN_SOURCES:
        raise DataError(
            f"train_source {opts.train_source!r} is not one of {', '.join(TRAIN_SOURCES)}"
        )
    # a converted folder's tasks.yaml names its tasks: they join the registry with it
    registry = load_registry([*source_task_files(opts.source), *opts.split_files])
    split: Split = registry.split(opts.split)
    source = open_source(opts.source, opts.revision)
    out = Path(opts.out)
    if out.exists() and not (out / "manifest.json").is_file():
        raise DataError(
            "exists and is not a built split (no manifest.json); refusing to replace it", out
        )

    # Plan: which files each task needs, and which tasks lack them (all at once).
    files = {t: source.task_files(t) for t in dict.fromkeys(split.train + split.eval_tasks)}
    missing: dict[str, dict] = {}
    for task in split.eval_tasks:
        support, heldout = _eval_files(opts, task)
        absent = [n for n in [*support, heldout] if n not in files[task]]
        if absent and not files[task]:
            absent = [f"no files at all (no folder {task}/ in the source)"]
        if absent:
            missing.setdefault(task, {"roles": [], "files": []})
            missing[task]["roles"].append("eval")
            missing[task]["files"] += absent
    train_plan = {}
    for task in split.train:
        train_plan[task] = _train_candidates(opts, task, files[task])
        if not train_plan[task]:
            missing.setdefault(task, {"roles": [], "files": []})
            missing[task]["roles"].insert(0, "train")
            wanted = (
                _train_wanted(opts, task)
                if files[task]
                else f"no files at all (no folder {task}/ in the source)"
            )
            if wanted not in missing[task]["files"]:
                missing[task]["files"].insert(0, wanted)
    if missing:
        if not opts.skip_missing_tasks:
            raise DataError(_missing_message(missing, opts), source.describe())
        left_out = ", ".join(f"{t} ({'/'.join(i['roles'])})" for t, i in missing.items())
        warnings.warn(
            f"split {split.name!r}: built without {len(missing)} task(s) whose files are "
            f"missing: {left_out}",
            stacklevel=2,
        )
        split = _split_without(split, missing)
        if not split.train:
            raise DataError(f"split {split.name!r}: no meta-training task left", source.describe())
        if not split.eval_tasks:
            warnings.warn(
                f"split {split.name!r}: no evaluation task left (meta-training side only)",
                stacklevel=2,
            )
    if split.overlap:
        warnings.warn(
            f"split {split.name!r}: tasks {list(split.overlap)} are both meta-training and "
            "evaluation tasks (kept for fidelity with MetaICL); their held-out questions are "
            "removed from their training pools",
            stacklevel=2,
        )

    # Read: evaluation pools first, so overlapping tasks know their held-out questions.
    jobs = [(t, "eval") for t in split.eval_tasks] + [(t, "train") for t in split.train]
    stats = {job: ParseStats() for job in jobs}
    pools: dict[tuple[str, str], dict] = {}
    heldout_keys: dict[str, set] = {}
    for task, role in tqdm(jobs, desc=f"building {split.name}", unit="task", disable=not progress):
        st = stats[(task, role)]
        read = dict(max_options=opts.max_options, stats=st)
        if role == "eval":
            support_names, heldout_name = _eval_files(opts, task)
            support = {
                seed: source.read_file(task, name, **read)
                for seed, name in zip(opts.seeds, support_names, strict=True)
            }
            heldout = source.read_file(task, heldout_name, **read)
            heldout_keys[task] = {content_key(e) for e in heldout}
            pools[(task, role)] = {"support": support, "heldout": heldout}
            continue
        pools[(task, role)] = _read_train_pool(
            source, task, train_plan[task], heldout_keys, opts, st
        )

    # Options never correct anywhere in a task (across every file read for it).
    dead: dict[str, list[str]] = {}
    for task in dict.fromkeys(t for t, _ in jobs):
        examples = [e for (t, _), pool in pools.items() if t == task for e in _pool_examples(pool)]
        dead[task] = sorted({o for e in examples for o in e.options} - {e.output for e in examples})
    if opts.drop_dead_options:
        for (task, role), pool in pools.items():
            _drop_options(pool, set(dead[task]), stats[(task, role)])

    tasks: dict[str, dict] = {}
    with atomic_directory(out) as tmp:
        for task, role in [(t, "train") for t in split.train] + [
            (t, "eval") for t in split.eval_tasks
        ]:
            info = registry.tasks[task]
            pool = pools[(task, role)]
            entry: dict = {
                "role": role,
                "source": info.source,
                "license": info.license,
                "kind": info.kind,
            }
            if role == "train":
                examples = _maybe_shuffle_options(
                    _seeded_subset(
                        pool["examples"], opts.max_examples_per_task, f"{opts.train_seed}:{task}"
                    ),
                    opts,
                )
                write_jsonl_examples(tmp / "train" / f"{task}.jsonl", examples)
                entry["train_source"] = pool["train_source"]
                entry["train_files"] = pool["files"]
                entry["pool"] = len(pool["examples"])
                if task in heldout_keys:
                    entry["held_out_dropped"] = pool["held_out_dropped"]
                entry["counts"] = {"train": len(examples)}
                seen = examples
            else:
                seen = []
                entry["counts"] = {}
                for seed in opts.seeds:
                    support = _maybe_shuffle_options(pool["support"][seed], opts)
                    write_jsonl_examples(tmp / "eval" / task / f"support_{seed}.jsonl", support)
                    entry["counts"][f"support_{seed}"] = len(support)
                    seen += support
                heldout = _maybe_shuffle_options(pool["heldout"], opts)
                order = list(range(len(heldout)))
                random.Random(f"{opts.holdout_seed}:{task}").shuffle(order)
                n_val = round(len(heldout) * opts.validation_fraction)
                if n_val == 0 or n_val == len(heldout):
                    raise DataError(
                        f"task {task!r} has {len(heldout)} held-out examples: too few for "
                        "disjoint validation and test parts",
                        source.describe(),
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
            entry["dead_options"] = dead[task]
            if info.labels is not None and set(entry["labels"]) - set(info.labels):
                raise DataError(
                    f"task {task!r} has options {sorted(set(entry['labels']) - set(info.labels))} "
                    f"outside its registered label set {list(info.labels)}"
                )
            entry["skipped"] = dict(sorted(stats[(task, role)].skipped.items()))
            entry["repaired"] = dict(sorted(stats[(task, role)].repaired.items()))
            tasks.setdefault(task, {})[role] = entry
        # train entries first in each task, as the split lists them
        tasks = {
            t: dict(sorted(r.items(), key=lambda kv: kv[0] != "train")) for t, r in tasks.items()
        }
        files_written = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*.jsonl"))}
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
            "missing_tasks": missing,
            "tasks": tasks,
            "files": files_written,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    _report(manifest, log, time.perf_counter() - started)
    return manifest


def _read_train_pool(source, task, candidates, heldout_keys, opts, stats) -> dict:
    """The first candidate source that leaves examples once the task's own held-out
    questions are removed (only the named one for an explicit source)."""
    tried = []
    for name, names in candidates:
        attempt = ParseStats()
        examples = [
            e
            for n in names
            for e in source.read_file(task, n, max_options=opts.max_options, stats=attempt)
        ]
        if name == "kshot":
            examples = _dedupe(examples)
        keys = heldout_keys.get(task, set())
        kept = [e for e in examples if content_key(e) not in keys]
        if kept:
            stats.merge(attempt)
            return {
                "train_source": name,
                "files": names,
                "examples": kept,
                "held_out_dropped": len(examples) - len(kept),
            }
        tried.append(f"{name} ({len(examples)} questions, all held out for evaluation)")
    raise DataError(
        f"task {task!r}: no training examples left once its own held-out evaluation "
        f"questions are removed (tried: {'; '.join(tried)}); use --train-source kshot or "
        "remove the task from the split's training list",
        source.describe(),
    )


def _pool_examples(pool: dict) -> list[MCExample]:
    if "examples" in pool:
        return pool["examples"]
    return [e for s in pool["support"].values() for e in s] + pool["heldout"]


def _drop_options(pool: dict, dead: set[str], stats: ParseStats) -> None:
    """Remove never-correct options in place; a question left with < 2 is skipped."""
    if not dead:
        return

    def clean(examples):
        out = []
        for e in examples:
            options = tuple(o for o in e.options if o not in dead)
            if len(options) < 2:
                stats.skipped[skip_fewer_options(2)] += 1
                continue
            out.append(MCExample(e.task, e.input, e.output, options, e.id))
        return out

    if "examples" in pool:
        pool["examples"] = clean(pool["examples"])
    else:
        pool["support"] = {s: clean(v) for s, v in pool["support"].items()}
        pool["heldout"] = clean(pool["heldout"])


def _report(manifest: dict, log, seconds: float) -> None:
    log(f"built split {manifest['split']['name']!r} from {manifest['source']}:")
    log(
        f"  {'task':<40}{'role':<6}{'from':<7}{'examples':>9}{'skipped':>9}{'repaired':>9}  license"
    )
    skipped: Counter = Counter()
    repaired: Counter = Counter()
    total = dropped = 0
    for task, roles in manifest["tasks"].items():
        for role, entry in roles.items():
            n = sum(entry["counts"].values())
            total += n
            skipped.update(entry["skipped"])
            repaired.update(entry["repaired"])
            dropped += entry.get("held_out_dropped", 0)
            log(
                f"  {task:<40}{role:<6}{entry.get('train_source', ''):<7}{n:>9}"
                f"{sum(entry['skipped'].values()):>9}{sum(entry['repaired'].values()):>9}"
                f"  {entry['license']}"
            )
            dead = entry["dead_options"]
            if dead:  # one line: a task of one-off options (ChemBench) has hundreds
                shown = ", ".join(repr(o[:30]) for o in dead[:3])
                more = f" and {len(dead) - 3} more (manifest.json)" if len(dead) > 3 else ""
                log(f"  {'':<40}never the answer: {len(dead)} options: {shown}{more}")
    split = manifest["split"]
    parts = [
        f"{len(split['train'])} train + {len(dict.fromkeys(split['validation'] + split['test']))} "
        f"eval tasks, {total} examples",
        "skipped " + (", ".join(f"{r}: {n}" for r, n in sorted(skipped.items())) or "none"),
        "repaired " + (", ".join(f"{r}: {n}" for r, n in sorted(repaired.items())) or "none"),
    ]
    if dropped:
        parts.append(f"held-out questions removed from training pools: {dropped}")
    if manifest["missing_tasks"]:
        parts.append(f"missing tasks left out: {', '.join(manifest['missing_tasks'])}")
    log(f"summary: {'; '.join(parts)}; {seconds:.1f} s")


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
