"""The interface every method implements, and the registry of methods.

A method is a settings dataclass (its fields are its config keys, declared with
:func:`abmll_tune.settings.setting`) with a few hooks that the one meta-training loop,
:class:`abmll_tune.meta.MetaLearner`, calls per task visit::

    begin_task(model)                     before the K inner steps of a task
    inner_loss(model, batch, loss_fn)     the loss of one inner step -> (loss, nll, metrics)
    clip_grads(model, scope)              after backward, before an optimizer step
    outer_step(learner, query)            after the K inner steps -> metrics

plus what the loop and the recipes need to know about it: the adapter pairs it needs
(``variational``: the std pairs; ``meta_learned``: a local copy reset per task), which
pairs the inner loop trains (``trained_scope``) and in which :class:`AdapterMode`,
whether visits pool every task's batches (``pools_tasks``), its optimizer groups
(``inner_param_groups``, ``outer_param_groups``), its evaluation variants and its own
config checks (``config_problems``). A config selects a method as a torchtune
component::

    method:
      _component_: abmll_tune.methods.ABMLL
      beta: 1.0e-6

A new method is one subclass in one new file (docs/extending.md "Adding a method"); a subclass
registers its ``name`` on import, so ``method: <name>`` also works once its module is
imported (the built-in methods are imported by :mod:`abmll_tune.methods`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from abmll_tune.modules import AdapterMode, adapter_param_groups, reset_local_from_global
from abmll_tune.objectives import answer_nll
from abmll_tune.settings import setting


class OuterLoop(Protocol):
    """What a method's :meth:`Method.outer_step` may ask of the meta-training loop
    (:class:`abmll_tune.meta.MetaLearner` is the one implementation): the model, the
    answer loss, the trained scope, the (global, local) adapter pairs, and two moves."""

    model: nn.Module
    loss_fn: nn.Module | None
    scope: str
    pairs: list[tuple[Tensor, Tensor]]
    visit_batches: list[dict]  # every batch of the current visit (inner and query)

    def interpolate(self, eps_mean: float, eps_std: float, kinds: tuple[str, ...]) -> None:
        """theta <- theta + eps (phi - theta) on the pairs of ``kinds`` (mean, std)."""

    def outer_optimizer_step(self) -> None:
        """One step of the outer optimizer on the gradients the method left, then zero them."""


REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Method:
    """Base class of the methods (see the module docstring). Subclasses set ``name``."""

    name: ClassVar[str] = ""
    variational: ClassVar[bool] = False  # needs the std pairs (model.variational: true)
    meta_learned: ClassVar[bool] = False  # local pairs reset per task, and an outer step
    trained_scope: ClassVar[str] = "global"  # the pairs the inner loop trains
    train_mode: ClassVar[AdapterMode] = AdapterMode.GLOBAL_MEAN
    pools_tasks: ClassVar[bool] = False  # visits are pooled batches, not tasks
    trains: ClassVar[bool] = True  # False: nothing to meta-train (evaluation only)
    default_variant: ClassVar[str] = "mean"  # the evaluation variant tables report

    inner_lr_mean: float = setting(1e-4, doc="learning rate of the mean pairs", minimum=0)
    inner_optimizer_reset: str | None = setting(
        None,
        doc="re-create the inner optimizer `per_task` or `never` (null: per task for "
        "meta-learned methods, never otherwise)",
        choices=("per_task", "never"),
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            if meta.get("choices") and value is not None and value not in meta["choices"]:
                raise ValueError(f"{field.name} must be one of {meta['choices']}, got {value!r}")
            if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
                raise ValueError(f"{field.name} must be >= {meta['minimum']}, got {value}")

    # ------------------------------------------------------------------ what it needs

    @property
    def reset_inner_optimizer(self) -> bool:
        if self.inner_optimizer_reset is not None:
            return self.inner_optimizer_reset == "per_task"
        return self.meta_learned

    @property
    def keeps_state_across_tasks(self) -> bool:
        """State a rank-0 checkpoint of a task-parallel run could not hold."""
        return not self.reset_inner_optimizer

    @property
    def uses_query_batch(self) -> bool:
        """One more batch per visit for the outer step."""
        return False

    @property
    def needs_outer_optimizer(self) -> bool:
        return False

    def steps_per_visit(self, inner_steps: int) -> int:
        return inner_steps

    def inner_lrs(self) -> tuple[float, float]:
        """(mean, std) learning rates of the inner optimizer."""
        return self.inner_lr_mean, self.inner_lr_mean

    def inner_param_groups(self, model: nn.Module) -> list[dict]:
        return adapter_param_groups(model, self.trained_scope, *self.inner_lrs())

    def outer_param_groups(self, model: nn.Module) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} has no outer optimizer")

    # ------------------------------------------------------------------ one visit

    def begin_task(self, model: nn.Module) -> None:
        """Before the inner steps of a task (the loop re-creates the inner optimizer)."""

    def nll(self, model: nn.Module, batch: dict, loss_fn: nn.Module | None) -> Tensor:
        return answer_nll(model, batch, loss_fn)

    def inner_loss(
        self, model: nn.Module, batch: dict, loss_fn: nn.Module | None
    ) -> tuple[Tensor | None, Tensor, dict[str, float]]:
        """(loss to backpropagate, its NLL part, extra metrics) of one inner batch; a
        loss of None makes the step a measurement only (no backward, no update)."""
        nll = self.nll(model, batch, loss_fn)
        return nll, nll, {}

    def clip_grads(self, model: nn.Module, scope: str) -> None:
        """Called after backward, before the optimizer step on ``scope``'s pairs."""

    def inner_diagnostics(
        self, model: nn.Module, batch: dict, loss_fn: nn.Module | None
    ) -> dict[str, float]:
        """Measurements of one inner batch taken without stepping (the recipes log them
        every ``diagnostics_every_n_visits`` visits); the model is as an inner step sees it."""
        return {}

    def outer_step(self, learner: OuterLoop, query: list[dict]) -> dict[str, float]:
        """After the inner steps of a task; ``query`` is the extra batch, if any."""
        return {}

    # ------------------------------------------------------------------ around the loop

    def eval_variants(self, samples: tuple[int, ...]) -> list[tuple[str, AdapterMode, int]]:
        """(name, adapter mode, posterior samples) to score after test adaptation."""
        mode = AdapterMode.LOCAL_MEAN if self.meta_learned else AdapterMode.GLOBAL_MEAN
        return [("mean", mode, 1)]

    def for_adaptation(self, lr_mean: float, lr_std: float, beta: float | None = None) -> Method:
        """This method as few-shot evaluation adapts with it: the adaptation learning
        rates, a fresh inner optimizer per task, local pairs from the global ones, and
        (``beta`` not None, methods with a KL only) the KL's weight."""
        changes = {
            "inner_lr_mean": lr_mean,
            "inner_lr_std": lr_std,  # methods with std pairs only
            "inner_optimizer_reset": "per_task",
            "local_init": "global",  # meta-learned methods only
        }
        if beta is not None:
            changes["beta"] = beta
        names = {f.name for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k in names})

    def log_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra metrics the recipe logs with every visit."""
        return {}

    def config_problems(
        self, model_cfg: Mapping[str, Any], settings: Any, sections: set[str]
    ) -> list[str]:
        """Problems of a meta-training config with this method (model section, the
        recipe's settings, the component sections present)."""
        problems = []
        if not self.trains:
            problems.append(
                f"method: {self.name!r} has nothing to meta-train; evaluate it with "
                "recipes/evaluate_few_shot"
            )
        variational = model_cfg.get("variational", True)
        sampling = model_cfg.get("sampling", "local")
        if self.variational and not variational:
            problems.append(
                f"model.variational: method {self.name!r} needs the std pairs; set "
                "model.variational: true"
            )
        if not self.variational:
            if variational:
                problems.append(
                    f"model.variational: method {self.name!r} has no variance adapters; set "
                    "model.variational: false"
                )
            if sampling != "mean":
                problems.append(
                    f"model.sampling: {sampling!r} needs variance adapters, which method "
                    f"{self.name!r} has none of; set model.sampling: mean"
                )
        if self.needs_outer_optimizer and "outer_optimizer" not in sections:
            problems.append(
                f"outer_optimizer: method {self.name!r} with these settings needs an "
                "outer_optimizer section"
            )
        return problems


@dataclass(frozen=True)
class TaskAdaptiveMethod(Method):
    """A meta-learned method: local pairs start from the global ones for every task."""

    meta_learned: ClassVar[bool] = True
    trained_scope: ClassVar[str] = "local"
    train_mode: ClassVar[AdapterMode] = AdapterMode.LOCAL_MEAN

    local_init: str = setting(
        "global",
        doc="local pairs <- global before every task, or `persistent` (kept across tasks)",
        choices=("global", "persistent"),
    )

    @property
    def keeps_state_across_tasks(self) -> bool:
        return self.local_init == "persistent" or not self.reset_inner_optimizer

    def begin_task(self, model: nn.Module) -> None:
        if self.local_init == "global":
            reset_local_from_global(model)


def check_finite_grads(model: nn.Module, where: str) -> None:
    """Raise on a non-finite gradient: one host sync for all of them (a sync per
    parameter would bind a GPU's inner step to hundreds of round trips)."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named or bool(torch.stack([g.isfinite().all() for _, g in named]).all()):
        return
    for name, grad in named:
        if not bool(grad.isfinite().all()):
            raise FloatingPointError(
                f"non-finite gradient of {name} in the {where}; NaNs are never zeroed silently. "
                "Lower the learning rates, set std_grad_clamp, or use std_param: softabs."
            )
