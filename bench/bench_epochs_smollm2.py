"""Does longer training move the meta-learners on a real model? SmolLM2-135M on cls-45.

    make smollm2
    python bench/bench_epochs_smollm2.py --metaicl /path/to/metaicl/data \
        --results docs/results/epochs_smollm2.json

The embedded-suite companion of ``bench/bench_epochs.py`` on the real small model: Reptile
and ABMLL (``configs/smollm2_135m_cls45{_reptile,}.yaml``) train on cls-45 built from the
MetaICL files, with the paper's epoch (``visits_per_epoch: data``: about 3,300 visits of
10 questions) cut at ``--steps`` gradient steps (torchtune's ``max_steps_per_epoch``), and
validate every ``--validate-every`` gradient steps on ``--val-tasks`` of the selection
tasks (support seed 100, the validation's 5 steps of 2). Writes the validation accuracy
and NLL against gradient steps (one training seed per method: mean +- SE over the
validation tasks), plus a figure. Sized for about an hour on 2 CPU cores; runs go one at
a time (two threads each) and a finished run is skipped when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_epochs import plot

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
# the std every config used before 2026-12-06 (softabs, c = e^-20): the comparison row
E20 = ["model.std_param=softabs", "model.sigma_floor=2.061153622438558e-09",
       "model.sigma_floor_w0_fraction=null"]  # fmt: skip
# name -> (config, recipe, overrides); all take K = 5 inner steps per visit
METHODS = {
    "reptile": ("smollm2_135m_cls45_reptile", "reptile_single_device", []),
    "abmll": ("smollm2_135m_cls45", "abmll_meta_single_device", []),
    "abmll_softabs_c_e-20": ("smollm2_135m_cls45", "abmll_meta_single_device", E20),
}
STEPS_PER_VISIT = 5


def build_data(metaicl: Path, data: Path) -> None:
    if (data / "manifest.json").is_file():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "abmll_tune.data",
            "build",
            "--quiet",
            "--split",
            "cls45",
            "--source",
            str(metaicl),
            "--out",
            str(data),
            "--max-eval-examples",
            "100",
            "--skip-missing-tasks",
        ],  # fmt: skip
        cwd=REPO,
        check=True,
    )


def one_run(name: str, out: Path, data: Path, model_dir: Path, args) -> Path:
    run = out / name
    if (run / "done").is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config, recipe, overrides = METHODS[name]
    # --steps 0: the untrained adapters, validated before the first visit (the run stops
    # after that visit, whose diagnostics log the KL's pull)
    length = (
        ["stop_after_visits=1", "validate_every_n_visits=null"]
        if args.steps == 0
        else [
            f"max_steps_per_epoch={args.steps}",
            f"validate_every_n_visits={args.validate_every // STEPS_PER_VISIT}",
        ]
    )
    cmd = [
        TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml",
        f"output_dir={run}", f"seed={args.seed}", "epochs=1", "visits_per_epoch=data",
        *length, *overrides,
        f"validation.max_tasks={args.val_tasks}", "validation.seeds=[100]",
        f"data.path={data}", f"checkpointer.checkpoint_dir={model_dir}",
        f"tokenizer.path={model_dir / 'tokenizer.json'}",
        "save_every_n_visits=20", "keep_epoch_checkpoints=false",
    ]  # fmt: skip
    cmd.append(
        "resume_from_checkpoint=true"
        if (run / "checkpoints" / "latest").is_dir()
        else "overwrite_output_dir=true"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(run / "bench.log", "a") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    minutes = (time.perf_counter() - start) / 60  # the code the run trained with, and its time
    (run / "done").write_text(json.dumps({"commit": commit, "minutes": minutes}))
    return run


def mean_se(values: list[float]) -> list[float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return [m, float("nan")]
    return [m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))]


def curve(run: Path) -> dict:
    """Gradient steps -> [mean, se] over the validation tasks (one training seed)."""
    rows = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    steps, acc, nll = [], [], []
    for row in sorted(rows, key=lambda r: r["visits"]):
        tasks = row.get("per_task") or {}
        per_acc = [t["accuracy"] for t in tasks.values()] or [row["accuracy"]]
        per_nll = [t["nll"] for t in tasks.values()] or [row["nll"]]
        steps.append(row["visits"] * STEPS_PER_VISIT)
        acc.append(mean_se(per_acc))
        nll.append(mean_se(per_nll))
    best = max(range(len(steps)), key=lambda i: acc[i][0])
    return {"steps": steps, "accuracy": acc, "nll": nll, "best_step": [steps[best]]}


def logged_diagnostics(run: Path) -> dict:
    """ABMLL's logged diagnostics over the run: the KL's share of the inner gradient
    (``kl_pull/share``) and sigma_theta's mean, first and last, min and max."""
    out: dict[str, list[float]] = {}
    for log in sorted((run / "logs").glob("*.txt")):
        for item in log.read_text().split():
            for key in ("kl_pull/share", "sigma_theta/mean"):
                if item.startswith(key + ":"):
                    out.setdefault(key, []).append(float(item.split(":", 1)[1]))
    return {
        k: {"first": v[0], "last": v[-1], "min": min(v), "max": max(v), "n": len(v)}
        for k, v in out.items()
    }


def paired(runs: dict[str, Path]) -> dict:
    """Per-task differences, mean +- SE over the validation tasks: each method against its
    own step 0, and the first method minus each other one at every validation."""
    rows = {
        name: [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
        for name, run in runs.items()
    }

    def diff(a: dict, b: dict, metric: str) -> list[float]:
        return mean_se([a["per_task"][t][metric] - b["per_task"][t][metric] for t in b["per_task"]])

    out = {
        f"{name} - step 0": {
            str(r["visits"] * STEPS_PER_VISIT): {m: diff(r, rs[0], m) for m in ("accuracy", "nll")}
            for r in rs
        }
        for name, rs in rows.items()
    }
    (a, ra), *others = rows.items()
    for b, rb in others:
        out[f"{a} - {b}"] = {
            str(x["visits"] * STEPS_PER_VISIT): {m: diff(x, y, m) for m in ("accuracy", "nll")}
            for x, y in zip(ra, rb, strict=True)
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metaicl", type=Path, required=True, help="MetaICL data folder")
    parser.add_argument("--model-dir", type=Path, default=REPO / "outputs/smollm2_135m_hf")
    parser.add_argument("--out", type=Path, default=Path("bench_results/epochs_smollm2"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=600, help="gradient steps per method (0: untrained only)"
    )
    parser.add_argument("--validate-every", type=int, default=120, help="gradient steps")
    parser.add_argument("--val-tasks", type=int, default=6, help="selection tasks validated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/epochs_smollm2.png"))
    args = parser.parse_args()
    if not (args.model_dir / "model.safetensors").is_file():
        parser.error(f"{args.model_dir}/model.safetensors not found: run `make smollm2` first")
    if not args.metaicl.is_dir():
        parser.error(f"--metaicl {args.metaicl}: not a directory (the MetaICL data folder)")
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    out = args.out.resolve()
    data = out / "data" / "cls45_cpu"
    build_data(args.metaicl.resolve(), data)
    for name in names:
        one_run(name, out, data, args.model_dir.resolve(), args)
    table = {name: curve(out / name) for name in names}
    done = {name: json.loads((out / name / "done").read_text()) for name in names}
    from abmll_tune.report import results_provenance

    report = {
        **results_provenance(
            "python bench/bench_epochs_smollm2.py --metaicl <MetaICL data> "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if k in ("methods", "seed", "steps", "validate_every", "val_tasks")
            )
        ),
        "minutes": sum(d["minutes"] for d in done.values()),
        "minutes_per_method": {name: d["minutes"] for name, d in done.items()},
        "note": "SmolLM2-135M-Instruct, cls45 from the MetaICL files; "
        + (
            f"visits_per_epoch: data cut at {args.steps} gradient steps; "
            if args.steps
            else "the untrained adapters (validated before the first visit); "
        )
        + f"one training seed per method, mean +- SE over "
        f"{args.val_tasks} validation tasks (support seed 100, 5 steps of 2); x is gradient steps",
        "trained_at": {name: d["commit"] for name, d in done.items()},
        "methods": table,
        "paired": paired({name: out / name for name in names}),
        "diagnostics": {name: logged_diagnostics(out / name) for name in names},
    }
    print(f"\nSmolLM2 cls45 validation, {args.steps} gradient steps ({report['minutes']:.0f} min)")
    for label, by_step in report["paired"].items():
        print(
            label,
            {k: f"{v['accuracy'][0]:+.3f} +- {v['accuracy'][1]:.3f}" for k, v in by_step.items()},
        )
    print(f"{'method':<10}{'steps':>7}{'accuracy':>18}{'NLL':>18}")
    for name, c in table.items():
        for k, acc, nll in zip(c["steps"], c["accuracy"], c["nll"], strict=True):
            print(f"{name:<10}{k:>7}{acc[0]:>10.3f} +- {acc[1]:.3f}{nll[0]:>10.3f} +- {nll[1]:.3f}")
    if args.steps:  # a curve needs more than the untrained point
        plot(
            table,
            REPO / args.figure if not args.figure.is_absolute() else args.figure,
            title="SmolLM2-135M, cls-45: validation over training (mean +- SE over tasks)",
            marker=None,
        )
    if args.results:
        from abmll_tune.io import atomic_write_json

        atomic_write_json(args.results, report)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
