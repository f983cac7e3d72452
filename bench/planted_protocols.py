"""Which test-time adaptation protocol? Candidates scored on one finished planted spread.

    python bench/planted_protocols.py --root bench_results/planted/spread1 \
        --results docs/results/planted_protocols.json

The planted benchmark (``bench/bench_planted.py``) adapts every method one way; this
script scores the candidates on the truth model (the global Gaussian set to the
family's, where the right protocol must help) and on the two ABMLL readings' training
seed 0 (where a protocol must not break adaptation from a tight learned prior): the
excess NLL (KL from the oracle) and accuracy after K = 1, 5 and 16 support examples,
mean +- SE over the support seeds. Candidates (``bench/planted_eval.py`` options):

* ``adamw_training_beta``: AdamW, each method's training beta (the paper's protocol);
* ``adamw_per_example``: AdamW, the ELBO at unit weight (beta = 1 / support size);
* ``natural_0.5``, ``natural_1``: ``adapt_optimizer: prior_natural`` (Newton steps on the
  KL for the mean pairs) at a half and a whole step, beta = 1 / support size.

A finished run is skipped when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "adamw_training_beta": ["--adapt-optimizer", "adamw", "--adapt-beta", "null"],
    "adamw_per_example": ["--adapt-optimizer", "adamw", "--adapt-beta", "per_example"],
    "natural_0.5": ["--adapt-optimizer", "prior_natural", "--adapt-beta", "per_example",
                    "--adapt-lr-mean", "0.5"],
    "natural_1": ["--adapt-optimizer", "prior_natural", "--adapt-beta", "per_example",
                  "--adapt-lr-mean", "1.0"],
}  # fmt: skip
# model -> checkpoint under the spread's root, and the candidates it is scored with
MODELS = {
    "truth": ("truth/checkpoint", tuple(CANDIDATES)),
    "abmll": ("runs/abmll_seed0/checkpoints/best", tuple(CANDIDATES)[:3]),
    "abmll_eb": ("runs/abmll_eb_seed0/checkpoints/best", tuple(CANDIDATES)[:3]),
}


def run(root: Path, out: Path, model: str, candidate: str, seeds: str) -> Path:
    result = out / f"{model}_{candidate}.json"
    if result.is_file():
        return result
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, str(REPO / "bench" / "planted_eval.py"),
        "--family", str(root / "family"),
        "--data", ",".join(str(root / f"k{k}") for k in (1, 5, 16)),
        "--tokenizer-dir", str(root.parent / "data" / "embedded_src" / "tokenizer"),
        "--seeds", seeds, "--protocols", "K1,K5,K16",
        "--checkpoint", str(root / MODELS[model][0]), "--out", str(result),
        *CANDIDATES[candidate],
    ]  # fmt: skip
    with open(result.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return result


def summarize(path: Path, oracle: dict) -> dict:
    """K -> {excess_nll, accuracy: [mean, se]} over the support seeds."""
    from abmll_tune.embedded.planted import planted_scores as scores
    from abmll_tune.metrics import mean_and_se, pad_probs

    result = json.loads(path.read_text())
    out = {}
    for protocol, records in result["protocols"].items():
        per_seed = []
        for seed in sorted({r["seed"] for r in records}):
            recs = sorted((r for r in records if r["seed"] == seed), key=lambda r: r["id"])
            ids = [r["id"] for r in recs]
            probs = pad_probs([r["probs"] for r in recs])
            width = probs.shape[1]
            gold = np.array([oracle[i]["gold"] for i in ids])
            ref = {n: pad_probs([oracle[i][n] for i in ids])[:, :width]
                   for n in ("oracle", "prior_predictive")}  # fmt: skip
            per_seed.append(scores(probs, gold, ref["oracle"], ref["prior_predictive"]))
        out[protocol[1:]] = {
            m: list(mean_and_se(s[m] for s in per_seed)) for m in ("excess_nll", "accuracy")
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("bench_results/planted/spread1"))
    parser.add_argument("--out", type=Path, help="default: ROOT/protocols")
    parser.add_argument("--seeds", default="100,13,21", help="support seeds")
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    args = parser.parse_args()
    root = args.root.resolve()
    out = (args.out or root / "protocols").resolve()
    from abmll_tune.embedded.planted import read_oracle

    oracle = read_oracle(root / "family")
    table = {
        model: {c: summarize(run(root, out, model, c, args.seeds), oracle) for c in candidates}
        for model, (_, candidates) in MODELS.items()
    }
    print(f"{'model':<10}{'candidate':<22}" + "".join(f"{'K' + k:>24}" for k in ("1", "5", "16")))
    for model, rows in table.items():
        for candidate, by_k in rows.items():
            cells = "".join(
                f"{by_k[k]['excess_nll'][0]:>10.3f} / {by_k[k]['accuracy'][0]:.3f}      "
                for k in ("1", "5", "16")
            )
            print(f"{model:<10}{candidate:<22}{cells}")
    if args.results:
        from abmll_tune.io import atomic_write_json

        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        atomic_write_json(
            args.results,
            {
                "date": time.strftime("%Y-%m-%d"),
                "commit": commit,
                "command": "python bench/planted_protocols.py " + " ".join(sys.argv[1:]),
                "root": str(args.root),
                "support_seeds": args.seeds,
                "machine": "x86_64, 2 cores, CPU float32 (figures move with the CPU's floating point)",
                "what": "excess NLL (KL from the oracle) and accuracy after K support examples, "
                "mean and SE over support seeds; truth: the family's own Gaussian; abmll, "
                "abmll_eb: training seed 0's best checkpoint",
                "candidates": CANDIDATES,
                "models": table,
            },
        )
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
