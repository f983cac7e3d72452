"""Reptile (Nichol et al., 2018) on LoRA pairs.

Per task: local mean pair phi <- global theta, K inner steps on the answer NLL, then the
outer step: theta += eps (phi - theta) (``outer_update: interpolate``), or one outer
optimizer step on the pseudo-gradient theta - phi (``optimizer``). Scored after test
adaptation with the adapted local pair (``local_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from abmll_tune.methods.base import TaskAdaptiveMethod
from abmll_tune.modules import adapter_param_groups
from abmll_tune.settings import setting


@dataclass(frozen=True)
class Reptile(TaskAdaptiveMethod):
    """First-order meta-learning of a LoRA pair by interpolation toward each task's fit."""

    name: ClassVar[str] = "reptile"

    outer_update: str = setting(
        "interpolate",
        doc="`interpolate`: theta += eps (phi - theta); `optimizer`: an outer optimizer "
        "step on theta - phi",
        choices=("interpolate", "optimizer"),
    )
    outer_step_mean: float = setting(0.1, doc="eps of the interpolation", minimum=0)
    outer_lr_mean: float = setting(
        1e-4, doc="outer optimizer's learning rate (`outer_update: optimizer`)", minimum=0
    )

    @property
    def needs_outer_optimizer(self) -> bool:
        return self.outer_update == "optimizer"

    def outer_param_groups(self, model):
        return adapter_param_groups(model, "global", self.outer_lr_mean, self.outer_lr_mean)

    def outer_step(self, learner, query):
        if self.outer_update == "interpolate":
            learner.interpolate(self.outer_step_mean, self.outer_step_mean, ("mean",))
            return {}
        with torch.no_grad():
            for theta, phi in learner.pairs:
                theta.grad = (theta - phi).detach()
        learner.outer_optimizer_step()
        return {}
