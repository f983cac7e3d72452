"""Sweeps of meta-training + evaluation runs: the beta ablation and seeds, resumable.

    python -m abmll_tune.sweep --config configs/tiny_cpu_abmll.yaml \\
        --eval-config configs/tiny_cpu_eval.yaml --out outputs/sweep \\
        --log10-betas 0,-5,-8,-16 --seeds 0,1,2 [--eval-override evaluation.seeds=[100]] [-- epochs=8 ...]

Each (beta, seed) gets its own directory ``{out}/beta_1e-08_seed_1/`` with the training
run and its evaluation (``eval/results.json``) of the best-validation checkpoint. A
finished run (results present) is skipped, an interrupted training resumes from its
checkpoint, so re-running the same command completes the sweep. Then
``python -m abmll_tune.report {out} --out {out}/report`` gives the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from abmll_tune.methods import method_class


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def run_dir_name(beta: float, seed: int) -> str:
    return f"beta_{beta:g}_seed_{seed}"


def plan(betas: list[float], seeds: list[int]) -> list[tuple[float, int]]:
    return [(b, s) for b in betas for s in seeds]


def recipe_module(recipe: str) -> str:
    """The installed recipe as ``tune run`` takes it: ``abmll_tune/recipes/<recipe>.py``,
    which torchtune turns into the module name ``abmll_tune.recipes.<recipe>`` and runs
    with ``python -m``, so it works from a checkout, a wheel and any directory."""
    module = f"abmll_tune.recipes.{recipe}"
    if importlib.util.find_spec(module) is None:
        raise FileNotFoundError(f"recipe {recipe!r} is not installed with abmll_tune ({module})")
    return module.replace(".", "/") + ".py"


def tune_command() -> list[str]:
    """torchtune's ``tune`` CLI run by this interpreter: found wherever torchtune is
    importable (a venv, a ``pip install --target`` folder whose scripts are not beside the
    interpreter), and never a ``tune`` of another environment first on PATH. ``-P``
    (Python 3.11+) keeps ``-m`` from putting the current directory first on the path, where
    a checkout's ``abmll_tune`` (which has no ``recipes``) would hide the installed one."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "torchtune._cli.tune"]


def _tune(recipe: str, config: str, overrides: list[str]) -> None:
    cmd = [*tune_command(), "run", recipe_module(recipe), "--config", config, *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)  # config paths are relative to the caller's directory


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--config", required=True, help="meta-training config (ABMLL for the beta ablation)"
    )
    parser.add_argument("--eval-config", required=True, help="few-shot evaluation config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log10-betas", type=_floats, default=[0.0, -5.0, -8.0, -16.0])
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument(
        "--eval-override",
        action="append",
        default=[],
        help="KEY=VALUE for the evaluation runs (repeatable)",
    )
    args = parser.parse_args(argv)
    value = OmegaConf.load(args.config).get("method")
    cls, problems = method_class(
        OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    )
    if cls is None:
        parser.error(f"{args.config}: {'; '.join(problems)}")
    has_beta = "beta" in {f.name for f in dataclasses.fields(cls)}
    out = Path(args.out).resolve()
    runs = plan([10.0**b for b in args.log10_betas], args.seeds)
    for i, (beta, seed) in enumerate(runs, start=1):
        run = out / run_dir_name(beta, seed)
        results = run / "eval" / "results.json"
        if results.is_file():
            print(f"[{i}/{len(runs)}] {run.name}: done, skipped")
            continue
        print(f"[{i}/{len(runs)}] {run.name}")
        training = [f"output_dir={run}", f"seed={seed}", *extra]
        if has_beta:  # the beta ablation; other methods only repeat seeds
            training.append(f"method.beta={beta}")
        if (run / "checkpoints" / "latest").is_dir():  # interrupted (or finished): continue
            training.append("resume_from_checkpoint=true")
        else:  # never checkpointed: start it again
            training.append("overwrite_output_dir=true")
        _tune("abmll_meta_single_device", args.config, training)  # the recipe of every method
        _tune(
            "evaluate_few_shot",
            args.eval_config,
            [
                f"output_dir={run / 'eval'}",
                f"method={cls.name}",
                f"adapter_checkpoint={run / 'checkpoints' / 'best'}",
                *args.eval_override,
            ],
        )
    print(f"sweep complete: python -m abmll_tune.report {out} --out {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
