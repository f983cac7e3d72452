"""Which outer step fits the prior's std? ABMLL's readings on a Gaussian toy with a known answer.

    python bench/bench_outer_grad_toy.py --results docs/results/outer_grad_toy.json

The toy (``abmll_tune.embedded.gaussian_toy``): tasks W_i = mu* + sigma* E_i of a 2 x 2
linear map, each visit one query batch observing every entry once with noise 0.5. The
marginal likelihood over tasks is maximised at sigma_theta = sigma*, so a reading of the
outer step that fits the prior must end near 1 x sigma* and follow sigma* when it
doubles. For each ``outer_grad`` (and, for ``marginal_likelihood``, each number of
prior draws S) and each sigma*: RMS sigma_theta / sigma* over the second half of
``--visits`` visits, and how much sigma_theta grows when sigma* doubles (2x is the
empirical-Bayes answer). A few seconds per row on a CPU.
"""

from __future__ import annotations

import argparse
import time

from abmll_tune.benchmarking import write_results

READINGS = ("marginal_likelihood", "reptile", "kl_only", "first_order")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=600)
    parser.add_argument("--spreads", default="0.5,1.0", help="sigma* values (two)")
    parser.add_argument(
        "--samples", default="8,16,32", help="prior draws S of marginal_likelihood (the others: 32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="also write the summary here (committed)")
    args = parser.parse_args()
    spreads = [float(x) for x in args.spreads.split(",")]
    if len(spreads) != 2 or spreads[1] <= spreads[0]:
        parser.error("--spreads: two increasing values, e.g. 0.5,1.0")
    from abmll_tune.embedded.gaussian_toy import sigma_after_training

    rows, measured = [], {}
    start = time.perf_counter()
    for reading in READINGS:
        draws = [int(s) for s in args.samples.split(",")] if reading == READINGS[0] else [32]
        for samples in draws:
            label = f"{reading}, S = {samples}" if reading == READINGS[0] else reading
            ratios = [
                sigma_after_training(reading, s, args.visits, args.seed, prior_samples=samples)
                for s in spreads
            ]
            growth = ratios[1] * spreads[1] / (ratios[0] * spreads[0])
            measured[label] = {"ratios": ratios, "growth": growth}
            rows.append([label, *(f"{r:.2f}" for r in ratios), f"{growth:.2f}x"])
            print(f"{label:<28}" + "".join(f"{r:>8.2f}" for r in ratios) + f"{growth:>8.2f}x")
    from abmll_tune.report import results_provenance

    report = {
        **results_provenance(
            "python bench/bench_outer_grad_toy.py "
            f"--visits {args.visits} --spreads {args.spreads} --samples {args.samples} "
            f"--seed {args.seed}"
        ),
        "minutes": (time.perf_counter() - start) / 60,
        "measured": measured,
        "tables": [
            {
                "title": f"RMS sigma_theta / sigma* over the second half of {args.visits} "
                f"visits (seed {args.seed})",
                "header": [
                    "`outer_grad`",
                    *(f"sigma* = {s:g}" for s in spreads),
                    f"sigma_theta grows when sigma* goes {spreads[0]:g} -> {spreads[1]:g}",
                ],
                "rows": rows,
            }
        ],
    }
    write_results(args.results, report)


if __name__ == "__main__":
    main()
