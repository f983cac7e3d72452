"""Science where the answer is known: every method on a planted hierarchical task family.

    python bench/bench_planted.py --out bench_results/planted      (part of make bench)

The family (:mod:`abmll_tune.embedded.planted`) is generated from the briefly pre-trained
tiny backbone: a true global adapter theta*, per task a true adapter phi_i ~ N(theta*,
sigma*^2) entrywise, labels sampled from the teacher (backbone + phi_i). So the teacher's
probabilities are the Bayes-optimal predictions (the oracle), the prior predictive (the
teacher averaged over fresh draws of phi, ``PRIOR_SAMPLES`` of them, with its Monte Carlo
standard error) is the best any model can do before seeing a task's examples, and ABMLL's
hierarchical Gaussian model is exactly right. For each spread sigma* (``--spreads``, in
units of theta*'s RMS entry) this script:

1. generates the family and builds it with support sets of K = 1, 5 and 16;
2. meta-trains Regular LoRA (pooled), Reptile and ABMLL (the configs' defaults) with the
   real recipes for ``--seeds`` training seeds, until validation stops improving
   (``early_stopping_patience``, at most ``--max-epochs``); the recipe's validation adapts
   as the K = 16 test does (8 steps of 2 on the validation tasks);
3. scores each run on the held-out test tasks (bench/planted_eval.py), training seed i
   paired with support seed i: before adaptation (K = 0, the epoch checkpoint with the
   lowest zero-step validation NLL) and after adapting to K = 1, 5, 16 examples (the
   recipe's best checkpoint);
4. climbs a sanity ladder before comparing methods: (a) a model whose global mean and std
   are theta* and sigma* reproduces the prior predictive before adaptation and comes near
   the oracle after it; (b) pooled LoRA approaches the prior predictive before adaptation;
   (c) Reptile and ABMLL do too, and after adaptation come nearer the oracle than
   Pretrained; (d) the comparison: accuracy, ECE, NLL, excess NLL over the oracle,
   paired ABMLL - Reptile differences, and the function-space distance to the truth
   before adaptation, KL(prior predictive || method) on the test questions, beside RMS
   sigma_theta / sigma* layer by layer.

Writes ``planted.json``, ``planted.md``, ``learning_curves_spread*.png`` and
``reliability_spread*.png`` under ``--out``; runs go ``--workers`` at a time on
single-thread workers, and a finished step is skipped when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from abmll_tune.benchmarking import EB_OVERRIDES, TUNE, prepare_embedded, run_logged
from abmll_tune.benchmarking import PLANTED_ADAPTATION as ADAPTATION
from abmll_tune.benchmarking import PLANTED_PROTOCOLS as PROTOCOLS

REPO = Path(__file__).resolve().parents[1]
SUPPORT_SEEDS = (100, 13, 21, 42, 87)  # MetaICL's five support seeds
# name -> (recipe, config, overrides)
METHODS = {
    "lora": ("reptile_single_device", "tiny_cpu_lora", []),
    "reptile": ("reptile_single_device", "tiny_cpu_reptile", []),
    "abmll": ("abmll_meta_single_device", "tiny_cpu_abmll", []),
    # the empirical-Bayes reading (docs/method.md "Fitting the prior")
    "abmll_eb": ("abmll_meta_single_device", "tiny_cpu_abmll", EB_OVERRIDES),
}
# pooled LoRA's epoch is every training question (4000 steps of 2), a meta-learner's one
# visit per task (40 x 5 inner steps): LoRA is capped at 1 epoch, 4000 steps, still more
# than the 1600 inner steps of a meta-learner's 8 epochs
MAX_EPOCHS = {"lora": 1}
# the recipe's validation adapts as the K = 16 test does (PLANTED_PROTOCOLS["K16"])
VALIDATION = ["validation.adapt_steps=8", "validation.adapt_batch_size=2",
              "validation.seeds=[100]", "validation.max_tasks=null",
              f"validation.adapt_optimizer={ADAPTATION['optimizer']}",
              f"validation.adapt_beta={'null' if ADAPTATION['beta'] is None else ADAPTATION['beta']}",
              f"validation.adapt_lr_mean={ADAPTATION['lr_mean']}",
              f"validation.adapt_lr_std={ADAPTATION['lr_std']}"]  # fmt: skip
TRUTH_SAMPLES = 64  # the truth model's prior predictive: as many draws as the reference

# ------------------------------------------------------------------------------ running


def train(run: Path, method: str, seed: int, data: Path, common, args) -> Path:
    if (run / "done").is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    recipe, config, overrides = METHODS[method]
    cmd = [
        TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml",
        f"output_dir={run}", f"seed={seed}", f"epochs={min(args.max_epochs, MAX_EPOCHS.get(method, args.max_epochs))}",
        f"early_stopping_patience={args.patience}", "keep_epoch_checkpoints=true",
        *common, f"data.path={data}", *VALIDATION, *overrides,
    ]  # fmt: skip
    if (run / "checkpoints" / "latest").is_dir():
        cmd.append("resume_from_checkpoint=true")
    else:
        cmd.append("overwrite_output_dir=true")
    run_logged(cmd, run / "bench.log", REPO)
    (run / "done").write_text("")
    return run


def evaluate(result: Path, family: Path, data: dict, tokenizer: Path, *, checkpoint=None,
             select=None, seeds=(100,), zero_step_samples=None) -> Path:  # fmt: skip
    if result.is_file():
        return result
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, str(REPO / "bench" / "planted_eval.py"), "--family", str(family),
        "--data", ",".join(str(data[k]) for k in (1, 5, 16)), "--tokenizer-dir", str(tokenizer),
        "--seeds", ",".join(map(str, seeds)), "--out", str(result),
    ]  # fmt: skip
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if select is not None:
        cmd += ["--select-zero-step", str(select)]
    if zero_step_samples is not None:
        cmd += ["--zero-step-samples", str(zero_step_samples)]
    run_logged(cmd, result.with_suffix(".log"), REPO)
    return result


def write_truth_checkpoint(template: Path, family: Path, out: Path) -> Path:
    """An ABMLL checkpoint (``template``'s) whose global and local Gaussians are the truth
    (:func:`abmll_tune.embedded.planted.truth_adapters`)."""
    from safetensors.torch import load_file, save_file

    from abmll_tune.embedded.planted import truth_adapters

    if (out / "adapters.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(template, tmp)
    config = json.loads((tmp / "meta.json").read_text())["config"]["model"]
    adapters = truth_adapters(family, load_file(str(template / "adapters.safetensors")), config)
    save_file(adapters, str(tmp / "adapters.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def run_spread(spread: float, args, out: Path, common: list[str], pool) -> dict:
    from abmll_tune.embedded.planted import SUPPORT_KS, PlantedFamily, generate_family

    root = out / f"spread{spread:g}"
    src = root / "family"
    tokenizer = out / "data" / "embedded_src" / "tokenizer"
    if not (src / "planted.json").is_file():
        generate_family(
            PlantedFamily(spread=spread, seed=args.family_seed), out / "backbone", tokenizer, src
        )
    data = {}
    for k in SUPPORT_KS:
        data[k] = root / f"k{k}"
        if not (data[k] / "manifest.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "abmll_tune.data", "build", "--quiet", "--split", "planted",
                 "--splits-file", str(src / "splits.yaml"), "--source", str(src), "--k", str(k),
                 "--out", str(data[k])],
                check=True,
            )  # fmt: skip
    common = [*common, f"checkpointer.checkpoint_dir={src / 'backbone'}"]
    seeds = range(args.seeds)
    all_seeds = [SUPPORT_SEEDS[s] for s in seeds]
    runs = {
        (name, seed): root / "runs" / f"{name}_seed{seed}"
        for name in args.methods
        for seed in seeds
    }
    jobs = {
        key: pool.submit(train, run, key[0], key[1], data[16], common, args)
        for key, run in runs.items()
    }
    evals = {
        ("pretrained", None): pool.submit(
            evaluate, root / "eval" / "pretrained.json", src, data, tokenizer, seeds=all_seeds
        )
    }
    template = next(name for name in args.methods if name.startswith("abmll"))
    jobs[template, 0].result()
    truth = write_truth_checkpoint(
        runs[template, 0] / "checkpoints" / "epoch_0", src, root / "truth" / "checkpoint"
    )
    evals["truth", None] = pool.submit(
        evaluate, root / "eval" / "truth.json", src, data, tokenizer, checkpoint=truth,
        seeds=all_seeds, zero_step_samples=TRUTH_SAMPLES,
    )  # fmt: skip
    for (name, seed), job in jobs.items():
        run = job.result()
        evals[name, seed] = pool.submit(
            evaluate, root / "eval" / f"{name}_seed{seed}.json", src, data, tokenizer,
            checkpoint=run / "checkpoints" / "best", select=run / "checkpoints",
            seeds=[SUPPORT_SEEDS[seed]],
        )  # fmt: skip
    return {
        "root": root,
        "family": src,
        "runs": runs,
        "results": {key: Path(f.result()) for key, f in evals.items()},
    }


# ------------------------------------------------------------------------------ scoring

METRICS = ("accuracy", "ece", "nll", "brier", "excess_nll", "kl_from_prior")


def score_spread(result: dict) -> dict:
    from abmll_tune.embedded.planted import (
        jackknife,
        planted_scores,
        read_oracle,
        read_prior_draws,
    )
    from abmll_tune.metrics import all_metrics, mean_and_se, mean_categorical_kl, pad_probs

    oracle = read_oracle(result["family"])
    loaded = {key: json.loads(path.read_text()) for key, path in result["results"].items()}
    # the test questions (the same for every protocol, seed and method)
    ids = sorted({r["id"] for r in loaded["pretrained", None]["protocols"]["K0"]})
    position = {i: n for n, i in enumerate(ids)}
    gold = np.array([oracle[i]["gold"] for i in ids])
    refs = {
        name: pad_probs([oracle[i][name] for i in ids])
        for name in ("oracle", "prior_predictive", "global_teacher", "backbone")
    }
    # the stored draws are padded to 4 options; the family's questions may have fewer
    draws = read_prior_draws(result["family"], ids)[:, : refs["oracle"].shape[1]]
    references = {name: planted_scores(p, gold, refs["oracle"], refs["prior_predictive"])
                  for name, p in refs.items()}  # fmt: skip
    mc = {}
    for metric in ("accuracy", "ece", "nll"):
        _, se = jackknife(draws, lambda p, m=metric: all_metrics(p, gold)[m])
        mc[metric] = se
    _, mc["excess_nll"] = jackknife(draws, lambda p: mean_categorical_kl(refs["oracle"], p))
    references["prior_predictive"]["mc_se"] = mc
    references["prior_predictive"]["draws"] = int(draws.shape[-1])
    # the Monte Carlo noise floor of KL(pp || model): E KL between two independent J-draw
    # estimates of the same predictive, which is about half that between two J/2-draw halves
    half = draws.shape[-1] // 2
    halves = [draws[..., :half].mean(-1), draws[..., half : 2 * half].mean(-1)]
    references["prior_predictive"]["kl_noise_floor"] = 0.5 * mean_categorical_kl(*halves)

    per_seed: dict = {}  # protocol -> label -> list of per-seed metric dicts
    pooled: dict = {}  # protocol -> label -> (probs, gold) over seeds, for reliability
    selection: dict = {}
    for (label, seed), res in loaded.items():
        if "K0" in res["selection"]:
            selection.setdefault(label, {})[seed] = res["selection"]["K0"]
        for protocol, records in res["protocols"].items():
            by_seed: dict = {}
            for r in records:
                by_seed.setdefault(r["seed"], []).append(r)
            for support_seed in sorted(by_seed, key=SUPPORT_SEEDS.index):
                recs = sorted(by_seed[support_seed], key=lambda r: position[r["id"]])
                assert [r["id"] for r in recs] == ids, "every run scores every test question"
                assert all(r["gold"] == g for r, g in zip(recs, gold, strict=True)), "gold"
                probs = pad_probs([r["probs"] for r in recs])
                m = planted_scores(probs, gold, refs["oracle"], refs["prior_predictive"])
                per_seed.setdefault(protocol, {}).setdefault(label, []).append(m)
                pooled.setdefault(protocol, {}).setdefault(label, []).append(probs)
    # the Bayes posterior predictive after each support set: the reference an adapted
    # model can at best reach with these draws (importance-weighted prior draws)
    ess: dict = {}
    for protocol in (p for p in per_seed if p != "K0"):
        k = PROTOCOLS[protocol][0]
        seeds_used = sorted(
            {r["seed"] for r in loaded["pretrained", None]["protocols"][protocol]},
            key=SUPPORT_SEEDS.index,
        )
        for support_seed in seeds_used:
            probs, values = bayes_predictive(result["family"], ids, draws, k, support_seed)
            probs = probs[:, : refs["oracle"].shape[1]]  # draws are padded to 4 options
            m = planted_scores(probs, gold, refs["oracle"], refs["prior_predictive"])
            per_seed[protocol].setdefault("bayes", []).append(m)
            pooled[protocol].setdefault("bayes", []).append(probs)
            ess.setdefault(protocol, []).extend(values)
    summary: dict = {"references": references, "protocols": {}, "selection_k0": selection}
    summary["bayes_ess"] = {p: float(np.mean(v)) for p, v in ess.items()}
    for protocol, rows in per_seed.items():
        table = {}
        for label, seed_rows in rows.items():
            entry = {}
            for m in METRICS:
                mean, se = mean_and_se(r[m] for r in seed_rows)
                entry[m] = {"mean": mean, "se": se if len(seed_rows) > 1 else None}
            entry["n_seeds"] = len(seed_rows)
            table[label] = entry
        paired = {}
        for a, b in (("abmll", "reptile"), ("abmll_eb", "reptile"), ("abmll_eb", "abmll"),
                     ("abmll", "lora"), ("reptile", "lora"), ("truth", "pretrained"),
                     ("bayes", "truth")):  # fmt: skip
            if a in rows and b in rows and len(rows[a]) == len(rows[b]) > 1:
                paired[f"{a} - {b}"] = {}
                for m in METRICS:
                    d = [x[m] - y[m] for x, y in zip(rows[a], rows[b], strict=True)]
                    mean, se = mean_and_se(d)
                    paired[f"{a} - {b}"][m] = {"mean": mean, "se": se}
        reliability = {name: _reliability(p, gold) for name, p in refs.items()}
        for label, probs in pooled[protocol].items():
            reliability[label] = _reliability(np.concatenate(probs), np.tile(gold, len(probs)))
        summary["protocols"][protocol] = {
            "methods": table,
            "paired": paired,
            "_reliability": reliability,
        }
    summary["ladder"] = ladder(summary)
    return summary


def bayes_predictive(family, ids, draws, k, seed) -> tuple[np.ndarray, list[float]]:
    """Per test task, :func:`abmll_tune.embedded.planted.posterior_predictive` after its
    K-shot support set of ``seed``, for the test questions ``ids`` (rows of ``draws``)."""
    from abmll_tune.embedded.planted import (
        posterior_predictive,
        read_prior_draws,
        support_examples,
    )

    out = np.full(draws.shape[:2], np.nan)
    by_task: dict = {}
    for row, qid in enumerate(ids):
        by_task.setdefault(qid.rsplit(":", 1)[0], []).append(row)
    ess = []
    for task, rows in by_task.items():
        support = support_examples(family, task, k, seed)
        support_draws = read_prior_draws(family, [r["id"] for r in support])
        gold = [r["options"].index(r["output"]) for r in support]
        out[rows], e = posterior_predictive(draws[rows], support_draws, gold)
        ess.append(e)
    return out, ess


def ladder(summary: dict) -> list[dict]:
    """The sanity ladder's rungs, each with its numbers and whether it holds."""
    refs = summary["references"]
    pp, orc = refs["prior_predictive"], refs["oracle"]
    k0 = summary["protocols"]["K0"]["methods"]
    k16 = summary["protocols"]["K16"]["methods"]
    rungs = []
    truth = k0["truth"]
    # the truth model's own Monte Carlo (64 samples) and the reference's: 3 combined SE
    tol = 3 * math.hypot(pp["mc_se"]["nll"], truth["nll"]["se"] or 0.0)
    rungs.append({
        "rung": "a", "what": "truth model before adaptation = prior predictive (NLL)",
        "value": truth["nll"]["mean"], "reference": pp["nll"], "tolerance": tol,
        "kl_from_prior": truth["kl_from_prior"]["mean"],
        "holds": abs(truth["nll"]["mean"] - pp["nll"]) <= tol,
    })  # fmt: skip
    rungs.append({
        "rung": "a", "what": "truth model after adapting to 16 examples: accuracy nearer the "
        "oracle than Pretrained's",
        "value": k16["truth"]["accuracy"]["mean"], "reference": orc["accuracy"],
        "pretrained": k16["pretrained"]["accuracy"]["mean"],
        "holds": k16["truth"]["accuracy"]["mean"] > k16["pretrained"]["accuracy"]["mean"],
    })  # fmt: skip
    # the adaptation protocol helps where the answer is known: the truth's excess NLL
    # falls with K and beats Pretrained's by more than 2 paired SE at K = 5 and 16
    ks = [p for p in ("K0", "K1", "K5", "K16") if p in summary["protocols"]]
    excess = [summary["protocols"][p]["methods"]["truth"]["excess_nll"]["mean"] for p in ks]
    rungs.append({
        "rung": "a", "what": "truth model's excess NLL falls with K (K = 0, 1, 5, 16)",
        "value": excess[-1], **{f"excess_nll_{p}": v for p, v in zip(ks, excess, strict=True)},
        "holds": all(b < a for a, b in zip(excess, excess[1:], strict=False)),
    })  # fmt: skip
    for protocol in ("K5", "K16"):
        diff = summary["protocols"][protocol]["paired"].get("truth - pretrained")
        if diff is not None:
            d = diff["excess_nll"]
            rungs.append({
                "rung": "a", "what": f"truth beats Pretrained after adaptation ({protocol}): "
                "excess NLL difference below -2 paired SE",
                "value": d["mean"], "se": d["se"], "holds": d["mean"] < -2 * d["se"],
            })  # fmt: skip
    base = k0["pretrained"]["kl_from_prior"]["mean"]
    for rung, names in (("b", ("lora",)), ("c", ("reptile", "abmll", "abmll_eb"))):
        for name in names:
            if name not in k0:
                continue
            closed = 1 - k0[name]["kl_from_prior"]["mean"] / base
            rungs.append({
                "rung": rung, "what": f"{name} before adaptation approaches the prior predictive: "
                "share of Pretrained's KL(prior predictive || model) closed (>= 0.5)",
                "value": closed, "kl_from_prior": k0[name]["kl_from_prior"]["mean"],
                "pretrained_kl_from_prior": base, "holds": closed >= 0.5,
            })  # fmt: skip
    for name in ("reptile", "abmll", "abmll_eb"):
        if name in k16:
            rungs.append({
                "rung": "c", "what": f"{name} after adapting to 16 examples: excess NLL below "
                "Pretrained's",
                "value": k16[name]["excess_nll"]["mean"],
                "pretrained": k16["pretrained"]["excess_nll"]["mean"],
                "holds": k16[name]["excess_nll"]["mean"] < k16["pretrained"]["excess_nll"]["mean"],
            })  # fmt: skip
    return rungs


def _reliability(probs: np.ndarray, gold: np.ndarray) -> dict:
    from abmll_tune.metrics import reliability

    rel = reliability(probs, gold)  # NaN (empty bins) as null: the JSON stays standard
    return {
        k: [None if math.isnan(x) else x for x in np.asarray(v).tolist()] for k, v in rel.items()
    }


def weight_space_distances(result: dict) -> dict:
    """Per method (mean over seeds) and layer, for the learned global mean Delta W = s B A
    (the recipe's best checkpoint): ||Delta W - Delta W*||_F / ||Delta W*||_F (1 for an
    adapter that never moved), its norm ratio and cosine with Delta W* (a rank-8 product is
    not identifiable: the function-space distance of the K = 0 table is the fair one), and
    for ABMLL (and the truth model) RMS sigma_theta / sigma*."""
    from safetensors.torch import load_file

    from abmll_tune.embedded.planted import mean_delta, read_family, std_floors
    from abmll_tune.modules.gaussian import std_variance

    meta = read_family(result["family"])
    theta = load_file(str(Path(result["family"]) / "theta_star.safetensors"))
    checkpoints = {key: run / "checkpoints" / "best" for key, run in result["runs"].items()}
    checkpoints["truth", None] = result["root"] / "truth" / "checkpoint"
    out: dict = {}
    floors: dict = {}
    for (name, _), best in sorted(checkpoints.items(), key=str):
        state = load_file(str(best / "adapters.safetensors"))
        config = json.loads((best / "meta.json").read_text())["config"]["model"]
        scale = config["lora_alpha"] / config["lora_rank"]
        layers = {}
        for prefix, sigma_star in meta["sigma_star"].items():
            target = mean_delta((theta[f"{prefix}.lora_a"], theta[f"{prefix}.lora_b"]))
            a = state[f"{prefix}.lora_global_mean_a.weight"]
            b = state[f"{prefix}.lora_global_mean_b.weight"]
            learned = scale * b @ a
            row = {
                "mean_rel_error": float((learned - target).norm() / target.norm()),
                "norm_ratio": float(learned.norm() / target.norm()),
                "cosine": float(
                    (learned * target).sum() / (learned.norm() * target.norm() + 1e-30)
                ),
            }
            std_a = state.get(f"{prefix}.lora_global_std_a.weight")
            if std_a is not None:
                if name not in floors:
                    floors[name] = std_floors(result["family"], config)
                m = scale * state[f"{prefix}.lora_global_std_b.weight"] @ std_a
                var = std_variance(m, floors[name][prefix], config["std_param"])
                row["sigma_rms_over_sigma_star"] = float(var.mean().sqrt() / sigma_star)
            layers[prefix] = row
        out.setdefault(name, []).append(layers)
    summary = {}
    for name, per_seed in out.items():
        summary[name] = {}
        for prefix in per_seed[0]:
            summary[name][prefix] = {
                key: float(np.mean([s[prefix][key] for s in per_seed]))
                for key in per_seed[0][prefix]
            }
    return summary


def learning_curves(result: dict) -> dict:
    """Per method and seed: the recipe's validation rows (epoch 0 = before training; the
    K = 16 protocol) and the zero-step validation NLL of every epoch checkpoint."""
    curves: dict = {}
    for (name, seed), run in sorted(result["runs"].items(), key=str):
        rows = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
        best = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
        res = json.loads(result["results"][name, seed].read_text())
        k0 = res["selection"].get("K0", {})
        curves.setdefault(name, []).append({
            "seed": seed,
            "adapted": [{k: r[k] for k in ("epoch", "accuracy", "nll", "ece")} for r in rows],
            "best_epoch": best["progress"]["validation"]["epoch"],
            "zero_step": [{"epoch": int(r["checkpoint"].split("_")[1]) + 1, "nll": r["nll"],
                           "accuracy": r["accuracy"]} for r in k0.get("rows", [])],
            "zero_step_chosen": k0.get("chosen"),
        })  # fmt: skip
    return curves


# ------------------------------------------------------------------------------ report

LABELS = ("bayes", "truth", "pretrained", "lora", "reptile", "abmll", "abmll_eb")


def _fmt(entry: dict, m: str, digits: int = 3) -> str:
    se = entry[m]["se"]
    return f"{entry[m]['mean']:.{digits}f} ± " + (
        "n/a" if se is None or math.isnan(se) else f"{se:.{digits}f}"
    )


def markdown(report: dict) -> str:
    lines = [
        f"# Planted hierarchical family ({report['date']}, {report['seeds']} paired seeds, at "
        f"most {report['max_epochs']} epochs with early stopping after {report['patience']} "
        f"without improvement; this invocation {report['minutes']:.0f} min, finished steps "
        "reused)",
        "",
        "Held-out test tasks, mean ± SE over seeds (Pretrained and the truth model: over the "
        "5 support seeds). K = 0: scored before adaptation; K = 1, 5, 16: after adapting to "
        "K examples (1 step of 1, 5 of 1, 8 of 2). excess NLL = E_x KL(oracle ‖ method); "
        "KL(pp ‖ ·) = E_x KL(prior predictive ‖ method), the distance to the truth before "
        "adaptation (0 for the prior predictive). Figures on the CPU depend on its floating "
        "point; the orderings are what the SEs support.",
    ]
    for spread, res in report["spreads"].items():
        refs = res["scores"]["references"]
        pp = refs["prior_predictive"]
        lines += ["", f"## spread {spread} (sigma* = {spread} × RMS entry of ΔW*)", ""]
        fam = res["family"]["evaluation_tasks"]
        lines.append(
            f"Family: oracle accuracy {fam['oracle_accuracy']:.3f} on its evaluation tasks; the "
            f"global teacher (θ* alone) agrees with the oracle's argmax on "
            f"{fam['global_teacher_agreement']:.3f} of questions, the backbone on "
            f"{fam['backbone_agreement']:.3f}. Prior predictive from {pp['draws']} draws, Monte "
            f"Carlo SE: accuracy {pp['mc_se']['accuracy']:.4f}, NLL {pp['mc_se']['nll']:.4f}, "
            f"ECE {pp['mc_se']['ece']:.4f}."
        )
        lines += ["", "### Sanity ladder", "", "| rung | check | value | against | holds |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in res["scores"]["ladder"]:
            against = {k: v for k, v in r.items() if k not in ("rung", "what", "value", "holds")}
            lines.append(
                f"| {r['rung']} | {r['what']} | {r['value']:.3f} | "
                + ", ".join(f"{k} {v:.3f}" for k, v in against.items())
                + f" | {'yes' if r['holds'] else '**no**'} |"
            )
        for protocol in (p for p in PROTOCOLS if p in res["scores"]["protocols"]):
            block = res["scores"]["protocols"][protocol]
            # the distance to the prior predictive means something before adaptation only
            metrics = ("accuracy", "ece", "nll", "excess_nll")
            metrics += ("kl_from_prior",) if protocol == "K0" else ()
            k = PROTOCOLS[protocol][0] if protocol != "K0" else 0
            lines += ["", f"### K = {k}" + (" (before adaptation)" if not k else ""), "",
                      "| model | accuracy | ECE | NLL | excess NLL |"
                      + (" KL(pp ‖ ·) |" if protocol == "K0" else ""),
                      "|---|---|---|---|---|" + ("---|" if protocol == "K0" else "")]  # fmt: skip
            for name in ("oracle", "prior_predictive", "global_teacher", "backbone"):
                ref = refs[name]
                lines.append(f"| *{name}* | " + " | ".join(f"{ref[m]:.3f}" for m in metrics) + " |")
            for name in LABELS:
                e = block["methods"].get(name)
                if e is not None:
                    lines.append(f"| {name} | " + " | ".join(_fmt(e, m) for m in metrics) + " |")
            if block["paired"]:
                lines += ["", "| paired difference | accuracy | ECE | NLL | excess NLL |",
                          "|---|---|---|---|---|"]  # fmt: skip
                for pair, d in block["paired"].items():
                    lines.append(f"| {pair} | " + " | ".join(
                        _fmt(d, m) for m in ("accuracy", "ece", "nll", "excess_nll")
                    ) + " |")  # fmt: skip
        lines += ["", "### Epochs", "", "| method | best epoch (K = 16 validation), per seed | "
                  "zero-step choice, per seed | epochs run |", "|---|---|---|---|"]  # fmt: skip
        for name, seeds in res["learning_curves"].items():
            lines.append(
                f"| {name} | {', '.join(str(c['best_epoch']) for c in seeds)} | "
                f"{', '.join(str(c['zero_step_chosen']) for c in seeds)} | "
                f"{', '.join(str(c['adapted'][-1]['epoch']) for c in seeds)} |"
            )
        lines += ["", "### Weight space", "",
                  "Learned global mean ΔW vs the truth ΔW* (mean over seeds, layer by layer): "
                  "‖ΔW − ΔW*‖/‖ΔW*‖ (1 = never moved), ‖ΔW‖/‖ΔW*‖, cos(ΔW, ΔW*), and RMS "
                  "σ_θ / σ* (ABMLL; the truth model's is 1 by construction)", "",
                  "| method | layer | rel. error | norm ratio | cosine | σ_θ / σ* |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, layers in res["distances"].items():
            for prefix, row in layers.items():
                sig = row.get("sigma_rms_over_sigma_star")
                lines.append(
                    f"| {name} | {prefix} | {row['mean_rel_error']:.3f} | {row['norm_ratio']:.3f} "
                    f"| {row['cosine']:+.3f} | {'' if sig is None else f'{sig:.3g}'} |"
                )
    sig = {spread: res["distances"].get("abmll") for spread, res in report["spreads"].items()}
    if all(v for v in sig.values()):
        lines += ["", "## σ_θ / σ* by spread (ABMLL, RMS over layers of the per-layer ratio)", "",
                  "| spread | σ_θ / σ* |", "|---|---|"]  # fmt: skip
        for spread, layers in sig.items():
            ratios = [row["sigma_rms_over_sigma_star"] for row in layers.values()]
            lines.append(f"| {spread} | {float(np.sqrt(np.mean(np.square(ratios)))):.3g} |")
    return "\n".join(lines) + "\n"


# the reading of each ABMLL variant's outer step, for the results file's sigma ratios
READINGS = {"abmll": "reptile", "abmll_eb": "marginal_likelihood"}


def results_summary(report: dict, command: str) -> dict:
    """The committed summary (``docs/results/planted.json``): per spread, RMS sigma_theta /
    sigma* by reading (RMS over layers of each layer's ratio, mean over seeds), the
    distance to the prior predictive before adaptation, KL(pp || method) as [mean, se],
    beside the prior predictive's own Monte Carlo noise floor, and the paired ABMLL minus
    Reptile differences by K as [mean, se]."""
    import platform
    import subprocess as sp

    commit = sp.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    out = {
        "date": report["date"],
        "commit": commit.stdout.strip() or None,
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU float32 "
        "(figures move with the CPU's floating point)",
        "seeds": report["seeds"],
        "max_epochs": report["max_epochs"],
        "patience": report["patience"],
        "methods": {name: METHODS[name][1:] for name in report["methods"]},
        "spreads": {},
    }
    for spread, res in report["spreads"].items():
        scores_ = res["scores"]
        k0 = scores_["protocols"]["K0"]["methods"]
        entry = {"sigma_ratio": {}, "kl_pp_k0": {}, "paired": {}}
        for name, layers in res["distances"].items():
            ratios = [row["sigma_rms_over_sigma_star"] for row in layers.values()
                      if "sigma_rms_over_sigma_star" in row]  # fmt: skip
            if ratios and name in READINGS:
                rms = float(np.sqrt(np.mean(np.square(ratios))))
                entry["sigma_ratio"][READINGS[name]] = rms
                entry["sigma_ratio"][name] = rms
        for name, row in k0.items():
            entry["kl_pp_k0"][name] = [row["kl_from_prior"]["mean"], row["kl_from_prior"]["se"]]
        entry["kl_pp_k0_noise_floor"] = scores_["references"]["prior_predictive"].get(
            "kl_noise_floor"
        )
        for protocol, block in scores_["protocols"].items():
            k = "0" if protocol == "K0" else str(PROTOCOLS[protocol][0])
            for pair, diff in block["paired"].items():
                a, b = pair.split(" - ")
                entry["paired"].setdefault(k, {})[f"{a}_minus_{b}"] = {
                    m: [diff[m]["mean"], diff[m]["se"]] for m in ("accuracy", "nll", "ece")
                }
        entry["bayes_ess"] = scores_.get("bayes_ess", {})
        out["spreads"][spread] = entry
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve_figure(spread, curves: dict, path: Path) -> None:
    """Validation by epoch, every seed (thin) and the mean (thick): accuracy after adapting
    as the K = 16 test does, and NLL before adaptation."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {
        "lora": "tab:blue",
        "reptile": "tab:green",
        "abmll": "tab:red",
        "abmll_eb": "tab:purple",
    }
    for name, seeds in curves.items():
        for key, ax, metric in (("adapted", axes[0], "accuracy"), ("zero_step", axes[1], "nll")):
            series = [[(r["epoch"], r[metric]) for r in c[key]] for c in seeds]
            for xs in series:
                if xs:
                    ax.plot(*zip(*xs, strict=True), color=colors.get(name), lw=0.5, alpha=0.5)
            n = min(len(xs) for xs in series)
            if n:
                mean = np.mean([[v for _, v in xs[:n]] for xs in series], axis=0)
                ax.plot(
                    [e for e, _ in series[0][:n]], mean, color=colors.get(name), lw=2, label=name
                )
    axes[0].set(title="validation accuracy, adapted (K = 16 protocol)", xlabel="epoch")
    axes[1].set(title="validation NLL before adaptation (epoch checkpoints)", xlabel="epoch")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"planted family, spread {spread}: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability_figure(spread, block: dict, path: Path) -> None:
    """One panel per predictor, each next to the oracle's reliability curve (bins with at
    least 10 questions; pooled over seeds)."""
    plt = _plt()
    rel = block["_reliability"]
    names = [n for n in ("prior_predictive", "global_teacher", *LABELS) if n in rel]

    def curve(name):
        data = {
            k: np.array([np.nan if x is None else x for x in rel[name][k]])
            for k in ("confidence", "accuracy", "count")
        }
        keep = data["count"] >= 10
        return data["confidence"][keep], data["accuracy"][keep]

    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):  # spare panels stay empty
        ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
        ax.plot(*curve("oracle"), color="black", lw=2, label="oracle")
        ax.plot(*curve(name), marker="o", ms=3, lw=1.2, color="tab:red", label=name)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0.2, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"planted family, spread {spread}, K = 16: reliability (accuracy vs confidence)")
    fig.supxlabel("confidence")
    fig.supylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/planted"))
    parser.add_argument("--spreads", default="1,2", help="sigma* / RMS entry of Delta W*")
    parser.add_argument("--seeds", type=int, default=5, help="paired training/support seeds")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=2, help="early_stopping_patience")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--family-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="where to write the summary the docs cite (make bench: docs/results/planted.json; "
        "default: OUT/results.json)",
    )
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not any(m.startswith("abmll") for m in args.methods):
        parser.error(
            f"--methods: unknown {unknown} or no ABMLL variant (the truth model's template)"
        )
    out = args.out.resolve()
    start = time.perf_counter()
    # data and backbone come from each family (its backbone is the sharpened source backbone)
    common = [
        c
        for c in prepare_embedded(out, args.pretrain_steps)
        if not c.startswith(("data.path=", "checkpointer.checkpoint_dir="))
    ]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "max_epochs": args.max_epochs,
        "patience": args.patience,
        "pretrain_steps": args.pretrain_steps,
        "methods": args.methods,
        "spreads": {},
    }
    from abmll_tune.embedded.planted import read_family

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for spread in (float(x) for x in args.spreads.split(",")):
            result = run_spread(spread, args, out, common, pool)
            scored = score_spread(result)
            curves = learning_curves(result)
            report["spreads"][f"{spread:g}"] = {
                "family": read_family(result["family"]),
                "scores": scored,
                "distances": weight_space_distances(result),
                "learning_curves": curves,
            }
            learning_curve_figure(
                f"{spread:g}", curves, out / f"learning_curves_spread{spread:g}.png"
            )
            reliability_figure(
                f"{spread:g}", scored["protocols"]["K16"], out / f"reliability_spread{spread:g}.png"
            )
    report["minutes"] = (time.perf_counter() - start) / 60
    from abmll_tune.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "planted.json", report)
    command = "python bench/bench_planted.py " + " ".join(sys.argv[1:])
    atomic_write_json(args.results or out / "results.json", results_summary(report, command))
    atomic_write_text(out / "planted.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
