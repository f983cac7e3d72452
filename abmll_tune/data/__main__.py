"""``python -m abmll_tune.data``: build splits, generate the embedded suite, convert sources.

    python -m abmll_tune.data embedded --out data/embedded_src
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


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be comma-separated integers, got {text!r}"
        ) from None


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
        "--source", required=True, help="metaicl-hub, hub:<dataset id>, or a MetaICL directory"
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

    e = sub.add_parser(
        "embedded", help="generate the embedded CPU suite (MetaICL layout + tokenizer)"
    )
    e.add_argument("--out", required=True)
    e.add_argument("--seed", type=int, default=0)

    for name, what in (
        ("convert-legalbench", "LegalBench TSV task directories"),
        ("convert-chembench", "ChemBench parquet/JSON"),
    ):
        c = sub.add_parser(name, help=f"convert {what} to a MetaICL directory")
        c.add_argument("--source", required=True)
        c.add_argument("--out", required=True)
        c.add_argument("--k", type=int, default=16)
        c.add_argument("--seeds", type=_seeds, default=METAICL_SEEDS)

    s = sub.add_parser("splits", help="list the registry's splits")
    s.add_argument("--splits-file", action="append", default=[])

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
                        source=args.source,
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
        elif args.command == "embedded":
            from abmll_tune.embedded.suite import generate_suite

            summary = generate_suite(args.out, args.seed)
            print(f"wrote the embedded suite to {args.out}: {summary['tasks']} tasks")
        elif args.command in ("convert-legalbench", "convert-chembench"):
            from abmll_tune.data import sources

            convert = (
                sources.convert_legalbench
                if args.command == "convert-legalbench"
                else sources.convert_chembench
            )
            summary = convert(args.source, args.out, k=args.k, seeds=args.seeds)
            for task, counts in summary["counts"].items():
                print(f"  {task:<48} {counts}  license: {summary['tasks'][task]['license']}")
            if summary["skipped"]:
                print(f"  skipped: {summary['skipped']}")
            print(f"wrote {args.out} (tasks.yaml lists its tasks for --splits-file)")
        elif args.command == "splits":
            from abmll_tune.data.splits import load_registry

            registry = load_registry(args.splits_file)
            for name, split in registry.splits.items():
                val = f", {len(split.validation)} validation" if split.validation else ""
                print(f"{name:<16} {len(split.train)} train, {len(split.test)} test{val}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
