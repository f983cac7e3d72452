"""``tune run recipes/<name>`` as typed: the top-level ``recipes`` package is this project's.

torchtune's wheel installs a top-level package ``recipes`` whose ``__init__`` raises, and
``tune run recipes/abmll_meta_single_device`` imports the module
``recipes.abmll_meta_single_device`` with the working directory appended at the *end* of
``sys.path``: torchtune's package is found first and the command fails. ``make install``
writes one line into the virtual environment's site-packages (``abmll_tune_recipes.pth``)
that installs :class:`abmll_tune.recipes_import.RecipesFinder` at interpreter start. It
answers for the name ``recipes`` alone:

* the working directory's ``recipes/`` package if it has one (this checkout's, from the
  repository root, or a user's own, as ``PYTHONPATH=.`` would give);
* otherwise this project's recipes as installed (``abmll_tune.recipes``), so the command
  works from any directory.

Every other import is left to Python's own machinery; ``recipes.<name>`` modules are
found through the package's ``__path__`` as usual.

    python -m abmll_tune.recipe_finder            # write the .pth line (make install does)
    python -m abmll_tune.recipe_finder --check    # exit 1 if it is missing
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "abmll_tune_recipes.pth"
# a .pth line runs when it starts with "import"; it must not break the environment's
# Python once the project is uninstalled (pip does not know this file)
PTH_LINE = (
    "import sys; exec('try:\\n import abmll_tune.recipes_import as r; r.install()\\n"
    "except ImportError:\\n pass')\n"
)


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.recipe_finder",
        description="Make `tune run recipes/<name>` find this project's recipes.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the line is missing")
    args = parser.parse_args(argv)
    path = pth_path()
    present = path.is_file() and path.read_text() == PTH_LINE
    if args.check:
        if not present:
            print(f"{path} is missing: run `python -m abmll_tune.recipe_finder` (make install)")
        return 0 if present else 1
    if not present:
        from abmll_tune.io import atomic_write_text

        atomic_write_text(path, PTH_LINE)
        print(f"wrote {path}: `tune run recipes/<name>` finds abmll-tune's recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
