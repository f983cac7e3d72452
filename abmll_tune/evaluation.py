"""Few-shot evaluation on unseen tasks (``docs/method.md``, "Evaluation").

For each evaluation task and seed, start from the trained adapters (ABMLL: local <-
global; Reptile: a copy of theta; LoRA baselines: a copy of the adapter; Pretrained: a
zero adapter), take K_test gradient steps on K_test support batches of the task with
the method's own objective (:class:`abmll_tune.meta.MetaLearner`'s inner step) at the
test-adaptation learning rate, then score the task's held-out questions: the
probabilities of the answer letters at the answer position, softmax restricted to the
question's options. ABMLL is scored with S posterior samples averaged in probability
space (one variant per S, ``s1``, ``s10``, ...) and with the posterior mean
(``mean``); the other methods with their adapted weights (``mean``).

Every task starts from the same saved adapters and from an RNG seeded by (seed, task),
so results do not depend on the order tasks are evaluated in. Pruning (robustness)
zeroes a fraction of each decoder layer's output neurons per token, smallest |h| first
(``hidden``), or of each adapted layer's frozen weights by magnitude (``weight``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer

from abmll_tune.data.loader import TaskData, heldout_batches, support_batches
from abmll_tune.meta import MetaLearner
from abmll_tune.methods import Method
from abmll_tune.modules import adapter_mode, adapter_params_by_group, variational_lora_layers
from abmll_tune.objectives import answer_logits
from abmll_tune.settings import check_settings, setting

PRUNING_KINDS = ("hidden", "weight")
ADAPT_OPTIMIZERS = ("adamw", "sgd", "prior_natural")


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation adapts and scores (the ``evaluation`` / ``validation`` section)."""

    part: str = setting(
        "test",
        doc="the tasks' part to score (validation sections always score `validation`)",
        choices=("validation", "test"),
    )
    seeds: tuple[int, ...] = setting((100, 13, 21), doc="support-set seeds (results: mean +- SE)")
    adapt_steps: int = setting(
        5, doc="K_test: adaptation steps on K_test support batches", minimum=0
    )
    adapt_batch_size: int = setting(2, doc="support questions per adaptation step", minimum=1)
    adapt_lr_mean: float = setting(1e-3, doc="adaptation learning rate, mean pairs", minimum=0)
    adapt_lr_std: float = setting(1e-4, doc="adaptation learning rate, std pairs", minimum=0)
    adapt_repeat_support: bool = setting(
        False,
        doc="take more adaptation batches than the support fills, in passes over it (each "
        "pass freshly shuffled); false: adapt_steps x adapt_batch_size must fit the support",
    )
    adapt_optimizer: str = setting(
        "adamw",
        doc="adaptation optimizer: `adamw` (the paper's), `sgd` (moves each weight by its "
        "gradient, where AdamW's first step moves every weight by the learning rate) or "
        "`prior_natural` (ABMLL: Newton steps on the KL for the mean pairs, "
        "`adapt_lr_mean` the step's fraction, AdamW for the stds; needs `adapt_beta`)",
        choices=ADAPT_OPTIMIZERS,
    )
    adapt_beta: float | str | None = setting(
        None,
        doc="beta of the local KL during adaptation: null (the trained method's), a number, "
        "or `per_example` (1 / support size: the ELBO at unit weight, the Bayesian posterior "
        "under the learned prior); methods without a KL ignore it",
    )
    eval_batch_size: int = setting(16, doc="held-out questions per scoring batch", minimum=1)
    samples: tuple[int, ...] = setting((1,), doc="ABMLL posterior sample counts to report")
    pruning_levels: tuple[float, ...] = setting((0.0,), doc="fractions pruned (robustness)")
    pruning: str = setting(
        "hidden", doc="what pruning zeroes: hidden units or frozen weights", choices=PRUNING_KINDS
    )
    max_tasks: int | None = setting(None, doc="evaluate the first N tasks only", minimum=1)

    def __post_init__(self):
        if self.part not in ("validation", "test"):
            raise ValueError(f"part must be 'validation' or 'test', got {self.part!r}")
        if self.pruning not in PRUNING_KINDS:
            raise ValueError(f"pruning must be one of {PRUNING_KINDS}, got {self.pruning!r}")
        if any(not 0.0 <= p < 1.0 for p in self.pruning_levels):
            raise ValueError(
                f"pruning levels must be fractions in [0, 1), got {self.pruning_levels}"
            )
        if self.adapt_steps < 0 or any(s < 1 for s in self.samples):
            raise ValueError("adapt_steps must be >= 0 and samples >= 1")
        if self.adapt_optimizer not in ADAPT_OPTIMIZERS:
            raise ValueError(
                f"adapt_optimizer must be one of {ADAPT_OPTIMIZERS}, got {self.adapt_optimizer!r}"
            )
        if self.adapt_optimizer == "prior_natural" and self.adapt_beta is None:
            raise ValueError(
                "adapt_optimizer prior_natural needs adapt_beta (per_example or a number): "
                "its steps scale as 1 / beta, and a training beta of 1e-6 makes them huge"
            )
        beta = self.adapt_beta
        if not (beta is None or beta == "per_example" or (
            isinstance(beta, int | float) and not isinstance(beta, bool) and beta >= 0
        )):  # fmt: skip
            raise ValueError(
                f"adapt_beta must be null, a number >= 0 or 'per_example', got {beta!r}"
            )

    def adaptation_beta(self, support_size: int) -> float | None:
        """The KL weight adaptation uses for a support set of ``support_size`` questions."""
        if self.adapt_beta == "per_example":
            return 1.0 / max(support_size, 1)
        return None if self.adapt_beta is None else float(self.adapt_beta)

    def make_optimizer(self, model: nn.Module | None = None, beta: float | None = None):
        """``f(param_groups) -> Optimizer`` of ``adapt_optimizer`` (learning rates per
        group); ``prior_natural`` also needs the model and the task's KL weight."""
        if self.adapt_optimizer == "sgd":
            return lambda groups: torch.optim.SGD(groups, lr=0.0)
        if self.adapt_optimizer == "prior_natural":
            from abmll_tune.methods.abmll import PriorNaturalGradient

            if model is None or beta is None:
                raise ValueError("prior_natural adaptation needs the model and beta")
            return lambda groups: PriorNaturalGradient([dict(g, beta=beta) for g in groups], model)
        return lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)


# ------------------------------------------------------------------------- scoring


def option_probabilities(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, max_options) probabilities of each question's options (NaN where it has fewer):
    a softmax over the answer-letter logits at the answer position, restricted to the
    question's options."""
    at_answer = answer_logits(model, batch)  # (B, vocab), the output layer at B positions only
    option_ids = batch["option_ids"].to(at_answer.device)
    valid = option_ids >= 0
    picked = at_answer.gather(1, option_ids.clamp_min(0))
    picked = picked.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(picked, dim=-1)
    return probs.masked_fill(~valid, float("nan"))


@torch.no_grad()
def score(
    model: nn.Module, batches: Sequence[dict], mode: str, n_samples: int = 1
) -> list[list[float]]:
    """Option probabilities of every question in ``batches`` under adapter ``mode``,
    averaged over ``n_samples`` forwards (posterior samples in probability space)."""
    out = []
    with adapter_mode(model, mode):
        for batch in batches:
            probs = sum(option_probabilities(model, batch) for _ in range(n_samples)) / n_samples
            for row, n in zip(probs, (batch["option_ids"] >= 0).sum(1), strict=True):
                out.append(row[: int(n)].tolist())
    return out


# ------------------------------------------------------------------------- pruning


@contextmanager
def pruned(model: nn.Module, fraction: float, kind: str = "hidden") -> Iterator[None]:
    """Prune ``fraction`` of neurons while inside (a no-op at 0).

    ``hidden``: after every decoder layer, zero the ``round(fraction * dim)`` entries of
    each token's residual-stream vector with the smallest |h|. ``weight``: zero the
    smallest-|w| ``fraction`` of each adapted layer's frozen weight (restored after).
    """
    if fraction <= 0:
        yield
        return
    if kind == "hidden":
        handles = [
            m.register_forward_hook(_prune_hook(fraction))
            for m in model.modules()
            if isinstance(m, TransformerSelfAttentionLayer)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        return
    saved = []
    with torch.no_grad():
        for layer in variational_lora_layers(model).values():
            w = layer.weight
            saved.append((w, w.detach().clone()))
            k = round(fraction * w.numel())
            if k:
                idx = w.detach().abs().flatten().argsort()[:k]
                w.view(-1)[idx] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def _prune_hook(fraction: float):
    def hook(module, inputs, output):
        k = round(fraction * output.shape[-1])
        if k == 0:
            return output
        idx = output.abs().topk(k, dim=-1, largest=False).indices
        return output.scatter(-1, idx, 0.0)

    return hook


# ------------------------------------------------------------------------- the protocol


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:7], "big")


def evaluate_tasks(
    model: nn.Module,
    data: TaskData,
    tasks: Sequence[str],
    settings: EvalSettings,
    *,
    method: Method,
    make_optimizer=None,
    progress=None,
) -> list[dict]:
    """Adapt to and score each task for each seed; returns prediction records
    (``task``, ``id``, ``seed``, ``variant``, ``prune``, ``probs``, ``gold``).

    ``method`` is the trained method (:class:`abmll_tune.methods.Pretrained` for none);
    it adapts with its own objective at the adaptation learning rates
    (:meth:`~abmll_tune.methods.Method.for_adaptation`).
    """
    per_task_optimizer = make_optimizer is None and settings.adapt_optimizer == "prior_natural"
    if per_task_optimizer and not method.variational:
        raise ValueError(
            f"adapt_optimizer prior_natural preconditions by a learned Gaussian prior; method "
            f"{method.name!r} has none: use adamw or sgd"
        )
    if make_optimizer is None and not per_task_optimizer:
        make_optimizer = settings.make_optimizer()
    snapshot = {n: p.detach().clone() for n, p in adapter_params_by_group(model).items()}
    params = adapter_params_by_group(model)
    records: list[dict] = []
    was_training = model.training
    try:
        for task in tasks:
            for seed in settings.seeds:
                with torch.no_grad():  # a fresh copy of the trained adapters for every task
                    for name, p in params.items():
                        p.copy_(snapshot[name])
                torch.manual_seed(_task_seed(seed, task))
                support, heldout = data.eval_task(task, seed, settings.part)
                adapt_method = method.for_adaptation(
                    settings.adapt_lr_mean,
                    settings.adapt_lr_std,
                    beta=settings.adaptation_beta(len(support)),
                )
                if not settings.adapt_steps:
                    # scored as adapted from zero examples: the task's local pairs start
                    # from the global ones, as adaptation would (not the last task's)
                    adapt_method.begin_task(model)
                else:
                    make = (
                        settings.make_optimizer(model, beta=getattr(adapt_method, "beta", None))
                        if per_task_optimizer
                        else make_optimizer
                    )
                    learner = MetaLearner(
                        model,
                        adapt_method,
                        make,
                        make,
                        inner_steps=max(1, settings.adapt_steps),
                    )
                    learner.begin_task()
                    model.train()
                    for batch in support_batches(
                        support,
                        batch_size=settings.adapt_batch_size,
                        n_batches=settings.adapt_steps,
                        seed=seed,
                        pad_id=data.pad_id,
                        repeat=settings.adapt_repeat_support,
                    ):
                        learner.inner_step([batch])
                model.eval()
                batches = heldout_batches(
                    heldout, batch_size=settings.eval_batch_size, pad_id=data.pad_id
                )
                golds = [g for b in batches for g in b["gold"].tolist()]
                ids = [i for b in batches for i in b["id"]]
                for level in settings.pruning_levels:
                    with pruned(model, level, settings.pruning) if level else nullcontext():
                        for name, mode, n in method.eval_variants(settings.samples):
                            for example_id, probs, gold in zip(
                                ids, score(model, batches, mode, n), golds, strict=True
                            ):
                                records.append(
                                    {
                                        "task": task,
                                        "id": example_id,
                                        "seed": seed,
                                        "variant": name,
                                        "prune": level,
                                        "probs": probs,
                                        "gold": gold,
                                    }
                                )
                if progress is not None:
                    progress.update(1)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(snapshot[name])
        model.train(was_training)
    return records


def eval_settings(section: dict | None, **overrides) -> EvalSettings:
    """EvalSettings from a config section (lists become tuples); problems raise ValueError."""
    values = dict(section or {})
    values.update(overrides)
    settings, problems = check_settings(EvalSettings, values, "evaluation")
    if problems:
        raise ValueError("; ".join(problems))
    return settings


def chance_accuracy(data: TaskData, tasks: Sequence[str], part: str) -> float:
    """Macro mean over tasks of the mean 1 / n_options of their held-out questions."""
    values = []
    for task in tasks:
        examples = getattr(data.split, part)(task)
        values.append(sum(1.0 / len(e.options) for e in examples) / len(examples))
    return sum(values) / len(values)
