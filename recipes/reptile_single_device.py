"""Reptile meta-training on one device (and the LoRA baselines).

    tune run recipes/reptile_single_device --config configs/tiny_cpu_reptile.yaml

The same recipe and loop as ``recipes/abmll_meta_single_device`` (one meta-training
loop serves every method); this entry point only makes Reptile the default method and
refuses the Bayesian ones (``variational``: ABMLL), so that a Reptile config reads as
one. It imports the recipe from the installed package
(``abmll_tune.recipes``, this directory as installed), so the file also runs when copied
alone into another torchtune workflow.
"""

from __future__ import annotations

import sys

from abmll_tune.recipes.abmll_meta_single_device import run
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from abmll_tune.methods import method_class


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if "method" not in cfg:
        cfg.method = {"_component_": "abmll_tune.methods.Reptile"}
    value = cfg.method
    cls, _ = method_class(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    if cls is not None and cls.variational:
        print(
            f"error: method {cls.name!r} runs with recipes/abmll_meta_single_device",
            file=sys.stderr,
        )
        raise SystemExit(2)
    run(cfg, recipe_name="ReptileRecipeSingleDevice")


if __name__ == "__main__":
    sys.exit(recipe_main())
