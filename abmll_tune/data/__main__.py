"""``python -m abmll_tune.data``: build splits, convert sources, list the registry.

    python -m abmll_tune.embedded.suite --out data/embedded_src   (the embedded suite)
    python -m abmll_tune.data build --split embedded --source data/embedded_src --out data/embedded
    python -m abmll_tune.data build --split cls45 --source metaicl-hub --out data/cls45
    python -m abmll_tune.data build --split cls45 --source ~/metaicl/data --out data/cls45 \
        --skip-missing-tasks          # a k-shot-only copy: --train-source auto uses _test files
    python -m abmll_tune.data convert-legalbench --source legalbench/ --out data/legalbench_src
    python -m abmll_tune.data convert-chembench --source ChemBench/data --out data/chembench_src
    python -m abmll_tune.data splits

Bad input exits with status 2 and one message naming the file, the line and the
problem; nothing is left half written.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from abmll_tune.data.build import TRAIN_SOURCES
from abmll_tune.data.records import DataError
from abmll_tune.data.sources import METAICL_HUB_REVISION, METAICL_SEEDS


def _int_list(what: str):
    """An argparse type: comma-separated integers, named ``what`` in its error."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be comma-separated integers, got {text!r}"
            ) from None

    return parse


_seeds = _int_list("seeds")
_sizes = _int_list("support sizes")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.data", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="prepare a split's task files (filter, cap, k-shot, hold out)")
    b.add_argument(
        "--split", required=True, help="a registry split (see `splits`) or one from --splits-file"
    )
    b.add_argument(
        "--source",
        required=True,
        action="append",
        help="metaicl-hub, hub:<dataset id>, or a MetaICL directory; repeat to add converted "
        "LegalBench/ChemBench folders (each task is read from the first source that has it)",
    )
    b.add_argument("--out", required=True, help="output directory (replaced atomically when done)")
    b.add_argument(
        "--splits-file",
        action="append",
        default=[],
        help="YAML with extra tasks/splits (repeatable)",
    )
    b.add_argument(
        "--k", type=int, default=16, help="support examples per evaluation task and seed (16)"
    )
    b.add_argument(
        "--seeds", type=_seeds, default=METAICL_SEEDS, help="k-shot seeds (100,13,21,42,87)"
    )
    b.add_argument(
        "--train-source",
        choices=TRAIN_SOURCES,
        default="auto",
        help="where meta-training examples come from: meta ({task}_{train_k}_{train_seed}_train), "
        "test ({task}_{k}_{seed}_test), kshot (union of the k-shot train/dev files), or auto: "
        "the first of these a task has (default)",
    )
    b.add_argument(
        "--train-k", type=int, default=16384, help="k of the meta-training files (16384)"
    )
    b.add_argument(
        "--train-seed", type=int, default=100, help="seed of the meta-training files (100)"
    )
    b.add_argument(
        "--max-examples-per-task",
        type=_optional_int,
        default=2000,
        help="meta-training cap per task (2000; 'none')",
    )
    b.add_argument(
        "--max-eval-examples",
        type=_optional_int,
        default=None,
        help="cap on each held-out part per task",
    )
    b.add_argument(
        "--validation-fraction",
        type=float,
        default=0.5,
        help="held-out share used for validation (0.5)",
    )
    b.add_argument(
        "--holdout-seed", type=int, default=0, help="seed of the validation/test division (0)"
    )
    b.add_argument(
        "--max-options",
        type=int,
        default=4,
        help="keep questions with at most this many options (4)",
    )
    b.add_argument(
        "--shuffle-options", action="store_true", help="shuffle each question's options (seeded)"
    )
    b.add_argument("--option-seed", type=int, default=0)
    b.add_argument(
        "--skip-missing-tasks",
        action="store_true",
        help="build the split without the tasks whose files are absent (listed in the manifest)",
    )
    b.add_argument(
        "--drop-dead-options",
        action="store_true",
        help="remove options that are never the answer anywhere in a task",
    )
    b.add_argument(
        "--revision",
        default=None,
        help=f"Hub revision (metaicl-hub default: {METAICL_HUB_REVISION[:12]}...)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("embedded", help="moved: python -m abmll_tune.embedded.suite --out DIR")
    e.add_argument("--out", required=True)
    e.add_argument("--seed", type=int, default=0)

    for name, what in (
        ("convert-legalbench", "LegalBench TSV task directories"),
        ("convert-chembench", "ChemBench parquet/JSON"),
    ):
        c = sub.add_parser(name, help=f"convert {what} to a MetaICL directory")
        c.add_argument("--source", required=True)
        c.add_argument("--out", required=True)
        c.add_argument(
            "--k",
            type=_sizes,
            default=(5, 16),
            help="support sizes to write, comma-separated (5,16); each seed draws its k "
            "from the task's own support pool",
        )
        c.add_argument("--seeds", type=_seeds, default=METAICL_SEEDS)
        c.add_argument(
            "--max-options",
            type=int,
            default=4,
            help="keep tasks/questions with at most this many options (4)",
        )

    s = sub.add_parser("splits", help="list the registry's splits")
    s.add_argument(
        "--splits-file", action="append", default=[], help="also a converted folder's tasks.yaml"
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from abmll_tune.data.build import BuildOptions, build_split

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda msg, *a, **k: print(
                    f"warning: {msg}", file=sys.stderr
                )
                build_split(
                    BuildOptions(
                        split=args.split,
                        source=args.source[0] if len(args.source) == 1 else args.source,
                        out=args.out,
                        split_files=args.splits_file,
                        k=args.k,
                        seeds=args.seeds,
                        train_source=args.train_source,
                        train_k=args.train_k,
                        train_seed=args.train_seed,
                        max_examples_per_task=args.max_examples_per_task,
                        max_eval_examples=args.max_eval_examples,
                        validation_fraction=args.validation_fraction,
                        holdout_seed=args.holdout_seed,
                        max_options=args.max_options,
                        shuffle_options=args.shuffle_options,
                        option_seed=args.option_seed,
                        skip_missing_tasks=args.skip_missing_tasks,
                        drop_dead_options=args.drop_dead_options,
                        revision=args.revision,
                    ),
                    progress=not args.quiet,
                )
            print(f"wrote {args.out}")
        elif args.command == "embedded":  # the data layer does not import the embedded world
            print(
                "error: the embedded suite is generated by: python -m abmll_tune.embedded.suite "
                f"--out {args.out}",
                file=sys.stderr,
            )
            return 2
        elif args.command in ("convert-legalbench", "convert-chembench"):
            from abmll_tune.data import sources

            convert = (
                sources.convert_legalbench
                if args.command == "convert-legalbench"
                else sources.convert_chembench
            )
            summary = convert(
                args.source, args.out, k=args.k, seeds=args.seeds, max_options=args.max_options
            )
            print(format_conversion(summary))
            print(
                f"wrote {args.out} (tasks.yaml lists its tasks for --splits-file; conversion.json the rest)"
            )
        elif args.command == "splits":
            from abmll_tune.data.splits import load_registry

            registry = load_registry(args.splits_file)
            for name in registry.splits:
                try:
                    split = registry.split(name)
                except DataError:  # a {source: ...} part with no converted task yet
                    source = registry._selectors[(name, "test")][0]
                    print(f"{name:<18} test: every {source} task (none known: convert them)")
                    continue
                val = f", {len(split.validation)} validation" if split.validation else ""
                print(f"{name:<18} {len(split.train)} train, {len(split.test)} test{val}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def format_conversion(summary: dict) -> str:
    """The console report of a conversion: one line per task, one per skip reason, one
    for support sets smaller than k (never a line per dead option or per question)."""
    lines = []
    for task, counts in summary["counts"].items():
        extra = "  ".join(f"{k} {v}" for k, v in counts.items())
        lines.append(f"  {task:<52} {extra}  license: {summary['tasks'][task]['license']}")
    n_questions = sum(c["questions"] for c in summary["counts"].values())
    lines.append(f"converted {len(summary['tasks'])} tasks ({n_questions} questions)")
    for reason, tasks in summary["skipped"].items():
        shown = ", ".join(f"{t} ({d})" if d else t for t, d in list(tasks.items())[:4])
        more = f", ... {len(tasks) - 4} more" if len(tasks) > 4 else ""
        lines.append(f"skipped {len(tasks)}: {reason}: {shown}{more}")
    for reason, n in summary.get("skipped_questions", {}).items():
        lines.append(f"skipped {n} questions: {reason}")
    pools = [c["support_pool"] for c in summary["counts"].values() if "support_pool" in c]
    if pools:
        ks = ", ".join(map(str, summary["k"]))
        lines.append(
            f"support: each seed draws k = {ks} questions from its task's pool of "
            f"{min(pools)}-{max(pools)}; the test part is fixed and never in a support set"
        )
    dead = summary.get("dead_options") or {}
    if dead:
        lines.append(
            f"dead options (never the answer in their task): {sum(dead.values())} in "
            f"{len(dead)} tasks (per task in conversion.json)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
