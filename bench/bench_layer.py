"""Cost of one ABMLL training step on a Llama3-8B-shaped decoder layer against torchtune's LoRA.

    python bench/bench_layer.py --out bench_results/layer.json      (or: make bench)

One decoder layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336), float32 on the CPU,
batch 2 x 256 tokens, adapters rank 8 / alpha 16 on q, v and output projections, the
layer input requiring grad as in the middle of a model. Variants:

* ``lora``            torchtune's ``LoRALinear`` (``lora_llama3``), loss = mean(out^2);
* ``abmll_full``      ``VariationalLoRALinear`` in ``local_sample`` mode (local
                      reparameterization) + beta * KL + gamma * prior (chunked float64),
                      gradients for all four pairs: the costliest step ABMLL takes (the
                      ``first_order`` outer step);
* ``abmll_inner``     an inner step: sampling + beta * KL, gradients for the local pairs
                      only (the prior is constant in the inner loop and is not computed);
* ``abmll_dense_kl``  ``abmll_full`` with KL and prior built by plain autograd on dense
                      d_out x d_in tensors (the naive implementation), for comparison;
* ``abmll_inner_compiled``, ``abmll_full_compiled``  the same steps with
                      ``kl_kernel: compiled`` (one torch.compile kernel per KL/prior
                      chunk) instead of the eager in-place kernel (``kl_kernel: eager``).

KL and prior run in float32 (``kl_dtype: float32``), as the shipped 8B configs do.

ABMLL takes K = 5 inner steps and one outer step per task, so the cost per step of
meta-training is (5 * inner + 1 * full) / 6 (``abmll_cycle`` in the table).

Each repetition runs every variant in a fresh subprocess, alternating, so peak RSS is
per variant and drift on this shared machine hits all variants alike. Reported: median
step time, the fastest step and the median process CPU time (all threads; each with its
ratio to LoRA: on a shared machine the median's spread hides a 5% effect), peak RSS above the process's RSS before the first step,
and the bytes each variant saves for backward (what a model without activation
checkpointing keeps per layer), extrapolated to 32 layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(
    vocab_size=16,  # the layer is what is measured; embeddings stay tiny
    num_layers=1,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    intermediate_dim=14336,
    max_seq_len=512,
)
TARGETS = ["q_proj", "v_proj", "output_proj"]
# ABMLL's adapters, beta and gamma as the 8B flagship config sets them (as the device check)
_FLAGSHIP = OmegaConf.load(REPO / "configs" / "llama3_8b_cls45.yaml")
PAPER_ADAPTERS = {
    k: _FLAGSHIP.model[k]
    for k in (
        "lora_rank",
        "lora_alpha",
        "std_param",
        "sigma_floor",
        "sigma_floor_w0_fraction",
        "std_b_init_std",
        "kl_dtype",
    )  # fmt: skip
    if k in _FLAGSHIP.model
}
BETA, GAMMA = float(_FLAGSHIP.method.beta), float(_FLAGSHIP.method.gamma)
VARIANTS = (
    "lora",
    "abmll_inner",
    "abmll_full",
    "abmll_dense_kl",
    "abmll_inner_compiled",
    "abmll_full_compiled",
)
INNER_STEPS = 5


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    # VmHWM is this process's own high-water mark (ru_maxrss inherits the parent's on Linux)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dense_kl_and_prior(layers) -> torch.Tensor:
    """The naive version: dense float64 tensors, plain autograd (keeps them all for backward)."""
    from abmll_tune.modules.gaussian import std_variance

    total = torch.zeros((), dtype=torch.float64)
    for m in layers:
        c = m.sigma_floor

        def dense(scope, kind, m=m):
            a, b = m.pair(scope, kind)
            return m.scale * b.double() @ a.double()

        mu_q, mu_p = dense("local", "mean"), dense("global", "mean")
        var_q = std_variance(dense("local", "std"), c, m.std_param)
        var_p = std_variance(dense("global", "std"), c, m.std_param)
        kl = (
            0.5 * torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
        ).sum()
        v = m.pretrained_weight_variance()
        prior = (mu_p**2).sum() / (2 * v) + (0.01 / var_p).sum()  # a0 = 1: the Gamma log term is 0
        total = total + BETA * kl + GAMMA * prior
    return total


def worker(variant: str, steps: int, std_param: str) -> dict:
    from torchtune.models.llama3 import lora_llama3

    from abmll_tune.models import abmll_llama3
    from abmll_tune.modules import (
        kl_local_global,
        neg_log_prior_global,
        set_trainable_scope,
        variational_lora_layers,
    )

    torch.manual_seed(0)
    if variant == "lora":
        model = lora_llama3(TARGETS, lora_rank=8, lora_alpha=16, **SHAPE)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        kernel = "compiled" if variant.endswith("_compiled") else "eager"
        adapters = {**PAPER_ADAPTERS, "std_param": std_param}
        model = abmll_llama3(TARGETS, **adapters, kl_kernel=kernel, **SHAPE)
        variant = variant.removesuffix("_compiled")
    block = model.layers[0]
    del model.tok_embeddings, model.output
    if variant == "abmll_inner":
        set_trainable_scope(block, "local")
    adapted = list(variational_lora_layers(block).values()) if variant != "lora" else []
    x = torch.randn(2, 256, SHAPE["embed_dim"], requires_grad=True)

    def step() -> int:
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x)
            loss = out.pow(2).mean()
            if variant == "abmll_inner":
                loss = loss + BETA * kl_local_global(block)
            elif variant == "abmll_full":
                loss = loss + BETA * kl_local_global(block) + GAMMA * neg_log_prior_global(block)
            elif variant == "abmll_dense_kl":
                loss = loss + _dense_kl_and_prior(adapted)
        loss.backward()
        for p in block.parameters():
            p.grad = None
        x.grad = None
        # weights and the input are parameters/leaves held anyway, not activations
        held = {p.untyped_storage().data_ptr() for p in block.parameters()} | {
            x.untyped_storage().data_ptr()
        }
        return sum(n for ptr, n in saved.items() if ptr not in held)

    baseline = _current_rss_bytes()
    saved_bytes = step()  # warm-up
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: load-independent-ish
    return {
        "step_seconds": times,
        "cpu_seconds": cpu_times,
        "extra_peak_rss_bytes": _peak_rss_bytes() - baseline,
        "saved_for_backward_bytes": saved_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repetition")
    parser.add_argument("--out", type=Path, default=Path("bench_results/layer.json"))
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument(
        "--std-param", default=PAPER_ADAPTERS["std_param"], help="the std's form (the config's)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.std_param)))
        return

    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for variant in variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps)]
            cmd += ["--std-param", args.std_param]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"rep {rep + 1}/{args.reps} {variant}: {runs[variant][-1]['step_seconds']}",
                file=sys.stderr,
            )

    mib = 2**20
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {
            "median_step_seconds": statistics.median(t for r in results for t in r["step_seconds"]),
            # on a shared machine the fastest step is the least disturbed one, and the CPU
            # time (all threads) moves less with other load than the wall clock does
            "min_step_seconds": min(t for r in results for t in r["step_seconds"]),
            "median_cpu_seconds": statistics.median(t for r in results for t in r["cpu_seconds"]),
            "median_extra_peak_rss_mib": statistics.median(
                r["extra_peak_rss_bytes"] for r in results
            )
            / mib,
            "saved_for_backward_mib": results[0]["saved_for_backward_bytes"] / mib,
        }
    inner, full = summary.get("abmll_inner"), summary.get("abmll_full")
    cycle = (
        {}
        if inner is None or full is None
        else {
            "median_step_seconds": (
                INNER_STEPS * inner["median_step_seconds"] + full["median_step_seconds"]
            )
            / (INNER_STEPS + 1),
            "min_step_seconds": (INNER_STEPS * inner["min_step_seconds"] + full["min_step_seconds"])
            / (INNER_STEPS + 1),
            "median_cpu_seconds": (
                INNER_STEPS * inner["median_cpu_seconds"] + full["median_cpu_seconds"]
            )
            / (INNER_STEPS + 1),
            "median_extra_peak_rss_mib": max(
                inner["median_extra_peak_rss_mib"], full["median_extra_peak_rss_mib"]
            ),
            "saved_for_backward_mib": max(
                inner["saved_for_backward_mib"], full["saved_for_backward_mib"]
            ),
        }
    )
    if cycle:
        summary["abmll_cycle"] = cycle
    lora = summary["lora"]
    for row in summary.values():
        row["time_ratio_vs_lora"] = row["median_step_seconds"] / lora["median_step_seconds"]
        row["min_time_ratio_vs_lora"] = row["min_step_seconds"] / lora["min_step_seconds"]
        row["cpu_time_ratio_vs_lora"] = row["median_cpu_seconds"] / lora["median_cpu_seconds"]
        row["extra_peak_vs_lora_mib"] = (
            row["median_extra_peak_rss_mib"] - lora["median_extra_peak_rss_mib"]
        )
        row["extra_saved_vs_lora_mib"] = (
            row["saved_for_backward_mib"] - lora["saved_for_backward_mib"]
        )
        row["extra_saved_32_layers_gib"] = 32 * row["extra_saved_vs_lora_mib"] / 1024
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": SHAPE,
        "batch": [2, 256],
        "reps": args.reps,
        "steps": args.steps,
        "summary": summary,
        "runs": runs,
    }
    from abmll_tune.io import atomic_write_json

    atomic_write_json(args.out, report)
    if args.results:
        from abmll_tune.report import results_provenance

        summary_report = {
            **results_provenance(
                f"python bench/bench_layer.py --reps {args.reps} --steps {args.steps} "
                f"--variants {args.variants} --std-param {args.std_param}",
                f"x86_64 CPU, {torch.get_num_threads()} threads, float32 "
                "(ratios move with the machine and its load)",
            ),
            "config": "configs/llama3_8b_cls45.yaml (adapters, beta, gamma)",
            "adapters": {**PAPER_ADAPTERS, "std_param": args.std_param},
            "beta": BETA,
            "gamma": GAMMA,
            "shape": SHAPE,
            "batch": [2, 256],
            "summary": summary,
        }
        atomic_write_json(args.results, summary_report)
    print(
        f"\nLlama3-8B-shaped decoder layer, fp32 CPU, batch 2x256, {args.reps} alternating reps (full results: {args.out})"
    )
    header = f"{'variant':<16}{'step s':>8}{'x LoRA':>8}{'min s':>7}{'x LoRA':>8}{'cpu s':>7}{'x LoRA':>8}{'peak+ MiB':>11}{'vs LoRA':>9}{'saved MiB':>11}{'vs LoRA':>9}{'x32 GiB':>9}"
    print(header)
    for variant, r in summary.items():
        print(
            f"{variant:<16}{r['median_step_seconds']:>8.2f}{r['time_ratio_vs_lora']:>8.2f}"
            f"{r['min_step_seconds']:>7.2f}{r['min_time_ratio_vs_lora']:>8.2f}"
            f"{r['median_cpu_seconds']:>7.2f}{r['cpu_time_ratio_vs_lora']:>8.2f}"
            f"{r['median_extra_peak_rss_mib']:>11.0f}{r['extra_peak_vs_lora_mib']:>+9.0f}"
            f"{r['saved_for_backward_mib']:>11.0f}{r['extra_saved_vs_lora_mib']:>+9.1f}"
            f"{r['extra_saved_32_layers_gib']:>+9.2f}"
        )
    print("targets: inner <= 1.05x and full <= 1.15x LoRA; 32 x extra per-layer memory < 0.7 GB")


if __name__ == "__main__":
    main()
