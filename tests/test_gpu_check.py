"""bench/gpu_check.py (make gpu-check) runs end to end in --cpu-smoke mode, so that the
one prepared GPU command cannot rot between the rare sessions that have a GPU."""

import json
import subprocess
import sys

from helpers import REPO


def test_gpu_check_cpu_smoke_runs_every_part(
    embedded_source, embedded_split, embedded_backbone, tmp_path
):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)]
    cmd += ["--embedded", str(embedded_source), str(embedded_split), str(embedded_backbone)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke"
    step = report["paper_step"]
    abmll_steps = {"abmll_inner_step", "abmll_first_order_outer_step", "abmll_task_visit"}
    # the default KL kernel and the eager one (their ratio is the GPU's answer on fusion)
    assert set(step["seconds"]) == {
        "lora_step",
        *abmll_steps,
        *(f"{s}_eager_kl" for s in abmll_steps),
    }
    assert all(v > 0 for v in step["time_ratio"].values())
    recipes = report["recipes"]
    assert recipes["ok"] and recipes["checkpoint_visits"] == [4, 8]  # resumed from 4 to 8
    runs = report["methods"]["runs"]
    assert [r["method"] for r in runs] == ["abmll", "lora"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ece"] == r["ece"] for r in runs)
    assert "time ratios to LoRA" in result.stdout and "recipes: ok" in result.stdout
