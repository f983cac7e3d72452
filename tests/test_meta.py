"""The shared meta-training loop against hand computations, and checkpoints/exports."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models import convert_weights
from torchtune.models.llama3 import llama3, lora_llama3

from abmll_tune.checkpointing import (
    CheckpointError,
    export_peft_adapter,
    load_training_checkpoint,
    peft_to_tune_adapter,
    save_training_checkpoint,
)
from abmll_tune.data.loader import MetaTaskSampler, TaskData, TaskVisit
from abmll_tune.embedded.backbone import TINY_EMBEDDED
from abmll_tune.embedded.suite import MODEL_VOCAB, llama3_tokenizer
from abmll_tune.meta import MetaLearner
from abmll_tune.methods import ABMLL, RegularLoRA, Reptile, StructuredLoRA
from abmll_tune.models import abmll_llama3
from abmll_tune.modules import adapter_mode, adapter_params_by_group
from abmll_tune.objectives import answer_nll

ARCH = dict(TINY_EMBEDDED, intermediate_dim=128)


def sgd(lr):
    return lambda groups: torch.optim.SGD(groups, lr=lr)


def adamw(groups):
    return torch.optim.AdamW(groups, weight_decay=0.0)


@pytest.fixture(scope="module")
def tasks(embedded_split, embedded_source):
    data = TaskData(embedded_split, llama3_tokenizer(embedded_source / "tokenizer"), max_seq_len=64)
    all_tasks = data.train_tasks()
    return {name: all_tasks[name] for name in sorted(all_tasks)[:3]}


def make_model(variational, seed=0, **kw):
    torch.manual_seed(seed)
    model = abmll_llama3(
        variational=variational, sampling="local" if variational else "mean", **ARCH, **kw
    )
    with torch.no_grad():  # non-zero adapters, so that every update is visible
        for p in adapter_params_by_group(model).values():
            p.normal_(0, 0.02)
    return model


def first_visit(tasks, k):
    return next(MetaTaskSampler(tasks, batch_size=2, batches_per_task=k, seed=0).visits(0))


def params(model, scope, kind=None):
    return {n: p.detach().clone() for n, p in adapter_params_by_group(model, scope, kind).items()}


def test_reptile_update_equals_the_formula_on_a_hand_checked_step(tasks):
    model = make_model(False)
    visit = first_visit(tasks, 3)
    lr, eps = 0.05, 0.25
    theta0 = params(model, "global")
    # by hand: local <- global, three plain SGD steps on the NLL, then interpolate
    manual = copy.deepcopy(model)
    manual_local = adapter_params_by_group(manual, "local")
    with torch.no_grad():
        for name, p in manual_local.items():
            p.copy_(theta0[name.replace(".lora_local_", ".lora_global_")])
    for batch in visit.batches:
        with adapter_mode(manual, "local_mean"):
            loss = answer_nll(manual, batch)
        grads = torch.autograd.grad(loss, list(manual_local.values()))
        with torch.no_grad():
            for p, g in zip(manual_local.values(), grads, strict=True):
                p.sub_(lr * g)
    cfg = Reptile(inner_lr_mean=lr, outer_step_mean=eps)
    learner = MetaLearner(model, cfg, sgd(lr), inner_steps=3)
    learner.train_task(visit)
    phi = params(model, "local")
    for name, p in phi.items():
        torch.testing.assert_close(p, manual_local[name].detach(), rtol=1e-5, atol=1e-7)
    for name, theta in params(model, "global").items():
        expected = theta0[name] + eps * (
            phi[name.replace(".lora_global_", ".lora_local_")] - theta0[name]
        )
        torch.testing.assert_close(theta, expected, rtol=0, atol=1e-7)


def test_reptile_outer_optimizer_uses_the_pseudo_gradient(tasks):
    model = make_model(False)
    cfg = Reptile(inner_lr_mean=0.05, outer_update="optimizer", outer_lr_mean=0.5)
    learner = MetaLearner(model, cfg, sgd(0.05), sgd(0.5), inner_steps=2)
    theta0 = params(model, "global")
    learner.train_task(first_visit(tasks, 2))
    for name, theta in params(model, "global").items():
        phi = params(model, "local")[name.replace(".lora_global_", ".lora_local_")]
        torch.testing.assert_close(
            theta, theta0[name] - 0.5 * (theta0[name] - phi), rtol=0, atol=1e-7
        )


@pytest.mark.parametrize("outer_grad", ["reptile", "first_order", "kl_only", "marginal_likelihood"])
def test_abmll_resets_local_from_global_at_each_task_and_moves_global(tasks, outer_grad):
    model = make_model(True, std_b_init_std=0.01)
    cfg = ABMLL(
        inner_lr_mean=1e-3,
        inner_lr_std=1e-4,
        outer_grad=outer_grad,
        outer_lr_mean=1e-3,
        outer_lr_std=1e-4,
        std_grad_clamp=1.0,
        beta=1e-6,
        gamma=1e-6,
    )
    learner = MetaLearner(model, cfg, adamw, adamw, inner_steps=2)
    sampler = MetaTaskSampler(
        tasks, batch_size=2, batches_per_task=learner.batches_per_task, seed=0
    )
    seen = []
    inner_step = learner.inner_step

    def spy(batches):
        if not seen or seen[-1][0] is not learner.visit_marker:
            local, glob = params(model, "local"), params(model, "global")
            same = all(
                torch.equal(v, glob[k.replace(".lora_local_", ".lora_global_")])
                for k, v in local.items()
            )
            seen.append((learner.visit_marker, same))
        return inner_step(batches)

    learner.inner_step = spy
    before = params(model, "global")
    for visit in sampler.visits(0):
        learner.visit_marker = object()
        metrics = learner.train_task(visit)
        assert all(v == v and abs(v) != float("inf") for v in metrics.values())
    assert len(seen) == 3 and all(same for _, same in seen)  # local == global at every task's start
    after = params(model, "global")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".lora_global_mean_" in k for k in moved) and any(
        ".lora_global_std_" in k for k in moved
    )
    if outer_grad == "first_order":
        assert "query_nll" in metrics
    if outer_grad == "marginal_likelihood":
        assert metrics["log_marginal_likelihood"] < 0 and 1 <= metrics["prior_ess"] <= 16


def test_structured_lora_with_k1_and_one_task_equals_regular_lora(tasks):
    name = sorted(tasks)[0]
    batches = [
        b
        for v in MetaTaskSampler(
            {name: tasks[name]}, batch_size=2, batches_per_task=1, seed=0
        ).visits(0)
        for b in v.batches
    ]
    batches += [
        b
        for v in MetaTaskSampler(
            {name: tasks[name]}, batch_size=2, batches_per_task=1, seed=1
        ).visits(0)
        for b in v.batches
    ]
    structured, regular = make_model(False), make_model(False)
    s_learner = MetaLearner(structured, StructuredLoRA(inner_lr_mean=1e-3), adamw, inner_steps=1)
    r_learner = MetaLearner(regular, RegularLoRA(inner_lr_mean=1e-3), adamw, inner_steps=1)
    for i, batch in enumerate(batches):
        s_learner.train_task(TaskVisit(0, i, name, [batch]))
        r_learner.train_task(TaskVisit(0, i, "<pooled>", [batch]))
    s, r = params(structured, "global"), params(regular, "global")
    assert all(torch.equal(s[k], r[k]) for k in s)
    assert not all(torch.equal(s[k], v) for k, v in params(make_model(False), "global").items())


def test_method_and_model_must_agree():
    with pytest.raises(ValueError, match="needs model.variational=True"):
        MetaLearner(make_model(False), ABMLL(), adamw, adamw)
    with pytest.raises(ValueError, match="needs model.variational=False"):
        MetaLearner(make_model(True), Reptile(), adamw)
    with pytest.raises(ValueError, match="outer_grad"):
        ABMLL(outer_grad="second_order")


def test_std_grad_clamp_is_elementwise(tasks):
    model = make_model(True, std_b_init_std=0.01)
    cfg = ABMLL(std_grad_clamp=1e-3)
    MetaLearner(model, cfg, adamw, adamw)
    stds = adapter_params_by_group(model, "local", "std")
    for p in stds.values():
        p.grad = torch.linspace(-5, 5, p.numel()).reshape(p.shape)
    means = adapter_params_by_group(model, "local", "mean")
    for p in means.values():
        p.grad = torch.full_like(p, 5.0)
    cfg.clip_grads(model, "local")
    assert all(p.grad.abs().max() == pytest.approx(1e-3) for p in stds.values())
    assert all(bool((p.grad == 5.0).all()) for p in means.values())  # means untouched


def test_checkpoint_round_trip_and_shape_check(tmp_path):
    model = make_model(True)
    state = {"inner_optimizer": None, "outer_optimizer": None}
    kwargs = dict(
        method="abmll",
        learner_state=state,
        sampler_state={"epoch": 1},
        progress={"visits": 3},
        config={},
        peft_kwargs=None,
    )
    torch.manual_seed(123)
    save_training_checkpoint(tmp_path / "ck", model=model, **kwargs)
    expected_next = torch.rand(3)
    other = make_model(True, seed=1)
    meta, _ = load_training_checkpoint(tmp_path / "ck", other, "abmll")
    assert meta["sampler"] == {"epoch": 1} and meta["progress"] == {"visits": 3}
    assert all(
        torch.equal(a, b)
        for a, b in zip(params(model, None).values(), params(other, None).values(), strict=True)
    )
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    with pytest.raises(CheckpointError, match=r"ck/adapters.safetensors does not fit the model"):
        load_training_checkpoint(tmp_path / "ck", make_model(True, lora_rank=4), "abmll")
    with pytest.raises(CheckpointError, match="method 'abmll', this run is 'reptile'"):
        load_training_checkpoint(tmp_path / "ck", make_model(False), "reptile")


def test_a_bf16_checkpoint_loads_into_an_fp32_model_by_a_cast(tmp_path):
    """A checkpoint written by a bf16 run (as on a GPU) evaluates or resumes in fp32: the
    adapters are cast, the training state is read onto the CPU (map_location), and a
    non-floating mismatch is still refused."""
    from safetensors.torch import load_file, save_file

    model = make_model(True).to(torch.bfloat16)
    kwargs = dict(method="abmll", learner_state={"inner_optimizer": None,
                  "outer_optimizer": None}, sampler_state={}, progress={}, config={},
                  peft_kwargs=None)  # fmt: skip
    save_training_checkpoint(tmp_path / "ck", model=model, **kwargs)
    assert {t.dtype for t in load_file(str(tmp_path / "ck" / "adapters.safetensors")).values()} == {
        torch.bfloat16
    }
    fp32 = make_model(True, seed=1)
    load_training_checkpoint(tmp_path / "ck", fp32, "abmll")
    for (name, a), b in zip(params(model, None).items(), params(fp32, None).values(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), name
    # an integer tensor where the model has a float one is not a cast
    adapters = load_file(str(tmp_path / "ck" / "adapters.safetensors"))
    first = next(iter(adapters))
    adapters[first] = adapters[first].to(torch.int32)
    save_file(adapters, str(tmp_path / "ck" / "adapters.safetensors"))
    with pytest.raises(CheckpointError, match=r"dtype I32 in the file, torch.float32 in the model"):
        load_training_checkpoint(tmp_path / "ck", fp32, "abmll")


def test_training_state_is_read_onto_the_cpu(tmp_path, monkeypatch):
    """torch.load gets map_location="cpu": a state saved on a GPU opens on a CPU box."""
    from abmll_tune import checkpointing

    seen = {}
    real_load = torch.load

    def spy(path, **kw):
        seen.update(kw)
        return real_load(path, **kw)

    monkeypatch.setattr(checkpointing.torch, "load", spy)
    model = make_model(True)
    kwargs = dict(method="abmll", learner_state={"inner_optimizer": None,
                  "outer_optimizer": None}, sampler_state={}, progress={}, config={},
                  peft_kwargs=None)  # fmt: skip
    save_training_checkpoint(tmp_path / "ck", model=model, **kwargs)
    checkpointing.load_training_state(tmp_path / "ck" / "training_state.pt")
    assert seen == {"weights_only": True, "map_location": "cpu"}


def test_exported_peft_adapter_loads_into_torchtunes_lora_model_with_the_same_logits(tmp_path):
    model = make_model(True)
    out = export_peft_adapter(
        model,
        tmp_path / "adapter",
        rank=8,
        alpha=16,
        lora_attn_modules=["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=False,
        apply_lora_to_output=False,
        num_heads=4,
        num_kv_heads=2,
        dim=64,
    )
    peft = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in peft)
    lora = lora_llama3(["q_proj", "v_proj", "output_proj"], lora_rank=8, lora_alpha=16, **ARCH)
    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    lora.load_state_dict(
        {**base, **peft_to_tune_adapter(peft, num_heads=4, num_kv_heads=2, dim=64)}, strict=True
    )
    tokens = torch.randint(0, MODEL_VOCAB, (2, 11))
    with torch.no_grad(), adapter_mode(model, "global_mean"):
        expected = model(tokens)
    torch.testing.assert_close(lora(tokens), expected, rtol=1e-5, atol=1e-5)
    # independently: merge the PEFT adapter into HF-format weights, convert back with torchtune
    hf = convert_weights.tune_to_hf(base, num_heads=4, num_kv_heads=2, dim=64)
    scale = 16 / 8
    for key, a in peft.items():
        if ".lora_A." in key:
            b = peft[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            hf[target] = hf[target] + scale * b @ a
    merged = llama3(**ARCH)
    merged.load_state_dict(convert_weights.hf_to_tune(hf, num_heads=4, num_kv_heads=2, dim=64))
    torch.testing.assert_close(merged(tokens), expected, rtol=1e-4, atol=1e-4)


def test_lr_scale_multiplies_inner_rates_and_outer_steps(tasks):
    # Reptile, one plain SGD step: phi - theta = -s lr g and theta moves by s eps (phi -
    # theta), so a schedule factor s scales the local move by s and the global one by s^2
    visit = first_visit(tasks, 1)
    moves = {}
    for scale in (1.0, 0.5):
        model = make_model(False)
        theta0 = params(model, "global")
        learner = MetaLearner(model, Reptile(inner_lr_mean=0.05, outer_step_mean=0.25), sgd(0.05),
                              inner_steps=1)  # fmt: skip
        learner.lr_scale = scale
        learner.train_task(visit)
        local = params(model, "local")
        moves[scale] = (
            {n: local[n.replace(".lora_global_", ".lora_local_")] - t for n, t in theta0.items()},
            {n: p - theta0[n] for n, p in params(model, "global").items()},
        )
    for name in moves[1.0][0]:
        torch.testing.assert_close(
            moves[0.5][0][name], 0.5 * moves[1.0][0][name], rtol=1e-4, atol=4e-9
        )
        torch.testing.assert_close(
            moves[0.5][1][name], 0.25 * moves[1.0][1][name], rtol=1e-4, atol=4e-9
        )


def test_clip_grad_norm_bounds_the_total_norm_of_an_inner_step(tasks):
    # SGD at lr 1: the local move is minus the clipped gradient, whose total norm is c
    visit = first_visit(tasks, 1)
    model = make_model(False)
    theta0 = params(model, "global")
    learner = MetaLearner(model, Reptile(inner_lr_mean=1.0, outer_step_mean=0.0), sgd(1.0),
                          inner_steps=1, clip_grad_norm=1e-3)  # fmt: skip
    learner.train_task(visit)
    local = params(model, "local")
    moved = torch.cat(
        [
            (local[n.replace(".lora_global_", ".lora_local_")] - t).flatten()
            for n, t in theta0.items()
        ]
    )
    torch.testing.assert_close(moved.norm(), torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_float32_adapters_under_a_bf16_base_keep_the_small_steps_bf16_rounds_away(tasks):
    # the 8B configs' outer std rate: 1e-6 against weights of ~0.02 (bf16 spacing ~1e-4)
    from torchtune import training

    from abmll_tune.modules import keep_adapters_in

    visit = first_visit(tasks, 1)
    changed = {}
    for adapter_dtype in (torch.bfloat16, torch.float32):
        with training.set_default_dtype(torch.bfloat16):
            model = make_model(False)
        assert keep_adapters_in(model, adapter_dtype) == (0 if adapter_dtype == torch.bfloat16 else
                                                          sum(p.numel() for p in params(model, "local").values()) * 2)  # fmt: skip
        before = params(model, "global")
        assert {p.dtype for p in before.values()} == {adapter_dtype}
        assert model.tok_embeddings.weight.dtype == torch.bfloat16  # the base stays bf16
        method = Reptile(inner_lr_mean=1e-6, outer_step_mean=1.0)
        MetaLearner(model, method, adamw, inner_steps=1).train_task(visit)
        after = params(model, "global")
        moved = sum(int((after[n] != before[n]).sum()) for n in before)
        changed[adapter_dtype] = moved / sum(p.numel() for p in before.values())
    assert changed[torch.float32] > 0.9 and changed[torch.bfloat16] < 0.1, changed


def test_batches_go_to_the_adapters_device_not_an_offloaded_bases(tasks):
    # fsdp_cpu_offload keeps the base's shards on the CPU while the adapters (and the
    # compute) are on the GPU: stand in for it with the embedding on the meta device
    from abmll_tune.objectives import on_model_device

    model = make_model(False)
    model.tok_embeddings.to("meta")
    assert next(model.parameters()).device.type == "meta"
    batch = on_model_device(model, first_visit(tasks, 1).batches[0])
    assert {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)} == {"cpu"}


def _kl_mean_part(layer, beta, a=None, b=None):
    """beta * sum (W_local - W_global)^2 / (2 sigma_global^2), dense float64: the
    reference (``a``, ``b``: the local mean factors to use instead of the layer's)."""
    from abmll_tune.modules.gaussian import std_variance

    local_a, local_b = layer.pair("local", "mean")
    a = local_a.double() if a is None else a
    b = local_b.double() if b is None else b
    ag, bg = (w.detach().double() for w in layer.pair("global", "mean"))
    a_sd, b_sd = (w.detach().double() for w in layer.pair("global", "std"))
    var = std_variance(layer.scale * (b_sd @ a_sd), layer.sigma_floor, layer.std_param)
    diff = layer.scale * (b @ a - bg @ ag)
    return beta * (diff**2 / (2 * var)).sum()


def _natural_layer():
    from abmll_tune.modules import variational_lora_layers

    model = make_model(True, std_b_init_std=0.3)
    with torch.no_grad():  # local means away from the global ones
        for p in adapter_params_by_group(model, "local", "mean").values():
            p.add_(torch.randn_like(p) * 0.05)
    return model, next(iter(variational_lora_layers(model).values()))


def test_prior_natural_blocks_are_the_kl_hessian_of_each_factor():
    # the KL is exactly quadratic in one factor with the other fixed: its float64
    # Hessian by autograd is block diagonal, one r x r block per row of B (column of A)
    from abmll_tune.methods.abmll import PriorNaturalGradient

    _, layer = _natural_layer()
    beta = 0.2
    f_b, f_a = PriorNaturalGradient.fisher_blocks(layer, beta)
    a, b = (w.detach().double() for w in layer.pair("local", "mean"))
    r, in_dim = a.shape
    h_b = torch.autograd.functional.hessian(
        lambda flat: _kl_mean_part(layer, beta, a=a, b=flat.reshape(b.shape)), b.flatten()
    )
    torch.testing.assert_close(h_b, torch.block_diag(*f_b), rtol=1e-9, atol=1e-12)
    h_a = torch.autograd.functional.hessian(  # A is r x in, flattened row-major
        lambda flat: _kl_mean_part(layer, beta, a=flat.reshape(in_dim, r).T, b=b),
        a.T.flatten(),  # column-major: the r entries of a column together
    )
    torch.testing.assert_close(h_a, torch.block_diag(*f_a), rtol=1e-9, atol=1e-12)


def test_one_prior_natural_step_lands_on_the_kl_minimum_of_a_factor():
    # Newton on an exact quadratic: lr 1, no damping, B alone (A's gradient withheld)
    from abmll_tune.methods.abmll import PriorNaturalGradient

    model, layer = _natural_layer()
    beta = 0.5
    a, b = layer.pair("local", "mean")
    optimizer = PriorNaturalGradient([{"params": [a, b], "lr": 1.0, "name": "local_mean",
                                       "beta": beta}], model, damping=0.0)  # fmt: skip
    loss = _kl_mean_part(layer, beta)
    loss.backward()
    a.grad = None
    before = float(loss)
    optimizer.step()
    optimizer.zero_grad()
    after = _kl_mean_part(layer, beta)
    (grad_b,) = torch.autograd.grad(after, [b])
    assert float(after) < before
    assert float(grad_b.abs().max()) < 1e-6 * max(1.0, before)
