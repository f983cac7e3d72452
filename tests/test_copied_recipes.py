"""A recipe file copied alone into another torchtune workflow runs there.

The design card's second use: users copy a recipe and its config into their own
directory and run ``tune run that_recipe.py --config that_config.yaml`` with abmll-tune
installed as a regular package. The package is installed here (non-editable, without
dependencies, into a folder of its own) and the recipes run from a directory holding
nothing but the copied files.
"""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, TUNE


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site") / "site-packages"
    build = tmp_path_factory.mktemp("build")
    top_level = {".venv", ".git", "outputs", "data", "bench_results", "build"}

    def ignore(directory, names):  # the checkout's own outputs, not the package's data/
        skip = top_level if directory == str(REPO) else set()
        return [n for n in names if n in skip or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(REPO, build / "src", ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(build / "src")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "abmll_tune" / "recipes" / "abmll_meta_single_device.py").is_file()
    return target


@pytest.mark.parametrize(
    "recipe, config",
    [
        ("reptile_single_device", "tiny_cpu_reptile"),
        ("abmll_meta_single_device", "tiny_cpu_abmll"),
    ],
)
def test_a_copied_recipe_runs_from_its_own_directory(
    installed, embedded_overrides, tmp_path, recipe, config
):
    work = tmp_path / "my_workflow"
    work.mkdir()
    shutil.copy(REPO / "recipes" / f"{recipe}.py", work / f"my_{recipe}.py")
    shutil.copy(REPO / "configs" / f"{config}.yaml", work / "my_config.yaml")
    # only the installed package is importable: not this checkout
    env = {**os.environ, "PYTHONPATH": str(installed), "TIKTOKEN_CACHE_DIR": ""}
    probe = subprocess.run(
        [sys.executable, "-c", "import abmll_tune; print(abmll_tune.__file__)"],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert probe.stdout.startswith(str(installed)), probe.stdout + probe.stderr
    cmd = [TUNE, "run", f"my_{recipe}.py", "--config", "my_config.yaml",
           f"output_dir={work / 'out'}", *embedded_overrides, "epochs=1",
           "stop_after_visits=3", "validation=null"]  # fmt: skip
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "out" / "checkpoints" / "latest" / "meta.json").is_file()
