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
from dataclasses import dataclass, replace

import torch
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer

from abmll_tune.data.loader import TaskData, heldout_batches, support_batches
from abmll_tune.meta import MetaConfig, MetaLearner
from abmll_tune.modules import adapter_mode, adapter_params_by_group, variational_lora_layers
from abmll_tune.objectives import answer_logits

PRUNING_KINDS = ("hidden", "weight")


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation adapts and scores (the ``evaluation`` section of a config)."""

    part: str = "test"  # or "validation"
    seeds: tuple[int, ...] = (100, 13, 21)
    adapt_steps: int = 5  # K_test: steps on K_test support batches (v3: 5; v1: 10)
    adapt_batch_size: int = 2
    adapt_lr_mean: float = 1e-3
    adapt_lr_std: float = 1e-4
    eval_batch_size: int = 16
    samples: tuple[int, ...] = (1,)  # ABMLL posterior sample counts to report
    pruning_levels: tuple[float, ...] = (0.0,)
    pruning: str = "hidden"
    max_tasks: int | None = None

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


# ------------------------------------------------------------------------- scoring


def option_probabilities(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, max_options) probabilities of each question's options (NaN where it has fewer):
    a softmax over the answer-letter logits at the answer position, restricted to the
    question's options."""
    at_answer = answer_logits(model, batch)  # (B, vocab), the output layer at B positions only
    option_ids = batch["option_ids"]
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


def variants(method: str, samples: Sequence[int]) -> list[tuple[str, str, int]]:
    """(name, adapter mode, samples) to score after adaptation."""
    if method == "abmll":
        return [(f"s{s}", "local_sample", s) for s in samples] + [("mean", "local_mean", 1)]
    if method == "reptile":
        return [("mean", "local_mean", 1)]
    return [("mean", "global_mean", 1)]  # lora, structured_lora, pretrained


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
    method: str,
    meta: MetaConfig | None = None,
    make_optimizer=None,
    progress=None,
) -> list[dict]:
    """Adapt to and score each task for each seed; returns prediction records
    (``task``, ``id``, ``seed``, ``variant``, ``prune``, ``probs``, ``gold``).

    ``method`` is the trained method (``pretrained`` for none); ``meta`` its loop
    settings (their learning rates are replaced by the adaptation rates).
    """
    learn_method = "lora" if method == "pretrained" else method
    base = meta or MetaConfig(method=learn_method)
    adapt_cfg = replace(
        base,
        method=learn_method,
        inner_steps=max(1, settings.adapt_steps),
        gradient_accumulation_steps=1,
        inner_lr_mean=settings.adapt_lr_mean,
        inner_lr_std=settings.adapt_lr_std,
        inner_optimizer_reset="per_task",
        local_init="global",
    )
    make_optimizer = make_optimizer or (lambda groups: torch.optim.AdamW(groups, weight_decay=0.0))
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
                if settings.adapt_steps:
                    learner = MetaLearner(model, adapt_cfg, make_optimizer, make_optimizer)
                    learner.begin_task()
                    model.train()
                    for batch in support_batches(
                        support,
                        batch_size=settings.adapt_batch_size,
                        n_batches=settings.adapt_steps,
                        seed=seed,
                        pad_id=data.pad_id,
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
                        for name, mode, n in variants(method, settings.samples):
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
    """EvalSettings from a config section (lists become tuples); unknown keys raise."""
    values = dict(section or {})
    values.update(overrides)
    for key in ("seeds", "samples", "pruning_levels"):
        if key in values and values[key] is not None:
            values[key] = tuple(values[key])
    known = set(EvalSettings.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown evaluation keys {unknown}; known: {sorted(known)}")
    return EvalSettings(**values)


def default_variant(method: str) -> str:
    """The variant a table reports by default: ABMLL with one sample (the paper's S = 1)."""
    return "s1" if method == "abmll" else "mean"


def chance_accuracy(data: TaskData, tasks: Sequence[str], part: str) -> float:
    """Macro mean over tasks of the mean 1 / n_options of their held-out questions."""
    values = []
    for task in tasks:
        examples = getattr(data.split, part)(task)
        values.append(sum(1.0 / len(e.options) for e in examples) / len(examples))
    return sum(values) / len(values)
