"""Regular LoRA: one LoRA pair fine-tuned on every training task's batches pooled.

No task structure: a visit is one pooled batch (``inner_steps: 1``), the inner step is
an optimizer step on the answer NLL, and there is no outer step. Scored with the
adapted pair (``global_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from abmll_tune.methods.base import Method


@dataclass(frozen=True)
class RegularLoRA(Method):
    """Regular LoRA on the pooled batches of all training tasks."""

    name: ClassVar[str] = "lora"
    pools_tasks: ClassVar[bool] = True

    def steps_per_visit(self, inner_steps: int) -> int:
        return 1

    def config_problems(self, model_cfg, settings, sections) -> list[str]:
        problems = super().config_problems(model_cfg, settings, sections)
        if settings.inner_steps != 1:
            problems.append(
                "inner_steps: Regular LoRA takes one step per pooled batch; set inner_steps: 1"
            )
        return problems
