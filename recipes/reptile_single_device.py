"""Reptile meta-training on one device (and the LoRA baselines).

    tune run recipes/reptile_single_device --config configs/tiny_cpu_reptile.yaml

The same recipe and loop as ``recipes/abmll_meta_single_device`` (one meta-training
loop serves ABMLL, Reptile, Structured LoRA and Regular LoRA); this entry point only
makes ``method: reptile`` the default and refuses ABMLL configs, so that a Reptile
config reads as one. It imports the recipe from the installed package
(``abmll_tune.recipes``, this directory as installed), so the file also runs when copied
alone into another torchtune workflow.
"""

from __future__ import annotations

import sys

from abmll_tune.recipes.abmll_meta_single_device import run
from omegaconf import DictConfig
from torchtune import config


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    if "method" not in cfg:
        cfg.method = "reptile"
    if cfg.method == "abmll":
        print("error: method: abmll runs with recipes/abmll_meta_single_device", file=sys.stderr)
        raise SystemExit(2)
    run(cfg, recipe_name="ReptileRecipeSingleDevice")


if __name__ == "__main__":
    sys.exit(recipe_main())
