"""Build an ABMLL model from a config, load its base checkpoint through torchtune's
checkpointer, and report what the adapters look like.

    tune run recipes/inspect_model --config configs/tiny_cpu_inspect.yaml

It checks that a checkpoint fits the model (no missing or unexpected base keys),
counts frozen and trainable parameters per adapter group, runs one forward in every
adapter mode on random tokens, evaluates the ELBO's KL and prior terms (and, given a
``kl_pull`` section, the share of the second inner step's gradient that beta KL takes,
``kl_pull_after_one_step``), and writes all of it to ``{output_dir}/inspect.json``. Use it before a long run on a new model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from abmll_tune.io import atomic_write_json
from abmll_tune.methods.abmll import kl_pull_after_one_step
from abmll_tune.models.loading import build_model
from abmll_tune.modules import (
    ADAPTER_MODES,
    adapter_mode,
    adapter_params_by_group,
    kl_local_global,
    neg_log_prior_global,
    variational_lora_layers,
)

log = utils.get_logger("INFO")


class InspectModelRecipe:
    """Load a model and its checkpoint; summarise adapters, modes and ELBO terms."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._output_dir = Path(cfg.output_dir)
        self._seed = training.set_seed(seed=cfg.seed)
        self._cfg = cfg

    def setup(self) -> None:
        cfg = self._cfg
        self._model, _ = build_model(
            cfg.model, cfg.checkpointer, device=self._device, dtype=self._dtype
        )
        self._layers = variational_lora_layers(self._model)
        log.info(f"Loaded the base model with {len(self._layers)} adapted layers")

    def run(self) -> dict:
        cfg, model = self._cfg, self._model
        params = dict(model.named_parameters())
        summary: dict = {
            "model": cfg.model._component_,
            "dtype": str(self._dtype),
            "frozen_parameters": sum(p.numel() for p in params.values() if not p.requires_grad),
            "trainable_parameters": sum(p.numel() for p in params.values() if p.requires_grad),
            "adapted_layers": sorted(self._layers),
            "adapter_groups": {},
        }
        for scope in ("global", "local"):
            for kind in ("mean", "std"):
                group = adapter_params_by_group(model, scope, kind)
                if group:
                    summary["adapter_groups"][f"{scope}_{kind}"] = sum(
                        p.numel() for p in group.values()
                    )
        vocab = model.tok_embeddings.num_embeddings
        tokens = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=self._device)
        summary["forward"] = {}
        with torch.no_grad():
            for mode in ADAPTER_MODES:
                with adapter_mode(model, mode):
                    start = time.perf_counter()
                    logits = model(tokens)
                    summary["forward"][mode] = {
                        "logits_mean": logits.float().mean().item(),
                        "logits_std": logits.float().std().item(),
                        "seconds": time.perf_counter() - start,
                    }
            if all(layer.variational for layer in self._layers.values()):
                prior = cfg.get("prior", {})
                summary["kl_local_global"] = kl_local_global(model).item()
                summary["neg_log_prior_global"] = neg_log_prior_global(
                    model,
                    prior.get("prior_mu_var", "pretrained"),
                    prior.get("a0", 1.0),
                    prior.get("b0", 0.01),
                ).item()
        pull = cfg.get("kl_pull")
        if pull is not None and "kl_local_global" in summary:
            summary["kl_pull_after_one_step"] = self._kl_pull_after_one_step(tokens, pull)
        return summary

    def _kl_pull_after_one_step(self, tokens: torch.Tensor, pull: DictConfig) -> dict:
        """The KL's pull at the second inner step of a task at the section's beta and rates
        (:func:`abmll_tune.methods.abmll.kl_pull_after_one_step`)."""
        out = kl_pull_after_one_step(
            self._model,
            tokens,
            float(pull.beta),
            float(pull.inner_lr_mean),
            float(pull.inner_lr_std),
        )
        return {"beta": float(pull.beta), **dict(pull), **out}

    def save(self, summary: dict) -> Path:
        path = atomic_write_json(self._output_dir / "inspect.json", summary)
        log.info(f"Wrote {path}")
        return path


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="InspectModelRecipe", cfg=cfg)
    recipe = InspectModelRecipe(cfg)
    recipe.setup()
    summary = recipe.run()
    recipe.save(summary)
    groups = ", ".join(f"{k} {v:,}" for k, v in summary["adapter_groups"].items())
    print(
        f"{summary['model']}: {summary['trainable_parameters']:,} trainable "
        f"({groups}), {summary['frozen_parameters']:,} frozen; "
        f"{len(summary['adapted_layers'])} adapted layers"
    )


if __name__ == "__main__":
    sys.exit(recipe_main())
