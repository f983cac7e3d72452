"""The KL pull metric (abmll_tune.methods.abmll.kl_pull): how much of an inner step's
gradient on the local factors comes from beta KL rather than the NLL, checked against a
dense float64 computation with torch.distributions; and the recipes' diagnostics leave
training unchanged."""

import torch
from torch import nn

from abmll_tune.methods import ABMLL
from abmll_tune.methods.abmll import kl_pull
from abmll_tune.modules import VariationalLoRALinear, adapter_mode, set_trainable_scope
from abmll_tune.modules.gaussian import std_dense


def _layer_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = VariationalLoRALinear(12, 10, 4, 8.0, std_b_init_std=0.3, sigma_floor=1e-2)
    layer.initialize_parameters()
    with torch.no_grad():  # local pairs off the global ones, as after a few inner steps
        for kind in ("mean", "std"):
            for glob, loc in zip(
                layer.pair("global", kind), layer.pair("local", kind), strict=True
            ):
                loc.copy_(glob + 0.2 * torch.randn_like(glob))
    return nn.ModuleDict({"proj": layer})


def _dense_reference(layer, x, beta):
    """||g_KL||, ||g_NLL|| and the |g_KL| > |g_NLL| count, from dense float64 tensors."""
    factors = {
        (scope, kind): [
            p.detach().double().clone().requires_grad_() for p in layer.pair(scope, kind)
        ]
        for scope in ("global", "local")
        for kind in ("mean", "std")
    }
    s, c = layer.scale, layer.sigma_floor

    def dense(scope, kind):
        a, b = factors[(scope, kind)]
        m = s * b @ a
        return m if kind == "mean" else std_dense(m, c, layer.std_param)

    q = torch.distributions.Normal(
        layer.weight.double() + dense("local", "mean"), dense("local", "std")
    )
    p = torch.distributions.Normal(
        layer.weight.double() + dense("global", "mean"), dense("global", "std")
    )
    kl = beta * torch.distributions.kl_divergence(q, p).sum()
    w = layer.weight.double() + dense("local", "mean")  # the local-mean forward, dense
    nll = (x.double() @ w.T).square().mean()
    local = [t for kind in ("mean", "std") for t in factors[("local", kind)]]
    g_kl = torch.autograd.grad(kl, local)
    g_nll = torch.autograd.grad(nll, local, allow_unused=True)
    g_nll = [torch.zeros_like(t) if g is None else g for t, g in zip(local, g_nll, strict=True)]
    norm = lambda gs: float(sum(g.square().sum() for g in gs)) ** 0.5  # noqa: E731
    dominated = sum(int((gk.abs() > gn.abs()).sum()) for gk, gn in zip(g_kl, g_nll, strict=True))
    return norm(g_kl), norm(g_nll), dominated / sum(t.numel() for t in local)


def test_kl_pull_matches_a_dense_float64_computation():
    model = _layer_model()
    layer = model["proj"]
    x = torch.randn(6, 12)
    beta = 3e-4
    set_trainable_scope(model, "local")
    with adapter_mode(model, "local_mean"):  # deterministic NLL (no posterior noise)
        nll = model["proj"](x).square().mean()
    pull = kl_pull(model, nll, beta * layer.kl_local_global())
    kl_norm, nll_norm, dominated = _dense_reference(layer, x, beta)
    torch.testing.assert_close(pull["kl_pull/grad_norm_kl"], kl_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(pull["kl_pull/grad_norm_nll"], nll_norm, rtol=1e-5, atol=0)
    share = kl_norm / (kl_norm + nll_norm)
    assert 0.05 < share < 0.95  # both terms matter at this beta: the check can tell them apart
    torch.testing.assert_close(pull["kl_pull/share"], share, rtol=1e-5, atol=0)
    assert pull["kl_pull/share/proj"] == pull["kl_pull/share"]
    assert pull["kl_pull/kl_dominated"] == dominated
    # the std factors get no NLL gradient in the mean forward: those coordinates are the KL's
    assert pull["kl_pull/kl_dominated"] >= 0.5


def test_kl_pull_is_all_kl_when_the_data_says_nothing():
    model = _layer_model(1)
    set_trainable_scope(model, "local")
    with adapter_mode(model, "local_mean"):
        nll = 0.0 * model["proj"](torch.randn(2, 12)).sum()
    pull = kl_pull(model, nll, 1e-3 * model["proj"].kl_local_global())
    assert pull["kl_pull/share"] == 1.0 and pull["kl_pull/grad_norm_nll"] == 0.0


def test_abmll_diagnostics_are_the_pull_of_its_inner_loss():
    method = ABMLL(beta=1e-3)
    model = _layer_model(2)

    set_trainable_scope(model, "local")
    calls = []

    def nll(self, m, batch, loss_fn):
        calls.append(batch)
        with adapter_mode(m, "local_mean"):
            return m["proj"](batch["x"]).square().mean()

    original = ABMLL.nll
    ABMLL.nll = nll
    try:
        x = torch.randn(3, 12)
        out = method.inner_diagnostics(model, {"x": x}, None)
    finally:
        ABMLL.nll = original
    assert len(calls) == 1
    kl_norm, nll_norm, _ = _dense_reference(model["proj"], x, 1e-3)
    torch.testing.assert_close(
        out["kl_pull/share"], kl_norm / (kl_norm + nll_norm), rtol=1e-5, atol=0
    )


def test_diagnostics_are_logged_and_leave_training_unchanged(embedded_overrides, tmp_path):
    import helpers
    from safetensors.torch import load_file

    runs = {}
    for name, every in (("with", "1"), ("without", "null")):
        out = tmp_path / name
        code, _, err = helpers.tune_run(
            "abmll_meta_single_device",
            "configs/tiny_cpu_abmll.yaml",
            f"output_dir={out}",
            *embedded_overrides,
            "validation=null",
            "stop_after_visits=2",
            f"diagnostics_every_n_visits={every}",
        )
        assert code == 0, err[-2000:]
        runs[name] = out
    shares = helpers.logged(runs["with"], "kl_pull/share")
    assert len(shares) == 2 and all(0.0 < s < 1.0 for s in shares)
    assert helpers.logged(runs["without"], "kl_pull/share") == []
    assert helpers.logged(runs["with"], "nll") == helpers.logged(runs["without"], "nll")
    a, b = (load_file(str(r / "checkpoints/latest/adapters.safetensors")) for r in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
