"""The one meta-training loop, for every method.

``docs/method.md`` ("The loop"). Tasks are visited one at a time; per visit,
:meth:`MetaLearner.train_task` calls the method's hooks (:mod:`abmll_tune.methods`):

    method.begin_task(model)                 ABMLL/Reptile: local <- global
    K times: method.inner_loss(batch)        backward, method.clip_grads, inner optimizer step
    method.outer_step(learner, query)        ABMLL/Reptile: move the global pairs

What differs between methods lives in their modules; this loop only runs them. No
backpropagation through the inner loop; one set of local adapters is reused, so memory
is constant in the number of tasks. The inner optimizer is re-created for every task
(or kept, ``inner_optimizer_reset: never``); the outer optimizer keeps its state across
tasks. Task-parallel training (``reduce_mean``, :mod:`abmll_tune.distributed`) averages
the outer step's two ingredients over the ranks, each of which has just adapted to its
own task: the deltas (local - global) before an interpolation
(:meth:`MetaLearner.interpolate`) and the global pairs' gradients before the outer
optimizer's step (:meth:`MetaLearner.outer_optimizer_step`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from abmll_tune.data.loader import TaskVisit
from abmll_tune.methods import Method, check_finite_grads
from abmll_tune.modules import (
    adapter_params_by_group,
    set_adapter_mode,
    set_trainable_scope,
    variational_lora_layers,
)

Optimizer = torch.optim.Optimizer


def _remember_base_lrs(optimizer: Optimizer) -> None:
    """Keep each group's configured rate, which ``lr_scale`` multiplies."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])


class MetaLearner:
    """Runs one task visit at a time for any :class:`abmll_tune.methods.Method`.

    Args:
        model: a model built by :mod:`abmll_tune.models` (``variational`` must match
            the method's: True for ABMLL, False otherwise).
        method: the method and its settings.
        inner_steps: K, optimizer steps per task visit.
        gradient_accumulation_steps: batches per optimizer step.
        make_inner_optimizer, make_outer_optimizer: ``f(param_groups) -> Optimizer``
            (the recipe passes its configured optimizer classes).
        loss_fn: optional torchtune loss (see :func:`abmll_tune.objectives.answer_nll`).
        reduce_mean: averages a list of tensors in place over the processes of a
            task-parallel job (:func:`abmll_tune.distributed.all_reduce_mean_`); None on
            one device.
        clip_grad_norm: torchtune's key: the total gradient norm of every inner and outer
            optimizer step is clipped to it (after the method's own clipping); None: off.

    ``lr_scale`` (1.0; the recipe sets it per visit from its ``lr_scheduler``) multiplies
    every learning rate and outer step size of the next visit: the inner and outer
    optimizers' rates and the interpolation steps, so one schedule serves every method.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        make_inner_optimizer: Callable[[list[dict]], Optimizer],
        make_outer_optimizer: Callable[[list[dict]], Optimizer] | None = None,
        *,
        inner_steps: int = 5,
        gradient_accumulation_steps: int = 1,
        loss_fn: nn.Module | None = None,
        reduce_mean: Callable[[list[torch.Tensor]], None] | None = None,
        clip_grad_norm: float | None = None,
    ):
        if inner_steps < 1 or gradient_accumulation_steps < 1:
            raise ValueError("inner_steps and gradient_accumulation_steps must be >= 1")
        layers = variational_lora_layers(model)
        if not layers:
            raise ValueError(
                "the model has no VariationalLoRALinear layers: build it with abmll_tune.models"
            )
        is_variational = {layer.variational for layer in layers.values()}
        if is_variational != {method.variational}:
            raise ValueError(
                f"method {method.name!r} needs model.variational={method.variational} "
                f"(std pairs {'required' if method.variational else 'absent'}); the model has "
                f"variational={sorted(is_variational)}"
            )
        self.model, self.method, self.loss_fn = model, method, loss_fn
        self.inner_steps, self.gradient_accumulation_steps = (
            inner_steps,
            gradient_accumulation_steps,
        )
        self.reduce_mean = reduce_mean
        self.clip_grad_norm = clip_grad_norm
        self.lr_scale = 1.0
        self.visit_batches: list[dict] = []
        self._make_inner = make_inner_optimizer
        self.scope = method.trained_scope
        self.inner_optimizer = self._new_inner_optimizer()
        self.outer_optimizer = None
        if method.needs_outer_optimizer:
            if make_outer_optimizer is None:
                raise ValueError(
                    f"method {method.name!r} with these outer settings needs an outer optimizer"
                )
            self.outer_optimizer = make_outer_optimizer(method.outer_param_groups(model))
            _remember_base_lrs(self.outer_optimizer)
        # (global, local) parameter pairs, for interpolation and first-order gradients
        global_params = adapter_params_by_group(model, "global")
        local_params = adapter_params_by_group(model, "local")
        self.pairs = [
            (p, local_params[name.replace(".lora_global_", ".lora_local_")])
            for name, p in global_params.items()
        ]
        self.pair_kinds = [
            "std" if ".lora_global_std_" in name else "mean" for name in global_params
        ]

    @property
    def batches_per_task(self) -> int:
        """Batches a task visit must provide (the inner steps, plus a query step)."""
        steps = self.method.steps_per_visit(self.inner_steps) + int(self.method.uses_query_batch)
        return steps * self.gradient_accumulation_steps

    def _new_inner_optimizer(self) -> Optimizer:
        optimizer = self._make_inner(self.method.inner_param_groups(self.model))
        _remember_base_lrs(optimizer)
        return optimizer

    def _apply_lr_scale(self, optimizer: Optimizer | None) -> None:
        for group in optimizer.param_groups if optimizer is not None else ():
            group["lr"] = group["base_lr"] * self.lr_scale

    def _clip(self, scope: str) -> None:
        self.method.clip_grads(self.model, scope)
        if self.clip_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)

    # ------------------------------------------------------------------ one task

    def begin_task(self) -> None:
        """The method's start of a task, and a fresh inner optimizer if it wants one."""
        self.method.begin_task(self.model)
        if self.method.reset_inner_optimizer:
            self.inner_optimizer = self._new_inner_optimizer()
        self._apply_lr_scale(self.inner_optimizer)

    def inner_step(self, batches: list[dict]) -> dict[str, float]:
        """One optimizer step of the inner loop on ``batches`` (gradient accumulation)."""
        set_trainable_scope(self.model, self.scope)
        set_adapter_mode(self.model, self.method.train_mode)
        metrics = {"nll": 0.0}
        n, trained = len(batches), False
        for batch in batches:
            loss, nll, extra = self.method.inner_loss(self.model, batch, self.loss_fn)
            if loss is not None:  # None: the method only measures (no update)
                (loss / n).backward()
                trained = True
            metrics["nll"] += float(nll.detach()) / n
            metrics.update(extra)
        if trained:
            check_finite_grads(self.model, "inner step")
            self._clip(self.scope)
            self.inner_optimizer.step()
            self.inner_optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def interpolate(self, eps_mean: float, eps_std: float, kinds: tuple[str, ...]) -> None:
        """theta += eps (phi - theta) for the pairs of ``kinds`` ("mean", "std"); the
        deltas are averaged over the ranks of a task-parallel job first."""
        chosen = [
            (theta, phi, kind)
            for (theta, phi), kind in zip(self.pairs, self.pair_kinds, strict=True)
            if kind in kinds
        ]
        deltas = [phi - theta for theta, phi, _ in chosen]
        if self.reduce_mean is not None:
            self.reduce_mean(deltas)  # the mean delta over the ranks' tasks
        for (theta, _, kind), delta in zip(chosen, deltas, strict=True):
            theta.add_(delta, alpha=(eps_mean if kind == "mean" else eps_std) * self.lr_scale)

    def outer_optimizer_step(self) -> None:
        """One outer optimizer step on the global pairs' gradients (averaged over the
        ranks of a task-parallel job first)."""
        if self.reduce_mean is not None:
            self.reduce_mean([theta.grad for theta, _ in self.pairs if theta.grad is not None])
        check_finite_grads(self.model, "outer step")
        self._clip("global")
        self._apply_lr_scale(self.outer_optimizer)
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)

    def outer_step(self, query: list[dict]) -> dict[str, float]:
        """The method's outer (global) update; ``query`` is its extra batch, if any."""
        return self.method.outer_step(self, query)

    def inner_diagnostics(self, batch: dict) -> dict[str, float]:
        """The method's measurements of ``batch`` as the next inner step would see it,
        under a forked RNG: the posterior noise they draw leaves training unchanged."""
        set_trainable_scope(self.model, self.scope)
        set_adapter_mode(self.model, self.method.train_mode)
        with torch.random.fork_rng(devices=[]):  # the noise seeds come from the CPU RNG
            out = self.method.inner_diagnostics(self.model, batch, self.loss_fn)
        self.model.zero_grad(set_to_none=True)
        return out

    def train_task(self, visit: TaskVisit, diagnose: bool = False) -> dict[str, float]:
        """begin_task, K inner steps, the outer step; returns the visit's metrics (with
        the method's :meth:`inner_diagnostics` of the last inner step's first batch, taken
        just before that step, when ``diagnose``: at the first step phi = theta, where a
        KL between them has no gradient)."""
        start = time.perf_counter()
        self.model.train()
        self.begin_task()
        g = self.gradient_accumulation_steps
        if len(visit.batches) != self.batches_per_task:
            raise ValueError(
                f"a visit must bring {self.batches_per_task} batches, got {len(visit.batches)}"
            )
        n_inner = len(visit.batches) // g - int(self.method.uses_query_batch)
        inner, diagnostics = [], {}
        for i in range(n_inner):
            batches = visit.batches[i * g : (i + 1) * g]
            if diagnose and i == n_inner - 1:  # not counted in the visit's time
                d_start = time.perf_counter()
                diagnostics = self.inner_diagnostics(batches[0])
                start += time.perf_counter() - d_start
            inner.append(self.inner_step(batches))
        metrics = {
            "nll": sum(m["nll"] for m in inner) / len(inner),
            "nll_first": inner[0]["nll"],
            "nll_last": inner[-1]["nll"],
        }
        metrics.update({k: v for k, v in inner[-1].items() if k != "nll"})
        self.visit_batches = visit.batches  # every batch of the visit, for the outer step
        metrics.update(self.outer_step(visit.batches[n_inner * g :]))
        metrics.update(diagnostics)
        tokens = sum(b["tokens"].numel() for b in visit.batches)  # processed, padding included
        metrics["seconds"] = time.perf_counter() - start
        metrics["tokens_per_second"] = tokens / metrics["seconds"]
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "inner_optimizer": None
            if self.method.reset_inner_optimizer
            else self.inner_optimizer.state_dict(),
            "outer_optimizer": None
            if self.outer_optimizer is None
            else self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("inner_optimizer") is not None:
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        if state.get("outer_optimizer") is not None:
            if self.outer_optimizer is None:
                raise ValueError("checkpoint has an outer optimizer state but this method has none")
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
