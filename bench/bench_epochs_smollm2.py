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

``--steps 0`` validates the untrained adapters only (the run stops after one visit,
whose diagnostics log the KL's pull) and stores a table of them with the summary; with
``--methods reptile,abmll,abmll_softabs_c_e-20`` it compares the configs' std with the
previous one on the real model (docs/method.md, "A std of the right scale").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from abmll_tune.benchmarking import (
    STD_SOFTABS_E20,
    TUNE,
    logged_diagnostics,
    plot_curves,
    run_logged,
    write_results,
)
from abmll_tune.metrics import mean_and_se

REPO = Path(__file__).resolve().parents[1]
# name -> (config, recipe, overrides); all take K = 5 inner steps per visit
METHODS = {
    "reptile": ("smollm2_135m_cls45_reptile", "reptile_single_device", []),
    "abmll": ("smollm2_135m_cls45", "abmll_meta_single_device", []),
    "abmll_softabs_c_e-20": ("smollm2_135m_cls45", "abmll_meta_single_device", STD_SOFTABS_E20),
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
    run_logged(cmd, run / "bench.log", REPO, threads=args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    minutes = (time.perf_counter() - start) / 60  # the code the run trained with, and its time
    (run / "done").write_text(json.dumps({"commit": commit, "minutes": minutes}))
    return run


def mean_se(values: list[float]) -> list[float]:
    return list(mean_and_se(values))


def curve(run: Path) -> dict:
    """Gradient steps -> [mean, se] over the validation tasks (one training seed)."""
    rows = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    steps, metrics = [], {"accuracy": [], "nll": [], "ece": []}
    for row in sorted(rows, key=lambda r: r["visits"]):
        tasks = list((row.get("per_task") or {}).values())
        steps.append(row["visits"] * STEPS_PER_VISIT)
        for metric, values in metrics.items():
            values.append(mean_se([t[metric] for t in tasks] or [row[metric]]))
    best = max(range(len(steps)), key=lambda i: metrics["accuracy"][i][0])
    return {"steps": steps, **metrics, "best_step": [steps[best]]}


def untrained_table(report: dict) -> dict:
    """The untrained adapters (``--steps 0``): one row per method, as a stored table."""
    first, *_ = report["methods"]
    rows = []
    for name, c in report["methods"].items():
        acc, ece, nll = c["accuracy"][0], c["ece"][0], c["nll"][0]
        share = report["diagnostics"][name].get("kl_pull/share", {}).get("first")
        diff = report["paired"].get(f"{first} - {name}", {}).get("0", {}).get("accuracy")
        rows.append([
            name, f"{acc[0]:.3f} +- {acc[1]:.3f}", f"{ece[0]:.3f} +- {ece[1]:.3f}",
            f"{nll[0]:.3f} +- {nll[1]:.3f}", "" if share is None else f"{share:.2g}",
            "" if diff is None else f"{-diff[0]:+.3f} +- {diff[1]:.3f}",
        ])  # fmt: skip
    return {
        "title": "The untrained adapters on the validation tasks (mean +- SE over the tasks; "
        f"paired by task against {first}; the KL's share of the first visit's inner gradient)",
        "header": ["method", "accuracy", "ECE", "NLL", "KL pull share", f"- {first}: accuracy"],
        "rows": rows,
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
    if args.steps == 0:
        report["tables"] = [untrained_table(report)]
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
        plot_curves(
            table,
            REPO / args.figure if not args.figure.is_absolute() else args.figure,
            title="SmolLM2-135M, cls-45: validation over training (mean +- SE over tasks)",
            marker=None,
        )
    write_results(args.results, report)


if __name__ == "__main__":
    main()
