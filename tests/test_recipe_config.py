"""Config checks of the meta-training recipes, on every shipped config and bad combinations."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune.config._validate import validate

from abmll_tune.recipe_config import RecipeConfigError, check_recipe_config, config_warnings

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
CONFIGS = [p for p in ALL if "inspect" not in p.name and not p.stem.endswith("_eval")]
EVAL_CONFIGS = [p for p in ALL if p.stem.endswith("_eval")]


def test_the_shipped_configs_cover_the_papers_grid():
    names = {p.stem for p in CONFIGS}
    baselines = ("reptile", "structured_lora", "lora", "abmll_metaicl", "reptile_metaicl")
    baselines += ("metaicl",)
    for model in ("llama3_8b", "qwen2_7b"):
        for split in ("cls45", "cls23", "nli", "para", "mcqa"):
            assert f"{model}_{split}" in names  # ABMLL
            for variant in baselines:
                assert f"{model}_{split}_{variant}" in names
        assert f"{model}_cls45_literal" in names
    for variant in ("abmll", *baselines):
        assert f"tiny_cpu_{variant}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_passes_our_checks_and_tune_validate(path):
    cfg = OmegaConf.load(path)
    settings, method = check_recipe_config(cfg)
    validate(cfg)  # torchtune's own: every _component_ binds its arguments (the method too)
    if path.stem.startswith(("llama3_8b", "qwen2_7b")):
        assert settings.dtype == "bf16" and settings.batch_size == 2
        assert 1e-6 <= method.inner_lr_mean <= 5e-5
        assert cfg.model.lora_rank == 8 and cfg.model.lora_alpha == 16
        assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj", "output_proj"]
        assert settings.enable_activation_checkpointing
        if method.name != "lora":
            assert settings.inner_steps == 5
        if method.name == "abmll":  # the paper's beta with its std (literal), 1e-5 with ours
            beta = 5e-10 if path.stem.endswith("literal") else 1e-5
            assert (method.beta, method.gamma, method.a0, method.b0) == (beta, 1e-6, 1.0, 0.01)
    if path.stem.endswith("literal"):
        assert cfg.model.std_param == "affine" and method.prior_mu_var == "sigma_floor"
        assert method.outer_grad == "kl_only" and method.local_init == "global"


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_every_evaluation_config_is_valid(path):
    from abmll_tune.evaluation import eval_settings

    cfg = OmegaConf.load(path)
    settings = eval_settings(OmegaConf.to_container(cfg.evaluation, resolve=True))
    assert settings.adapt_steps == 5 and settings.part == "test" and 1 in settings.samples
    validate(cfg)


def test_the_generator_and_configs_agree():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "scripts/generate_configs.py", "--check"],
        cwd=CONFIGS[0].parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def base_cfg(**changes):
    cfg = OmegaConf.load(CONFIGS[0].parent / "tiny_cpu_abmll.yaml")
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(outer_optimizer=None),
            "outer_optimizer: method 'abmll' with these settings needs an outer_optimizer section",
        ),
        (
            {
                "method": {
                    "_component_": "abmll_tune.methods.Reptile",
                    "outer_update": "optimizer",
                },
                "model.variational": False,
                "model.sampling": "mean",
                "outer_optimizer": None,
            },
            "outer_optimizer: method 'reptile'",
        ),
        (
            {"method": "abmll", "model.variational": False},
            "model.variational: method 'abmll' needs the std pairs",
        ),
        (
            {"method": "reptile", "model.variational": False},
            "model.sampling: 'local' needs variance adapters",
        ),
        (
            {"method": "lora", "model.variational": False, "model.sampling": "mean"},
            "inner_steps: Regular LoRA takes one step per pooled batch",
        ),
        ({"method.beta": True}, "method.beta: expected float, got bool True"),
        (
            {"method.prior_mu_var": "flat"},
            "prior_mu_var: 'flat' must be 'pretrained', 'sigma_floor' or a number",
        ),
        ({"beta": 1e-3}, "beta: a setting of method 'abmll'; move it into the method section"),
        ({"method.betta": 1e-3}, "method.betta: unknown key (did you mean 'beta'?)"),
        ({"method": "maml"}, "method: 'maml' is not a method"),
        (
            {"method._component_": "torch.optim.AdamW"},
            "method._component_: 'torch.optim.AdamW' is not an abmll_tune.methods.Method",
        ),
        ({"epochs": 0}, "epochs: must be >= 1, got 0"),
        ({"tokenizer": None}, "tokenizer: missing required section"),
    ],
)
def test_bad_combinations_are_named(changes, message):
    with pytest.raises(RecipeConfigError) as info:
        check_recipe_config(base_cfg(**changes))
    assert any(message in p for p in info.value.problems), info.value.problems


def test_bf16_on_the_cpu_is_a_warning_not_an_error():
    settings, _ = check_recipe_config(base_cfg(dtype="bf16"))
    assert any("bf16 on the CPU is about 30x slower" in w for w in config_warnings(settings))
    assert config_warnings(check_recipe_config(base_cfg())[0]) == []
