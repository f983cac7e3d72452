"""Can ABMLL's task posterior learn from data before any meta-training? The KL's scale.

    python bench/bench_kl_scale.py --out bench_results/kl_scale

At initialisation ABMLL's global std is tiny wherever its low-rank product crosses zero
(sigma = c = e^-20 with ``softabs``), so beta KL's stiffness beta / sigma_p^2 dwarfs the
NLL and, through Adam's per-coordinate normalisation, steers the inner loop
(docs/method.md "A std of the right scale"). This benchmark measures, for each candidate
std setting and for Reptile (zero adapters, the same few-shot adaptation), the few-shot
accuracy of the *untrained* adapters on validation tasks: on the embedded suite (its 16
validation tasks) and on a planted hierarchical family (spread 0.5, its 10 validation
tasks, where adaptation from zero recovers most of the task's weights). Each candidate:

1. ``tune run recipes/abmll_meta_single_device`` (or Reptile's) for one visit, whose
   epoch-0 validation saves the initial adapters as ``checkpoints/best``, and whose
   diagnostics log the KL's pull at that visit's last inner step (``kl_pull/share``);
2. ``tune run recipes/evaluate_few_shot`` on the validation part with the validation's
   adaptation (5 steps on 5 support batches of 2) and three support seeds;
3. accuracy per (task, seed), and the paired difference to Reptile, mean +- SE over the
   (task, seed) units.

Writes ``kl_scale.json`` and ``kl_scale.md`` under ``--out``; finished steps are skipped
when the command is repeated.
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
    logged_values,
    prepare_embedded,
    run_logged,
)
from abmll_tune.metrics import mean_and_se

REPO = Path(__file__).resolve().parents[1]
SEEDS = (100, 13, 21)
# name -> (recipe, config, overrides); every ABMLL row is the tiny config with these changes
CANDIDATES = {
    "reptile": ("reptile_single_device", "tiny_cpu_reptile", []),
    "abmll_softabs_c_e-20": ("abmll_meta_single_device", "tiny_cpu_abmll", STD_SOFTABS_E20),
    "abmll_softabs_c_e-20_beta0": (
        "abmll_meta_single_device",
        "tiny_cpu_abmll",
        [*STD_SOFTABS_E20, "method.beta=0"],
    ),  # fmt: skip
}
for _fraction in (0.03, 0.1, 0.3):
    for _form in ("softabs", "exp"):
        CANDIDATES[f"abmll_{_form}_c_{_fraction:g}rms"] = (
            "abmll_meta_single_device",
            "tiny_cpu_abmll",
            [f"model.std_param={_form}", f"model.sigma_floor_w0_fraction={_fraction}"],
        )
VALIDATION = [
    "evaluation.adapt_steps=5",
    "evaluation.adapt_batch_size=2",
    "evaluation.samples=[1]",
    "evaluation.part=validation",
]


def planted(out: Path, common: list[str]) -> list[str]:
    """The planted family at spread 0.5 (family seed 0), built with K = 16."""
    from abmll_tune.embedded.planted import PlantedFamily, generate_family

    src, built = out / "planted" / "family", out / "planted" / "k16"
    backbone = next(c.split("=", 1)[1] for c in common if c.startswith("checkpointer."))
    tokenizer = Path(next(c.split("=", 1)[1] for c in common if c.startswith("tokenizer.path")))
    if not (src / "planted.json").is_file():
        generate_family(PlantedFamily(spread=0.5, seed=0), backbone, tokenizer.parent, src)
    if not (built / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "abmll_tune.data", "build", "--quiet", "--split", "planted",
             "--splits-file", str(src / "splits.yaml"), "--source", str(src), "--k", "16",
             "--out", str(built)],
            check=True,
        )  # fmt: skip
    common = [c for c in common if not c.startswith(("checkpointer.checkpoint_dir", "data.path"))]
    return [*common, f"checkpointer.checkpoint_dir={src / 'backbone'}", f"data.path={built}"]


def one(name: str, suite: str, out: Path, common: list[str]) -> Path:
    run = out / suite / name
    predictions = run / "eval" / "predictions.jsonl"
    if predictions.is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    recipe, config, overrides = CANDIDATES[name]
    log = run / "bench.log"
    training = [
        f"output_dir={run}", "stop_after_visits=1", "validation.max_tasks=1",
        "validation.adapt_steps=0", "save_every_n_visits=null", "overwrite_output_dir=true",
        *common, *overrides,
    ]  # fmt: skip
    run_logged(
        [TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml", *training],
        log,
        REPO,
    )
    seeds = ",".join(map(str, SEEDS))
    evaluation = [
        f"output_dir={run / 'eval'}", f"adapter_checkpoint={run / 'checkpoints' / 'best'}",
        "~method", f"evaluation.seeds=[{seeds}]", *VALIDATION, *common,
    ]  # fmt: skip
    run_logged([TUNE, "run", "recipes/evaluate_few_shot", "--config", "configs/tiny_cpu_eval.yaml",
          *evaluation], log, REPO)  # fmt: skip
    return run


def unit_accuracy(run: Path) -> dict[tuple[str, int], float]:
    """(task, seed) -> accuracy of the default variant, unpruned."""
    results = json.loads((run / "eval" / "results.json").read_text())
    variant = results["default_variant"]
    hits: dict[tuple[str, int], list[int]] = {}
    for line in (run / "eval" / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["variant"] != variant or r["prune"]:
            continue
        probs = r["probs"]
        hits.setdefault((r["task"], r["seed"]), []).append(
            int(max(range(len(probs)), key=probs.__getitem__) == r["gold"])
        )
    return {k: sum(v) / len(v) for k, v in hits.items()}


def pull(run: Path) -> float | None:
    """The KL's share of the inner gradient at the run's first logged visit."""
    found = logged_values(run, "kl_pull/share")
    return found[0] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/kl_scale"))
    parser.add_argument("--pretrain-steps", type=int, default=600, help="the demo backbone's")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    args = parser.parse_args()
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown or "reptile" not in args.candidates:
        parser.error(f"--candidates: reptile (the reference) and any of {list(CANDIDATES)}")
    start = time.perf_counter()
    out = args.out.resolve()
    common = prepare_embedded(out, args.pretrain_steps)
    suites = {"embedded": common, "planted": planted(out, common)}
    report: dict = {"date": time.strftime("%Y-%m-%d"), "seeds": SEEDS, "suites": {}}
    lines = ["# Few-shot accuracy of untrained adapters (epoch 0), validation tasks", ""]
    for suite, overrides in suites.items():
        units = {name: unit_accuracy(one(name, suite, out, overrides)) for name in args.candidates}
        ref = units["reptile"]
        rows = {}
        lines += [f"## {suite}", "", "| candidate | accuracy | - Reptile (paired) | KL pull share |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, acc in units.items():
            keys = sorted(acc)
            m, se = mean_and_se([acc[k] for k in keys])
            d, dse = mean_and_se([acc[k] - ref[k] for k in keys])
            share = pull(out / suite / name)
            rows[name] = {"accuracy": m, "se": se, "diff_vs_reptile": d, "diff_se": dse,
                          "kl_pull_share": share, "units": len(keys)}  # fmt: skip
            shown = "n/a" if share is None else f"{share:.3f}"
            lines.append(f"| {name} | {m:.3f} +- {se:.3f} | {d:+.3f} +- {dse:.3f} | {shown} |")
        lines.append("")
        report["suites"][suite] = rows
    report["seconds"] = time.perf_counter() - start
    from abmll_tune.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "kl_scale.json", report)
    if args.results:
        from abmll_tune.report import results_provenance

        names = list(report["suites"]["embedded"])
        rows = []
        for name in names:
            row = [name]
            for suite in report["suites"].values():
                r = suite[name]
                row += [f"{r['accuracy']:.3f} +- {r['se']:.3f}",
                        "" if name == "reptile" else f"{r['diff_vs_reptile']:+.3f} +- {r['diff_se']:.3f}"]  # fmt: skip
            shares = [s[name]["kl_pull_share"] for s in report["suites"].values()]
            row.append(" / ".join("n/a" if v is None else f"{v:.3f}" for v in shares))
            rows.append(row)
        header = ["std", "embedded", "- Reptile", "planted 0.5", "- Reptile"]
        header += ["KL pull share (embedded / planted)"]
        command = "python bench/bench_kl_scale.py --pretrain-steps " + str(args.pretrain_steps)
        if args.candidates != list(CANDIDATES):
            command += " --candidates " + " ".join(args.candidates)
        summary = {
            **results_provenance(command),
            "seeds": list(SEEDS),
            "suites": report["suites"],
            "tables": [{"title": "", "header": header, "rows": rows}],
        }
        atomic_write_json(args.results, summary)
    atomic_write_text(out / "kl_scale.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'kl_scale.md'} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
