"""Pretrained: the base model with a zero LoRA pair, adapted at test time as LoRA is.

Evaluation only (nothing to meta-train): ``tune run recipes/evaluate_few_shot ...
method=pretrained adapter_checkpoint=null``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from abmll_tune.methods.lora import RegularLoRA


@dataclass(frozen=True)
class Pretrained(RegularLoRA):
    """The untrained base: test adaptation from a zero adapter, Regular LoRA's objective."""

    name: ClassVar[str] = "pretrained"
    trains: ClassVar[bool] = False
