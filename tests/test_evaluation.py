"""Few-shot evaluation: option probabilities, fresh copies per task, pruning, best-epoch
selection, the evaluation recipe, the report command and their bad inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tune_run

from abmll_tune.data.loader import TaskData, heldout_batches
from abmll_tune.embedded.backbone import TINY_EMBEDDED
from abmll_tune.embedded.suite import llama3_tokenizer
from abmll_tune.evaluation import EvalSettings, evaluate_tasks, option_probabilities, pruned
from abmll_tune.methods import METHODS
from abmll_tune.metrics import all_metrics, pad_probs
from abmll_tune.models import abmll_llama3
from abmll_tune.modules import adapter_params_by_group
from abmll_tune.report import ReportError, write_report

ARCH = dict(TINY_EMBEDDED, intermediate_dim=128)


@pytest.fixture(scope="module")
def data(embedded_split, embedded_source):
    return TaskData(embedded_split, llama3_tokenizer(embedded_source / "tokenizer"), max_seq_len=64)


def model_for(method):
    torch.manual_seed(0)
    model = abmll_llama3(
        variational=method == "abmll",
        sampling="local" if method == "abmll" else "mean",
        std_b_init_std=0.01,
        **ARCH,
    )
    with torch.no_grad():
        for p in adapter_params_by_group(model).values():
            p.normal_(0, 0.02)
    return model


def test_option_probabilities_sum_to_one_over_each_questions_options(data):
    _, heldout = data.eval_task("emb-test-00", 100, "test")
    batch = heldout_batches(heldout[:8], batch_size=8)[0]
    with torch.no_grad():
        probs = option_probabilities(model_for("reptile"), batch)
    n = (batch["option_ids"] >= 0).sum(1)
    for row, k in zip(probs, n, strict=True):
        assert torch.isclose(row[:k].sum(), torch.tensor(1.0)) and torch.isnan(row[k:]).all()


@pytest.mark.parametrize("method", ["abmll", "reptile"])
def test_tasks_start_from_a_fresh_copy_so_order_does_not_matter(data, method):
    model = model_for(method)
    before = {k: v.clone() for k, v in adapter_params_by_group(model).items()}
    settings = EvalSettings(seeds=(100, 13), adapt_steps=3, samples=(1, 3), eval_batch_size=32)
    tasks = ["emb-test-00", "emb-test-01", "emb-test-02"]
    trained = METHODS[method]()
    forward = evaluate_tasks(model, data, tasks, settings, method=trained)
    backward = evaluate_tasks(model, data, list(reversed(tasks)), settings, method=trained)
    key = lambda r: (r["task"], r["seed"], r["variant"], r["id"])  # noqa: E731
    assert sorted(forward, key=key) == sorted(backward, key=key)
    assert all(
        torch.equal(before[k], v) for k, v in adapter_params_by_group(model).items()
    )  # restored
    variants = {r["variant"] for r in forward}
    assert variants == ({"s1", "s3", "mean"} if method == "abmll" else {"mean"})
    # adaptation does something: without it, the predictions differ
    untouched = evaluate_tasks(
        model, data, tasks[:1], EvalSettings(seeds=(100,), adapt_steps=0), method=trained
    )
    adapted = [
        r for r in forward if r["task"] == tasks[0] and r["seed"] == 100 and r["variant"] == "mean"
    ]
    assert [r["probs"] for r in untouched if r["variant"] == "mean"] != [
        r["probs"] for r in adapted
    ]


@pytest.mark.parametrize("method", ["abmll", "reptile"])
def test_zero_step_evaluation_scores_the_global_adapters_not_a_stale_local_copy(data, method):
    """adapt_steps=0 is adaptation from no examples: the task's local pairs start from the
    global ones, whatever the local pairs held (after training: the last task's)."""
    from abmll_tune.modules import set_adapter_mode

    model = model_for(method)  # local and global pairs drawn independently: they differ
    settings = EvalSettings(seeds=(100,), adapt_steps=0, samples=(1,), eval_batch_size=32)
    trained = METHODS[method]()
    records = evaluate_tasks(model, data, ["emb-test-00"], settings, method=trained)
    _, heldout = data.eval_task("emb-test-00", 100, "test")
    batch = heldout_batches(heldout, batch_size=len(heldout), pad_id=data.pad_id)[0]
    expected = {}
    for mode in ("global_mean", "local_mean"):
        set_adapter_mode(model, mode)
        with torch.no_grad():
            expected[mode] = option_probabilities(model.eval(), batch)
    assert not torch.allclose(expected["global_mean"], expected["local_mean"], equal_nan=True)
    got = pad_probs([r["probs"] for r in records if r["variant"] == "mean"])
    np.testing.assert_allclose(got, expected["global_mean"].double().numpy(), rtol=1e-5, atol=1e-6)


def test_pruning_zero_is_no_pruning_and_levels_zero_the_requested_fraction(data):
    model = model_for("reptile")
    _, heldout = data.eval_task("emb-test-00", 100, "test")
    batch = heldout_batches(heldout[:4], batch_size=4)[0]
    with torch.no_grad():
        plain = model(batch["tokens"])
        with pruned(model, 0.0):
            torch.testing.assert_close(model(batch["tokens"]), plain, rtol=0, atol=0)
    captured = []  # what the second layer receives: the first layer's pruned output
    hook = model.layers[1].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad(), pruned(model, 0.3):
        model(batch["tokens"])
    hook.remove()
    zeros = (captured[0] == 0).sum(-1)
    assert bool((zeros == round(0.3 * 64)).all())
    layer = model.layers[0].attn.q_proj
    original = layer.weight.detach().clone()
    with pruned(model, 0.25, "weight"):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(
            0.25, abs=1 / layer.weight.numel()
        )
        kept = layer.weight != 0
        assert original[kept].abs().min() >= original[~kept].abs().max()
    assert torch.equal(layer.weight, original)


@pytest.fixture(scope="module")
def trained(embedded_overrides, tmp_path_factory):
    """A short Structured LoRA run with validation after every epoch."""
    out = tmp_path_factory.mktemp("trained") / "structured"
    common = embedded_overrides
    code, _, err = tune_run(
        "reptile_single_device",
        "configs/tiny_cpu_structured_lora.yaml",
        f"output_dir={out}",
        *common,
        "epochs=3",
        "validation.max_tasks=4",
    )
    assert code == 0, err[-3000:]
    return out, common


def test_best_validation_epoch_is_kept(trained):
    out, _ = trained
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]  # epoch 0 (before training) included
    best = max(rows, key=lambda r: r["accuracy"])
    meta = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["progress"]["validation"]["epoch"] == best["epoch"]
    assert meta["progress"]["validation"]["accuracy"] == best["accuracy"]


def test_evaluation_recipe_writes_per_task_files_and_macro_is_the_task_average(
    trained, tmp_path, capsys
):
    out, common = trained
    ev = tmp_path / "eval"
    code, stdout, err = tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={ev}",
        *common,
        "method=structured_lora",
        f"adapter_checkpoint={out / 'checkpoints' / 'best'}",
        "evaluation.seeds=[100,13]",
        "evaluation.max_tasks=3",
        "evaluation.pruning_levels=[0.0,0.2]",
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    results = json.loads((ev / "results.json").read_text())
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert {"task", "id", "seed", "variant", "prune", "probs", "gold"} <= set(preds[0])
    assert set(results["metrics"]) == {"mean@0", "mean@0.2"}
    m = results["metrics"]["mean@0"]
    for seed in ("100", "13"):
        for task in results["tasks"]:
            rows = [
                p
                for p in preds
                if p["task"] == task
                and str(p["seed"]) == seed
                and p["variant"] == "mean"
                and p["prune"] == 0
            ]
            assert m["per_task"][seed][task] == pytest.approx(
                all_metrics(pad_probs([r["probs"] for r in rows]), [r["gold"] for r in rows])
            )
        assert m["macro"][seed]["accuracy"] == pytest.approx(
            np.mean([m["per_task"][seed][t]["accuracy"] for t in results["tasks"]])
        )
    assert "structured_lora on embedded" in stdout and 0.2 < results["chance_accuracy"] < 0.5


def test_evaluation_bad_inputs(trained, tmp_path, capsys, tiny_llama3_checkpoint):
    out, common = trained
    best = f"adapter_checkpoint={out / 'checkpoints' / 'best'}"
    code, _, err = tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'a'}",
        *common,
        "method=structured_lora",
        best,
        "evaluation.adapt_steps=20",
        capsys=capsys,
    )
    assert code == 2 and "adaptation needs 20 batches x 2 = 40 support examples" in err
    code, _, err = tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'b'}",
        *common,
        "method=abmll",
        best,
        capsys=capsys,
    )
    assert code == 2 and "a checkpoint of method 'structured_lora', but method is 'abmll'" in err
    code, _, err = tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'c'}",
        *common,
        "method=structured_lora",
        best,
        f"checkpointer.checkpoint_dir={tiny_llama3_checkpoint}",
        capsys=capsys,
    )
    assert code == 2 and "the checkpoint does not fit model" in err
    code, _, err = tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'd'}",
        *common,
        "method=structured_lora",
        best,
        "evaluation.samplez=[1]",
        capsys=capsys,
    )
    assert code == 2 and "evaluation.samplez: unknown key (did you mean 'samples'?)" in err


def fake_results(
    path,
    method,
    run,
    split="embedded",
    seeds=(100, 13),
    acc=(0.5, 0.7),
    prune_levels=(0.0,),
    beta=None,
):
    metrics = {}
    variant = "s1" if method == "abmll" else "mean"
    for level in prune_levels:
        summary = {
            m: {"mean": a, "se": 0.1}
            for m, a in (
                ("accuracy", np.mean(acc) - level),
                ("ece", 0.2 + level),
                ("mce", 0.3),
                ("nll", 1.0),
                ("brier", 0.5),
            )
        }
        metrics[f"{variant}@{level:g}"] = {
            "variant": variant,
            "prune": level,
            "summary": summary,
            "per_task": {},
            "macro": {},
        }
    results = {
        "format": "abmll-tune-results",
        "version": 1,
        "method": method,
        "run": run,
        "split": split,
        "part": "test",
        "tasks": ["t1", "t2"],
        "checkpoint": None,
        "checkpoint_epoch": 2,
        "default_variant": variant,
        "settings": {"seeds": list(seeds), "adapt_steps": 5},
        "training": {"beta": beta} if beta else {},
        "chance_accuracy": 0.36,
        "metrics": metrics,
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))


def test_report_turns_result_files_into_tables_and_figures(tmp_path):
    runs = tmp_path / "runs"
    fake_results(runs / "a", "abmll", "a", prune_levels=(0.0, 0.1))
    fake_results(runs / "b", "reptile", "b")
    (runs / "train").mkdir()
    (runs / "train" / "validation.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e, "accuracy": 0.4 + e / 10, "ece": 0.3}) + "\n" for e in range(3)
        )
    )
    written = write_report([runs], tmp_path / "report")
    assert written["main"].splitlines()[2] == "| abmll | 0.600 +- 0.100 | 0.200 +- 0.100 |"
    assert written["main"].splitlines()[3] == "| reptile | 0.600 +- 0.100 | 0.200 +- 0.100 |"
    assert "| abmll | embedded | 0.1 | 0.500 +- 0.100 | 0.300 +- 0.100 |" in written["pruning"]
    csv_text = (tmp_path / "report" / "main.csv").read_text()
    assert csv_text.splitlines()[0] == "method,embedded accuracy,embedded ECE"
    for name in ("epochs.png", "pruning.png", "samples.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def test_report_command_as_documented(tmp_path):
    # docs/evaluation.md: python -m abmll_tune.report DIR... --out DIR, a subprocess in
    # another directory without PYTHONPATH; a bad input is one line and status 2
    import subprocess
    import sys

    fake_results(tmp_path / "eval" / "a", "abmll", "a")
    fake_results(tmp_path / "eval" / "b", "reptile", "b")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "abmll_tune.report", "eval", "--out", "report"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| abmll | 0.600 +- 0.100 |" in (tmp_path / "report" / "main.md").read_text()
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "abmll_tune.report", "empty", "--out", "report2"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no results.json or validation.jsonl" in result.stderr
    assert not (tmp_path / "report2").exists()


def test_report_beta_ablation_table(tmp_path):
    for beta in (1.0, 1e-8):
        fake_results(tmp_path / f"beta_{beta:g}", "abmll", f"beta_{beta:g}", beta=beta)
    written = write_report([tmp_path], tmp_path / "report")
    assert (
        "| embedded | 0 | beta_1 |" in written["beta_ablation"]
        and "| embedded | -8 | beta_1e-08 |" in written["beta_ablation"]
    )


def test_report_rejects_empty_and_incompatible_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no results.json or validation.jsonl"):
        write_report([tmp_path / "empty"], tmp_path / "r")
    fake_results(tmp_path / "mixed" / "a", "abmll", "a", seeds=(100,))
    fake_results(tmp_path / "mixed" / "b", "reptile", "b", seeds=(100, 13))
    with pytest.raises(ReportError, match="different protocols"):
        write_report([tmp_path / "mixed"], tmp_path / "r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"format": "lm-eval"}))
    with pytest.raises(ReportError, match="not an abmll-tune results file"):
        write_report([tmp_path / "other"], tmp_path / "r")


def test_sweep_writes_one_directory_per_run_and_resumes(embedded_overrides, tmp_path, capsys):
    import subprocess
    import sys

    from helpers import REPO

    paths = embedded_overrides
    evals = [
        f"--eval-override={p}"
        for p in paths
        + ["evaluation.max_tasks=2", "evaluation.seeds=[100]", "evaluation.samples=[1]"]
    ]
    cmd = [
        sys.executable,
        "-m",
        "abmll_tune.sweep",
        "--config",
        str(REPO / "configs" / "tiny_cpu_abmll.yaml"),
        "--eval-config",
        str(REPO / "configs" / "tiny_cpu_eval.yaml"),
        "--out",
        str(tmp_path / "sweep"),
        "--log10-betas",
        "0,-8",
        "--seeds",
        "0",
        *evals,
        "--",
        *paths,
        "epochs=1",
        "stop_after_visits=4",
        "validation.max_tasks=2",
    ]
    # from another directory, without the checkout on PYTHONPATH: the installed package only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    options = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    result = subprocess.run(cmd, **options)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert runs == ["beta_1_seed_0", "beta_1e-08_seed_0"]
    for run in runs:
        results = json.loads((tmp_path / "sweep" / run / "eval" / "results.json").read_text())
        assert results["training"]["beta"] == (1.0 if run.startswith("beta_1_") else 1e-8)
    # the re-run skips both: its driver in this process (a subprocess costs ~8 s of imports)
    from abmll_tune.sweep import main as sweep_main

    assert sweep_main(cmd[3:]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2


def test_evaluation_accepts_the_exported_peft_adapter_with_the_same_results(
    trained, tmp_path, capsys
):
    out, common = trained
    best = out / "checkpoints" / "best"
    config = json.loads((best / "adapter" / "adapter_config.json").read_text())
    # what peft.AutoPeftModelForCausalLM.from_pretrained needs to find the base model
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(
        Path(common[2].split("=", 1)[1]).resolve()
    )  # the checkpointer's directory
    results = {}
    for kind, checkpoint in (("abmll", best), ("peft", best / "adapter")):
        code, _, err = tune_run(
            "evaluate_few_shot",
            "configs/tiny_cpu_eval.yaml",
            f"output_dir={tmp_path / kind}",
            *common,
            "method=structured_lora",
            f"adapter_checkpoint={checkpoint}",
            "evaluation.seeds=[100]",
            "evaluation.max_tasks=2",
            "evaluation.samples=[1]",
            capsys=capsys,
        )
        assert code == 0, err[-3000:]
        results[kind] = json.loads((tmp_path / kind / "results.json").read_text())["metrics"]
    assert results["peft"] == results["abmll"]
    neither = tmp_path / "empty"
    neither.mkdir()
    for method, extra, message in (
        ("structured_lora", [], "neither an abmll-tune checkpoint (meta.json) nor a PEFT LoRA"),
        ("abmll", [], "a PEFT LoRA adapter holds one LoRA pair"),
        ("structured_lora", ["model.lora_rank=4"], "r = 8, the model's adapters have 4"),
    ):
        checkpoint = neither if "neither" in message else best / "adapter"
        code, _, err = tune_run(
            "evaluate_few_shot",
            "configs/tiny_cpu_eval.yaml",
            f"output_dir={tmp_path / 'bad'}",
            *common,
            f"method={method}",
            f"adapter_checkpoint={checkpoint}",
            *extra,
            capsys=capsys,
        )
        assert code == 2 and message in err, err[-2000:]


def test_adaptation_beta_and_optimizer_reach_the_adaptation(data, monkeypatch):
    """adapt_beta sets the KL's weight during adaptation (per_example: 1 / support size)
    and adapt_optimizer the optimizer the inner steps take; Reptile has no KL to weigh."""
    from abmll_tune.methods import ABMLL, Reptile

    seen = []
    original = ABMLL.inner_loss

    def spy(self, model, batch, loss_fn):
        seen.append(self.beta)
        return original(self, model, batch, loss_fn)

    monkeypatch.setattr(ABMLL, "inner_loss", spy)
    tasks = ["emb-test-00"]
    common = dict(seeds=(100,), adapt_steps=2, samples=(1,), eval_batch_size=32)
    support, _ = data.eval_task(tasks[0], 100, "test")
    model = model_for("abmll")
    runs = {}
    for beta in (None, "per_example", 0.5):
        seen.clear()
        settings = EvalSettings(adapt_beta=beta, **common)
        runs[beta] = evaluate_tasks(model, data, tasks, settings, method=ABMLL(beta=1e-6))
        assert set(seen) == {{None: 1e-6, "per_example": 1.0 / len(support), 0.5: 0.5}[beta]}, seen
    assert [r["probs"] for r in runs[None]] != [r["probs"] for r in runs[0.5]]
    # SGD takes the gradient's size, AdamW about the learning rate: different adaptations
    plain = model_for("reptile")
    adamw, sgd = (
        evaluate_tasks(
            plain, data, tasks, EvalSettings(adapt_optimizer=o, adapt_beta=0.5, **common),
            method=Reptile(),
        )
        for o in ("adamw", "sgd")
    )  # fmt: skip
    assert [r["probs"] for r in adamw] != [r["probs"] for r in sgd]
    assert (
        EvalSettings(adapt_optimizer="sgd")
        .make_optimizer()([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}])
        .__class__
        is torch.optim.SGD
    )


def test_benchmark_table_renders_a_committed_summary():
    from abmll_tune.report import benchmark_table

    def metric(mean, se):
        return {"mean": mean, "se": se}

    summary = {
        "methods": {
            "reptile": {"accuracy": metric(0.66, 0.059), "ece": metric(0.2, 0.01),
                        "nll": metric(0.9, 0.05)},
            "reptile [s10]": {"accuracy": metric(0.1, 0.1), "ece": metric(0, 0), "nll": metric(0, 0)},
        },
        "seeds": 3, "chance_accuracy": 1 / 3, "date": "2026-12-06", "commit": "abcdef123",
        "machine": "x86_64", "command": "python bench/bench_methods.py",
    }  # fmt: skip
    text = benchmark_table(summary)
    assert "| reptile | 0.660 +- 0.059 | 0.200 +- 0.010 | 0.900 +- 0.050 |" in text
    assert (
        "[s10]" not in text
        and "commit abcdef1" in text
        and "`python bench/bench_methods.py`" in text
    )


def test_prior_natural_adaptation_runs_for_abmll_and_is_refused_without_a_prior(data):
    from abmll_tune.methods import ABMLL, Reptile

    tasks = ["emb-test-00"]
    common = dict(seeds=(100,), adapt_steps=2, samples=(1,), eval_batch_size=32)
    natural = EvalSettings(adapt_optimizer="prior_natural", adapt_beta="per_example", **common)
    model = model_for("abmll")
    records = evaluate_tasks(model, data, tasks, natural, method=ABMLL(beta=1e-6))
    adamw = evaluate_tasks(model, data, tasks, EvalSettings(adapt_beta="per_example", **common),
                           method=ABMLL(beta=1e-6))  # fmt: skip
    assert records and all(abs(sum(r["probs"]) - 1) < 1e-5 for r in records)
    assert [r["probs"] for r in records] != [r["probs"] for r in adamw]
    with pytest.raises(ValueError, match="method 'reptile' has none"):
        evaluate_tasks(model_for("reptile"), data, tasks, natural, method=Reptile())
    with pytest.raises(ValueError, match="prior_natural needs adapt_beta"):
        EvalSettings(adapt_optimizer="prior_natural")
