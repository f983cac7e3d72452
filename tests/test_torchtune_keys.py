"""A torchtune LoRA config's keys in a meta-training recipe: the keys that fit are
honoured (lr_scheduler, clip_grad_norm, max_steps_per_epoch, log_every_n_steps,
profiler, ...), the rest refused with one line that says why."""

from pathlib import Path

import helpers
import pytest
import torchtune
from omegaconf import OmegaConf

from abmll_tune.recipe_config import COMPONENTS, RecipeSettings

TORCHTUNE_CONFIG = (
    Path(torchtune.__file__).resolve().parents[1]
    / "recipes" / "configs" / "llama3" / "8B_lora_single_device.yaml"
)  # fmt: skip
# what a user replaces for this model and machine: the model, its files, the hardware
REPLACED = {"model", "tokenizer", "checkpointer", "output_dir", "device", "dtype"}


def merged_config(tmp_path: Path, **changes) -> Path:
    """configs/tiny_cpu_reptile.yaml with every other key of torchtune's config on top."""
    ours = OmegaConf.load(helpers.REPO / "configs" / "tiny_cpu_reptile.yaml")
    theirs = OmegaConf.load(TORCHTUNE_CONFIG)
    for key in theirs:
        if key not in REPLACED:
            ours[key] = theirs[key]
    for key, value in changes.items():
        if value is None:
            del ours[key]
        else:
            ours[key] = value
    path = tmp_path / "merged.yaml"
    path.write_text(OmegaConf.to_yaml(ours))
    return path


def test_every_key_of_torchtunes_lora_config_is_read_or_refused_with_a_reason():
    theirs = OmegaConf.load(TORCHTUNE_CONFIG)
    known = {f for f in RecipeSettings.__dataclass_fields__} | set(COMPONENTS) | {"method"}
    from abmll_tune.recipe_config import TORCHTUNE_REFUSED

    assert set(theirs) - REPLACED <= known | set(TORCHTUNE_REFUSED)


def test_refused_keys_fail_before_training_each_with_its_reason(
    embedded_overrides, tmp_path, capsys
):
    config = merged_config(tmp_path)
    code, _, err = helpers.tune_run(
        "reptile_single_device", str(config), f"output_dir={tmp_path / 'out'}",
        *embedded_overrides, capsys=capsys,
    )  # fmt: skip
    assert code == 2, err[-2000:]
    for line in (
        "optimizer: torchtune's key does not apply here: meta-learning has two optimizers",
        "dataset: torchtune's key does not apply here: the recipes read task-grouped data",
        "seed: null (torchtune: a random seed) is not supported",
    ):
        assert line in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("save_adapter_weights_only", False, "never a merged model"),
        ("enable_activation_offloading", True, "not supported by the meta-training recipes"),
        ("shuffle", False, "always drawn in a seeded shuffle"),
    ],
)
def test_values_these_recipes_cannot_honour_are_refused(
    key, value, reason, embedded_overrides, tmp_path, capsys
):
    code, _, err = helpers.tune_run(
        "reptile_single_device", "configs/tiny_cpu_reptile.yaml",
        f"output_dir={tmp_path / 'out'}", f"{key}={value}", *embedded_overrides, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and f"{key}: must be" in err and reason in err, err[-2000:]


def test_the_keys_that_fit_meta_training_are_honoured(embedded_overrides, tmp_path, capsys):
    out = tmp_path / "out"
    profiler = {
        "_component_": "torchtune.training.setup_torch_profiler", "enabled": True,
        "output_dir": str(tmp_path / "profile"), "cpu": True, "cuda": False,
        "wait_steps": 0, "warmup_steps": 1, "active_steps": 1, "num_cycles": 1,
    }  # fmt: skip
    config = merged_config(tmp_path, optimizer=None, dataset=None, seed=0,
                           save_adapter_weights_only=True, profiler=profiler)  # fmt: skip
    code, _, err = helpers.tune_run(
        "reptile_single_device", str(config), f"output_dir={out}", *embedded_overrides,
        "epochs=2", "max_steps_per_epoch=10", "clip_grad_norm=1.0",
        "validation.max_tasks=1", "validation.seeds=[100]", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    # max_steps_per_epoch 10 at 5 steps a visit: 2 visits an epoch, 4 in all
    visits = (out / "logs" / "task_visits_rank0.jsonl").read_text().splitlines()
    assert len(visits) == 4
    # log_every_n_steps 1: every visit logged; the cosine schedule's 100 warmup visits
    assert helpers.logged(out, "lr_scale") == pytest.approx([0.0, 0.01, 0.02, 0.03])
    assert any((tmp_path / "profile").rglob("*")), "the profiler wrote no trace"
