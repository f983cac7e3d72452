"""Tables and figures from evaluation and training runs: the paper's results, from yours.

    python -m abmll_tune.report outputs/eval outputs/tiny_cpu_abmll --out outputs/report

Reads every ``results.json`` (from ``recipes/evaluate_few_shot``) and ``validation.jsonl``
(from the meta-training recipes) under the given directories and writes, as Markdown
and CSV:

* ``main`` - accuracy and ECE (fraction) per method and split, mean +- SE over seeds
  (ABMLL with one posterior sample, as in the paper; no pruning);
* ``samples`` - ABMLL with each number of posterior samples and the posterior mean;
* ``pruning`` - accuracy and ECE per method and pruning level;
* ``beta_ablation`` - ABMLL runs by the beta they were trained with;

and as PNG: accuracy and ECE over validation epochs per run (the paper's Figure 2),
reliability diagrams per method, accuracy/ECE against pruning level and against the
number of posterior samples. The main table is printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from abmll_tune.io import atomic_write_text
from abmll_tune.metrics import format_mean_se, pad_probs, reliability

RESULTS_FORMAT = "abmll-tune-results"


class ReportError(ValueError):
    """Nothing to report, or result files that cannot be compared."""


def find_runs(paths: list[str | os.PathLike]) -> tuple[list[dict], list[dict]]:
    """(evaluation results, training validation histories) found under ``paths``."""
    results, histories = [], []
    for root in map(Path, paths):
        if not root.exists():
            raise ReportError(f"{root}: no such file or directory")
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for f in files:
            if f.name == "results.json":
                data = json.loads(f.read_text())
                if data.get("format") != RESULTS_FORMAT or data.get("version") != 1:
                    raise ReportError(
                        f"{f}: not an abmll-tune results file (format {data.get('format')!r} v{data.get('version')})"
                    )
                data["_path"] = str(f)
                results.append(data)
            elif f.name == "validation.jsonl":
                rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                if rows:
                    histories.append({"run": f.parent.name, "rows": rows, "_path": str(f)})
    if not results and not histories:
        raise ReportError(
            f"no results.json or validation.jsonl under {', '.join(map(str, paths))}: run recipes/evaluate_few_shot first"
        )
    _check_compatible(results)
    return results, histories


def _check_compatible(results: list[dict]) -> None:
    """Runs compared in one table must share split part and protocol."""
    by_split = defaultdict(list)
    for r in results:
        by_split[r["split"]].append(r)
    for split, runs in by_split.items():
        keys = {
            (
                r["part"],
                tuple(r["settings"]["seeds"]),
                r["settings"]["adapt_steps"],
                tuple(r["tasks"]),
            )
            for r in runs
        }
        if len(keys) > 1:
            detail = "; ".join(
                f"{r['_path']}: part={r['part']}, seeds={r['settings']['seeds']}, adapt_steps={r['settings']['adapt_steps']}, {len(r['tasks'])} tasks"
                for r in runs
            )
            raise ReportError(
                f"results of split {split!r} were made with different protocols and cannot share a table: {detail}"
            )


def _label(r: dict, results: list[dict]) -> str:
    same = [x for x in results if x["method"] == r["method"] and x["split"] == r["split"]]
    return r["method"] if len(same) == 1 else f"{r['method']} ({r['run']})"


def _fmt(m: dict) -> str:
    return format_mean_se(m)


def _table(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def tables(results: list[dict]) -> dict[str, tuple[str, str]]:
    """name -> (markdown, csv)."""
    out = {}
    splits = sorted({r["split"] for r in results})
    labels = sorted({_label(r, results) for r in results})
    cell = {}
    for r in results:
        key = f"{r['default_variant']}@0"
        if key in r["metrics"]:
            cell[(_label(r, results), r["split"])] = r["metrics"][key]["summary"]
    header = ["method"] + [f"{s} {m}" for s in splits for m in ("accuracy", "ECE")]
    rows = [
        [label]
        + [
            _fmt(cell[(label, s)][m]) if (label, s) in cell else "-"
            for s in splits
            for m in ("accuracy", "ece")
        ]
        for label in labels
    ]
    out["main"] = _table(header, rows)
    sample_rows = []
    for r in results:
        if len({m["variant"] for m in r["metrics"].values()}) < 2:
            continue  # one variant only: nothing to compare (not a sampled method)
        for m in r["metrics"].values():
            if m["prune"] == 0:
                sample_rows.append(
                    [
                        _label(r, results),
                        r["split"],
                        m["variant"],
                        _fmt(m["summary"]["accuracy"]),
                        _fmt(m["summary"]["ece"]),
                    ]
                )
    if sample_rows:
        out["samples"] = _table(["method", "split", "variant", "accuracy", "ECE"], sample_rows)
    prune_rows = []
    for r in results:
        levels = sorted({m["prune"] for m in r["metrics"].values()})
        if len(levels) > 1:
            for level in levels:
                m = r["metrics"].get(f"{r['default_variant']}@{level:g}")
                if m:
                    prune_rows.append(
                        [
                            _label(r, results),
                            r["split"],
                            f"{level:g}",
                            _fmt(m["summary"]["accuracy"]),
                            _fmt(m["summary"]["ece"]),
                        ]
                    )
    if prune_rows:
        out["pruning"] = _table(["method", "split", "pruned", "accuracy", "ECE"], prune_rows)
    beta_rows = []
    for r in sorted(
        (r for r in results if "beta" in r.get("training", {})),  # a method with a beta
        key=lambda r: (r["split"], -r["training"]["beta"]),
    ):
        m = r["metrics"].get(f"{r['default_variant']}@0")
        if m:
            beta_rows.append(
                [
                    r["split"],
                    f"{np.log10(r['training']['beta']) if r['training']['beta'] > 0 else float('-inf'):g}",
                    r["run"],
                    _fmt(m["summary"]["accuracy"]),
                    _fmt(m["summary"]["ece"]),
                ]
            )
    if len({row[1] for row in beta_rows}) > 1:
        out["beta_ablation"] = _table(["split", "log10 beta", "run", "accuracy", "ECE"], beta_rows)
    return out


def _save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def figures(results: list[dict], histories: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if histories:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for h in histories:
            epochs = [row["epoch"] for row in h["rows"]]
            axes[0].plot(epochs, [row["accuracy"] for row in h["rows"]], marker="o", label=h["run"])
            axes[1].plot(epochs, [row["ece"] for row in h["rows"]], marker="o", label=h["run"])
        for ax, name in zip(axes, ("validation accuracy", "validation ECE"), strict=True):
            ax.set_xlabel("epoch")
            ax.set_title(name)
        axes[0].legend(fontsize=7)
        _save_figure(fig, out / "epochs.png")
        plt.close(fig)
        written.append(out / "epochs.png")
    for r in results:
        preds_path = Path(r["_path"]).with_name("predictions.jsonl")
        if not preds_path.is_file():
            continue
        rows = [json.loads(line) for line in preds_path.read_text().splitlines() if line.strip()]
        rows = [p for p in rows if p["variant"] == r["default_variant"] and p["prune"] == 0]
        if not rows:
            continue
        rel = reliability(pad_probs([p["probs"] for p in rows]), [p["gold"] for p in rows])
        centers = (rel["edges"][:-1] + rel["edges"][1:]) / 2
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.bar(
            centers,
            np.nan_to_num(rel["accuracy"]),
            width=1 / len(centers),
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability: {_label(r, results)}, {r['split']}", fontsize=9)
        ax.legend(fontsize=7)
        path = out / f"reliability_{r['run']}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    pruned = [r for r in results if len({m["prune"] for m in r["metrics"].values()}) > 1]
    if pruned:
        written.append(
            _curve(
                plt,
                pruned,
                results,
                out / "pruning.png",
                "pruned fraction",
                lambda r: [
                    (m["prune"], m)
                    for m in r["metrics"].values()
                    if m["variant"] == r["default_variant"]
                ],
            )
        )
    sampled = [
        r
        for r in results
        if any(
            m["variant"][:1] == "s" and m["variant"][1:].isdigit() for m in r["metrics"].values()
        )
    ]
    if sampled:
        written.append(
            _curve(
                plt,
                sampled,
                results,
                out / "samples.png",
                "posterior samples",
                lambda r: [
                    (int(m["variant"][1:]), m)
                    for m in r["metrics"].values()
                    if m["variant"].startswith("s") and m["prune"] == 0
                ],
            )
        )
    return written


def _curve(plt, runs, results, path: Path, xlabel: str, points) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        pts = sorted(points(r), key=lambda p: p[0])
        xs = [x for x, _ in pts]
        for ax, metric in zip(axes, ("accuracy", "ece"), strict=True):
            means = [m["summary"][metric]["mean"] for _, m in pts]
            ses = [m["summary"][metric]["se"] for _, m in pts]
            ax.errorbar(xs, means, yerr=ses, marker="o", capsize=3, label=_label(r, results))
    for ax, metric in zip(axes, ("accuracy", "ECE"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def benchmark_table(summary: dict) -> str:
    """The Markdown table of a committed method-benchmark summary
    (``bench/bench_methods.py --results``, ``docs/results/methods.json``): every method's
    default variant, mean +- SE over the training seeds, with where it comes from; the
    global std at the end of training where it was logged, and the paired differences
    where the benchmark computed them (``--paired-against``)."""
    methods = {name: m for name, m in summary["methods"].items() if "[" not in name}
    with_sigma = any("sigma_theta_mean_last" in m for m in methods.values())

    def cell(value: dict | None, form: str = ".3f") -> str:
        return (
            "" if value is None else f"{value['mean']:{form}} +- {value['se']:{form.lstrip('+')}}"
        )

    with_pull = any("kl_pull_share_range" in m for m in methods.values())

    def pull(m: dict) -> str:
        low_high = m.get("kl_pull_share_range")
        return "" if low_high is None else "{:.2g} - {:.2g}".format(*low_high)

    rows = [
        [name, *(cell(m[k]) for k in ("accuracy", "ece", "nll"))]
        + ([cell(m.get("sigma_theta_mean_last"), ".2g")] if with_sigma else [])
        + ([pull(m)] if with_pull else [])
        for name, m in methods.items()
    ]
    header = ["method", "accuracy", "ECE", "NLL"] + (["sigma_theta (end)"] if with_sigma else [])
    header += ["KL pull share over training"] if with_pull else []
    markdown, _ = _table(header, rows)
    if summary.get("paired_accuracy"):
        paired, _ = _table(
            ["paired by training seed", "accuracy"],
            [[label, cell(d, "+.3f")] for label, d in summary["paired_accuracy"].items()],
        )
        markdown += "\n" + paired
    return (
        markdown
        + f"\n{summary['seeds']} training seeds (each with its own support seed), 30 held-out "
        f"test tasks, chance {summary['chance_accuracy']:.3f}; {summary['date']}, commit "
        f"{(summary.get('commit') or '?')[:7]}, {summary['machine']}: "
        f"`{summary['command']}`\n"
    )


def planted_protocols_table(summary: dict) -> str:
    """The Markdown table of ``bench/planted_protocols.py --results``: excess NLL after K =
    1 / 5 / 16 support examples per adaptation candidate (rows) and model (columns)."""
    models = summary["models"]
    candidates = list(summary["candidates"])
    rows = []
    for c in candidates:
        row = [f"{c} (`{' '.join(summary['candidates'][c])}`)"]
        for by_candidate in models.values():
            by_k = by_candidate.get(c)
            row.append(
                ""
                if by_k is None
                else " / ".join(f"{by_k[k]['excess_nll'][0]:.3f}" for k in ("1", "5", "16"))
            )
        rows.append(row)
    markdown, _ = _table(["candidate (planted_eval options)", *models], rows)
    return (
        "Excess NLL at K = 1 / 5 / 16, mean over the support seeds "
        f"({summary['support_seeds']}; SEs and accuracies in the file):\n\n"
        + markdown
        + _provenance(summary)
    )


def curves_table(summary: dict) -> str:
    """The Markdown table of a committed learning-curve summary (``bench/bench_epochs.py
    --results``, ``docs/results/epochs.json``): validation accuracy and NLL per method
    against gradient steps, mean +- SE over the training seeds."""
    methods = summary["methods"]
    steps = sorted(set.intersection(*(set(c["steps"]) for c in methods.values())))
    header = ["gradient steps"] + [f"{name} accuracy / NLL" for name in methods]
    rows = []
    for step in steps:
        row = [str(step)]
        for curve in methods.values():
            i = curve["steps"].index(step)
            (acc, acc_se), (nll, _) = curve["accuracy"][i], curve["nll"][i]
            row.append(f"{acc:.3f} +- {acc_se:.3f} / {nll:.3f}")
        rows.append(row)
    markdown, _ = _table(header, rows)
    if summary.get("paired"):  # per-task paired differences (one training seed)
        labels = list(summary["paired"])
        header = ["gradient steps"] + [f"{label}: accuracy" for label in labels]
        rows = [
            [str(step)]
            + [
                "{:+.3f} +- {:.3f}".format(*summary["paired"][label][str(step)]["accuracy"])
                for label in labels
            ]
            for step in steps
        ]
        paired, _ = _table(header, rows)
        markdown += "\nPaired by validation task (mean +- SE over the tasks):\n\n" + paired
    return markdown + _provenance(summary)


def results_provenance(command: str, machine: str | None = None) -> dict:
    """The header of a committed benchmark summary (``docs/results/``): date, commit (of
    the checkout the benchmark runs from, when it is one), command and machine."""
    import platform
    import subprocess
    import time

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit or None,
        "command": command,
        "machine": machine
        or f"{platform.machine()}, {os.cpu_count()} cores, CPU float32 "
        "(figures move with the CPU's floating point and the machine's load)",
    }


def summary_tables(summary: dict) -> str:
    """The Markdown tables a benchmark stored with its summary (``tables``: a list of
    ``{"title", "header", "rows"}``), followed by the summary's provenance."""
    parts = []
    for table in summary["tables"]:
        markdown, _ = _table(table["header"], table["rows"])
        parts.append((f"{table['title']}\n\n" if table.get("title") else "") + markdown)
    return "\n".join(parts) + _provenance(summary)


def _provenance(summary: dict) -> str:
    return (
        f"\n{summary['date']}, commit {(summary.get('commit') or '?')[:7]}, "
        f"{summary['machine']}: `{summary['command']}`\n"
    )


LAYER_ROWS = {  # bench/bench_layer.py's variants, as the table names them
    "lora": "torchtune LoRA",
    "abmll_inner": "ABMLL inner step (sample + beta KL, local grads)",
    "abmll_inner_compiled": "the same, `kl_kernel: compiled`",
    "abmll_full": "ABMLL full step (sample + KL + prior, all grads)",
    "abmll_full_compiled": "the same, `kl_kernel: compiled`",
    "abmll_cycle": "ABMLL per step of a task (5 inner + 1 full) / 6, eager",
    "abmll_dense_kl": "naive dense KL + prior (plain autograd)",
}


def layer_table(summary: dict) -> str:
    """The Markdown table of ``bench/bench_layer.py --results`` (``docs/results/layer.json``):
    each variant's step on one 8B-shaped layer against torchtune's LoRA."""
    header = ["variant", "median s", "x LoRA", "min x LoRA", "CPU time x LoRA"]
    header += ["peak RSS vs LoRA", "saved for backward vs LoRA", "x 32 layers"]
    rows = []
    for key, label in LAYER_ROWS.items():
        if key not in summary["summary"]:  # a run of some variants only
            continue
        r = summary["summary"][key]
        rows.append(
            [
                label,
                f"{r['median_step_seconds']:.2f}",
                f"{r['time_ratio_vs_lora']:.2f}",
                f"{r['min_time_ratio_vs_lora']:.2f}",
                f"{r['cpu_time_ratio_vs_lora']:.2f}",
                "-" if key == "lora" else f"{r['extra_peak_vs_lora_mib']:+.0f} MiB",
                "-" if key == "lora" else f"{r['extra_saved_vs_lora_mib']:+.1f} MiB",
                "-" if key == "lora" else f"{r['extra_saved_32_layers_gib']:+.2f} GiB",
            ]
        )
    markdown, _ = _table(header, rows)
    return markdown + _provenance(summary)


def kl_pull_table(summary: dict) -> str:
    """The Markdown table of ``bench/bench_kl_pull.py --results``
    (``docs/results/kl_pull_layers.json``): the KL's share of the inner gradient after one
    inner step, per model shape, std and beta."""
    header = ["model layer", "std", "c", "B_std init", "beta", "inner rates (mean / std)"]
    header += ["KL share of the gradient norm", "coordinates KL-dominated"]
    rows = [
        [
            r["model"] + (" (its config)" if r["std"] == "config" else ""),
            f"{r['std']}: {r['std_param']}",
            str(r["c"]) if isinstance(r["c"], str) else f"{r['c']:.2g}",
            f"{r['std_b_init_std']:g}",
            f"{r['beta']:g}",
            f"{r['inner_lr_mean']:g} / {r['inner_lr_std']:g}",
            f"{r['share']:.2g}",
            f"{100 * r['kl_dominated']:.3g}%",
        ]
        for r in summary["rows"]
    ]
    markdown, _ = _table(header, rows)
    return markdown + _provenance(summary)


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    results, histories = find_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (md, text) in tables(results).items() if results else []:
        atomic_write_text(out / f"{name}.md", md)
        atomic_write_text(out / f"{name}.csv", text)
        written[name] = md
    written["figures"] = [str(p) for p in figures(results, histories, out)]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "paths", nargs="+", help="directories (or files) holding results.json / validation.jsonl"
    )
    parser.add_argument("--out", required=True, help="directory for the tables and figures")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.paths, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "main" in written:
        print(written["main"])
    print(
        f"wrote {len([k for k in written if k != 'figures'])} tables and {len(written['figures'])} figures to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
