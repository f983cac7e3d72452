"""VariationalLoRALinear against torchtune's LoRALinear, Monte Carlo and its own contract."""

import pytest
import torch
from helpers import REPO
from torch import nn
from torchtune.modules.peft import (
    LoRALinear,
    disable_adapter,
    get_adapter_params,
    get_adapter_state_dict,
    set_trainable_params,
)

from abmll_tune.modules import (
    ADAPTER_MODES,
    VariationalLoRALinear,
    adapter_mode,
    adapter_param_groups,
    adapter_params_by_group,
    kl_local_global,
    neg_log_prior_global,
    reset_local_from_global,
    set_trainable_scope,
)
from abmll_tune.modules.gaussian import std_dense

F64 = torch.float64


def make_layer(d_in, d_out, rank=4, alpha=8.0, dtype=F64, **kw):
    layer = VariationalLoRALinear(d_in, d_out, rank, alpha, **kw).to(dtype)
    with torch.no_grad():  # non-zero B everywhere, so every pair matters
        for name, p in layer.named_parameters():
            if "lora" in name:
                p.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("shape", [(16, 16), (16, 8), (8, 24)])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_mean_path_equals_torchtune_lora(shape, use_bias, scope):
    d_in, d_out = shape
    layer = make_layer(d_in, d_out, use_bias=use_bias)
    lora = LoRALinear(d_in, d_out, rank=4, alpha=8.0, use_bias=use_bias).to(F64)
    with torch.no_grad():
        lora.weight.copy_(layer.weight)
        if use_bias:
            lora.bias.copy_(layer.bias)
        a, b = layer.pair(scope, "mean")
        lora.lora_a.weight.copy_(a)
        lora.lora_b.weight.copy_(b)
    x = torch.randn(3, 5, d_in, dtype=F64)
    layer.mode = f"{scope}_mean"
    torch.testing.assert_close(layer(x), lora(x), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["local_sample", "global_sample"])
def test_sampling_mean_makes_sample_modes_deterministic(mode):
    layer = make_layer(6, 5, sampling="mean")
    x = torch.randn(4, 6, dtype=F64)
    layer.mode = mode
    scope = mode.split("_")[0]
    with adapter_mode(torch.nn.Sequential(layer), f"{scope}_mean"):
        expected = layer(x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def analytic_moments(layer, x, scope):
    a_mu, b_mu = layer.pair(scope, "mean")
    a_sd, b_sd = layer.pair(scope, "std")
    mean = x @ (layer.weight + layer.scale * b_mu @ a_mu).T
    sigma = std_dense(layer.scale * b_sd @ a_sd, layer.sigma_floor, layer.std_param)
    var = (x * x) @ (sigma * sigma).T
    return mean, var


@pytest.mark.parametrize("std_param", ["softabs", "affine", "exp"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_local_reparameterization_moments_match_analytic_and_weight_sampling(std_param, scope):
    d_in, d_out, n = 6, 5, 20000
    layer = make_layer(d_in, d_out, std_param=std_param, sigma_floor=0.2)
    layer.mode = f"{scope}_sample"
    x = torch.randn(d_in, dtype=F64)
    mean, var = analytic_moments(layer, x, scope)
    with torch.no_grad():
        local = layer(x.expand(n, d_in))  # independent noise per token
        layer.sampling = "weight"  # one weight-space sample per forward
        weight = torch.stack([layer(x) for _ in range(4000)])
    for samples in (local, weight):
        m = samples.shape[0]
        se_mean = (var / m).sqrt()
        assert ((samples.mean(0) - mean).abs() < 5 * se_mean).all()
        # relative standard error of a Gaussian variance estimate is sqrt(2 / m)
        rel = (samples.var(0) / var - 1).abs()
        assert (rel < 5 * (2 / m) ** 0.5).all(), rel
    # and the two samplers agree with each other
    rel = (local.var(0) / weight.var(0) - 1).abs()
    assert (rel < 5 * (2 / 4000) ** 0.5 + 5 * (2 / n) ** 0.5).all()


def test_local_and_global_sample_use_their_own_std_pair():
    layer = make_layer(6, 5, sigma_floor=1e-6)
    with torch.no_grad():  # global std ~ floor: global samples are nearly deterministic
        layer.lora_global_std_b.weight.zero_()
    x = torch.randn(2000, 6, dtype=F64)
    spread = {}
    with torch.no_grad():
        for scope in ("global", "local"):
            layer.mode = f"{scope}_sample"
            mean, _ = analytic_moments(layer, x, scope)
            spread[scope] = (layer(x) - mean).abs().max()
    spread_global, spread_local = spread["global"], spread["local"]
    assert spread_global < 1e-4 < spread_local


def test_same_seed_same_samples_and_gradients():
    layer = make_layer(8, 6)
    x = torch.randn(3, 8, dtype=F64)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        layer.zero_grad()
        y = layer(x)
        (y**2).sum().backward()
        outs.append((y.detach(), layer.lora_local_std_b.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def test_init_follows_lora_and_local_starts_from_global():
    torch.manual_seed(3)
    layer = VariationalLoRALinear(32, 16, 4, 8.0)
    ref = LoRALinear(32, 16, rank=4, alpha=8.0)
    for scope in ("global", "local"):
        for kind in ("mean", "std"):
            a, b = layer.pair(scope, kind)
            assert torch.count_nonzero(b) == 0
            # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(d_in), as torchtune's lora_a
            bound = 1 / 32**0.5
            assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
            assert a.shape == ref.lora_a.weight.shape and b.shape == ref.lora_b.weight.shape
    for kind in ("mean", "std"):
        for g, loc in zip(layer.pair("global", kind), layer.pair("local", kind), strict=True):
            assert torch.equal(g, loc)
    # sigma starts at exactly c everywhere, for every parameterization
    for std_param in ("softabs", "affine", "exp"):
        fresh = VariationalLoRALinear(32, 16, 4, 8.0, std_param=std_param, sigma_floor=0.01)
        a, b = fresh.pair("global", "std")
        sigma = std_dense(fresh.scale * b @ a, 0.01, std_param)
        torch.testing.assert_close(sigma, torch.full_like(sigma, 0.01))


def test_softabs_zero_init_is_a_stationary_point_and_std_b_init_breaks_it():
    x = torch.randn(4, 12)
    grads = {}
    for init in (0.0, 1e-2):
        torch.manual_seed(0)
        layer = VariationalLoRALinear(12, 10, 4, 8.0, std_b_init_std=init, sigma_floor=0.1)
        for p in get_adapter_params(layer).values():
            p.requires_grad_(True)
        (layer(x) ** 2).sum().backward()
        kl = layer.kl_local_global() + layer.neg_log_prior_global(prior_mu_var=1.0)
        kl.backward()
        grads[init] = (
            layer.lora_local_std_b.weight.grad.abs().sum()
            + layer.lora_global_std_a.weight.grad.abs().sum()
        )
    assert grads[0.0] == 0
    assert grads[1e-2] > 0


def test_reset_local_from_global():
    layer = make_layer(8, 6)
    assert not torch.equal(layer.lora_local_mean_b.weight, layer.lora_global_mean_b.weight)
    reset_local_from_global(torch.nn.Sequential(layer))
    for kind in ("mean", "std"):
        for g, loc in zip(layer.pair("global", kind), layer.pair("local", kind), strict=True):
            assert torch.equal(g, loc) and g.data_ptr() != loc.data_ptr()


def test_kl_is_zero_when_local_equals_global_and_positive_otherwise():
    layer = make_layer(8, 6)
    layer.reset_local_from_global()
    assert layer.kl_local_global().abs() < 1e-10
    with torch.no_grad():
        layer.lora_local_mean_b.weight.add_(0.1)
    assert layer.kl_local_global() > 0


def test_prior_mu_var_defaults_to_frozen_weight_variance():
    layer = make_layer(8, 6)
    expected = layer.weight.detach().var(unbiased=False).item()
    assert layer.pretrained_weight_variance() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(
        layer.neg_log_prior_global(), layer.neg_log_prior_global(prior_mu_var=expected)
    )
    torch.testing.assert_close(
        layer.neg_log_prior_global(prior_mu_var="sigma_floor"),
        layer.neg_log_prior_global(prior_mu_var=layer.sigma_floor),
    )
    with torch.no_grad():  # loading new weights invalidates the cached variance
        layer.weight.mul_(3.0)
    assert layer.pretrained_weight_variance() == pytest.approx(9 * expected, rel=1e-12)
    with pytest.raises(ValueError, match="prior_mu_var"):
        layer.neg_log_prior_global(prior_mu_var="flat")


def test_adapter_protocol_sees_all_four_pairs():
    model = torch.nn.Sequential(
        make_layer(8, 6, dtype=torch.float32), make_layer(6, 4, dtype=torch.float32)
    )
    adapters = get_adapter_params(model)
    assert len(adapters) == 2 * 8
    set_trainable_params(model, adapters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)
    assert all(n.split(".")[1].startswith("lora_") for n in adapters)
    assert set(get_adapter_state_dict(model.state_dict())) == set(adapters)


def test_parameter_group_helpers():
    model = torch.nn.Sequential(make_layer(8, 6), make_layer(6, 4))
    per_pair = {0: 4 * (8 + 6), 1: 4 * (6 + 4)}
    for scope in ("global", "local"):
        for kind in ("mean", "std"):
            group = adapter_params_by_group(model, scope, kind)
            assert len(group) == 4 and all(f"lora_{scope}_{kind}_" in n for n in group)
            assert sum(p.numel() for p in group.values()) == per_pair[0] + per_pair[1]
    assert len(adapter_params_by_group(model)) == 16
    groups = adapter_param_groups(model, "global", mean_lr=1e-3, std_lr=1e-5, weight_decay=0.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("global_mean", 1e-3, 4),
        ("global_std", 1e-5, 4),
    ]
    set_trainable_scope(model, "local")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params_by_group(model, "local"))
    set_trainable_scope(model, None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        adapter_params_by_group(model)
    )
    with pytest.raises(ValueError, match="scope"):
        adapter_params_by_group(model, "task")


def test_model_level_terms_sum_layers():
    layers = [make_layer(8, 6), make_layer(6, 4)]
    model = torch.nn.Sequential(*layers)
    torch.testing.assert_close(kl_local_global(model), sum(m.kl_local_global() for m in layers))
    torch.testing.assert_close(
        neg_log_prior_global(model, 0.5, 2.0, 0.1),
        sum(m.neg_log_prior_global(0.5, 2.0, 0.1) for m in layers),
    )


def test_adapter_mode_context_restores_and_validates():
    model = torch.nn.Sequential(make_layer(8, 6))
    with adapter_mode(model, "global_mean"):
        assert model[0].mode == "global_mean"
    assert model[0].mode == "local_sample"
    with pytest.raises(ValueError, match="mode"):
        with adapter_mode(model, "posterior"):
            pass
    assert set(ADAPTER_MODES) == {"local_sample", "local_mean", "global_mean", "global_sample"}


def test_disable_adapter_gives_base_output():
    layer = make_layer(8, 6)
    x = torch.randn(3, 8, dtype=F64)
    with disable_adapter(torch.nn.Sequential(layer)):
        torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=0, atol=0)


def test_non_variational_layer_has_mean_pairs_only():
    layer = VariationalLoRALinear(8, 6, 4, 8.0, variational=False, sampling="mean")
    assert layer.adapter_params() == [
        "lora_global_mean_a.weight",
        "lora_global_mean_b.weight",
        "lora_local_mean_a.weight",
        "lora_local_mean_b.weight",
    ]
    assert layer.mode == "local_mean"
    with pytest.raises(ValueError, match="needs the variance adapters"):
        VariationalLoRALinear(8, 6, 4, 8.0, variational=False, sampling="local")
    with pytest.raises(RuntimeError, match="variational=False"):
        layer.kl_local_global()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(std_param="softplus"), "std_param"),
        (dict(sampling="mc"), "sampling"),
        (dict(sigma_floor=0.0), "sigma_floor"),
        (dict(block_size=64), "quantize_base is False"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariationalLoRALinear(8, 6, 4, 8.0, **kwargs)


def test_quantized_base_matches_dequantized_weight():
    torch.manual_seed(0)
    layer = VariationalLoRALinear(256, 256, 4, 8.0, quantize_base=True)
    x = torch.randn(2, 3, 256)
    layer.mode = "global_mean"
    dequantized = layer.weight.get_original_weight()
    torch.testing.assert_close(layer(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)
    assert layer.pretrained_weight_variance() == pytest.approx(
        dequantized.double().var(unbiased=False).item()
    )


def test_sigma_summary_matches_dense_sigma():
    from abmll_tune.modules import sigma_summary

    layers = [make_layer(8, 6), make_layer(6, 4)]
    for layer in layers:
        layer.chunk_elements = 7  # several chunks per layer
    sigmas = [
        std_dense(
            m.scale * m.pair("global", "std")[1] @ m.pair("global", "std")[0],
            m.sigma_floor,
            m.std_param,
        )
        for m in layers
    ]
    flat = torch.cat([s.flatten() for s in sigmas])
    summary = sigma_summary(torch.nn.Sequential(*layers))
    assert summary["mean"] == pytest.approx(flat.mean().item(), rel=1e-12)
    assert summary["min"] == pytest.approx(flat.min().item()) and summary["max"] == pytest.approx(
        flat.max().item()
    )


class _Syncs:
    """Counts the tensor -> Python conversions (each one a host sync on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _three_layer_model(chunk_elements=64):
    model = nn.ModuleDict(
        {
            name: make_layer(d_in, d_out, dtype=torch.float32, std_param="exp",
                             sigma_floor=0.05, chunk_elements=chunk_elements)
            for name, (d_in, d_out) in {"q": (16, 32), "v": (16, 8), "o": (32, 48)}.items()
        }
    )  # fmt: skip
    for name, layer in model.items():
        layer.layer_name = name
    return model


@pytest.mark.parametrize("term", ["kl", "prior"])
def test_a_whole_model_kl_or_prior_syncs_with_the_host_once(monkeypatch, term):
    # what costs on a GPU: every layer's term and its closed-form gradients are checked
    # finite on the device and read back once for the model (chunks of 4 rows here: 21
    # chunks over three layers, each term with its own gradient check)
    from abmll_tune.modules import kl_local_global, neg_log_prior_global

    model = _three_layer_model()
    syncs = _Syncs(monkeypatch)
    if term == "kl":
        value = kl_local_global(model)
    else:
        value = neg_log_prior_global(model, prior_mu_var=1.0)
    assert syncs.count == 1
    value.backward()
    assert syncs.count == 1  # the gradients were checked in the forward
    monkeypatch.undo()
    assert torch.isfinite(value)
    assert all(p.grad is not None for n, p in model.named_parameters() if "std" in n and
               ("global" in n or term == "kl"))  # fmt: skip


def test_a_deferred_check_still_names_the_failing_layer_and_rows():
    from abmll_tune.modules import kl_local_global

    model = _three_layer_model()
    with torch.no_grad():  # exp(s B A) overflows in rows 8.. of layer "o"'s local std
        model["o"].lora_local_std_b.weight[8:].fill_(1e4)
    with pytest.raises(FloatingPointError, match=r"kl of layer 'o' is not finite .* rows 8:"):
        kl_local_global(model)


def test_auto_chunks_make_an_8b_kl_one_compiled_call_per_layer_on_cuda():
    # what costs on a GPU, counted here: the 8B config's adapted layers (built on the meta
    # device), the KL's chunks with chunk_elements: auto on each device type
    import math

    from omegaconf import OmegaConf
    from torchtune import config

    from abmll_tune.modules.gaussian import (
        DEFAULT_CHUNK_ELEMENTS,
        FUSED_CHUNK_FACTOR,
        chunk_rows_for,
        resolve_chunk_elements,
    )

    cfg = OmegaConf.load(REPO / "configs" / "llama3_8b_cls45.yaml")
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, VariationalLoRALinear)]
    assert len(layers) == 96 and all(m.chunk_elements == "auto" for m in layers)

    def calls(device, factor):
        elements = resolve_chunk_elements("auto", device)
        return sum(math.ceil(m.out_dim / (chunk_rows_for(m.in_dim, elements) * factor))
                   for m in layers)  # fmt: skip

    assert resolve_chunk_elements("auto", "cpu") == DEFAULT_CHUNK_ELEMENTS
    assert (calls("cpu", 1), calls("cpu", FUSED_CHUNK_FACTOR)) == (4608, 1152)
    assert calls("cuda", FUSED_CHUNK_FACTOR) == len(layers)  # one compiled call per layer
    assert calls("cuda", 1) <= 2 * len(layers)
    assert layers[0].chunk_rows() == chunk_rows_for(layers[0].in_dim, DEFAULT_CHUNK_ELEMENTS)


@pytest.mark.parametrize("bad", [0, -4, 1.5, "big", True])
def test_chunk_elements_refuses_what_is_not_a_positive_integer_or_auto(bad):
    with pytest.raises(ValueError, match="chunk_elements must be a positive integer or 'auto'"):
        VariationalLoRALinear(8, 8, rank=2, alpha=4, chunk_elements=bad)
