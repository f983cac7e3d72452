"""ABMLL: Amortized Bayesian Meta-Learning for LoRA (Zhang, Snell & Griffiths,
arXiv 2508.14285).

Four LoRA pairs per adapted layer (:class:`abmll_tune.modules.VariationalLoRALinear`):
a global Gaussian p(phi | theta) = N(W0 + mu_theta, sigma_theta^2) and a task Gaussian
q(phi | D_i) = N(W0 + mu_phi, sigma_phi^2). Per task visit:

1. ``begin_task``: phi <- theta (mean and std pairs);
2. K inner steps on the tempered ELBO's local part (Eq. 2)::

       L_inner = NLL(batch | phi ~ q) + beta * KL(q(phi | D_i) || p(phi | theta)),

   the NLL averaged over ``train_samples`` posterior samples, only phi trained;
3. the outer step (Algorithm 1's body is missing from the paper; ``docs/method.md``
   gives the three readings), each ending in one outer optimizer step on the global
   pairs with ``beta * KL + gamma * (-log p(theta))`` among its gradients:

   * ``reptile`` (default): theta moves by eps (phi - theta), mean and std pairs with
     their own eps, then the optimizer step on the regularizers for the std pairs only;
   * ``first_order``: on one more (query) batch, theta gets the gradient of the query
     NLL with respect to phi (first-order, d phi / d theta = I) plus the exact
     regularizer gradients;
   * ``kl_only``: the literal reading, the regularizer gradients alone;
   * ``marginal_likelihood`` (not the paper's): empirical Bayes. theta follows the
     gradient of the Monte Carlo log marginal likelihood of the query batch under S
     draws of the global Gaussian, log (1/S) sum_s p(query | W_s), W_s ~ p(phi | theta)
     (:func:`marginal_likelihood_backward`), plus gamma * (-log p(theta)): a fixed point
     at the type-II maximum likelihood prior, which the other three lack
     (``docs/method.md`` "Fitting the prior").

The KL and prior themselves are :mod:`abmll_tune.modules.gaussian` (low-rank, row
chunked, closed-form gradients); :mod:`abmll_tune.objectives` weighs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from abmll_tune.data.loader import merge_batches
from abmll_tune.methods.base import TaskAdaptiveMethod
from abmll_tune.modules import (
    AdapterMode,
    adapter_mode,
    adapter_param_groups,
    adapter_params_by_group,
    adapter_sampling,
    kl_local_global,
    reset_local_from_global,
    set_adapter_mode,
    set_trainable_scope,
    sigma_summary,
    variational_lora_layers,
    zero_fixed_std_grads,
)
from abmll_tune.modules.gaussian import draw_seed, std_variance
from abmll_tune.objectives import ELBOWeights, answer_nll, beta_kl, gamma_prior
from abmll_tune.settings import setting

# A draw whose importance weight is below this is not replayed with a backward pass: the
# weights sum to 1, so at most prior_samples x this of the gradient's mass is left out.
MIN_REPLAY_WEIGHT = 1e-4


def marginal_likelihood_backward(
    model: torch.nn.Module,
    batches: list[dict],
    sample_nll: Callable[[torch.nn.Module, dict], torch.Tensor],
    samples: int,
) -> dict[str, float]:
    """Backpropagate -(1/N) log p_hat(D | theta) into the global pairs, where

        p_hat(D | theta) = (1/S) sum_s p(D | W_s),   W_s = W0 + mu_theta + sigma_theta o E_s,

    D is ``batches`` (N examples of one task), and each draw W_s is one weight for all of
    them (weight-space sampling): the task's marginal likelihood under the global
    Gaussian p(phi | theta), the quantity empirical Bayes maximizes (PACOH's route; the
    paper's Eq. 2 is a bound on it). Its gradient is, exactly (Fisher's identity for a
    Monte Carlo average),

        grad log p_hat = sum_s w_s grad log p(D | W_s),   w_s = softmax_s log p(D | W_s),

    which two passes compute in memory independent of S: the S log-likelihoods without
    gradients, each draw's seed recorded, then each draw replayed from its seed with a
    backward weighted by w_s (draws with w_s < ``MIN_REPLAY_WEIGHT`` are skipped).

    ``sample_nll(model, batch)`` is the mean NLL of a batch under one forward (one draw);
    a batch's example count is its ``tokens``' first dimension. The model is put in
    ``global_sample`` mode with weight-space sampling for the duration. Returns the
    estimate per example (``log_marginal_likelihood``) and the effective sample size of
    the weights (``prior_ess``, 1/sum w_s^2, from 1 to S: near 1 means S is too small for
    the batch's information and the estimate is biased toward the best draw).
    """
    counts = [int(batch["tokens"].shape[0]) for batch in batches]
    total = sum(counts)
    seeds = [draw_seed() for _ in range(samples)]  # from torch's RNG: runs reproduce

    def replay(seed: int):
        # the layers draw their noise seeds from torch's CPU RNG: reseeding it replays a
        # draw (torch.manual_seed would also queue a CUDA reseed, with a stack trace, per call)
        torch.default_generator.manual_seed(seed)

    log_lik = torch.zeros(samples, dtype=torch.float64)
    with (
        adapter_mode(model, AdapterMode.GLOBAL_SAMPLE),
        adapter_sampling(model, "weight"),
        torch.random.fork_rng(devices=[]),
    ):
        with torch.no_grad():
            for s, seed in enumerate(seeds):
                replay(seed)
                log_lik[s] = -sum(
                    float(sample_nll(model, batch)) * n
                    for batch, n in zip(batches, counts, strict=True)
                )
        weights = torch.softmax(log_lik, dim=0)
        for s, seed in enumerate(seeds):
            if weights[s] < MIN_REPLAY_WEIGHT:
                continue
            replay(seed)
            for batch, n in zip(batches, counts, strict=True):
                (sample_nll(model, batch) * (float(weights[s]) * n / total)).backward()
    log_ml = torch.logsumexp(log_lik, dim=0) - math.log(samples)
    return {
        "log_marginal_likelihood": float(log_ml) / total,
        "prior_ess": float(1.0 / weights.square().sum()),
    }


class PriorNaturalGradient(torch.optim.Optimizer):
    """Adaptation steps on the local mean pairs preconditioned by the learned prior.

    Under the ELBO at weight ``beta``, the KL's mean part is the quadratic
    ``beta * sum_ij (W_ij - W_theta,ij)^2 / (2 sigma_theta,ij^2)`` in ``W = s B A``. For a
    factor with the other held fixed it is exactly quadratic, with Hessian blocks

        F_B[i] = beta s^2 A diag(1 / sigma_theta[i, :]^2) A^T      (r x r, one per row i)
        F_A[j] = beta s^2 B^T diag(1 / sigma_theta[:, j]^2) B      (r x r, one per column j)

    and each step is ``factor -= lr * (F + damping) \\ gradient``: a Newton step on the
    KL, so the data's gradient moves each weight by about sigma_theta^2 / beta times it (at
    beta = 1 / n the posterior's scale), whatever sigma_theta's size. AdamW's first step
    moves every coordinate by its learning rate instead, which overshoots a tight prior
    by orders of magnitude (``docs/method.md``, "The planted benchmark"). Both factors
    step at once, so ``lr`` 0.5 (the default) halves the bilinear double count. Groups
    named ``*_mean`` take this step (their ``beta`` entry, set by evaluation, weighs the
    KL); the other groups (the std pairs) take AdamW steps at their own rates.
    """

    def __init__(self, groups: list[dict], model: torch.nn.Module, damping: float = 1e-4):
        super().__init__(groups, {"lr": 0.5, "beta": 1.0})
        self.damping = damping
        self._layers = {}  # id(local mean param) -> (layer, "a" | "b")
        for layer in variational_lora_layers(model).values():
            if not layer.variational:
                raise ValueError("prior_natural adaptation needs a Gaussian prior (ABMLL)")
            a, b = layer.pair("local", "mean")
            self._layers[id(a)], self._layers[id(b)] = (layer, "a"), (layer, "b")
        other = [g for g in self.param_groups if not str(g.get("name", "")).endswith("_mean")]
        self._adamw = (
            torch.optim.AdamW([dict(g) for g in other], weight_decay=0.0) if other else None
        )

    @staticmethod
    def fisher_blocks(layer, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_B, F_A): ``(out, r, r)`` and ``(in, r, r)``, float64, at the local means."""
        a, b = (w.detach().double() for w in layer.pair("local", "mean"))
        a_sd, b_sd = (w.detach().double() for w in layer.pair("global", "std"))
        precision = 1.0 / std_variance(
            layer.scale * (b_sd @ a_sd), layer.sigma_floor, layer.std_param
        )
        r = a.shape[0]
        weight = beta * layer.scale**2
        f_b = precision @ (a[:, None, :] * a[None, :, :]).reshape(r * r, -1).T
        f_a = precision.T @ (b[:, :, None] * b[:, None, :]).reshape(-1, r * r)
        return weight * f_b.reshape(-1, r, r), weight * f_a.reshape(-1, r, r)

    def _solve(self, blocks: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        r = blocks.shape[-1]
        trace = blocks.diagonal(dim1=-2, dim2=-1).sum(-1).mean() / r
        if not bool(trace > 0):  # the other factor is zero: the KL is flat here, a plain step
            return grads.double()
        eye = torch.eye(r, dtype=blocks.dtype, device=blocks.device)
        damped = blocks + self.damping * trace * eye
        return torch.linalg.solve(damped, grads.double()[..., None])[..., 0]

    @torch.no_grad()
    def step(self, closure=None):
        if self._adamw is not None:  # the std pairs, at the (possibly scaled) rates
            others = [g for g in self.param_groups if not str(g.get("name", "")).endswith("_mean")]
            for mine, theirs in zip(others, self._adamw.param_groups, strict=True):
                theirs["lr"] = mine["lr"]
            self._adamw.step()
        for group in self.param_groups:
            if not str(group.get("name", "")).endswith("_mean"):
                continue
            layers = {}
            for p in group["params"]:
                if p.grad is not None:
                    layer, which = self._layers[id(p)]
                    layers.setdefault(id(layer), (layer, {}))[1][which] = p
            for layer, params in layers.values():
                f_b, f_a = self.fisher_blocks(layer, group["beta"])
                if "b" in params:
                    b = params["b"]
                    b.sub_(group["lr"] * self._solve(f_b, b.grad).to(b.dtype))
                if "a" in params:
                    a = params["a"]
                    a.sub_(group["lr"] * self._solve(f_a, a.grad.T).T.to(a.dtype))

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        if self._adamw is not None:
            self._adamw.zero_grad(set_to_none)


def kl_pull(model: torch.nn.Module, nll: torch.Tensor, kl_term: torch.Tensor) -> dict[str, float]:
    """How much of an inner step's gradient on the local factors comes from beta * KL
    rather than the NLL (Eq. 2's two inner terms), per adapted layer and in total.

    The inner loop trains phi on NLL + beta KL(q || p); where the KL's gradient dominates,
    the task posterior follows the prior, not the data. Reported (``kl_pull/...``):

    * ``share``: ||g_KL|| / (||g_KL|| + ||g_NLL||) over the layer's local mean and std
      factors (0: the data alone, 1: the KL alone);
    * ``kl_dominated``: the fraction of those factor coordinates where |g_KL| > |g_NLL|,
      the coordinates that an Adam step, which normalises each coordinate, moves in the
      KL's direction;
    * ``grad_norm_kl``, ``grad_norm_nll`` (totals only).

    ``nll`` and ``kl_term`` must hold their graphs, which this consumes; neither is stepped.
    """
    layers = variational_lora_layers(model)
    local = adapter_params_by_group(model, "local")
    names = [n for n, p in local.items() if p.requires_grad]
    params = [local[n] for n in names]
    # two graphs that share only the leaves: neither needs retaining (a compiled model's
    # backward, with donated buffers, refuses retain_graph)
    g_nll = torch.autograd.grad(nll, params, allow_unused=True)
    g_kl = torch.autograd.grad(kl_term, params, allow_unused=True)
    per_layer: dict[str, list[float]] = {prefix: [0.0, 0.0, 0.0, 0.0] for prefix in layers}
    for name, p, gn, gk in zip(names, params, g_nll, g_kl, strict=True):
        gn = torch.zeros_like(p) if gn is None else gn.double()
        gk = torch.zeros_like(p) if gk is None else gk.double()
        row = per_layer[name.rsplit(".", 1)[0].rsplit(".", 1)[0]]  # ...q_proj.lora_x.weight
        row[0] += float(gk.square().sum())
        row[1] += float(gn.square().sum())
        row[2] += float((gk.abs() > gn.abs()).sum())
        row[3] += p.numel()

    def share(kl2: float, nll2: float) -> float:
        kl, nl = kl2**0.5, nll2**0.5
        return kl / (kl + nl) if kl + nl > 0 else 0.0

    totals = [sum(r[i] for r in per_layer.values()) for i in range(4)]
    out = {
        "kl_pull/share": share(totals[0], totals[1]),
        "kl_pull/kl_dominated": totals[2] / max(totals[3], 1),
        "kl_pull/grad_norm_kl": totals[0] ** 0.5,
        "kl_pull/grad_norm_nll": totals[1] ** 0.5,
    }
    for prefix, (kl2, nll2, dominated, count) in per_layer.items():
        out[f"kl_pull/share/{prefix}"] = share(kl2, nll2)
        out[f"kl_pull/kl_dominated/{prefix}"] = dominated / max(count, 1)
    return out


def kl_pull_after_one_step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    beta: float,
    inner_lr_mean: float,
    inner_lr_std: float,
) -> dict[str, float]:
    """The KL's pull (:func:`kl_pull`) at the second inner step of a task.

    At a task's first step phi = theta and beta KL has no gradient, so the pull a config
    starts training with shows one step later: phi = theta, one AdamW step on NLL + beta KL
    at the given inner rates, then both terms' gradient shares. The task is ``tokens``
    answered by a random token at the last position (the answer NLL of Eq. 2's inner term);
    the model's local adapters are reset to the global ones before and after.
    """
    reset_local_from_global(model)
    set_trainable_scope(model, "local")
    optimizer = torch.optim.AdamW(
        adapter_param_groups(model, "local", inner_lr_mean, inner_lr_std), weight_decay=0.0
    )
    labels = torch.full_like(tokens, -100)
    labels[:, -1] = torch.randint_like(tokens[:, -1], model.tok_embeddings.num_embeddings)
    positions = torch.full((tokens.shape[0],), tokens.shape[1] - 2, device=tokens.device)
    batch = {"tokens": tokens, "labels": labels, "answer_positions": positions}
    with adapter_mode(model, AdapterMode.LOCAL_SAMPLE):
        (answer_nll(model, batch) + beta * kl_local_global(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out = kl_pull(model, answer_nll(model, batch), beta * kl_local_global(model))
    reset_local_from_global(model)
    return out


@dataclass(frozen=True)
class ABMLL(TaskAdaptiveMethod):
    """Bayesian meta-learning of LoRA adapters through a tempered ELBO (Eq. 2)."""

    name: ClassVar[str] = "abmll"
    variational: ClassVar[bool] = True
    train_mode: ClassVar[AdapterMode] = AdapterMode.LOCAL_SAMPLE
    default_variant: ClassVar[str] = "s1"  # one posterior sample, the paper's S = 1

    inner_lr_std: float = setting(1e-4, doc="inner learning rate of the std pairs", minimum=0)
    outer_grad: str = setting(
        "reptile",
        doc="the outer step's reading (docs/method.md)",
        choices=("reptile", "first_order", "kl_only", "marginal_likelihood"),
    )
    prior_samples: int = setting(
        16,
        doc="S, draws of the global Gaussian per outer step of `marginal_likelihood`",
        minimum=1,
    )
    prior_data: str = setting(
        "query",
        doc="the examples `marginal_likelihood` scores: the `query` batch, or the whole "
        "`visit` (inner and query batches, one forward per draw; more information, fewer "
        "effective draws: watch prior_ess)",
        choices=("query", "visit"),
    )
    outer_step_mean: float = setting(0.1, doc="eps of the mean pairs' interpolation", minimum=0)
    outer_step_std: float = setting(0.1, doc="eps of the std pairs' interpolation", minimum=0)
    outer_lr_mean: float = setting(1e-4, doc="outer optimizer, mean pairs", minimum=0)
    outer_lr_std: float = setting(1e-4, doc="outer optimizer, std pairs", minimum=0)
    beta: float = setting(5e-10, doc="temperature of the local KL (v1: 5e-10)", minimum=0)
    gamma: float = setting(1e-6, doc="temperature of the global prior (v1: 1e-6)", minimum=0)
    prior_mu_var: str | float = setting(
        "pretrained",
        doc="variance v of N(mu_theta; 0, v): `pretrained` (the frozen W0's), "
        "`sigma_floor` (c, literal) or a number",
    )
    a0: float = setting(1.0, doc="Gamma hyperprior shape on 1 / sigma_theta^2", minimum=0)
    b0: float = setting(0.01, doc="Gamma hyperprior rate", minimum=0)
    std_grad_clamp: float | None = setting(
        None, doc="clamp the std pairs' gradients to [-c, c] (null: off)", minimum=0
    )
    train_samples: int = setting(
        1, doc="posterior samples averaged per training forward", minimum=1
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.prior_mu_var, str) and self.prior_mu_var not in (
            "pretrained",
            "sigma_floor",
        ):
            raise ValueError(
                f"prior_mu_var: {self.prior_mu_var!r} must be 'pretrained', 'sigma_floor' or a number"
            )

    @property
    def elbo(self) -> ELBOWeights:
        return ELBOWeights(
            beta=self.beta, gamma=self.gamma, prior_mu_var=self.prior_mu_var, a0=self.a0, b0=self.b0
        )

    @property
    def uses_query_batch(self) -> bool:
        return self.outer_grad in ("first_order", "marginal_likelihood")

    @property
    def needs_outer_optimizer(self) -> bool:
        return True

    def inner_lrs(self):
        return self.inner_lr_mean, self.inner_lr_std

    def outer_param_groups(self, model):
        groups = adapter_param_groups(model, "global", self.outer_lr_mean, self.outer_lr_std)
        if self.outer_grad == "reptile":  # the means move by interpolation
            groups = [g for g in groups if g["name"] == "global_std"]
        return groups

    # ------------------------------------------------------------------ one visit

    def sample_nll(self, model, batch, loss_fn):
        """The answer NLL under one forward (one posterior or prior draw)."""
        return super().nll(model, batch, loss_fn)

    def nll(self, model, batch, loss_fn):
        n = self.train_samples
        return sum(self.sample_nll(model, batch, loss_fn) for _ in range(n)) / n

    def inner_loss(self, model, batch, loss_fn):
        nll = self.nll(model, batch, loss_fn)
        kl_term = beta_kl(model, self.elbo)
        return nll + kl_term, nll, {"beta_kl": float(kl_term.detach())}

    def inner_diagnostics(self, model, batch, loss_fn):
        nll = self.nll(model, batch, loss_fn)
        return kl_pull(model, nll, beta_kl(model, self.elbo))

    def clip_grads(self, model, scope):
        zero_fixed_std_grads(model)  # std_scale_row layers: sigma is a per-row level
        if self.std_grad_clamp is None:
            return
        c = self.std_grad_clamp
        for p in adapter_params_by_group(model, scope, "std").values():
            if p.grad is not None:
                p.grad.clamp_(-c, c)

    def outer_step(self, learner, query):
        model, metrics = learner.model, {}
        if self.outer_grad == "reptile":
            learner.interpolate(self.outer_step_mean, self.outer_step_std, ("mean", "std"))
            set_trainable_scope(model, "global")
            for p in adapter_params_by_group(model, "global", "mean").values():
                p.requires_grad_(False)  # means moved by interpolation; this step is for sigma
        else:
            set_trainable_scope(model, "global")
        if self.outer_grad == "marginal_likelihood":
            metrics.update(
                marginal_likelihood_backward(
                    model,
                    [merge_batches(learner.visit_batches)] if self.prior_data == "visit" else query,
                    lambda m, batch: self.sample_nll(m, batch, learner.loss_fn),
                    self.prior_samples,
                )
            )
        if self.outer_grad == "first_order":
            set_trainable_scope(model, "local")
            set_adapter_mode(model, AdapterMode.LOCAL_SAMPLE)
            locals_ = [phi for _, phi in learner.pairs]
            n, query_nll = len(query), 0.0
            for batch in query:
                nll = self.nll(model, batch, learner.loss_fn) / n
                grads = torch.autograd.grad(nll, locals_)
                for (theta, _), g in zip(learner.pairs, grads, strict=True):
                    theta.grad = g if theta.grad is None else theta.grad + g
                query_nll += float(nll.detach())
            metrics["query_nll"] = query_nll
            set_trainable_scope(model, "global")
        reg_prior = gamma_prior(model, self.elbo)
        if self.outer_grad == "marginal_likelihood":  # theta's fit is the evidence, not q
            reg_prior.backward()
        else:
            reg_kl = beta_kl(model, self.elbo)
            (reg_kl + reg_prior).backward()
            metrics["outer_beta_kl"] = float(reg_kl.detach())
        metrics["gamma_prior"] = float(reg_prior.detach())
        learner.outer_optimizer_step()
        set_trainable_scope(model, learner.scope)
        return metrics

    # ------------------------------------------------------------------ around the loop

    def eval_variants(self, samples):
        return [(f"s{s}", AdapterMode.LOCAL_SAMPLE, s) for s in samples] + [
            ("mean", AdapterMode.LOCAL_MEAN, 1)
        ]

    def log_metrics(self, model):
        sigma = sigma_summary(model, "global")  # how far sigma_theta moved from its floor c
        return {"sigma_theta/mean": sigma["mean"], "sigma_theta/max": sigma["max"]}
