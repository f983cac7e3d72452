"""The documented commands, through the real CLIs (subprocesses, as a user runs them)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNE = shutil.which("tune", path=str(Path(sys.executable).parent)) or "tune"


def run(cmd, cwd=REPO, **env):
    """``cmd`` as a user types it after `make install`: from ``cwd`` (the repository root),
    with no PYTHONPATH (the tests' own is removed)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update({"TIKTOKEN_CACHE_DIR": "", **env})
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def test_tune_run_finds_the_projects_recipes_from_anywhere(tiny_llama3_checkpoint, tmp_path):
    """torchtune's wheel installs a top-level `recipes` package that raises on import; the
    line `make install` writes (abmll_tune.recipe_finder) makes `tune run recipes/<name>`
    load this project's recipes, from the repository root and from any other directory."""
    check = run([sys.executable, "-m", "abmll_tune.recipe_finder", "--check"])
    assert check.returncode == 0, check.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(
        [TUNE, "run", "recipes/inspect_model", "--config",
         str(REPO / "configs" / "tiny_cpu_inspect.yaml"),
         f"checkpointer.checkpoint_dir={tiny_llama3_checkpoint}", f"output_dir={tmp_path / 'out'}"],
        cwd=elsewhere,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "inspect.json").is_file()
    # a directory with its own `recipes` package keeps it, as PYTHONPATH=. would
    (elsewhere / "recipes").mkdir()
    (elsewhere / "recipes" / "__init__.py").write_text("")
    (elsewhere / "recipes" / "mine.py").write_text("print('my recipe')\n")
    mine = run([TUNE, "run", "recipes/mine", "--config", "x.yaml"], cwd=elsewhere)
    assert mine.returncode == 0 and "my recipe" in mine.stdout, mine.stderr[-2000:]


def test_tune_run_inspect_model_from_repo_root(tiny_llama3_checkpoint, tmp_path):
    out = tmp_path / "inspect"
    result = run(
        [
            TUNE,
            "run",
            "recipes/inspect_model",
            "--config",
            "configs/tiny_cpu_inspect.yaml",
            f"checkpointer.checkpoint_dir={tiny_llama3_checkpoint}",
            f"output_dir={out}",
            "model.std_param=affine",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "inspect.json").read_text())
    # 2 blocks x (q 64->64, v 64->32, output 64->64), rank 8, one pair per group
    per_group = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 64))
    assert summary["adapter_groups"] == {
        f"{s}_{k}": per_group for s in ("global", "local") for k in ("mean", "std")
    }
    assert summary["trainable_parameters"] == 4 * per_group
    assert len(summary["adapted_layers"]) == 6
    assert summary["kl_local_global"] == 0.0  # local == global right after init
    assert summary["neg_log_prior_global"] == summary["neg_log_prior_global"]  # finite, not NaN
    assert "abmll_tune.models.abmll_llama3: 22,528 trainable" in result.stdout


def test_tune_run_reports_a_model_that_does_not_fit_the_checkpoint(
    tiny_llama3_checkpoint, tmp_path
):
    result = run(
        [
            TUNE,
            "run",
            "recipes/inspect_model",
            "--config",
            "configs/tiny_cpu_inspect.yaml",
            f"checkpointer.checkpoint_dir={tiny_llama3_checkpoint}",
            f"output_dir={tmp_path / 'inspect'}",
            "model.embed_dim=32",
        ]
    )
    assert result.returncode != 0
    assert "size mismatch" in result.stderr
    assert not (tmp_path / "inspect" / "inspect.json").exists()


def test_tiny_checkpoint_command_refuses_to_overwrite(tmp_path):
    out = tmp_path / "tiny"
    first = run([sys.executable, "-m", "abmll_tune.embedded.backbone", "--out", str(out)])
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = run([sys.executable, "-m", "abmll_tune.embedded.backbone", "--out", str(out)])
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary directory left behind
