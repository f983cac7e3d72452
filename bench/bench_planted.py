"""Science where the answer is known: every method on a planted hierarchical task family.

    python bench/bench_planted.py --out bench_results/planted      (part of make bench)

The family (:mod:`abmll_tune.embedded.planted`) is generated from the briefly pre-trained
tiny backbone: a true global adapter theta*, per task a true adapter phi_i ~ N(theta*,
sigma*^2) entrywise, labels sampled from the teacher (backbone + phi_i). So the teacher's
probabilities are the Bayes-optimal predictions (the oracle), and ABMLL's hierarchical
Gaussian model is exactly right. For each spread sigma* (``--spreads``, in units of
theta*'s RMS entry) this script:

1. generates the family and builds it twice (support sets of K = 5 and K = 16);
2. meta-trains Regular LoRA, Reptile and ABMLL (the configs' defaults) with the real
   recipes for ``--seeds`` training seeds, validation on the family's validation tasks;
   ABMLL also in a validation-tuned setting: each candidate of ``TUNING_GRID`` is trained
   with seed 0 and the one with the lowest validation NLL (at the recipe's own selected
   epoch) is then trained for every seed;
3. evaluates every best-validation checkpoint (and the Pretrained backbone) few-shot on
   the held-out test tasks with the evaluation recipe, training seed i paired with
   support seed i, K = 5 (5 steps of 1) and K = 16 (8 steps of 2);
4. scores the predictions against the oracle: accuracy, ECE, NLL, Brier and their gaps to
   the oracle on the same questions, the excess NLL E_x KL(oracle || method) (exact, no
   label noise), paired ABMLL - Reptile differences with their standard errors, how far
   the learned global mean and std are from theta* and sigma* (layer by layer), and
   reliability diagrams next to the oracle's.

Writes ``planted.json``, ``planted.md`` and ``reliability_spread*.png`` under ``--out``;
runs go ``--workers`` at a time on single-thread workers, a finished step is skipped when
the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import TUNE, _run, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUPPORT_SEEDS = (100, 13, 21, 42, 87)  # MetaICL's five support seeds
# K -> evaluation overrides: K_test steps of batch b (each support example used once or so)
KS = {5: ["evaluation.adapt_steps=5", "evaluation.adapt_batch_size=1"],
      16: ["evaluation.adapt_steps=8", "evaluation.adapt_batch_size=2"]}  # fmt: skip
# name -> (recipe, config, overrides)
METHODS = {
    "lora": ("reptile_single_device", "tiny_cpu_lora", []),
    "reptile": ("reptile_single_device", "tiny_cpu_reptile", []),
    "abmll": ("abmll_meta_single_device", "tiny_cpu_abmll", []),
}
# ABMLL settings tried on the validation tasks (seed 0): beta and gamma (the tempering),
# the std pairs' learning rates, posterior samples per inner step, and two ways off the
# pinned start: the CPU config (beta 1e-6, std pairs' B at 1e-3) starts with 98% of the
# entries pinned by beta / sigma_p^2 > 1 (modules.pinned_share; 6% with beta 1e-9, 10% with
# B at 2e-2, the 8B configs' init)
TUNING_GRID = {
    "beta1e-3": ["method.beta=1e-3", "method.gamma=1e-3"],
    "std_lr1e-2": ["method.inner_lr_std=1e-2", "method.outer_lr_std=1e-2"],
    "samples4": ["method.train_samples=4"],
    "beta1e-9": ["method.beta=1e-9"],
    "std_init2e-2": ["model.std_b_init_std=2e-2"],
}
EVAL_SAMPLES = 10  # ABMLL's posterior predictive: 10 samples (variant s10) and its mean


# ------------------------------------------------------------------------------ running


def train(run: Path, method: str, seed: int, data: Path, common, epochs, extra=()) -> Path:
    best = run / "checkpoints" / "best"
    if (run / "done").is_file():
        return best
    run.mkdir(parents=True, exist_ok=True)
    recipe, config, overrides = METHODS[method]
    cmd = [
        TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml",
        f"output_dir={run}", f"seed={seed}", f"epochs={epochs}", *common, f"data.path={data}",
        "validation.max_tasks=6", *overrides, *extra,
    ]  # fmt: skip
    if (run / "checkpoints" / "latest").is_dir():
        cmd.append("resume_from_checkpoint=true")
    _run(cmd, run / "bench.log")
    (run / "done").write_text("")
    return best


def evaluate(out: Path, method: str, checkpoint, seeds, k: int, data: Path, common) -> Path:
    predictions = out / "predictions.jsonl"
    if predictions.is_file():
        return predictions
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        TUNE, "run", "recipes/evaluate_few_shot", "--config", "configs/tiny_cpu_eval.yaml",
        f"method={method}", f"adapter_checkpoint={checkpoint or 'null'}",
        f"evaluation.seeds=[{','.join(map(str, seeds))}]", f"evaluation.samples=[{EVAL_SAMPLES}]",
        f"output_dir={out}", *common, f"data.path={data}", *KS[k],
    ]  # fmt: skip
    _run(cmd, out / "bench.log")
    return predictions


def best_validation_nll(run: Path) -> float:
    """NLL of the validation row the recipe selected (highest accuracy, first of ties)."""
    rows = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: (r["accuracy"], -r["epoch"]))
    return best["nll"]


def run_spread(spread: float, args, out: Path, common: list[str], pool) -> dict:
    from abmll_tune.embedded.planted import PlantedFamily, generate_family

    root = out / f"spread{spread:g}"
    src = root / "family"
    if not (src / "planted.json").is_file():
        generate_family(
            PlantedFamily(spread=spread, seed=args.family_seed),
            out / "backbone",
            out / "data" / "embedded_src" / "tokenizer",
            src,
        )
    data = {}
    for k in KS:
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
    runs = {}  # (name, seed) -> run dir
    jobs = {}
    for name in METHODS:
        for seed in seeds:
            runs[name, seed] = root / "runs" / f"{name}_seed{seed}"
            jobs[name, seed] = pool.submit(
                train, runs[name, seed], name, seed, data[16], common, args.epochs
            )
    tuning = {
        cand: pool.submit(
            train, root / "tuning" / cand, "abmll", 0, data[16], common, args.epochs, extra
        )
        for cand, extra in TUNING_GRID.items()
    }
    for future in tuning.values():
        future.result()
    nll = {cand: best_validation_nll(root / "tuning" / cand) for cand in TUNING_GRID}
    nll["default"] = None
    jobs["abmll", 0].result()
    nll["default"] = best_validation_nll(runs["abmll", 0])
    chosen = min(nll, key=nll.get)
    for seed in seeds:
        runs["abmll_tuned", seed] = root / "runs" / f"abmll_tuned_seed{seed}"
        if chosen == "default":
            runs["abmll_tuned", seed] = runs["abmll", seed]
        elif chosen in TUNING_GRID and seed == 0:
            runs["abmll_tuned", seed] = root / "tuning" / chosen
        else:
            jobs["abmll_tuned", seed] = pool.submit(
                train, runs["abmll_tuned", seed], "abmll", seed, data[16], common, args.epochs,
                TUNING_GRID[chosen],
            )  # fmt: skip
    evals = {}
    for k in KS:
        evals["pretrained", None, k] = pool.submit(
            evaluate, root / "eval" / f"pretrained_k{k}", "pretrained", None,
            [SUPPORT_SEEDS[s] for s in seeds], k, data[k], common,
        )  # fmt: skip
    for future in list(jobs.values()):
        future.result()
    for name in (*METHODS, "abmll_tuned"):
        method = "abmll" if name.startswith("abmll") else METHODS[name][1].removeprefix("tiny_cpu_")
        for seed in seeds:
            for k in KS:
                evals[name, seed, k] = pool.submit(
                    evaluate, root / "eval" / f"{name}_seed{seed}_k{k}", method,
                    runs[name, seed] / "checkpoints" / "best", [SUPPORT_SEEDS[seed]], k, data[k],
                    common,
                )  # fmt: skip
    predictions = {key: Path(f.result()) for key, f in evals.items()}
    return {
        "root": root,
        "family": src,
        "runs": runs,
        "predictions": predictions,
        "tuning": {"validation_nll": nll, "chosen": chosen},
    }


# ------------------------------------------------------------------------------ scoring


def scores(probs: np.ndarray, gold: np.ndarray, oracle: np.ndarray) -> dict:
    """Metrics against the sampled labels, and the exact excess NLL against the oracle."""
    from abmll_tune.metrics import all_metrics

    m = all_metrics(probs, gold)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(oracle > 0, oracle * (np.log(oracle) - np.log(probs)), 0.0)
    m["excess_nll"] = float(np.nansum(terms, axis=1).mean())
    return m


def score_spread(result: dict) -> dict:
    from abmll_tune.embedded.planted import read_oracle
    from abmll_tune.metrics import pad_probs

    oracle = read_oracle(result["family"])
    by_key: dict = {}
    for (name, seed, k), path in result["predictions"].items():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["prune"]:
                continue
            variant = r["variant"]
            if name.startswith("abmll"):
                label = name if variant == f"s{EVAL_SAMPLES}" else f"{name} [mean]"
            else:
                label = name
            s = seed if seed is not None else SUPPORT_SEEDS.index(r["seed"])
            by_key.setdefault((label, s, k), []).append(r)
    table: dict = {}
    references = {}
    for (label, _, k), records in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        records.sort(key=lambda r: r["id"])
        gold = np.array([oracle[r["id"]]["gold"] for r in records])
        assert all(r["gold"] == oracle[r["id"]]["gold"] for r in records), "gold mismatch"
        probs = pad_probs([r["probs"] for r in records])
        ref = {
            name: pad_probs([oracle[r["id"]][name] for r in records])
            for name in ("oracle", "prior_predictive", "global_teacher")
        }
        mine = scores(probs, gold, ref["oracle"])
        orc = scores(ref["oracle"], gold, ref["oracle"])
        row = table.setdefault(k, {}).setdefault(label, {})
        row.setdefault("seeds", []).append(
            {**mine, "gap": {m: mine[m] - orc[m] for m in ("accuracy", "ece", "nll", "brier")}}
        )
        if k not in references:  # the same test questions for every seed
            references[k] = {name: scores(p, gold, ref["oracle"]) for name, p in ref.items()}
            references[k]["_reliability"] = {name: _reliability(p, gold) for name, p in ref.items()}
        row.setdefault("_pooled", []).append((probs, gold))
    from abmll_tune.metrics import mean_and_se

    summary = {}
    for k, rows in table.items():
        summary[k] = {"references": {n: v for n, v in references[k].items() if n[0] != "_"}}
        reliability = dict(references[k]["_reliability"])
        for label, row in rows.items():
            seeds_rows = row["seeds"]
            entry = {}
            for m in ("accuracy", "ece", "nll", "brier", "excess_nll"):
                mean, se = mean_and_se(r[m] for r in seeds_rows)
                entry[m] = {"mean": mean, "se": se}
            for m in ("accuracy", "ece", "nll", "brier"):
                mean, se = mean_and_se(r["gap"][m] for r in seeds_rows)
                entry[f"gap_{m}"] = {"mean": mean, "se": se}
            entry["n_seeds"] = len(seeds_rows)
            summary[k][label] = entry
            probs = np.concatenate([p for p, _ in row["_pooled"]])
            gold = np.concatenate([g for _, g in row["_pooled"]])
            reliability[label] = _reliability(probs, gold)
        summary[k]["_reliability"] = reliability
        summary[k]["paired"] = {}
        for a, b in (("abmll", "reptile"), ("abmll_tuned", "reptile"), ("abmll", "lora")):
            if a in rows and b in rows and len(rows[a]["seeds"]) == len(rows[b]["seeds"]) > 1:
                diffs = {}
                for m in ("accuracy", "ece", "nll", "brier", "excess_nll"):
                    d = [
                        x[m] - y[m] for x, y in zip(rows[a]["seeds"], rows[b]["seeds"], strict=True)
                    ]
                    mean, se = mean_and_se(d)
                    diffs[m] = {"mean": mean, "se": se}
                summary[k]["paired"][f"{a} - {b}"] = diffs
    return summary


def _reliability(probs: np.ndarray, gold: np.ndarray) -> dict:
    from abmll_tune.metrics import reliability

    rel = reliability(probs, gold)  # NaN (empty bins) as null: the JSON stays standard
    return {
        k: [None if math.isnan(x) else x for x in np.asarray(v).tolist()] for k, v in rel.items()
    }


def weight_space_distances(result: dict) -> dict:
    """Per method (mean over seeds) and layer, for the learned global mean Delta W = s B A:
    ||Delta W - Delta W*||_F / ||Delta W*||_F (1 for an adapter that never moved), its norm
    ratio and cosine with Delta W* (the weights are not identifiable: a function equal to
    the teacher's can sit elsewhere, so the cosine says whether it moved *toward* theta*),
    and for ABMLL RMS(sigma_theta) / sigma*."""
    from safetensors.torch import load_file

    from abmll_tune.embedded.planted import mean_delta, read_family
    from abmll_tune.modules.gaussian import std_variance

    meta = read_family(result["family"])
    theta = load_file(str(Path(result["family"]) / "theta_star.safetensors"))
    out: dict = {}
    for (name, _), run in sorted(result["runs"].items(), key=str):
        best = run / "checkpoints" / "best"
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
                m = scale * state[f"{prefix}.lora_global_std_b.weight"] @ std_a
                var = std_variance(m, config.get("sigma_floor", math.exp(-20)), config["std_param"])
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


# ------------------------------------------------------------------------------ report


def _fmt(entry: dict, m: str, digits: int = 3) -> str:
    return f"{entry[m]['mean']:.{digits}f} ± {entry[m]['se']:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        f"# Planted hierarchical family ({report['date']}, {report['seeds']} paired seeds, "
        f"{report['epochs']} epochs; this invocation {report['minutes']:.0f} min, finished "
        "steps reused)",
        "",
        "Metrics on the held-out test tasks (mean ± SE over seeds). gap = method − oracle on "
        "the same questions; excess NLL = E_x KL(oracle ‖ method) (0 for the oracle).",
    ]
    for spread, res in report["spreads"].items():
        lines += ["", f"## spread {spread} (sigma* = {spread} × RMS entry of ΔW*)", ""]
        fam = res["family"]["evaluation_tasks"]
        lines.append(
            f"Family: oracle accuracy {fam['oracle_accuracy']:.3f} on its evaluation tasks; the "
            f"global teacher (θ* alone) agrees with the oracle's argmax on "
            f"{fam['global_teacher_agreement']:.3f} of questions, the backbone on "
            f"{fam['backbone_agreement']:.3f}."
        )
        nll = ", ".join(f"{k} {v:.3f}" for k, v in res["tuning"]["validation_nll"].items())
        lines += ["", f"ABMLL tuned on validation NLL: chose **{res['tuning']['chosen']}** ({nll})"
                  + (" = the default: the abmll_tuned rows are the abmll rows" if
                     res["tuning"]["chosen"] == "default" else "")]  # fmt: skip
        for k, rows in res["scores"].items():
            lines += ["", f"### K = {k}", "",
                      "| method | accuracy | gap | ECE | NLL | gap | Brier | excess NLL |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for name, ref in rows["references"].items():
                lines.append(
                    f"| *{name}* | {ref['accuracy']:.3f} | | {ref['ece']:.3f} | {ref['nll']:.3f} "
                    f"| | {ref['brier']:.3f} | {ref['excess_nll']:.3f} |"
                )
            same = res["tuning"]["chosen"] == "default"  # abmll_tuned is abmll: not repeated
            for name, e in rows.items():
                if name in ("references", "paired", "_reliability"):
                    continue
                if same and name.startswith("abmll_tuned"):
                    continue
                lines.append(
                    f"| {name} | {_fmt(e, 'accuracy')} | {e['gap_accuracy']['mean']:+.3f} | "
                    f"{_fmt(e, 'ece')} | {_fmt(e, 'nll')} | {e['gap_nll']['mean']:+.3f} | "
                    f"{_fmt(e, 'brier')} | {_fmt(e, 'excess_nll')} |"
                )
            if rows["paired"]:
                lines += ["", "| paired difference | accuracy | ECE | NLL | Brier | excess NLL |",
                          "|---|---|---|---|---|---|"]  # fmt: skip
                for pair, d in rows["paired"].items():
                    if same and pair.startswith("abmll_tuned"):
                        continue
                    lines.append(
                        f"| {pair} | " + " | ".join(
                            _fmt(d, m) for m in ("accuracy", "ece", "nll", "brier", "excess_nll")
                        ) + " |"
                    )  # fmt: skip
        lines += ["", "Learned global mean ΔW vs the truth ΔW* (mean over seeds; layer by layer): "
                  "‖ΔW − ΔW*‖/‖ΔW*‖ (1 = never moved), ‖ΔW‖/‖ΔW*‖, cos(ΔW, ΔW*), and for "
                  "ABMLL RMS σ_θ / σ*", "",
                  "| method | layer | rel. error | norm ratio | cosine | σ_θ / σ* |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, layers in res["distances"].items():
            if name == "abmll_tuned" and res["tuning"]["chosen"] == "default":
                continue
            for prefix, row in layers.items():
                sig = row.get("sigma_rms_over_sigma_star")
                lines.append(
                    f"| {name} | {prefix} | {row['mean_rel_error']:.3f} | {row['norm_ratio']:.3f} "
                    f"| {row['cosine']:+.3f} | {'' if sig is None else f'{sig:.3g}'} |"
                )
    return "\n".join(lines) + "\n"


def reliability_figure(spread, rows: dict, path: Path, chosen: str) -> None:
    """One panel per predictor, each next to the oracle's reliability curve (bins with at
    least 10 questions; pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = rows["_reliability"]
    names = [
        n
        for n in (
            "prior_predictive",
            "global_teacher",
            "pretrained",
            "lora",
            "reptile",
            "abmll",
            "abmll_tuned",
        )
        if n in rel
    ]
    if chosen == "default":
        names.remove("abmll_tuned")

    def curve(name):
        data = {
            k: np.array([np.nan if x is None else x for x in rel[name][k]])
            for k in ("confidence", "accuracy", "count")
        }
        keep = data["count"] >= 10
        return data["confidence"][keep], data["accuracy"][keep]

    cols = 3
    fig, axes = plt.subplots(
        math.ceil(len(names) / cols),
        cols,
        figsize=(10, 3.4 * math.ceil(len(names) / cols)),
        squeeze=False,
    )
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
    parser.add_argument("--spreads", default="0.5,1,2", help="sigma* / RMS entry of Delta W*")
    parser.add_argument("--seeds", type=int, default=5, help="paired training/support seeds")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--family-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.perf_counter()
    # data and backbone come from each family (its backbone is the sharpened source backbone)
    common = [
        c
        for c in prepare(out, args.pretrain_steps)
        if not c.startswith(("data.path=", "checkpointer.checkpoint_dir="))
    ]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "pretrain_steps": args.pretrain_steps,
        "tuning_grid": TUNING_GRID,
        "spreads": {},
    }
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for spread in (float(s) for s in args.spreads.split(",")):
            result = run_spread(spread, args, out, common, pool)
            scored = score_spread(result)
            from abmll_tune.embedded.planted import read_family

            report["spreads"][f"{spread:g}"] = {
                "family": read_family(result["family"]),
                "tuning": result["tuning"],
                "scores": scored,
                "distances": weight_space_distances(result),
            }
            reliability_figure(
                f"{spread:g}",
                scored[16],
                out / f"reliability_spread{spread:g}.png",
                result["tuning"]["chosen"],
            )
    report["minutes"] = (time.perf_counter() - start) / 60
    from abmll_tune.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "planted.json", report)
    atomic_write_text(out / "planted.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
