"""The docs' generated tables: settings tables rewritten from the settings classes they
document, results tables from the benchmarks' committed summaries (``docs/results/``).

    python -m abmll_tune.settings_tables [--check] [PAGE.md ...]   (default: README.md, docs/*.md)

This module sits above everything it lists (the recipes' settings, the evaluation
section, every method): :mod:`abmll_tune.settings`, which they all import, stays at the
foundation and imports none of them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from abmll_tune.evaluation import EvalSettings
from abmll_tune.methods import METHODS
from abmll_tune.recipe_config import EvalRecipeSettings, RecipeSettings
from abmll_tune.settings import settings_table


def documented_classes() -> dict[str, type]:
    """Every settings class the docs document, by the name their markers use."""
    classes = {"RecipeSettings": RecipeSettings, "EvalRecipeSettings": EvalRecipeSettings}
    classes["EvalSettings"] = EvalSettings
    classes.update({cls.__name__: cls for cls in METHODS.values()})
    return classes


# a block is its opening marker, any table lines, and the closing marker (never across blocks)
_BLOCK = re.compile(r"(<!-- settings: (\w+) -->\n)((?:(?!<!--).*\n)*?)(<!-- /settings -->)")


# a results block: a benchmark's committed summary (docs/results/NAME.json) as tables
_RESULTS = re.compile(r"(<!-- results: (\w+) -->\n)((?:(?!<!--).*\n)*?)(<!-- /results -->)")
RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def results_tables(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The tables of one committed benchmark summary."""
    import json

    from abmll_tune.embedded.planted import results_tables as planted_tables
    from abmll_tune.report import (
        benchmark_table,
        curves_table,
        kl_pull_table,
        layer_table,
        planted_protocols_table,
        summary_tables,
    )

    renderers = {"planted": planted_tables, "methods": benchmark_table, "epochs": curves_table}
    renderers.update(epochs_smollm2=curves_table, layer=layer_table, kl_pull_layers=kl_pull_table)
    renderers["layer_softabs"] = layer_table
    renderers.update(methods_eb=benchmark_table, methods_std=benchmark_table)
    renderers["planted_protocols"] = planted_protocols_table
    # benchmarks that store their own tables with their summary
    stored = ("cost", "distributed", "answer_logits", "kl_scale", "kl_scale_weak_backbone")
    stored += ("untrained_std_smollm2", "kill_trials")
    renderers.update({k: summary_tables for k in (*stored, "outer_grad_toy", "kl_precision")})
    if name not in renderers:
        raise KeyError(f"a marker names unknown results {name!r}")
    path = results_dir / f"{name}.json"
    return renderers[name](json.loads(path.read_text(encoding="utf-8")))


def render_readme(text: str) -> str:
    """``text`` with every ``<!-- settings: Name -->`` block replaced by Name's table, and
    every ``<!-- results: name -->`` block by the tables of ``docs/results/name.json``."""
    classes = documented_classes()

    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in classes:
            raise KeyError(f"a marker names unknown settings class {name!r}")
        return match.group(1) + settings_table(classes[name]) + "\n" + match.group(4)

    def replace_results(match: re.Match) -> str:
        return match.group(1) + results_tables(match.group(2)) + match.group(4)

    return _RESULTS.sub(replace_results, _BLOCK.sub(replace, text))


ROOT = Path(__file__).resolve().parents[1]


def generated_pages(root: Path = ROOT) -> list[Path]:
    """The Markdown pages that hold generated blocks: the README and ``docs/*.md``."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.settings_tables",
        description="Rewrite the generated tables (settings, results) of Markdown pages.",
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="pages to rewrite (default: README.md and docs/*.md)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs")
    args = parser.parse_args(argv)
    stale = 0
    for path in args.paths or generated_pages():
        text = path.read_text()
        new = render_readme(text)
        if new == text:
            continue
        if args.check:
            print(
                f"{path}: generated tables are out of date; run python -m abmll_tune.settings_tables"
            )
            stale += 1
            continue
        from abmll_tune.io import atomic_write_text

        atomic_write_text(path, new)
        print(f"{path}: generated tables rewritten")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
