"""bench/device/gpu_check.py (make gpu-check) runs end to end in --cpu-smoke mode, so that the
one prepared GPU command cannot rot between the rare sessions that have a GPU."""

import json
import subprocess
import sys

import torch
from helpers import REPO


def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    # no --embedded: the suite, split and backbone are built by the script itself, as on a
    # GPU (that path once called the data builder with an old signature, untested)
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "device" / "gpu_check.py"),
        "--cpu-smoke",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke"
    env = report["environment"]
    assert env["versions"]["torchtune"] == "0.6.1" and env["torch"] == torch.__version__
    step = report["paper_step"]
    abmll_steps = {"abmll_inner_step", "abmll_first_order_outer_step", "abmll_task_visit"}
    # the default KL kernel and the eager one (their ratio is the GPU's answer on fusion)
    assert set(step["seconds"]) == {
        "lora_step",
        "lora_step_again",  # LoRA measured first and last: the part's drift
        *abmll_steps,
        *(f"{s}_eager_kl" for s in abmll_steps),
    }
    assert set(step["min_seconds"]) == set(step["first_step_seconds"]) == set(step["seconds"])
    assert all(v > 0 for v in step["time_ratio"].values()) and step["lora_drift"] > 0
    assert set(report["part_seconds"]) == {"environment", "paper_step", "recipes", "methods"}
    recipes = report["recipes"]
    assert "enable_activation_checkpointing=true" in recipes["paths"]  # the paper's paths
    assert recipes["ok"] and recipes["checkpoint_visits"] == [4, 8]  # resumed from 4 to 8
    runs = report["methods"]["runs"]
    assert [r["method"] for r in runs] == ["abmll", "lora"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ece"] == r["ece"] for r in runs)
    assert "time ratios to LoRA" in result.stdout and "recipes: ok" in result.stdout
