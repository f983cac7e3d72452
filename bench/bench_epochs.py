"""Does longer training move the meta-learners? Validation curves over a data epoch.

    python bench/bench_epochs.py --out bench_results/epochs --results docs/results/epochs.json

The shipped CPU configs count an epoch as one visit per task (40 visits of 10 questions
on the embedded suite); the paper's epoch is a pass over the training data
(``visits_per_epoch: data``: 800 visits, 4,000 inner steps). This benchmark trains
Reptile, ABMLL (the configs' reading) and pooled Regular LoRA for ``--epochs`` data
epochs on the embedded suite, validating every ``--validate-every`` gradient steps (the
same steps for every method: LoRA's pooled epoch is 4,000 steps of 2 questions, a
meta-learner's 800 visits of 5 steps), and writes the validation accuracy and NLL
against gradient steps, mean +- SE over the training seeds, plus a figure. The point at
200 gradient steps is what one `tasks` epoch of the CPU configs sees.

Runs go ``--workers`` at a time on single-thread workers; a finished run is skipped when
the command is repeated (an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from abmll_tune.benchmarking import (
    TUNE,
    plot_curves,
    prepare_embedded,
    run_logged,
    write_results,
)
from abmll_tune.metrics import mean_and_se

REPO = Path(__file__).resolve().parents[1]

# name -> (config, recipe, gradient steps per visit)
METHODS = {
    "reptile": ("tiny_cpu_reptile", "reptile_single_device", 5),
    "abmll": ("tiny_cpu_abmll", "abmll_meta_single_device", 5),
    "lora": ("tiny_cpu_lora", "reptile_single_device", 1),
}


def one_run(name: str, seed: int, out: Path, common: list[str], args) -> Path:
    run = out / f"{name}_seed{seed}"
    done = run / "done"
    if done.is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    config, recipe, steps_per_visit = METHODS[name]
    every_visits = max(args.validate_every // steps_per_visit, 1)
    cmd = [
        TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml",
        f"output_dir={run}", f"seed={seed}", f"epochs={args.epochs}",
        "visits_per_epoch=data", f"validate_every_n_visits={every_visits}",
        "validation.max_tasks=8", "validation.seeds=[100]",
        "save_every_n_visits=100", "keep_epoch_checkpoints=false", *common,
    ]  # fmt: skip
    cmd.append(
        "resume_from_checkpoint=true"
        if (run / "checkpoints" / "latest").is_dir()
        else "overwrite_output_dir=true"
    )
    run_logged(cmd, run / "bench.log", REPO)
    done.write_text("")
    return run


def curves(out: Path, name: str, seeds: int) -> dict:
    """Gradient steps -> [mean, se] of validation accuracy and NLL over the seeds."""
    steps_per_visit = METHODS[name][2]
    per_seed = []
    for seed in range(seeds):
        rows = [
            json.loads(line)
            for line in (out / f"{name}_seed{seed}" / "validation.jsonl").read_text().splitlines()
        ]
        per_seed.append({r["visits"] * steps_per_visit: r for r in rows})
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))

    def mean_se(values: list[float]) -> list[float]:
        return list(mean_and_se(values))

    return {
        "steps": steps,
        "accuracy": [mean_se([s[k]["accuracy"] for s in per_seed]) for k in steps],
        "nll": [mean_se([s[k]["nll"] for s in per_seed]) for k in steps],
        "best_step": [max(s, key=lambda k: s[k]["accuracy"]) for s in per_seed],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/epochs"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="data epochs")
    parser.add_argument("--validate-every", type=int, default=400, help="gradient steps")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/epochs_embedded.png"))
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.perf_counter()
    common = prepare_embedded(out, args.pretrain_steps)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    jobs = [(n, s) for n in names for s in range(args.seeds)]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for future in [pool.submit(one_run, n, s, out, common, args) for n, s in jobs]:
            future.result()
    table = {name: curves(out, name, args.seeds) for name in names}
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "command": "python bench/bench_epochs.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("out", "results", "figure", "workers")
        ),
        "machine": "x86_64, 2 cores, CPU float32 (figures move with the CPU's floating point)",
        "minutes": (time.perf_counter() - start) / 60,
        "note": "validation: 8 selection tasks, support seed 100, 5 steps of 2; an epoch is "
        "visits_per_epoch: data; x is gradient steps",
        "methods": table,
    }
    print(f"\nValidation over {args.epochs} data epoch(s), {args.seeds} seeds "
          f"({report['minutes']:.0f} min)")  # fmt: skip
    print(f"{'method':<10}{'steps':>7}{'accuracy':>18}{'NLL':>18}")
    for name, c in table.items():
        for k, acc, nll in zip(c["steps"], c["accuracy"], c["nll"], strict=True):
            print(f"{name:<10}{k:>7}{acc[0]:>10.3f} +- {acc[1]:.3f}{nll[0]:>10.3f} +- {nll[1]:.3f}")
    plot_curves(
        table,
        REPO / args.figure if not args.figure.is_absolute() else args.figure,
        title="Embedded suite: validation over a data epoch (mean +- SE over seeds)",
        marker=200,  # one `tasks` epoch of a meta-learner
    )
    write_results(args.results, report)


if __name__ == "__main__":
    main()
