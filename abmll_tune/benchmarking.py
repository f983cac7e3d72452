"""What the benchmarks in ``bench/`` share, importable (no ``sys.path`` edits).

* :data:`TUNE` and :func:`run_logged`: a ``tune`` command run from the repository root,
  its output appended to a log;
* :func:`prepare_embedded`: the embedded task suite and the briefly pre-trained tiny
  Llama3 every embedded-suite benchmark trains on, and the overrides that point a
  config at them;
* :func:`add_run_arguments` and :func:`run_all`: the options and the worker pool of the
  training sweeps over that suite;
* the settings several benchmarks compare: :data:`STD_SOFTABS_E20` (the std the configs
  used before the KL-scale benchmark), :data:`EB_OVERRIDES` (the empirical-Bayes outer
  step), :data:`PLANTED_PROTOCOLS` and :data:`PLANTED_ADAPTATION` (the planted
  benchmark's test protocols);
* :func:`logged_values` and :func:`logged_diagnostics`: metrics read back from a run's
  logs; :func:`plot_curves`: validation curves against gradient steps;
  :func:`write_results`: the committed summary a ``--results`` option asks for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TUNE = shutil.which("tune", path=str(Path(sys.executable).parent)) or "tune"

# softabs with c = e^-20: the std every config used before 2026-12-06
STD_SOFTABS_E20 = [
    "model.std_param=softabs",
    "model.sigma_floor=2.061153622438558e-09",
    "model.sigma_floor_w0_fraction=null",
]

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

# the planted benchmark's test protocols: name -> (support K, adaptation steps, batch
# size), each support example seen once or so
PLANTED_PROTOCOLS = {"K0": (5, 0, 1), "K1": (1, 1, 1), "K5": (5, 5, 1), "K16": (16, 8, 2)}
# how every method adapts there (the planted validation too): chosen on the truth model
# (docs/method.md "The planted benchmark")
PLANTED_ADAPTATION = {"optimizer": "adamw", "beta": None, "lr_mean": 1e-2, "lr_std": 1e-3}


def run_logged(cmd: list[str], log: Path, cwd: Path, threads: int = 1) -> None:
    """Run ``cmd`` from ``cwd`` with ``threads`` intra-op threads, appending the command
    line and its output to ``log``; raise on a non-zero exit."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "OMP_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def _module(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)


def prepare_embedded(out: Path, pretrain_steps: int) -> list[str]:
    """Build the embedded suite under ``out/data`` and pre-train the tiny backbone in
    ``out/backbone`` for ``pretrain_steps`` language-model steps (each skipped when
    already there; a backbone recorded with other steps stops the run); return the
    overrides that point a tiny config at both."""
    data, backbone = out / "data", out / "backbone"
    tok = data / "embedded_src" / "tokenizer"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    if not (data / "embedded" / "manifest.json").is_file():
        _module(["abmll_tune.embedded.suite", "--out", str(data / "embedded_src")], env)
        _module(
            ["abmll_tune.data", "build", "--quiet", "--split", "embedded",
             "--source", str(data / "embedded_src"), "--out", str(data / "embedded")],
            env,
        )  # fmt: skip
    # a backbone pre-trained for another number of steps must not be reused silently
    steps_file = backbone / "pretrain_steps.txt"
    if steps_file.is_file() and int(steps_file.read_text()) != pretrain_steps:
        raise SystemExit(
            f"{backbone} was pre-trained for {steps_file.read_text().strip()} steps, not "
            f"{pretrain_steps}: give this run another --out"
        )
    if not (backbone / "model.safetensors").is_file():
        _module(
            ["abmll_tune.embedded.backbone", "--out", str(backbone), "--vocab-size", "768",
             "--max-seq-len", "256", "--pretrain-steps", str(pretrain_steps),
             "--tokenizer-dir", str(tok)],
            env,
        )  # fmt: skip
        steps_file.write_text(f"{pretrain_steps}\n")
    return [
        f"tokenizer.path={tok / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
        f"checkpointer.checkpoint_dir={backbone}",
        f"data.path={data / 'embedded'}",
    ]


def add_run_arguments(parser: argparse.ArgumentParser, *, seeds: int) -> None:
    """The options every training sweep over the embedded suite takes."""
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)


def run_all(
    run_one: Callable, names: list[str], args: argparse.Namespace, out: Path, common: list[str]
) -> None:
    """``run_one(name, seed, out, common, epochs)`` for every name and seed, ``--workers``
    at a time (single-thread workers side by side double the throughput of tiny models)."""
    jobs = [(n, seed) for n in names for seed in range(args.seeds)]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, n, seed, out, common, args.epochs) for n, seed in jobs]
        for future in futures:
            future.result()


def write_results(path: str | Path | None, report: dict) -> None:
    """Write a benchmark's committed summary (``--results``) atomically, when asked."""
    if path:
        from abmll_tune.io import atomic_write_json

        atomic_write_json(path, report)
        print(f"wrote {path}")


def logged_values(run: Path, key: str) -> list[float]:
    """Every value of ``key`` in a run's metric logs (``logs/*.txt``), in order."""
    values = []
    for log in sorted((run / "logs").glob("*.txt")):
        for item in log.read_text().split():
            if item.startswith(key + ":"):
                values.append(float(item.split(":", 1)[1]))
    return values


def logged_diagnostics(run: Path, keys=("kl_pull/share", "sigma_theta/mean")) -> dict:
    """Per logged key: first and last value, min, max and count over the run."""
    out = {}
    for key in keys:
        v = logged_values(run, key)
        if v:
            out[key] = {"first": v[0], "last": v[-1], "min": min(v), "max": max(v), "n": len(v)}
    return out


def plot_curves(table: dict, path: Path, title: str, marker: int | None = None) -> None:
    """Validation accuracy and NLL against gradient steps, one line per method, with
    error bars: ``table[name] = {"steps": [...], "accuracy": [[mean, se], ...], "nll":
    [...]}``; ``marker`` draws a dotted vertical line at that step. Written to a temporary
    file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in table.items():
        for ax, metric in zip(axes, ("accuracy", "nll"), strict=True):
            m = [v[0] for v in c[metric]]
            se = [v[1] for v in c[metric]]
            ax.errorbar(c["steps"], m, yerr=se, label=name, capsize=2)
            ax.set_xlabel("gradient steps")
            ax.set_ylabel(f"validation {metric}")
    for ax in axes:
        if marker is not None:
            ax.axvline(marker, color="grey", lw=0.8, ls=":")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
