"""A Gaussian task family whose best prior is known in closed form, for ABMLL's outer steps.

Tasks are weights W_i = mu* + sigma* E_i (E_i standard normal) of a D x D linear map; a
batch observes every column once, y = W_i x + noise for one-hot x. ABMLL's model is
exactly right here: the marginal likelihood over tasks is maximised at the global mean
mu* and the global std sigma* (docs/method.md, "Fitting the prior"). Used by
``tests/test_marginal_likelihood.py`` (the empirical-Bayes reading finds sigma*, the
paper's three readings do not) and ``bench/bench_outer_grad_toy.py`` (the table).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from abmll_tune.data.loader import TaskVisit
from abmll_tune.meta import MetaLearner
from abmll_tune.methods import ABMLL
from abmll_tune.modules import VariationalLoRALinear, sigma_summary

D = 2  # the toy's weight is D x D: every entry observed once per query batch
NOISE = 0.5  # observation noise of the toy's regression


class Toy(nn.Module):
    """y = W x for one-hot x: an example observes one column of the adapted weight."""

    def __init__(self, sigma_floor: float = 0.1):
        super().__init__()
        self.layer = VariationalLoRALinear(
            D, D, rank=D, alpha=D, std_param="exp", sigma_floor=sigma_floor, std_scale_row=True
        )
        with torch.no_grad():
            self.layer.weight.zero_()

    def forward(self, tokens):
        return self.layer(nn.functional.one_hot(tokens, D).float())


class ToyABMLL(ABMLL):
    """ABMLL with the toy's Gaussian likelihood in place of the answer NLL."""

    name: ClassVar[str] = ""  # not registered: the real "abmll" stays ABMLL

    def sample_nll(self, model, batch, loss_fn):
        return toy_nll(model, batch)


def toy_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    """The Gaussian negative log-likelihood of a batch (per example, up to a constant)."""
    return 0.5 * ((model(batch["tokens"]) - batch["y"]) ** 2).sum(-1).mean() / NOISE**2


def toy_batch(weight: torch.Tensor, generator: torch.Generator) -> dict:
    """D noisy observations of ``weight``, one per column, in random order."""
    columns = torch.randperm(D, generator=generator)
    y = weight[:, columns].T + NOISE * torch.randn(D, D, generator=generator)
    return {"tokens": columns, "y": y}


def sigma_after_training(
    outer_grad: str, spread: float, visits: int, seed: int = 0, prior_samples: int = 32
) -> float:
    """RMS sigma_theta / sigma* over the second half of ``visits`` task visits of the
    family with sigma* = ``spread``, one query batch of D noisy columns per visit;
    ``prior_samples`` draws of the global Gaussian per visit for ``marginal_likelihood``."""
    g = torch.Generator().manual_seed(seed)
    mu_star = torch.randn(D, D, generator=g)
    torch.manual_seed(seed)
    model = Toy()
    method = ToyABMLL(
        outer_grad=outer_grad,
        inner_lr_mean=0.05,
        inner_lr_std=0.01,
        outer_lr_mean=0.05,
        outer_lr_std=0.05,
        outer_step_mean=0.1,
        outer_step_std=0.1,
        beta=1e-3,
        gamma=0.0,
        prior_mu_var=1.0,
        prior_samples=prior_samples,
        prior_data="query",  # one observation of each entry per visit (the default)
    )
    adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)  # noqa: E731
    learner = MetaLearner(model, method, adamw, adamw, inner_steps=2)
    squares = []
    for visit in range(visits):
        weight = mu_star + spread * torch.randn(D, D, generator=g)
        batches = [toy_batch(weight, g) for _ in range(learner.batches_per_task)]
        learner.train_task(TaskVisit(0, visit, "toy", batches))
        if visit >= visits // 2:
            squares.append(sigma_summary(model)["mean"] ** 2)
    return math.sqrt(sum(squares) / len(squares)) / spread
