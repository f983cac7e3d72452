"""Does meta-learning pay off? Every method on the embedded suite, the paper's protocol.

    python bench/bench_methods.py --out bench_results/methods      (part of make bench)

Prepares the embedded suite and a briefly pre-trained tiny Llama3 (the backbone must
know the format, not the tasks), then for each method and training seed: meta-trains
with validation after every epoch (epoch 0 included), evaluates the best-validation
checkpoint few-shot on the 30 held-out test tasks (5 steps on 5 support batches of 2),
and reports accuracy, ECE, NLL and Brier as mean +- SE over the three (training seed,
support seed) pairs; ABMLL also with 10 posterior samples and the posterior mean. Runs
go two at a time on single-thread workers (for models this small that doubles
throughput). A finished run is skipped when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from abmll_tune.benchmarking import (
    EB_OVERRIDES,
    STD_SOFTABS_E20,
    TUNE,
    add_run_arguments,
    logged_values,
    prepare_embedded,
    run_all,
    run_logged,
)

REPO = Path(__file__).resolve().parents[1]
SUPPORT_SEEDS = (100, 13, 21)

# name -> (training config, overrides); None for the pretrained backbone alone
METHODS: dict[str, tuple[str, list[str]] | None] = {
    "pretrained": None,
    "lora": ("tiny_cpu_lora", ["epochs=2"]),
    "structured_lora": ("tiny_cpu_structured_lora", []),
    "reptile": ("tiny_cpu_reptile", []),
    "abmll": ("tiny_cpu_abmll", []),
    "abmll_first_order": ("tiny_cpu_abmll", ["method.outer_grad=first_order"]),
    "abmll_kl_only": ("tiny_cpu_abmll", ["method.outer_grad=kl_only"]),
    "abmll_eb": ("tiny_cpu_abmll", EB_OVERRIDES),
    # the std every tiny config used before 2026-12-06, and softabs at today's c
    "abmll_softabs_c_e-20": ("tiny_cpu_abmll", STD_SOFTABS_E20),
    "abmll_softabs_c_0.1rms": ("tiny_cpu_abmll", ["model.std_param=softabs"]),
    # the paper's values (v1): its std (softabs, c = e^-20, B_std = 0), beta and gamma
    "abmll_paper_values": (
        "tiny_cpu_abmll",
        [*STD_SOFTABS_E20, "model.std_b_init_std=0.0", "method.beta=5e-10", "method.gamma=1e-6"],
    ),
    "reptile_metaicl": ("tiny_cpu_reptile_metaicl", []),
    "abmll_metaicl": ("tiny_cpu_abmll_metaicl", []),
}


def one_run(name: str, seed_index: int, out: Path, common: list[str], epochs: int) -> Path:
    run = out / f"{name}_seed{seed_index}"
    results = run / "eval" / "results.json"
    if results.is_file():
        return results
    run.mkdir(parents=True, exist_ok=True)
    log = run / "bench.log"
    spec = METHODS[name]

    def evaluate(method: str, checkpoint: str) -> None:
        run_logged(
            [
                TUNE, "run", "recipes/evaluate_few_shot", "--config", "configs/tiny_cpu_eval.yaml",
                f"method={method}", f"adapter_checkpoint={checkpoint}",
                f"evaluation.seeds=[{SUPPORT_SEEDS[seed_index]}]", "evaluation.samples=[1,10]",
                f"output_dir={run / 'eval'}", *common,
            ],
            log,
            REPO,
        )  # fmt: skip

    if spec is None:
        evaluate("pretrained", "null")
        return results
    config, overrides = spec
    from abmll_tune.methods import method_class

    # a config names its method as a component (or by name): its class says which recipe
    cls, problems = method_class(OmegaConf.load(REPO / "configs" / f"{config}.yaml").method)
    if cls is None:
        raise ValueError(f"configs/{config}.yaml: {problems}")
    method = cls.name
    recipe = "abmll_meta_single_device" if method == "abmll" else "reptile_single_device"
    training = [
        f"output_dir={run}",
        f"seed={seed_index}",
        f"epochs={epochs}",
        "validation.max_tasks=8",
        *common,
        *overrides,
    ]
    if (run / "checkpoints" / "latest").is_dir():
        training.append("resume_from_checkpoint=true")
    else:
        training.append("overwrite_output_dir=true")
    run_logged(
        [TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml", *training],
        log,
        REPO,
    )
    evaluate(method, str(run / "checkpoints" / "best"))
    return results


def summarize(out: Path, names: list[str], n_seeds: int) -> dict:
    from abmll_tune.metrics import mean_and_se

    table = {}
    for name in names:
        rows = [
            json.loads((out / f"{name}_seed{i}" / "eval" / "results.json").read_text())
            for i in range(n_seeds)
        ]
        for key in rows[0]["metrics"]:
            if not key.endswith("@0"):
                continue
            values = {
                m: mean_and_se(next(iter(r["metrics"][key]["macro"].values()))[m] for r in rows)
                for m in ("accuracy", "ece", "nll", "brier")
            }
            label = name if key in (f"{rows[0]['default_variant']}@0",) else f"{name} [{key[:-2]}]"
            table[label] = {m: {"mean": v[0], "se": v[1]} for m, v in values.items()}
            table[label]["best_epochs"] = [r["checkpoint_epoch"] for r in rows]
            table[label]["per_seed_accuracy"] = [
                next(iter(r["metrics"][key]["macro"].values()))["accuracy"] for r in rows
            ]
        sigma = [logged_values(out / f"{name}_seed{i}", "sigma_theta/mean") for i in range(n_seeds)]
        pulls = [logged_values(out / f"{name}_seed{i}", "kl_pull/share") for i in range(n_seeds)]
        if all(pulls):  # the KL's share of the inner gradient over training, every seed
            table[name]["kl_pull_share_range"] = [min(map(min, pulls)), max(map(max, pulls))]
        if all(sigma):  # the global std at the end of training
            sigma = [v[-1] for v in sigma]
            m, se = mean_and_se(sigma)
            table[name]["sigma_theta_mean_last"] = {"mean": m, "se": se}
        table.setdefault("_chance", {"accuracy": rows[0]["chance_accuracy"]})
    return table


def paired_against(table: dict, reference: str, names: list[str]) -> dict:
    """Each method's accuracy minus the reference's, paired by training seed (seed i of
    both shares its support seed): mean +- SE over the seeds."""
    from abmll_tune.metrics import mean_and_se

    ref = table[reference]["per_seed_accuracy"]
    out = {}
    for name in names:
        if name != reference:
            d = [a - b for a, b in zip(table[name]["per_seed_accuracy"], ref, strict=True)]
            out[f"{name} - {reference}"] = dict(zip(("mean", "se"), mean_and_se(d), strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/methods"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    parser.add_argument(
        "--paired-against", help="also report every method's accuracy minus this one's, by seed"
    )
    add_run_arguments(parser, seeds=3)
    args = parser.parse_args()
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.paired_against and args.paired_against not in names:
        parser.error(f"--paired-against {args.paired_against}: not among --methods {names}")
    out = args.out.resolve()
    start = time.perf_counter()
    common = prepare_embedded(out, args.pretrain_steps)
    run_all(one_run, names, args, out, common)
    table = summarize(out, names, args.seeds)
    chance = table.pop("_chance")["accuracy"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "pretrain_steps": args.pretrain_steps,
        "minutes": (time.perf_counter() - start) / 60,
        "chance_accuracy": chance,
        "methods": table,
    }
    if args.paired_against:
        report["paired_accuracy"] = paired_against(table, args.paired_against, names)
    report["validation"] = {
        name: [
            [r["accuracy"] for r in map(json.loads, (out / f"{name}_seed{i}" / "validation.jsonl")
                                        .read_text().splitlines())]
            for i in range(args.seeds)
        ]
        for name in names
        if name != "pretrained"
    }  # fmt: skip
    from abmll_tune.io import atomic_write_json

    atomic_write_json(out / "methods.json", report)
    if args.results is not None:  # the committed summary the docs cite
        import platform

        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        atomic_write_json(
            args.results,
            {
                **report,
                "commit": commit or None,
                "command": "python bench/bench_methods.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU float32",
                "methods_settings": {n: METHODS[n] for n in names},
            },
        )
    print(
        f"\nEmbedded suite, 30 held-out tasks, {args.seeds} seeds, best-validation epoch of {args.epochs}; chance {chance:.3f} ({report['minutes']:.0f} min)"
    )
    print(f"{'method':<34}{'accuracy':>16}{'ECE':>16}{'NLL':>9}{'Brier':>9}  best epochs")
    for label, m in table.items():
        print(
            f"{label:<34}{m['accuracy']['mean']:>9.3f} +- {m['accuracy']['se']:.3f}{m['ece']['mean']:>9.3f} +- {m['ece']['se']:.3f}{m['nll']['mean']:>9.3f}{m['brier']['mean']:>9.3f}  {m['best_epochs']}"
        )


if __name__ == "__main__":
    main()
