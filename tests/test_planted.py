"""The planted hierarchical family: deterministic, its oracle calibrated on its own labels,
and the project's data and scoring path reproducing the teacher from the written files."""

import filecmp
import json

import numpy as np
import pytest
import torch

from abmll_tune.embedded import planted
from abmll_tune.embedded.planted import PlantedFamily, generate_family, read_oracle

SMALL = dict(n_train=2, n_val=1, n_test=3, examples_per_task=96)


def _generated(family, prior_samples, backbone, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "family"
    generate_family(family, backbone, source / "tokenizer", out, prior_samples=prior_samples)
    return out


@pytest.fixture(scope="module")
def family_dir(embedded_backbone, embedded_source, tmp_path_factory):
    family = PlantedFamily(spread=1.0, seed=3, **SMALL)
    return _generated(family, 2, embedded_backbone, embedded_source, tmp_path_factory)


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), (
        cmp.left_only,
        cmp.right_only,
        cmp.diff_files,
    )
    for sub in cmp.common_dirs:
        _same_tree(a / sub, b / sub)


def test_generator_is_deterministic_and_seeded(
    family_dir, embedded_backbone, embedded_source, tmp_path
):
    tok = embedded_source / "tokenizer"
    again = tmp_path / "again"
    generate_family(
        PlantedFamily(spread=1.0, seed=3, **SMALL), embedded_backbone, tok, again, prior_samples=2
    )
    _same_tree(family_dir, again)  # byte for byte, theta* and the oracle included
    other = tmp_path / "other"
    generate_family(
        PlantedFamily(spread=1.0, seed=4, **SMALL), embedded_backbone, tok, other, prior_samples=2
    )
    ids = sorted(read_oracle(family_dir))
    assert ids == sorted(read_oracle(other))
    assert [read_oracle(family_dir)[i]["oracle"] for i in ids] != [
        read_oracle(other)[i]["oracle"] for i in ids
    ]
    meta = json.loads((family_dir / "planted.json").read_text())
    assert set(meta["sigma_star"]) == {
        f"layers.{i}.attn.{t}" for i in range(2) for t in planted.TARGETS
    }
    for prefix, sigma in meta["sigma_star"].items():  # spread 1: sigma* = RMS entry of Delta W*
        assert sigma == pytest.approx(meta["mean_delta_rms"][prefix])


def _ece_null(probs, n_draws, rng):
    """ECE of the probabilities on labels drawn from themselves: its sampling distribution
    when the predictions are perfectly calibrated (Monte Carlo)."""
    from abmll_tune.metrics import expected_calibration_error

    cumulative = np.nancumsum(probs, axis=1)
    out = []
    for _ in range(n_draws):
        u = rng.random((len(probs), 1)) * cumulative[:, -1:]
        labels = (u > cumulative).sum(axis=1)  # inverse CDF, per row
        out.append(expected_calibration_error(probs, labels))
    return np.array(out)


def test_oracle_is_calibrated_on_its_own_labels(family_dir):
    from abmll_tune.metrics import expected_calibration_error, pad_probs

    rows = list(read_oracle(family_dir).values())
    probs = [r["oracle"] for r in rows]
    ece = expected_calibration_error(pad_probs(probs), [r["gold"] for r in rows])
    null = _ece_null(pad_probs(probs), 200, np.random.default_rng(0))
    assert ece <= np.quantile(null, 0.99), (ece, np.quantile(null, [0.5, 0.99]))
    # the same check rejects labels that are not the oracle's samples: its argmax
    argmax = [int(np.argmax(p)) for p in probs]
    assert expected_calibration_error(pad_probs(probs), argmax) > np.quantile(null, 0.99)


def test_true_task_adapter_reaches_the_oracle(
    family_dir, embedded_backbone, embedded_source, tmp_path
):
    # the project's own path: data build, TaskData, the evaluation's scoring, an ABMLL model
    # whose frozen weights carry W0 + phi_i (adapters at their zero init): its predictions
    # are the oracle's, so it reaches the oracle's accuracy
    from abmll_tune.data.build import BuildOptions, build_split
    from abmll_tune.data.loader import TaskData, heldout_batches
    from abmll_tune.embedded.backbone import TINY_EMBEDDED
    from abmll_tune.embedded.suite import llama3_tokenizer
    from abmll_tune.evaluation import score
    from abmll_tune.models import abmll_llama3

    built = tmp_path / "built"
    build_split(
        BuildOptions(
            split="planted",
            source=str(family_dir),
            out=str(built),
            split_files=[str(family_dir / "splits.yaml")],
            k=5,
        ),
        progress=False,
        log=lambda *_: None,
    )
    data = TaskData(
        str(built), llama3_tokenizer(embedded_source / "tokenizer"), max_seq_len=planted.PROMPT_LEN
    )
    family = PlantedFamily(spread=1.0, seed=3, **SMALL)
    base, _ = planted.load_backbone(family_dir / "backbone")  # the family's sharpened backbone
    theta = planted.true_global_adapter(base, family)
    sigma = planted.true_sigma(theta, family.spread)
    model = abmll_llama3(
        list(planted.TARGETS), lora_rank=planted.RANK, lora_alpha=planted.ALPHA, **TINY_EMBEDDED
    )
    oracle = read_oracle(family_dir)
    hits = oracle_hits = total = 0
    for task in family.task_names()["test"]:
        delta = planted.task_delta(theta, sigma, family, task)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for prefix, d in delta.items():
            state[f"{prefix}.weight"] += d
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("lora" in k for k in missing)
        _, heldout = data.eval_task(task, 100, "test")
        batches = heldout_batches(heldout, batch_size=16, pad_id=data.pad_id)
        probs = score(model.eval(), batches, "local_mean")
        for example, p in zip(heldout, probs, strict=True):
            want = oracle[example.id]
            np.testing.assert_allclose(p, want["oracle"], rtol=1e-4, atol=1e-6)
            hits += int(np.argmax(p) == example.gold)
            oracle_hits += int(np.argmax(want["oracle"]) == want["gold"])
            total += 1
    assert total >= 40 and hits == oracle_hits
    # and the oracle is worth reaching: better than the backbone alone on the same questions
    rows = [oracle[i] for i in oracle if i.startswith("planted-test")]
    assert np.mean([np.argmax(r["oracle"]) == r["gold"] for r in rows]) > np.mean(
        [np.argmax(r["backbone"]) == r["gold"] for r in rows]
    )
    torch.testing.assert_close(
        planted.mean_delta(theta["layers.0.attn.q_proj"]),
        (planted.ALPHA / planted.RANK)
        * theta["layers.0.attn.q_proj"][1]
        @ theta["layers.0.attn.q_proj"][0],
    )


def test_benchmark_excess_nll_is_the_kl_to_the_oracle():
    # the planted benchmark's gap measure against torch.distributions' KL, with padded rows
    from torch.distributions import Categorical, kl_divergence

    from abmll_tune.embedded.planted import planted_scores as scores
    from abmll_tune.metrics import mean_categorical_kl, pad_probs

    rng = np.random.default_rng(0)
    rows_p, rows_q = [], []
    for n in (2, 3, 4, 3, 2):
        rows_p.append(list(rng.dirichlet(np.ones(n))))
        rows_q.append(list(rng.dirichlet(np.ones(n))))
    p, q = pad_probs(rows_p), pad_probs(rows_q)
    gold = [0, 1, 2, 0, 1]
    want = np.mean(
        [
            float(kl_divergence(Categorical(torch.tensor(a)), Categorical(torch.tensor(b))))
            for a, b in zip(rows_p, rows_q, strict=True)
        ]
    )
    assert mean_categorical_kl(p, q) == pytest.approx(want, rel=1e-9)
    assert scores(p, gold, p, q)["excess_nll"] == pytest.approx(0.0, abs=1e-12)
    # the function-space distance to the prior predictive is the same KL, other reference
    assert scores(q, gold, q, p)["kl_from_prior"] == pytest.approx(want, rel=1e-9)


def test_jackknife_standard_error_of_a_mean_is_the_textbook_one():
    # for a statistic linear in the draws the delete-one jackknife is exactly s / sqrt(n)
    draws = np.random.default_rng(1).normal(size=(7, 3, 40))
    value, se = planted.jackknife(draws, lambda p: p[:, 0].mean())
    per_draw = draws[:, 0, :].mean(axis=0)
    assert value == pytest.approx(per_draw.mean(), rel=1e-12)
    assert se == pytest.approx(per_draw.std(ddof=1) / np.sqrt(40), rel=1e-9)


def _built_data(family_dir, out, embedded_source):
    """The family built as the data command builds it (K = 5 support files), tokenized."""
    from abmll_tune.data.build import BuildOptions, build_split
    from abmll_tune.data.loader import TaskData
    from abmll_tune.embedded.suite import llama3_tokenizer

    build_split(
        BuildOptions(split="planted", source=str(family_dir), out=str(out),
                     split_files=[str(family_dir / "splits.yaml")], k=5),
        progress=False,
        log=lambda *_: None,
    )  # fmt: skip
    return TaskData(
        str(out), llama3_tokenizer(embedded_source / "tokenizer"), max_seq_len=planted.PROMPT_LEN
    )


@pytest.fixture(scope="module")
def wide_family(embedded_backbone, embedded_source, tmp_path_factory):
    """A small family with enough prior draws for a Monte Carlo comparison."""
    small = dict(n_train=1, n_val=1, n_test=2, examples_per_task=64)
    family = PlantedFamily(spread=1.0, seed=5, **small)
    return _generated(family, 48, embedded_backbone, embedded_source, tmp_path_factory)


def test_truth_model_before_adaptation_is_the_prior_predictive(
    wide_family, embedded_source, tmp_path
):
    """Rung (a) of the planted benchmark: an ABMLL model whose global Gaussian is (theta*,
    sigma*) predicts, by sampling it, what the family's prior predictive does, within their
    two Monte Carlo errors; the global mean alone (sigma set aside) does not."""
    from abmll_tune.checkpointing import adapter_state
    from abmll_tune.data.loader import heldout_batches
    from abmll_tune.embedded.backbone import TINY_EMBEDDED
    from abmll_tune.evaluation import score
    from abmll_tune.metrics import pad_probs
    from abmll_tune.models import abmll_llama3

    data = _built_data(wide_family, tmp_path / "built", embedded_source)
    config = dict(lora_rank=planted.RANK, lora_alpha=planted.ALPHA, std_param="exp",
                  sigma_floor_w0_fraction=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = abmll_llama3(list(planted.TARGETS), sampling="weight", **config, **TINY_EMBEDDED)
    base, _ = planted.load_backbone(wide_family / "backbone")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    truth = planted.truth_adapters(wide_family, adapter_state(model), config)
    model.load_state_dict(truth, strict=False)
    model.eval()
    batches, ids = [], []
    for task in PlantedFamily(spread=1.0, seed=5, n_test=2).task_names()["test"]:
        _, heldout = data.eval_task(task, 100, "test")
        batches += heldout_batches(heldout, batch_size=64, pad_id=data.pad_id)
        ids += [q.id for q in heldout]
    oracle = read_oracle(wide_family)
    gold = np.array([oracle[i]["gold"] for i in ids])
    reference = planted.read_prior_draws(wide_family, ids)  # (n, 4, 48)
    draws = np.stack(
        [pad_probs(score(model, batches, "global_sample", 1)) for _ in range(48)], axis=-1
    )

    reference = reference[:, : draws.shape[1]]  # both NaN past each question's options

    def nll(p):
        return float(-np.log(p[np.arange(len(gold)), gold]).mean())

    def kl(p, q):  # mean over questions of KL(p || q), NaN past a question's options
        return float(np.nansum(p * (np.log(p) - np.log(q)), axis=1).mean())

    # the sampled labels: the model's NLL within the two Monte Carlo errors of the reference's
    want, want_se = planted.jackknife(reference, nll)
    got, got_se = planted.jackknife(draws, nll)
    assert want == pytest.approx(
        nll(pad_probs([oracle[i]["prior_predictive"] for i in ids])), rel=1e-5
    )
    assert abs(got - want) <= 3 * np.hypot(want_se, got_se), (got, want, want_se, got_se)
    # per question: as close to the reference as two halves of the reference's own draws
    # are to each other (Monte Carlo noise alone), where the global mean without sigma*
    # (the global teacher) is far
    half = reference.shape[-1] // 2
    noise = kl(reference[..., :half].mean(-1), reference[..., half:].mean(-1))
    truth = kl(reference.mean(-1), draws.mean(-1))
    mean_only = kl(reference.mean(-1), pad_probs(score(model, batches, "global_mean", 1)))
    assert truth <= noise and mean_only > 3 * noise, (truth, noise, mean_only)


def test_shared_question_family_tells_tasks_apart_by_their_adapters_only(family_dir):
    """Every task draws its questions from one pool with one set of option words, so
    nothing but phi_i distinguishes tasks (a model cannot fit a task from its questions)."""
    meta = json.loads((family_dir / "planted.json").read_text())
    assert meta["family"]["shared_questions"] is True
    by_task: dict = {}
    for path in family_dir.glob("*/*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_task.setdefault(record["task"], []).append(record)
    assert len(by_task) == 6
    option_sets = {tuple(r["options"]) for records in by_task.values() for r in records}
    assert len(option_sets) == 1  # one set of option words for every task
    inputs = [{r["input"] for r in records} for records in by_task.values()]
    assert all(a & b for a in inputs for b in inputs)  # the tasks' questions overlap


def test_posterior_predictive_is_bayes_rule_over_the_stored_draws():
    """Against a direct computation: with no support it is the prior predictive; each
    support answer reweighs the draws by their likelihood of it, and a draw that makes
    the observed answers likelier gains weight."""
    rng = np.random.default_rng(0)
    draws = rng.dirichlet(np.ones(3), size=(5, 4)).transpose(0, 2, 1)  # (n=5, 3 options, 4)
    support = rng.dirichlet(np.ones(3), size=(2, 4)).transpose(0, 2, 1)  # (K=2, 3, 4)
    prior, ess = planted.posterior_predictive(draws, support[:0], [])
    np.testing.assert_allclose(prior, draws.mean(-1))
    assert ess == pytest.approx(4.0)
    gold = [2, 0]
    post, ess = planted.posterior_predictive(draws, support, gold)
    like = support[0, 2] * support[1, 0]  # per draw: p_j(y_1) p_j(y_2)
    expected = (draws * like).sum(-1) / like.sum()
    np.testing.assert_allclose(post, expected, rtol=1e-12)
    np.testing.assert_allclose(post.sum(1), 1.0)
    assert 1.0 <= ess < 4.0


def test_marginal_likelihood_reading_holds_sigma_star_from_the_truth(
    embedded_backbone, embedded_source, tmp_path_factory
):
    """A sigma-only run of ``outer_grad: marginal_likelihood`` on the real tiny model, from
    the truth (global means theta*, stds sigma*, means frozen): the empirical-Bayes fixed
    point is sigma*, so 40 visits leave RMS sigma_theta / sigma* within [0.5, 2] in every layer
    (a smoke of the path; docs/method.md "Fitting the prior" has the measurements)."""
    from abmll_tune.checkpointing import adapter_state
    from abmll_tune.data.loader import MetaTaskSampler
    from abmll_tune.embedded.backbone import TINY_EMBEDDED
    from abmll_tune.meta import MetaLearner
    from abmll_tune.methods import ABMLL
    from abmll_tune.models import abmll_llama3
    from abmll_tune.modules import variational_lora_layers
    from abmll_tune.modules.gaussian import std_variance

    family = PlantedFamily(spread=1.0, seed=7, n_train=8, n_val=1, n_test=1, examples_per_task=48)
    source = _generated(family, 2, embedded_backbone, embedded_source, tmp_path_factory)
    data = _built_data(source, tmp_path_factory.mktemp("built") / "planted", embedded_source)
    config = dict(lora_rank=planted.RANK, lora_alpha=planted.ALPHA, std_param="exp",
                  sigma_floor_w0_fraction=0.1, std_scale_row=True)  # fmt: skip
    torch.manual_seed(0)
    model = abmll_llama3(list(planted.TARGETS), sampling="local", **config, **TINY_EMBEDDED)
    base, _ = planted.load_backbone(source / "backbone")
    model.load_state_dict(base.state_dict(), strict=False)
    model.load_state_dict(
        planted.truth_adapters(source, adapter_state(model), config), strict=False
    )
    method = ABMLL(outer_grad="marginal_likelihood", inner_lr_mean=0.01, inner_lr_std=1e-3,
                   outer_lr_mean=0.0, outer_lr_std=0.03, beta=1e-6, gamma=0.0,
                   prior_samples=32)  # fmt: skip
    adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)  # noqa: E731
    learner = MetaLearner(model, method, adamw, adamw, inner_steps=2)
    sampler = MetaTaskSampler(
        data.train_tasks(), batch_size=2, batches_per_task=learner.batches_per_task, seed=0
    )
    sigma_star = json.loads((source / "planted.json").read_text())["sigma_star"]
    ess = []
    for epoch in range(5):
        for visit in sampler.visits(epoch):
            metrics = learner.train_task(visit)
            assert np.isfinite(metrics["log_marginal_likelihood"])
            ess.append(metrics["prior_ess"])
    # near sigma* the draws' likelihoods of even 2 confident answers spread widely: few
    # effective draws (measured: 2.0 of 16, 2.8 of 64), docs/method.md "Fitting the prior"
    assert np.mean(ess) > 1.5, np.mean(ess)
    for prefix, layer in variational_lora_layers(model).items():
        a, b = layer.pair("global", "std")
        var = std_variance(layer.scale * (b @ a).double(), layer.sigma_floor, "exp")
        ratio = float(var.mean().sqrt()) / sigma_star[prefix]
        assert 0.5 <= ratio <= 2.0, (prefix, ratio)  # measured 0.97-1.44 with 64 draws
