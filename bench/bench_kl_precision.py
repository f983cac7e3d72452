"""How much does float32 change the KL? ``kl_dtype: float32`` against float64 on one layer.

    python bench/bench_kl_precision.py --results docs/results/kl_precision.json

The configs compute the KL's dense chunks in float32 (``model.kl_dtype``); the library
default and the tests' reference is float64. On the same float32 inputs at a d x d layer
(rank 8, alpha 16, the local pairs within 5% of the global ones, 8B-like factor scales),
for the previous std (softabs, c = e^-20) and the configs' std (exp, c = 0.1 x 0.02, the
RMS of a pretrained projection), with the std pairs' B drawn at several scales (the
initial 1e-3 and larger, as training moves it): the relative difference of the KL value
and the worst relative difference (in norm) of its factor gradients. Seconds per row.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from abmll_tune.benchmarking import write_results

# (label, std form, c, B std of the std pairs)
ROWS = [
    ("previous std: softabs, c = e^-20", "softabs", math.exp(-20), (1e-3, 2e-2, 1e-1)),
    ("configs' std: exp, c = 0.1 x 0.02", "exp", 0.1 * 0.02, (1e-3, 2e-2, 1e-1)),
]


def kl_errors(d: int, std_param: str, floor: float, b_std: float, seed: int) -> tuple[float, float]:
    """(relative value difference, worst relative gradient difference) of float32 vs
    float64 on the same float32 inputs."""
    from abmll_tune.modules import gaussian

    torch.manual_seed(seed)
    r = 8

    def pair(b_scale):
        return (torch.rand(r, d) * 2 - 1) / math.sqrt(d), torch.randn(d, r) * b_scale

    p_mu = pair(1e-2)
    q_mu = (p_mu[0] + 1e-3 * torch.randn(r, d), p_mu[1] + 1e-3 * torch.randn(d, r))
    p_sd = pair(b_std)
    q_sd = tuple(t * (1 + 0.05 * torch.randn_like(t)) for t in p_sd)
    leaves32 = [t.float().requires_grad_() for t in (*q_mu, *q_sd, *p_mu, *p_sd)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves32]

    def kl(leaves, dtype):
        pairs = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(4)]
        return gaussian.kl_diag_gaussians(
            *pairs, scale=2.0, floor=floor, std_param=std_param, dtype=dtype, kernel="eager"
        )

    k32, k64 = kl(leaves32, torch.float32), kl(leaves64, torch.float64)
    g32 = torch.autograd.grad(k32, leaves32)
    g64 = torch.autograd.grad(k64, leaves64)
    value = abs(float(k32.detach()) - float(k64.detach())) / abs(float(k64.detach()))
    grad = max(float((a.double() - b).norm() / b.norm()) for a, b in zip(g32, g64, strict=True))
    return value, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096, help="the layer is dim x dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="also write the summary here (committed)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, measured = [], {}
    for label, form, floor, b_stds in ROWS:
        for b_std in b_stds:
            value, grad = kl_errors(args.dim, form, floor, b_std, args.seed)
            measured[f"{form} B_std {b_std:g}"] = {"value": value, "gradient": grad}
            rows.append([label, f"{b_std:g}", f"{value:.1e}", f"{100 * grad:.3g}%"])
            print(f"{label:<36}{b_std:>8g}{value:>12.1e}{100 * grad:>10.3g}%")
    from abmll_tune.report import results_provenance

    report = {
        **results_provenance(
            f"python bench/bench_kl_precision.py --dim {args.dim} --seed {args.seed}"
        ),
        "minutes": (time.perf_counter() - start) / 60,
        "measured": measured,
        "tables": [
            {
                "title": f"float32 against float64 KL on a {args.dim} x {args.dim} layer "
                "(the same float32 inputs)",
                "header": ["std", "B_std", "KL value, relative", "gradient, relative (worst)"],
                "rows": rows,
            }
        ],
    }
    write_results(args.results, report)


if __name__ == "__main__":
    main()
