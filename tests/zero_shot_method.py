"""A method added the way docs/extending.md "Adding a method" says: this one file, nothing else.

Zero-shot: no inner step updates anything (the NLL is only measured), no outer step;
evaluation scores the model with its adapter as initialised (B = 0: the base model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from abmll_tune.methods import Method


@dataclass(frozen=True)
class ZeroShot(Method):
    """The base model, never adapted."""

    name: ClassVar[str] = "zero_shot"

    def inner_loss(self, model, batch, loss_fn):
        with torch.no_grad():
            return None, self.nll(model, batch, loss_fn), {}
