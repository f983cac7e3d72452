"""bench/ holds benchmark scripts that share code through abmll_tune.benchmarking: each one
starts as a user types it, and none imports another script or edits sys.path."""

import ast
import os
import subprocess
import sys

import pytest
from helpers import REPO, logged

from abmll_tune.benchmarking import logged_diagnostics, logged_values

SCRIPTS = sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "bench" / "device").glob("*.py"))


def test_there_are_benchmarks_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"bench_methods.py", "bench_layer.py", "gpu_check.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help_as_typed(script):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(script.relative_to(REPO)), "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_shares_code_through_the_library_only(script):
    siblings = {p.stem for p in SCRIPTS}
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            assert module.split(".")[0] not in siblings, f"{script.name} imports {module}"
            assert not module.startswith("recipes"), f"{script.name} imports {module}"
        if isinstance(node, ast.Attribute) and node.attr == "path":
            base = node.value
            assert not (isinstance(base, ast.Name) and base.id == "sys"), (
                f"{script.name}:{node.lineno} touches sys.path"
            )


def test_logged_values_read_what_the_disk_logger_wrote(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "log_1.txt").write_text(
        "Step 1 | loss:1.5 kl_pull/share:0.25 sigma_theta/mean:0.01\n"
        "Step 2 | loss:1.25 sigma_theta/mean:0.02 not_kl_pull/share:9\n"
    )
    (logs / "log_2.txt").write_text("Step 3 | kl_pull/share:0.125 sigma_theta/mean:0.015\n")
    for key in ("kl_pull/share", "sigma_theta/mean", "loss"):
        assert logged_values(tmp_path, key) == logged(tmp_path, key)
    assert logged_values(tmp_path, "kl_pull/share") == [0.25, 0.125]
    d = logged_diagnostics(tmp_path)
    assert d["sigma_theta/mean"] == {"first": 0.01, "last": 0.015, "min": 0.01, "max": 0.02, "n": 3}
    assert d["kl_pull/share"]["n"] == 2
    assert logged_diagnostics(tmp_path, keys=("absent",)) == {}


def test_a_backbone_pretrained_for_other_steps_is_not_reused(tmp_path):
    from abmll_tune.benchmarking import prepare_embedded

    (tmp_path / "data" / "embedded").mkdir(parents=True)
    (tmp_path / "data" / "embedded" / "manifest.json").write_text("{}")
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "model.safetensors").write_bytes(b"")
    (backbone / "pretrain_steps.txt").write_text("600\n")
    overrides = prepare_embedded(tmp_path, 600)  # the same steps: reused as it is
    assert f"checkpointer.checkpoint_dir={backbone}" in overrides
    with pytest.raises(SystemExit, match="pre-trained for 600 steps, not 200"):
        prepare_embedded(tmp_path, 200)


def test_write_results_writes_only_when_asked(tmp_path, capsys):
    import json

    from abmll_tune.benchmarking import write_results

    write_results(None, {"a": 1})
    assert capsys.readouterr().out == "" and not list(tmp_path.iterdir())
    write_results(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert "wrote" in capsys.readouterr().out
