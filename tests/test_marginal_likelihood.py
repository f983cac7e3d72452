"""ABMLL's ``outer_grad: marginal_likelihood`` (empirical Bayes) against references: the
exact gradient of the Monte Carlo log marginal likelihood, and a Gaussian toy whose
optimal prior is known in closed form (docs/method.md "Fitting the prior")."""

import math

import pytest
import torch

from abmll_tune.data.loader import TaskVisit
from abmll_tune.embedded.gaussian_toy import (
    D,
    Toy,
    ToyABMLL,
    sigma_after_training,
    toy_batch,
    toy_nll,
)
from abmll_tune.meta import MetaLearner
from abmll_tune.methods.abmll import marginal_likelihood_backward
from abmll_tune.modules import (
    AdapterMode,
    VariationalLoRALinear,
    adapter_mode,
    adapter_sampling,
    set_trainable_scope,
)
from abmll_tune.modules.gaussian import draw_seed


@pytest.mark.parametrize("skip_light_draws", [False, True])
def test_gradient_is_that_of_the_monte_carlo_log_marginal_likelihood(skip_light_draws, monkeypatch):
    """Two passes with importance weights = autograd through log mean_s p(D | W_s): exact
    when every draw is replayed, within S x MIN_REPLAY_WEIGHT when light ones are not."""
    from abmll_tune.methods import abmll

    if not skip_light_draws:
        monkeypatch.setattr(abmll, "MIN_REPLAY_WEIGHT", 0.0)
    tolerance = 6 * abmll.MIN_REPLAY_WEIGHT if skip_light_draws else 1e-5
    torch.manual_seed(3)
    model = Toy(sigma_floor=0.4)
    with torch.no_grad():  # a prior away from the LoRA init, every factor non-zero
        for p in model.layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    set_trainable_scope(model, "global")
    g = torch.Generator().manual_seed(0)
    batches = [toy_batch(torch.randn(D, D, generator=g), g) for _ in range(2)]
    samples = 6

    torch.manual_seed(11)
    metrics = marginal_likelihood_backward(model, batches, toy_nll, samples)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # the reference keeps every draw's graph and differentiates the estimate itself
    torch.manual_seed(11)
    seeds = [draw_seed() for _ in range(samples)]
    log_liks = []
    with adapter_mode(model, AdapterMode.GLOBAL_SAMPLE), adapter_sampling(model, "weight"):
        for seed in seeds:
            torch.manual_seed(seed)
            log_liks.append(-sum(toy_nll(model, b) * b["tokens"].shape[0] for b in batches))
    n = sum(b["tokens"].shape[0] for b in batches)
    estimate = (torch.logsumexp(torch.stack(log_liks), 0) - math.log(samples)) / n
    (-estimate).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert set(got) == set(want) and any(".lora_global_std_" in k for k in got)
    for name in want:
        error = float((got[name] - want[name]).norm() / want[name].norm())
        assert error <= tolerance, (name, error)
    assert metrics["log_marginal_likelihood"] == pytest.approx(float(estimate.detach()), rel=1e-6)
    assert 1.0 <= metrics["prior_ess"] <= samples
    assert all(layer.mode == AdapterMode.LOCAL_SAMPLE for layer in [model.layer])
    assert model.layer.sampling == "local"  # restored after the weight-space draws


# The closed-form optimum: each query entry is y = W0 + mu + (sigma* e + noise), so the
# marginal likelihood over tasks is maximized at mu = mu*, sigma = sigma* (the model is
# exactly right. The measured ratios: docs/results/outer_grad_toy.json
# (bench/bench_outer_grad_toy.py).
@pytest.mark.parametrize("spread", [0.5, 1.0])
def test_marginal_likelihood_reading_finds_the_true_prior_std(spread):
    ratio = sigma_after_training("marginal_likelihood", spread, visits=600)
    assert 0.8 <= ratio <= 1.2, ratio


@pytest.mark.parametrize("reading", ["reptile", "kl_only", "first_order"])
def test_the_papers_readings_miss_the_true_prior_std(reading):
    ratios = [sigma_after_training(reading, spread, visits=600) for spread in (0.5, 1.0)]
    assert not all(0.8 <= r <= 1.2 for r in ratios), ratios
    # and sigma_theta hardly grows when sigma* doubles (the empirical-Bayes fit doubles it)
    assert ratios[1] * 1.0 / (ratios[0] * 0.5) < 1.5, ratios


def test_std_scale_row_gives_the_std_pair_a_constant_row():
    layer = VariationalLoRALinear(6, 5, rank=3, alpha=3, std_param="exp", std_scale_row=True)
    a, _ = layer.pair("global", "std")
    assert torch.equal(a[0], torch.ones(6)) and not a[1:].any()
    assert torch.equal(layer.pair("local", "std")[0], a)  # local <- global
    plain = VariationalLoRALinear(6, 5, rank=3, alpha=3, std_param="exp")
    assert not torch.equal(plain.pair("global", "std")[0][0], torch.ones(6))


def test_std_scale_row_keeps_a_fixed_and_moves_one_level_per_row():
    torch.manual_seed(0)
    model = Toy()
    method = ToyABMLL(outer_grad="marginal_likelihood", gamma=0.0, prior_mu_var=1.0,
                      outer_lr_std=0.05, inner_lr_std=0.05, prior_samples=4)  # fmt: skip
    adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)  # noqa: E731
    learner = MetaLearner(model, method, adamw, adamw, inner_steps=2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    weight = 2 * torch.randn(D, D, generator=g)
    batches = [toy_batch(weight, g) for _ in range(learner.batches_per_task)]
    learner.train_task(TaskVisit(0, 0, "toy", batches))
    after = dict(model.named_parameters())
    for scope in ("global", "local"):
        a = f"layer.lora_{scope}_std_a.weight"
        b = f"layer.lora_{scope}_std_b.weight"
        assert torch.equal(after[a], before[a])  # A stays [1; 0]
        assert not torch.equal(after[b][:, 0], before[b][:, 0])  # the per-row levels moved
        assert not after[b][:, 1:].any()  # the other columns never get a gradient


def test_adapter_sampling_restores_and_refuses_unknown():
    model = Toy()
    with adapter_sampling(model, "weight"):
        assert model.layer.sampling == "weight"
    assert model.layer.sampling == "local"
    with pytest.raises(ValueError, match="sampling must be one of"):
        with adapter_sampling(model, "dense"):
            pass
