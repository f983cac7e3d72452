"""The import hook behind ``tune run recipes/<name>`` (:mod:`abmll_tune.recipe_finder`
explains it and installs the one ``.pth`` line that calls :func:`install`). Kept apart
and small: it is imported at every interpreter start in the project's environment."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


class RecipesFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level ``recipes`` package before the path finder does."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "recipes":
            return None
        cwd = os.getcwd()
        if os.path.isfile(os.path.join(cwd, "recipes", "__init__.py")):
            return importlib.machinery.PathFinder.find_spec(fullname, [cwd])
        installed = importlib.util.find_spec("abmll_tune.recipes")
        if installed is None or not installed.submodule_search_locations:
            return None
        location = Path(list(installed.submodule_search_locations)[0])
        return importlib.util.spec_from_file_location(
            "recipes", location / "__init__.py", submodule_search_locations=[str(location)]
        )


def install() -> None:
    """Put :class:`RecipesFinder` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, RecipesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, RecipesFinder())
