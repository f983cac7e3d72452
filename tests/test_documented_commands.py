"""Every command the README and docs show in a shell block holds as typed: its recipe and
config exist and the config, with the command's overrides merged as `tune run` merges
them, passes the recipe's checks; a Python program exists and accepts every flag the
command gives it (its --help, run from the repository root without PYTHONPATH); a make
target exists; a script exists. Commands that need what a test cannot have (a model hub)
are listed with the reason. The commands' behaviour is tested where they matter most
(tests/test_cli.py, test_recipes.py, test_evaluation.py, test_smollm2.py, test_docs.py);
this test keeps every other documented line from drifting."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# programs a test cannot run here, with the reason
NOT_RUN = {
    "tune download": "downloads from the Hugging Face hub (no network in tests)",
    "pip": "installs packages",
    "cd": "changes directory",
}
RECIPES_CHECKED_BY = {
    "abmll_meta_single_device": "recipe",
    "reptile_single_device": "recipe",
    "abmll_meta_distributed": "recipe",
    "evaluate_few_shot": "eval",
    "inspect_model": "load",
}


def documented_commands() -> list[tuple[str, str]]:
    """(page name, command) for every command line in the pages' shell blocks."""
    out = []
    for page in PAGES:
        in_block = False
        lines: list[str] = []
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                if in_block:
                    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
                    for cmd in joined.splitlines():
                        cmd = re.split(r"\s+#", cmd, maxsplit=1)[0].strip()
                        if cmd and not cmd.startswith("#"):
                            out.append((page.name, cmd))
                    in_block, lines = False, []
                elif line.strip() in ("```bash", "```sh", "```shell"):
                    in_block = True
                continue
            if in_block:
                lines.append(line)
    return out


# commands in the prose: `python ...`, `tune run ...`, `make ...` spans (without placeholders)
INLINE = re.compile(r"`((?:python3?|tune run|make) [^`]+)`")


def inline_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for span in INLINE.findall(page.read_text(encoding="utf-8")):
            cmd = " ".join(span.split())
            if not re.search(r"<|\.\.\.|\[|\bDIR\b|\bPAGE\b|\bN\b", cmd):
                out.append((page.name, cmd))
    return sorted(set(out))


COMMANDS = documented_commands() + inline_commands()


def _words(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words[0] in ("python", "python3"):  # interpreter options before -m / -c / a script
        while len(words) > 1 and words[1] in ("-P", "-u", "-B"):
            words.pop(1)
    return words


def _program(words: list[str]) -> str:
    if words[0] in ("python", "python3"):
        if words[1] != "-m":
            return " ".join(words[:2])
        # a subcommand (``python -m abmll_tune.data build``): a bare lower-case word
        sub = len(words) > 3 and re.fullmatch(r"[a-z][a-z_-]*", words[3])
        return " ".join(words[: 4 if sub else 3])
    if words[0] == "tune":
        return "tune " + words[1]
    return words[0]


@functools.cache
def _help(program: str) -> str:
    words = program.split()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, *words[1:], "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{program} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def _check_tune_run(words: list[str]) -> None:
    args = words[2:]
    if args and args[0].startswith("--nproc_per_node"):
        args = args[1:] if "=" in args[0] else args[2:]
    recipe, args = args[0], args[1:]
    name = Path(recipe).name.removesuffix(".py")
    assert (REPO / "recipes" / f"{name}.py").is_file(), f"no recipe {recipe}"
    if not args:  # the recipe named in prose
        return
    assert args[0] == "--config", f"expected --config after the recipe, got {args[:1]}"
    config, overrides = args[1], args[2:]
    assert (REPO / config).is_file(), f"no config {config}"
    # torchtune's own parsing, as `tune run` does it
    from torchtune.config._parse import TuneRecipeArgumentParser, _merge_yaml_and_cli_args

    yaml_args, cli_args = TuneRecipeArgumentParser().parse_known_args(
        ["--config", str(REPO / config), *overrides]
    )
    cfg = _merge_yaml_and_cli_args(yaml_args, cli_args)
    kind = RECIPES_CHECKED_BY[name]
    if kind == "recipe":
        from abmll_tune.recipe_config import check_recipe_config

        if name == "reptile_single_device" and "method" not in cfg:
            cfg.method = {"_component_": "abmll_tune.methods.Reptile"}
        check_recipe_config(cfg)
    elif kind == "eval":
        from abmll_tune.recipe_config import check_eval_config

        check_eval_config(cfg)
    else:
        assert "model" in cfg and "checkpointer" in cfg


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


def _program_exists(words: list[str]) -> None:
    if words[1] == "-m":
        module = words[2]
        import importlib.util

        assert importlib.util.find_spec(module) is not None, f"no module {module}"
    else:
        assert (REPO / words[1]).is_file(), f"no script {words[1]}"


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_documented_command_holds(page, command):
    words = _words(command)
    program = _program(words)
    if program in NOT_RUN or words[0] in NOT_RUN:
        return  # listed with its reason
    if words[0] == "make":
        assert set(words[1:]) <= _make_targets(), f"{page}: no make target in {command!r}"
    elif words[0] == "bash":
        assert (REPO / words[1]).is_file(), f"{page}: no script {words[1]}"
    elif words[0] == "cp":
        for source in words[1:-1]:
            assert (REPO / source).exists(), f"{page}: {source} does not exist"
    elif program == "tune run":
        _check_tune_run(words)
    elif words[0] in ("python", "python3"):
        if len(words) < 2 or words[1] == "-" or words[-1] == "-m":
            return  # the interpreter named in prose (`python -`: a script on stdin)
        _program_exists(words)
        if words[1] == "-c":
            return
        flags = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
        if flags:
            text = _help(program)
            missing = [f for f in flags if f not in text]
            assert not missing, f"{page}: {program} does not accept {missing}"
    else:
        pytest.fail(f"{page}: {command!r}: a program this test does not know; add it")


def test_the_pages_show_commands():
    # the parser finds the README's first two commands (install and demo, then the tests)
    readme = [c for p, c in COMMANDS if p == "README.md"]
    assert "make demo" in " ".join(readme) and "make test" in readme
