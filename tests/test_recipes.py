"""The meta-training recipes end to end through torchtune's real `tune run` CLI.

Most runs execute the CLI in-process (patched argv, runpy), as torchtune's own recipe
tests do, to save the ~6-10 s of imports per run; one runs it as a subprocess.
"""

import json
import math
import os
import subprocess
from pathlib import Path

import helpers
import pytest
import torch
from helpers import REPO, TUNE, logged
from safetensors.torch import load_file

RECIPE = {
    "abmll": "abmll_meta_single_device",
    "reptile": "reptile_single_device",
    "structured_lora": "reptile_single_device",
    "lora": "reptile_single_device",
}


@pytest.fixture(scope="module")
def overrides(embedded_overrides):
    return embedded_overrides


def tune_run(method, out, overrides, *extra, config=None, capsys=None):
    """Run a meta-training recipe in-process; returns (exit code, stderr)."""
    config = config or f"configs/tiny_cpu_{method}.yaml"
    code, _, err = helpers.tune_run(
        RECIPE[method], config, f"output_dir={out}", *overrides, *extra, capsys=capsys
    )
    return code, err


def final_adapters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / "latest" / "adapters.safetensors"))


@pytest.mark.parametrize(
    "method, extra",
    [
        ("abmll", ["epochs=2"]),
        ("reptile", ["epochs=3"]),
        ("structured_lora", ["epochs=2"]),
        ("lora", ["epochs=1", "stop_after_visits=200"]),
    ],
)
def test_each_method_trains_end_to_end(method, extra, overrides, tmp_path, capsys):
    out = tmp_path / method
    # the training loss is what is checked: validation on 4 tasks only (a quarter the cost)
    code, err = tune_run(method, out, overrides, *extra, "validation.max_tasks=4", capsys=capsys)
    assert code == 0, err[-3000:]
    nll = logged(out, "nll")
    assert len(nll) >= 40 and all(v == v and abs(v) < 1e6 for v in nll)
    first, last = sum(nll[:10]) / 10, sum(nll[-10:]) / 10
    assert last < first - 0.3, (first, last)  # the training loss falls
    ckpt = out / "checkpoints" / "latest"
    assert {p.name for p in ckpt.iterdir()} == {
        "adapters.safetensors",
        "training_state.pt",
        "meta.json",
        "adapter",
    }
    assert {p.name for p in (ckpt / "adapter").iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
    }
    if method == "abmll":
        assert (
            logged(out, "beta_kl")
            and logged(out, "gamma_prior")
            and logged(out, "sigma_theta/mean")
        )
        # sigma_theta's pass over every weight runs on the diagnostic visits only (1 in 10)
        assert len(logged(out, "sigma_theta/mean")) == math.ceil(len(nll) / 10)
        assert any(".lora_global_std_" in k for k in final_adapters(out))


@pytest.mark.parametrize("method", ["abmll", "lora"])
def test_resume_after_a_stop_mid_epoch_gives_the_same_final_adapters(
    method, overrides, tmp_path, capsys
):
    # ABMLL over an epoch's end (2 inner steps a visit, not 5: what is tested is the state
    # a resume restores); pooled LoRA's sampler within an epoch, 40 of its batches of 64
    if method == "abmll":
        epochs = ["epochs=2", "inner_steps=2"]
    else:
        epochs = ["epochs=1", "batch_size=64", "stop_after_visits=40"]
    epochs.append(
        "validation.max_tasks=4"
    )  # validation is part of the state, at a quarter the cost
    straight = tmp_path / "straight"
    assert tune_run(method, straight, overrides, *epochs, capsys=capsys)[0] == 0
    resumed = tmp_path / "resumed"
    stop = "stop_after_visits=53" if method == "abmll" else "stop_after_visits=23"
    code, err = tune_run(
        method, resumed, overrides, *epochs, stop, "save_every_n_visits=7", capsys=capsys
    )
    assert code == 0, err[-3000:]
    partial = final_adapters(resumed)
    code, err = tune_run(
        method, resumed, overrides, *epochs, "resume_from_checkpoint=true", capsys=capsys
    )
    assert code == 0, err[-3000:]
    a, b = final_adapters(straight), final_adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert not all(torch.equal(a[k], partial[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["inner_stpes=5"], "inner_stpes: unknown key (did you mean 'inner_steps'?)"),
        (["~epochs"], "epochs: missing required key"),
        (["batch_size=two"], "batch_size: expected int, got str 'two'"),
        (["method.outer_grad=second_order"], "outer_grad: 'second_order' is not one of"),
        (["method=reptile"], "method.beta: unknown key"),  # ABMLL's settings left behind
        (["inner_steps=150"], "fewer than batches_per_task x batch_size = 150 x 2 = 300"),
        (
            ["model.embed_dim=32"],
            "the checkpoint does not fit model abmll_tune.models.abmll_llama3",
        ),
        (
            ["inner_optimizer._component_=torch.optim.AdamWW"],
            "inner_optimizer._component_: cannot import 'torch.optim.AdamWW'",
        ),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(
    extra, message, overrides, tmp_path, capsys
):
    out = tmp_path / "bad"
    code, err = tune_run("abmll", out, overrides, *extra, capsys=capsys)
    assert code == 2, err[-2000:]
    assert message in err
    assert not (out / "checkpoints").exists()


def test_unwritable_output_dir_and_mismatched_checkpoint_are_reported(overrides, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = tune_run("abmll", blocker / "out", overrides, "epochs=1", capsys=capsys)
    assert code == 2 and "output_dir:" in err and "is not writable" in err
    out = tmp_path / "run"
    assert (
        tune_run("abmll", out, overrides, "epochs=1", "stop_after_visits=3", capsys=capsys)[0] == 0
    )
    code, err = tune_run(
        "abmll",
        out,
        overrides,
        "epochs=1",
        "resume_from_checkpoint=true",
        "model.lora_rank=4",
        capsys=capsys,
    )
    assert code == 2 and "adapters.safetensors does not fit the model" in err


def test_reptile_recipe_through_the_tune_cli_subprocess(overrides, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIKTOKEN_CACHE_DIR": ""}
    out = tmp_path / "reptile"
    cmd = [
        TUNE,
        "run",
        "recipes/reptile_single_device",
        "--config",
        "configs/tiny_cpu_reptile.yaml",
        f"output_dir={out}",
        *overrides,
        "epochs=1",
        "validation.max_tasks=2",  # the command is tested, not the validation
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {out}/checkpoints/latest" in result.stdout
    assert (out / "checkpoints" / "epoch_0" / "adapter" / "adapter_model.safetensors").is_file()


def test_early_stopping_ends_training_when_validation_stops_improving(overrides, tmp_path, capsys):
    # Reptile whose outer step is zero: the global adapters never move, so validation after
    # epoch 1 equals epoch 0's and patience 1 ends the run there (of 3 epochs)
    out = tmp_path / "stalled"
    code, err = tune_run(
        "reptile", out, overrides, "epochs=3", "early_stopping_patience=1",
        "method.outer_step_mean=0.0", "validation.max_tasks=2", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    rows = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["accuracy"] == rows[1]["accuracy"]
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch_*")) == ["epoch_0"]


def test_validation_within_epochs_selects_and_stops_on_those_validations(
    overrides, tmp_path, capsys
):
    # an epoch of 20 visits, validated every 5: with a Reptile whose global adapters never
    # move, the validations after visits 5 and 10 equal the one before training, and
    # patience 2 stops the run at visit 10, within its first epoch
    out = tmp_path / "within"
    code, err = tune_run(
        "reptile", out, overrides, "epochs=2", "visits_per_epoch=20",
        "validate_every_n_visits=5", "early_stopping_patience=2",
        "method.outer_step_mean=0.0", "validation.max_tasks=2", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    rows = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["visits"], r.get("within_epoch", False)) for r in rows] == [
        (0, 0, False), (0, 5, True), (0, 10, True)
    ]  # fmt: skip
    for r in rows:  # per-task metrics whose macro mean is the row's (one support seed)
        assert len(r["per_task"]) == 2
        mean = sum(t["accuracy"] for t in r["per_task"].values()) / 2
        assert abs(mean - r["accuracy"]) < 1e-12
    visits = (out / "logs" / "task_visits_rank0.jsonl").read_text().splitlines()
    assert len(visits) == 10
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["progress"]["visits"] == 10 and not meta["progress"]["epoch_end"]
    best = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())
    assert best["progress"]["validation"]["visits"] == 0  # never beaten


def test_regular_lora_refuses_an_epoch_of_a_number_of_visits(overrides, tmp_path, capsys):
    code, err = tune_run("lora", tmp_path / "lora", overrides, "visits_per_epoch=10", capsys=capsys)
    assert code == 2 and "visits_per_epoch: lora's epoch is a pass over the pooled" in err


def test_a_resume_within_a_validated_epoch_matches_the_straight_run(overrides, tmp_path, capsys):
    common = ["epochs=1", "visits_per_epoch=12", "validate_every_n_visits=4", "inner_steps=2",
              "validation.max_tasks=1", "validation.seeds=[100]"]  # fmt: skip
    straight = tmp_path / "straight"
    assert tune_run("reptile", straight, overrides, *common, capsys=capsys)[0] == 0
    resumed = tmp_path / "resumed"
    code, err = tune_run("reptile", resumed, overrides, *common, "stop_after_visits=6",
                         capsys=capsys)  # fmt: skip
    assert code == 0, err[-2000:]
    code, err = tune_run("reptile", resumed, overrides, *common, "resume_from_checkpoint=true",
                         capsys=capsys)  # fmt: skip
    assert code == 0, err[-2000:]

    def rows(out):
        return [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]

    assert [r["visits"] for r in rows(straight)] == [0, 4, 8, 12]
    assert rows(resumed) == rows(straight)
    a, b = final_adapters(straight), final_adapters(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_run_keeps_float32_adapters_and_checkpoints_them(overrides, tmp_path, capsys):
    out = tmp_path / "bf16"
    code, err = tune_run(
        "abmll", out, overrides, "dtype=bf16", "adapter_dtype=fp32", "epochs=1",
        "inner_steps=1", "stop_after_visits=2", "~validation", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    adapters = final_adapters(out)
    assert {t.dtype for t in adapters.values()} == {torch.float32}
