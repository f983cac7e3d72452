"""The one meta-training loop: ABMLL, Reptile, Structured LoRA and Regular LoRA.

``docs/method.md`` ("The loop"). Tasks are visited one at a time; per visit,
:meth:`MetaLearner.train_task` takes K inner steps on K batches of the task and then
the method's outer step:

=================  ==================  ====================  ==========================  ===========================
method             adapters            before a task         inner step updates          outer step
=================  ==================  ====================  ==========================  ===========================
``lora``           global mean pair    -                     the pair, NLL (pooled       -
                                                             batches, no task structure)
``structured_lora`` global mean pair   -                     the pair, NLL, K per task   -
``reptile``        global + local      local <- global       local mean, NLL             theta += eps (phi - theta),
                   mean pairs                                                            or an optimizer step on the
                                                                                         pseudo-gradient theta - phi
``abmll``          4 pairs             local <- global       local pairs, NLL + beta KL  see ``outer_grad``
=================  ==================  ====================  ==========================  ===========================

ABMLL's outer step (``outer_grad``; Algorithm 1's body is missing from the paper):

* ``reptile`` (default): the global pairs move by eps (local - global), mean and std
  pairs each with their own eps, then one optimizer step on beta KL + gamma prior for
  the global std pairs;
* ``first_order``: on one more (query) batch, the global pairs get the gradient of the
  query NLL with respect to the matching local pairs (first-order: d phi / d theta = I)
  plus the exact gradients of beta KL + gamma prior, then one optimizer step;
* ``kl_only``: the literal reading: the global pairs get only beta KL + gamma prior.

No backpropagation through the inner loop; one set of local adapters is reused, so
memory is constant in the number of tasks. Task-parallel training (``reduce_mean``,
:mod:`abmll_tune.distributed`) averages the outer step's two ingredients over the ranks,
each of which has just adapted to its own task: the deltas (local - global) before the
interpolation and the global adapters' gradients before the outer optimizer's step. Mean and std pairs have separate learning
rates, inner and outer. The inner optimizer is re-created for every task (or kept,
``inner_optimizer_reset: never``); the outer optimizer keeps its state across tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from abmll_tune.data.loader import TaskVisit
from abmll_tune.modules import (
    adapter_param_groups,
    adapter_params_by_group,
    reset_local_from_global,
    set_adapter_mode,
    set_trainable_scope,
    variational_lora_layers,
)
from abmll_tune.objectives import ELBOWeights, answer_nll, beta_kl, gamma_prior

METHODS = ("abmll", "reptile", "structured_lora", "lora")
OUTER_GRADS = ("reptile", "first_order", "kl_only")
OUTER_UPDATES = ("interpolate", "optimizer")


@dataclass(frozen=True)
class MetaConfig:
    """Everything that defines a method's loop (the recipe fills it from the config)."""

    method: str
    inner_steps: int = 5
    gradient_accumulation_steps: int = 1
    local_init: str = "global"  # ABMLL/Reptile: local <- global before each task, or "persistent"
    inner_optimizer_reset: str | None = None  # per_task | never; default per method
    inner_lr_mean: float = 1e-4
    inner_lr_std: float = 1e-4
    outer_grad: str = "reptile"  # ABMLL
    outer_update: str = "interpolate"  # Reptile
    outer_step_mean: float = 0.1  # eps for interpolation (mean pairs)
    outer_step_std: float = 0.1  # eps for interpolation (std pairs)
    outer_lr_mean: float = 1e-4  # outer optimizer
    outer_lr_std: float = 1e-4
    std_grad_clamp: float | None = None
    train_samples: int = 1  # posterior samples averaged per ABMLL forward
    elbo: ELBOWeights = ELBOWeights()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.outer_grad not in OUTER_GRADS:
            raise ValueError(f"outer_grad must be one of {OUTER_GRADS}, got {self.outer_grad!r}")
        if self.outer_update not in OUTER_UPDATES:
            raise ValueError(
                f"outer_update must be one of {OUTER_UPDATES}, got {self.outer_update!r}"
            )
        if self.local_init not in ("global", "persistent"):
            raise ValueError(
                f"local_init must be 'global' or 'persistent', got {self.local_init!r}"
            )
        if self.inner_optimizer_reset not in (None, "per_task", "never"):
            raise ValueError(
                f"inner_optimizer_reset must be 'per_task' or 'never', got {self.inner_optimizer_reset!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                f.name in ("inner_steps", "gradient_accumulation_steps", "train_samples")
                and value < 1
            ):
                raise ValueError(f"{f.name} must be >= 1, got {value}")

    @property
    def meta_learned(self) -> bool:
        """ABMLL and Reptile: local adapters reset per task and an outer step."""
        return self.method in ("abmll", "reptile")

    @property
    def reset_inner_optimizer(self) -> bool:
        if self.inner_optimizer_reset is not None:
            return self.inner_optimizer_reset == "per_task"
        return self.meta_learned

    @property
    def uses_query_batch(self) -> bool:
        return self.method == "abmll" and self.outer_grad == "first_order"

    @property
    def batches_per_task(self) -> int:
        """Batches a task visit must provide (K inner steps, plus the query step)."""
        steps = 1 if self.method == "lora" else self.inner_steps
        return (steps + int(self.uses_query_batch)) * self.gradient_accumulation_steps

    @property
    def variational(self) -> bool:
        return self.method == "abmll"


Optimizer = torch.optim.Optimizer


class MetaLearner:
    """Runs one task visit at a time for any method of :data:`METHODS`.

    Args:
        model: a model built by :mod:`abmll_tune.models` (``variational`` must match
            the method: True for ABMLL, False otherwise).
        cfg: the loop's settings.
        make_inner_optimizer, make_outer_optimizer: ``f(param_groups) -> Optimizer``
            (the recipe passes its configured optimizer classes).
        loss_fn: optional torchtune loss (see :func:`abmll_tune.objectives.answer_nll`).
        reduce_mean: averages a list of tensors in place over the processes of a
            task-parallel job (:func:`abmll_tune.distributed.all_reduce_mean_`); None on
            one device.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: MetaConfig,
        make_inner_optimizer: Callable[[list[dict]], Optimizer],
        make_outer_optimizer: Callable[[list[dict]], Optimizer] | None = None,
        loss_fn: nn.Module | None = None,
        reduce_mean: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        layers = variational_lora_layers(model)
        if not layers:
            raise ValueError(
                "the model has no VariationalLoRALinear layers: build it with abmll_tune.models"
            )
        is_variational = {layer.variational for layer in layers.values()}
        if is_variational != {cfg.variational}:
            raise ValueError(
                f"method {cfg.method!r} needs model.variational={cfg.variational} "
                f"(std pairs {'required' if cfg.variational else 'absent'}); the model has "
                f"variational={sorted(is_variational)}"
            )
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        self.reduce_mean = reduce_mean
        self._make_inner = make_inner_optimizer
        self.scope = "local" if cfg.meta_learned else "global"
        # inner optimizer over the trained scope, means and stds at their own rates
        self.inner_optimizer = self._new_inner_optimizer()
        self.outer_optimizer = None
        if self._needs_outer_optimizer:
            if make_outer_optimizer is None:
                raise ValueError(
                    f"method {cfg.method!r} with these outer settings needs an outer optimizer"
                )
            groups = adapter_param_groups(model, "global", cfg.outer_lr_mean, cfg.outer_lr_std)
            if cfg.method == "abmll" and cfg.outer_grad == "reptile":
                groups = [
                    g for g in groups if g["name"] == "global_std"
                ]  # means move by interpolation
            self.outer_optimizer = make_outer_optimizer(groups)
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
    def _needs_outer_optimizer(self) -> bool:
        cfg = self.cfg
        if cfg.method == "abmll":
            return True
        return cfg.method == "reptile" and cfg.outer_update == "optimizer"

    def _new_inner_optimizer(self) -> Optimizer:
        return self._make_inner(
            adapter_param_groups(
                self.model, self.scope, self.cfg.inner_lr_mean, self.cfg.inner_lr_std
            )
        )

    @property
    def train_mode(self) -> str:
        if self.cfg.method == "abmll":
            return "local_sample"
        return "local_mean" if self.cfg.meta_learned else "global_mean"

    # ------------------------------------------------------------------ one task

    def begin_task(self) -> None:
        """local <- global (ABMLL/Reptile with ``local_init: global``) and a fresh inner optimizer."""
        if self.cfg.meta_learned and self.cfg.local_init == "global":
            reset_local_from_global(self.model)
        if self.cfg.reset_inner_optimizer:
            self.inner_optimizer = self._new_inner_optimizer()

    def _nll(self, batch: dict) -> torch.Tensor:
        samples = self.cfg.train_samples if self.cfg.method == "abmll" else 1
        nll = sum(answer_nll(self.model, batch, self.loss_fn) for _ in range(samples)) / samples
        return nll

    def _clamp_std_grads(self, scope: str | None) -> None:
        if self.cfg.std_grad_clamp is None:
            return
        c = self.cfg.std_grad_clamp
        for p in adapter_params_by_group(self.model, scope, "std").values():
            if p.grad is not None:
                p.grad.clamp_(-c, c)

    def inner_step(self, batches: list[dict]) -> dict[str, float]:
        """One optimizer step of the inner loop on ``batches`` (gradient accumulation)."""
        cfg = self.cfg
        set_trainable_scope(self.model, self.scope)
        set_adapter_mode(self.model, self.train_mode)
        metrics = {"nll": 0.0}
        n = len(batches)
        for batch in batches:
            nll = self._nll(batch)
            loss = nll
            if cfg.method == "abmll":
                kl_term = beta_kl(self.model, cfg.elbo)
                loss = loss + kl_term
                metrics["beta_kl"] = float(kl_term.detach())
            (loss / n).backward()
            metrics["nll"] += float(nll.detach()) / n
        _check_finite_grads(self.model, "inner step")
        self._clamp_std_grads(self.scope)
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def _interpolate(self, eps_mean: float, eps_std: float, kinds: tuple[str, ...]) -> None:
        chosen = [
            (theta, phi, kind)
            for (theta, phi), kind in zip(self.pairs, self.pair_kinds, strict=True)
            if kind in kinds
        ]
        deltas = [phi - theta for theta, phi, _ in chosen]
        if self.reduce_mean is not None:
            self.reduce_mean(deltas)  # the mean delta over the ranks' tasks
        for (theta, _, kind), delta in zip(chosen, deltas, strict=True):
            theta.add_(delta, alpha=eps_mean if kind == "mean" else eps_std)

    def _reduce_global_grads(self) -> None:
        if self.reduce_mean is not None:
            self.reduce_mean([theta.grad for theta, _ in self.pairs if theta.grad is not None])

    def outer_step(self, query: list[dict]) -> dict[str, float]:
        """The method's outer (global) update; ``query`` is used by ``first_order`` only."""
        cfg, metrics = self.cfg, {}
        if not cfg.meta_learned:
            return metrics
        if cfg.method == "reptile":
            if cfg.outer_update == "interpolate":
                self._interpolate(cfg.outer_step_mean, cfg.outer_step_std, ("mean",))
            else:  # an optimizer step on the pseudo-gradient theta - phi
                for theta, phi in self.pairs:
                    theta.grad = (theta - phi).detach()
                self._reduce_global_grads()
                self.outer_optimizer.step()
                self.outer_optimizer.zero_grad(set_to_none=True)
            return metrics
        # ABMLL
        if cfg.outer_grad == "reptile":
            self._interpolate(cfg.outer_step_mean, cfg.outer_step_std, ("mean", "std"))
            set_trainable_scope(self.model, "global")
            for p in adapter_params_by_group(self.model, "global", "mean").values():
                p.requires_grad_(False)  # means moved by interpolation; this step is for sigma
        else:
            set_trainable_scope(self.model, "global")
        if cfg.outer_grad == "first_order":
            set_trainable_scope(self.model, "local")
            set_adapter_mode(self.model, "local_sample")
            locals_ = [phi for _, phi in self.pairs]
            n = len(query)
            query_nll = 0.0
            for batch in query:
                nll = self._nll(batch) / n
                grads = torch.autograd.grad(nll, locals_)
                for (theta, _), g in zip(self.pairs, grads, strict=True):
                    theta.grad = g if theta.grad is None else theta.grad + g
                query_nll += float(nll.detach())
            metrics["query_nll"] = query_nll
            set_trainable_scope(self.model, "global")
        reg_kl = beta_kl(self.model, cfg.elbo)
        reg_prior = gamma_prior(self.model, cfg.elbo)
        (reg_kl + reg_prior).backward()
        metrics["outer_beta_kl"], metrics["gamma_prior"] = (
            float(reg_kl.detach()),
            float(reg_prior.detach()),
        )
        self._reduce_global_grads()
        _check_finite_grads(self.model, "outer step")
        self._clamp_std_grads("global")
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        set_trainable_scope(self.model, self.scope)
        return metrics

    def train_task(self, visit: TaskVisit) -> dict[str, float]:
        """begin_task, K inner steps, the outer step; returns the visit's metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        self.begin_task()
        g = cfg.gradient_accumulation_steps
        n_inner = len(visit.batches) // g - int(cfg.uses_query_batch)
        if len(visit.batches) != cfg.batches_per_task:
            raise ValueError(
                f"a visit must bring {cfg.batches_per_task} batches, got {len(visit.batches)}"
            )
        inner = [self.inner_step(visit.batches[i * g : (i + 1) * g]) for i in range(n_inner)]
        metrics = {
            "nll": sum(m["nll"] for m in inner) / len(inner),
            "nll_first": inner[0]["nll"],
            "nll_last": inner[-1]["nll"],
        }
        if "beta_kl" in inner[-1]:
            metrics["beta_kl"] = inner[-1]["beta_kl"]
        metrics.update(self.outer_step(visit.batches[n_inner * g :]))
        tokens = sum(b["tokens"].numel() for b in visit.batches)  # processed, padding included
        metrics["seconds"] = time.perf_counter() - start
        metrics["tokens_per_second"] = tokens / metrics["seconds"]
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "inner_optimizer": None
            if self.cfg.reset_inner_optimizer
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


def _check_finite_grads(model: nn.Module, where: str) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise FloatingPointError(
                f"non-finite gradient of {name} in the {where}; NaNs are never zeroed silently. "
                "Lower the learning rates, set std_grad_clamp, or use std_param: softabs."
            )
