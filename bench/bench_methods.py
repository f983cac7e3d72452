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
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TUNE = shutil.which("tune", path=str(Path(sys.executable).parent)) or "tune"
SUPPORT_SEEDS = (100, 13, 21)

# ABMLL with the empirical-Bayes outer step (docs/method.md "Fitting the prior"): the
# settings the planted benchmark measured
EB_OVERRIDES = [
    "method.outer_grad=marginal_likelihood",
    "model.std_scale_row=true",
    "model.std_b_init_std=0.0",
    "method.outer_lr_mean=0.01",
    "method.outer_lr_std=0.03",
    "method.prior_data=query",
    "method.prior_samples=64",
    "method.gamma=0.0",
]

# softabs with c = e^-20: the std the configs used before the KL-scale benchmark
E20 = [
    "model.std_param=softabs",
    "model.sigma_floor=2.061153622438558e-09",
    "model.sigma_floor_w0_fraction=null",
]

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
    "abmll_softabs_c_e-20": ("tiny_cpu_abmll", E20),
    "abmll_softabs_c_0.1rms": ("tiny_cpu_abmll", ["model.std_param=softabs"]),
    # the paper's values (v1): its std (softabs, c = e^-20, B_std = 0), beta and gamma
    "abmll_paper_values": (
        "tiny_cpu_abmll",
        [*E20, "model.std_b_init_std=0.0", "method.beta=5e-10", "method.gamma=1e-6"],
    ),
    "reptile_metaicl": ("tiny_cpu_reptile_metaicl", []),
    "abmll_metaicl": ("tiny_cpu_abmll_metaicl", []),
}


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIKTOKEN_CACHE_DIR": "", "OMP_NUM_THREADS": "1"}
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def one_run(name: str, seed_index: int, out: Path, common: list[str], epochs: int) -> Path:
    run = out / f"{name}_seed{seed_index}"
    results = run / "eval" / "results.json"
    if results.is_file():
        return results
    run.mkdir(parents=True, exist_ok=True)
    log = run / "bench.log"
    spec = METHODS[name]

    def evaluate(method: str, checkpoint: str) -> None:
        _run(
            [
                TUNE, "run", "recipes/evaluate_few_shot", "--config", "configs/tiny_cpu_eval.yaml",
                f"method={method}", f"adapter_checkpoint={checkpoint}",
                f"evaluation.seeds=[{SUPPORT_SEEDS[seed_index]}]", "evaluation.samples=[1,10]",
                f"output_dir={run / 'eval'}", *common,
            ],
            log,
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
    _run([TUNE, "run", f"recipes/{recipe}", "--config", f"configs/{config}.yaml", *training], log)
    evaluate(method, str(run / "checkpoints" / "best"))
    return results


def prepare(out: Path, pretrain_steps: int) -> list[str]:
    data = out / "data"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    if not (data / "embedded" / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "abmll_tune.embedded.suite",
                "--out",
                str(data / "embedded_src"),
            ],
            check=True,
            env=env,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "abmll_tune.data",
                "build",
                "--quiet",
                "--split",
                "embedded",
                "--source",
                str(data / "embedded_src"),
                "--out",
                str(data / "embedded"),
            ],
            check=True,
            env=env,
        )
    backbone = out / "backbone"
    if not (backbone / "model.safetensors").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "abmll_tune.embedded.backbone",
                "--out",
                str(backbone),
                "--vocab-size",
                "768",
                "--max-seq-len",
                "256",
                "--pretrain-steps",
                str(pretrain_steps),
                "--tokenizer-dir",
                str(data / "embedded_src" / "tokenizer"),
            ],
            check=True,
            env=env,
        )
    tok = data / "embedded_src" / "tokenizer"
    return [
        f"tokenizer.path={tok / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
        f"checkpointer.checkpoint_dir={backbone}",
        f"data.path={data / 'embedded'}",
    ]


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
        sigma = [last_logged(out / f"{name}_seed{i}", "sigma_theta/mean") for i in range(n_seeds)]
        if all(v is not None for v in sigma):  # the global std at the end of training
            m, se = mean_and_se(sigma)
            table[name]["sigma_theta_mean_last"] = {"mean": m, "se": se}
        table.setdefault("_chance", {"accuracy": rows[0]["chance_accuracy"]})
    return table


def last_logged(run: Path, key: str) -> float | None:
    """The last value of ``key`` in a run's metric logs (None when never logged)."""
    found = None
    for log in sorted((run / "logs").glob("*.txt")):
        for item in log.read_text().split():
            if item.startswith(key + ":"):
                found = float(item.split(":", 1)[1])
    return found


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


def add_run_arguments(parser: argparse.ArgumentParser, *, seeds: int) -> None:
    """The options every training sweep over the embedded suite takes (this script's and
    ``calibration_sweep.py``'s)."""
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)


def run_all(run_one, names: list[str], args: argparse.Namespace, out: Path, common: list[str]):
    """``run_one(name, seed, out, common, epochs)`` for every name and seed, ``--workers``
    at a time (single-thread workers side by side double the throughput here)."""
    jobs = [(n, seed) for n in names for seed in range(args.seeds)]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, n, seed, out, common, args.epochs) for n, seed in jobs]
        for future in futures:
            future.result()


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
    common = prepare(out, args.pretrain_steps)
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
