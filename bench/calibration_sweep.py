"""Where does ABMLL's calibration come from? A sweep of the sigma settings, on validation only.

    python bench/calibration_sweep.py --out bench_results/calibration

Same backbone, data and protocol as ``bench/bench_methods.py`` (it reuses that script's
preparation and runner), but every variant is judged on the validation tasks alone: the
recipe validates after every epoch (epoch 0 included) with 1 posterior sample and the
posterior mean (10 samples are measured on the test tasks by ``bench_methods.py``), and the sweep reads, per run, the epoch of best validation
accuracy and its ECE. The test tasks are never touched here; the chosen setting then
goes through the test protocol as a row of ``bench_methods.py``'s ``METHODS``.

Knobs (docs/method.md and the benchmark issue): the std learning rates, the
initial sigma (``std_b_init_std``), the Gamma hyperprior's mode (``a0`` > 1), beta, the
number of posterior samples while training. ``sigma_theta/mean`` (logged every ``diagnostics_every_n_visits`` visits)
shows how far each moved sigma_theta from its floor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from abmll_tune.benchmarking import TUNE, add_run_arguments, prepare_embedded, run_all, run_logged

REPO = Path(__file__).resolve().parents[1]

# name -> overrides of configs/tiny_cpu_abmll.yaml
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "std_lr_x10": [
        "method.inner_lr_std=0.01",
        "method.outer_lr_std=0.01",
        "validation.adapt_lr_std=0.01",
    ],
    "std_init_0.01": ["model.std_b_init_std=0.01"],
    "std_init_0.01_lr_x10": [
        "model.std_b_init_std=0.01",
        "method.inner_lr_std=0.01",
        "method.outer_lr_std=0.01",
        "validation.adapt_lr_std=0.01",
    ],
    "hyperprior_mode_0.03": ["method.a0=2.0", "method.b0=0.001"],  # mode sqrt(b0 / (a0 - 1))
    "hyperprior_mode_0.03_gamma_1e-4": ["method.a0=2.0", "method.b0=0.001", "method.gamma=1e-4"],
    "beta_1e-5": ["method.beta=1e-5"],
    "train_samples_4": ["method.train_samples=4"],
    # second round, between the base and the x10 rates (which cost accuracy)
    "std_lr_x3": [
        "method.inner_lr_std=0.003",
        "method.outer_lr_std=0.003",
        "validation.adapt_lr_std=0.003",
    ],
    "std_lr_x3_train_samples_4": [
        "method.inner_lr_std=0.003",
        "method.outer_lr_std=0.003",
        "validation.adapt_lr_std=0.003",
        "method.train_samples=4",
    ],
}
ACCURACY_TOLERANCE = 0.02  # a calibration gain may cost at most this much validation accuracy


def one_run(name: str, seed: int, out: Path, common: list[str], epochs: int) -> Path:
    run = out / f"{name}_seed{seed}"
    history = run / "validation.jsonl"
    if (run / "done").is_file():
        return history
    run.mkdir(parents=True, exist_ok=True)
    cmd = [
        TUNE, "run", "recipes/abmll_meta_single_device", "--config", "configs/tiny_cpu_abmll.yaml",
        f"output_dir={run}", f"seed={seed}", f"epochs={epochs}", "validation.samples=[1]",
        "save_every_n_visits=null",
        "keep_epoch_checkpoints=false", "overwrite_output_dir=true", *common, *VARIANTS[name],
    ]  # fmt: skip
    run_logged(cmd, run / "bench.log", REPO)
    (run / "done").write_text("")
    return history


def _last_logged(run: Path, key: str) -> float | None:
    value = None
    for log in sorted((run / "logs").glob("*.txt")):
        for line in log.read_text().splitlines():
            for item in line.split():
                if item.startswith(key + ":"):
                    value = float(item.split(":", 1)[1])
    return value


def summarize(out: Path, names: list[str], seeds: int) -> dict:
    from abmll_tune.metrics import mean_and_se

    table = {}
    for name in names:
        best_rows, sigmas = [], []
        for seed in range(seeds):
            run = out / f"{name}_seed{seed}"
            rows = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
            best_rows.append(max(rows, key=lambda r: r["accuracy"]))  # first best, as the recipe
            sigmas.append(_last_logged(run, "sigma_theta/mean"))
        entry = {"epochs": [r["epoch"] for r in best_rows], "sigma_theta_mean": sigmas}
        for variant in best_rows[0]["variants"]:
            for metric in ("accuracy", "ece"):
                mean, se = mean_and_se(r["variants"][variant][metric] for r in best_rows)
                entry[f"{variant[:-2]}/{metric}"] = {"mean": mean, "se": se}
        table[name] = entry
    return table


def choose(table: dict) -> str:
    """Lowest validation ECE (1 sample, as the paper reports) among the variants whose
    validation accuracy is within ACCURACY_TOLERANCE of the base setting's."""
    floor = table["base"]["s1/accuracy"]["mean"] - ACCURACY_TOLERANCE
    eligible = [n for n, e in table.items() if e["s1/accuracy"]["mean"] >= floor]
    return min(eligible, key=lambda n: table[n]["s1/ece"]["mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/calibration"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    add_run_arguments(parser, seeds=2)
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.perf_counter()
    # the method benchmark's data and backbone, so the chosen setting transfers unchanged
    common = prepare_embedded(REPO / "bench_results" / "methods", args.pretrain_steps)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    run_all(one_run, names, args, out, common)
    table = summarize(out, names, args.seeds)
    chosen = choose(table) if "base" in table else None
    from abmll_tune.io import atomic_write_json

    atomic_write_json(
        out / "calibration.json",
        {
            "date": time.strftime("%Y-%m-%d"),
            "split": "validation (8 tasks), never test",
            "epochs": args.epochs,
            "seeds": args.seeds,
            "minutes": (time.perf_counter() - start) / 60,
            "overrides": {n: VARIANTS[n] for n in names},
            "chosen": chosen,
            "variants": table,
        },
    )
    print(
        f"\nABMLL calibration sweep on the validation tasks, {args.seeds} seeds, best-validation epoch of {args.epochs}"
    )
    print(f"{'variant':<34}{'acc s1':>8}{'ECE s1':>8}{'ECE mean':>9}  sigma_theta  epochs")
    for name, e in table.items():
        sigma = ", ".join(f"{s:.3g}" for s in e["sigma_theta_mean"] if s is not None)
        print(
            f"{name:<34}{e['s1/accuracy']['mean']:>8.3f}{e['s1/ece']['mean']:>8.3f}"
            f"{e.get('mean/ece', {}).get('mean', float('nan')):>9.3f}  {sigma}  {e['epochs']}"
        )
    if chosen:
        print(f"chosen on validation: {chosen} {VARIANTS[chosen]}")


if __name__ == "__main__":
    main()
