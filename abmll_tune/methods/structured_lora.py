"""Structured LoRA: one LoRA pair fine-tuned task by task, K steps per task visit.

The same pair keeps training from task to task (no local copy, no outer step); only the
order of the batches follows the tasks, as meta-learning's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from abmll_tune.methods.base import Method


@dataclass(frozen=True)
class StructuredLoRA(Method):
    """LoRA trained on one task at a time, K steps per visit."""

    name: ClassVar[str] = "structured_lora"
