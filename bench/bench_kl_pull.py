"""The KL's pull after one inner step, per model shape, std and beta: how the paper-scale
configs' beta was paired with their std.

    python bench/bench_kl_pull.py --results docs/results/kl_pull_layers.json

At a task's first inner step phi = theta and beta KL has no gradient; one AdamW step later
its share of the inner gradient (``kl_pull/share``: ||g_KL|| / (||g_KL|| + ||g_NLL||), and
the fraction of coordinates it dominates) says whether the inner loop still learns from the
task. Measured on one decoder layer of each model's shape (``abmll_tune.models.one_layer``:
random W0 ~ N(0, 0.02^2), adapted where the config adapts, a random-token task of 2 x 32
tokens), for the
SmolLM2 config (the reference: its std and beta were chosen on real validation tasks), the
paper-scale configs' std at several betas, the previous std (softabs, c = e^-20, B_std
2e-2) and the literal one (affine, c = e^-20, B_std 0), at the configs' inner rates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from abmll_tune.benchmarking import write_results
from abmll_tune.methods.abmll import kl_pull_after_one_step
from abmll_tune.models.one_layer import one_layer_model
from abmll_tune.report import results_provenance

REPO = Path(__file__).resolve().parents[1]
E20 = 2.061153622438558e-09
PREVIOUS = dict(std_param="softabs", sigma_floor=E20, std_b_init_std=0.02, kl_dtype="float32")
LITERAL = dict(std_param="affine", sigma_floor=E20, std_b_init_std=0.0, kl_dtype="float64")
ADAPTER_KEYS = ("lora_rank", "lora_alpha", "std_param", "sigma_floor", "sigma_floor_w0_fraction")
ADAPTER_KEYS += ("std_b_init_std", "kl_dtype")
MODELS = {  # name -> the config whose model shape, std and inner rates are used
    "smollm2_135m": "smollm2_135m_cls45",
    "llama3_8b": "llama3_8b_cls45",
    "qwen2_7b": "qwen2_7b_cls45",
    "llama3_70b": "llama3_70b_cls45_8gpu",
}
BETAS = (5e-10, 1e-6, 1e-5, 1e-4)


def measure(
    component: str, adapted: list, adapters: dict, beta: float, lr_mean: float, lr_std: float
) -> dict:
    model = one_layer_model(component, adapters, adapted=adapted)
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 32))
    out = kl_pull_after_one_step(model, tokens, beta, lr_mean, lr_std)
    return {"share": out["kl_pull/share"], "kl_dominated": out["kl_pull/kl_dominated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--results", type=Path, help="write the rows here (committed)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        cfg = OmegaConf.load(REPO / "configs" / f"{MODELS[name]}.yaml")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        configured = {k: model[k] for k in ADAPTER_KEYS if k in model}
        rates = (float(cfg.method.inner_lr_mean), float(cfg.method.inner_lr_std))
        base = {k: configured[k] for k in ("lora_rank", "lora_alpha")}
        cases = [("config", configured, float(cfg.method.beta))]
        if name != "smollm2_135m":
            cases += [("config std", configured, b) for b in BETAS if b != cfg.method.beta]
            cases += [("previous std", {**base, **PREVIOUS}, 5e-10)]
            cases += [("literal std", {**base, **LITERAL}, 5e-10)]
        for label, adapters, beta in cases:
            row = {"model": name, "config": MODELS[name], "std": label, "beta": beta}
            row.update(inner_lr_mean=rates[0], inner_lr_std=rates[1])
            row.update({k: adapters[k] for k in ("std_param", "std_b_init_std")})
            row["c"] = (
                f"{adapters['sigma_floor_w0_fraction']} RMS(W0)"
                if "sigma_floor_w0_fraction" in adapters
                else adapters["sigma_floor"]
            )
            adapted = model["lora_attn_modules"]
            row.update(measure(cfg.model._component_, adapted, adapters, beta, *rates))
            rows.append(row)
            print(f"{name:<13}{label:<14}{row['std_param']:<8}beta {beta:<8.0e}"
                  f"share {row['share']:.2e}  dominated {row['kl_dominated']:.2e}", flush=True)  # fmt: skip
    report = {
        **results_provenance(f"python bench/bench_kl_pull.py --models {args.models}"),
        "minutes": (time.perf_counter() - start) / 60,
        "note": "one decoder layer per model shape, random W0 ~ N(0, 0.02^2), the config's "
        "adapted projections, random-token task (2 x 32), one AdamW step at the config's inner rates, then the KL's "
        "share of the inner gradient norm and of the coordinates",
        "rows": rows,
    }
    write_results(args.results, report)


if __name__ == "__main__":
    main()
