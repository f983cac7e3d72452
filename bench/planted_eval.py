"""Evaluate one trained run (or the Pretrained backbone, or the truth model) on a planted
family in one process, for every protocol of the planted benchmark.

    python bench/planted_eval.py --checkpoint RUN/checkpoints/best --family FAMILY \\
        --data K1_DIR,K5_DIR,K16_DIR --tokenizer-dir TOK --out RESULT.json \\
        [--select-zero-step RUN/checkpoints]

Loading the model once and looping over protocols and checkpoints here costs seconds where
one ``tune run recipes/evaluate_few_shot`` per protocol and checkpoint costs its start-up
each time; the adaptation and scoring are the evaluation recipe's own
(:func:`abmll_tune.evaluation.evaluate_tasks`), with the settings of ``PROTOCOLS``.

``--select-zero-step``: the zero-step test is scored with the epoch checkpoint
(``epoch_N``) whose zero-step validation NLL is lowest, the way the test scores it; the
adapted tests use ``--checkpoint`` (the recipe's ``best``, selected by a validation that
adapts as the K = 16 test does). Writes per protocol the test records (id -> option
probabilities, support seed) and the selection's validation rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from abmll_tune.benchmarking import PLANTED_ADAPTATION as ADAPTATION  # each an option here
from abmll_tune.benchmarking import PLANTED_PROTOCOLS as PROTOCOLS

STEPS: dict[str, int] = {}  # protocol -> adaptation steps, replacing PROTOCOLS' (support repeated)
SAMPLES = 10  # ABMLL: posterior predictive of 10 samples


def _settings(protocol: str, part: str, seeds, samples: int, adaptation: dict):
    from abmll_tune.evaluation import EvalSettings

    k, steps, batch = PROTOCOLS[protocol]
    steps = adaptation.get("steps", {}).get(protocol, steps)
    return EvalSettings(
        adapt_repeat_support=steps * batch > k,
        part=part,
        seeds=tuple(seeds),
        adapt_steps=steps,
        adapt_batch_size=batch,
        adapt_lr_mean=adaptation["lr_mean"],
        adapt_lr_std=adaptation["lr_std"],
        adapt_optimizer=adaptation["optimizer"],
        adapt_beta=adaptation["beta"],
        eval_batch_size=64,
        samples=(samples,),
    )


def _beta(text: str):
    return None if text in ("null", "none") else text if text == "per_example" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a training checkpoint; none: Pretrained")
    parser.add_argument("--family", type=Path, required=True)
    parser.add_argument("--data", required=True, help="built K=1,5,16 directories, comma-separated")
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--seeds", default="100", help="support seeds, comma-separated")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument(
        "--zero-step-samples", type=int, help="posterior samples before adaptation (--samples)"
    )
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--select-zero-step", type=Path, help="a run's checkpoints/ directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--adapt-optimizer",
        default=ADAPTATION["optimizer"],
        choices=("adamw", "sgd", "prior_natural"),
    )
    parser.add_argument(
        "--adapt-beta", type=_beta, default=ADAPTATION["beta"],
        help="null (the method's), a number, or per_example",
    )  # fmt: skip
    parser.add_argument("--adapt-lr-mean", type=float, default=ADAPTATION["lr_mean"])
    parser.add_argument("--adapt-lr-std", type=float, default=ADAPTATION["lr_std"])
    parser.add_argument(
        "--adapt-steps", default=",".join(f"{p}={n}" for p, n in STEPS.items()),
        help="steps per protocol replacing PROTOCOLS', e.g. K1=5 (the support repeated)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    adaptation = {
        "optimizer": args.adapt_optimizer,
        "beta": args.adapt_beta,
        "lr_mean": args.adapt_lr_mean,
        "lr_std": args.adapt_lr_std,
        "steps": {p: int(n) for p, n in (x.split("=") for x in args.adapt_steps.split(",") if x)},
    }

    from omegaconf import OmegaConf

    from abmll_tune.checkpointing import load_training_checkpoint, read_checkpoint_meta
    from abmll_tune.data.loader import TaskData
    from abmll_tune.embedded.suite import llama3_tokenizer
    from abmll_tune.evaluation import evaluate_tasks
    from abmll_tune.io import atomic_write_json
    from abmll_tune.methods import Pretrained, method_from_saved_config
    from abmll_tune.metrics import all_metrics, pad_probs
    from abmll_tune.models.loading import build_model

    torch.set_num_threads(1)
    tokenizer = llama3_tokenizer(args.tokenizer_dir)
    data = {
        k: TaskData(Path(d), tokenizer, max_seq_len=64)
        for k, d in zip((1, 5, 16), args.data.split(","), strict=True)
    }
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(args.family / "backbone"),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "LLAMA3",
        "output_dir": str(args.out.parent / "scratch"),
    }
    if args.checkpoint:
        config = read_checkpoint_meta(args.checkpoint)["config"]
        method = method_from_saved_config(config)
        model_cfg = config["model"]
    else:
        method = Pretrained()
        eval_config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu_eval.yaml"
        model_cfg = OmegaConf.to_container(OmegaConf.load(eval_config).model)
    model, _ = build_model(
        OmegaConf.create(model_cfg),
        OmegaConf.create(checkpointer),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )

    def load(directory):
        if directory is not None:
            load_training_checkpoint(directory, model, method.name)

    def records(protocol, part, seeds):
        k = PROTOCOLS[protocol][0]
        split = data[k].split
        tasks = split.test_tasks if part == "test" else split.selection_tasks
        settings = _settings(protocol, part, seeds, samples(protocol), adaptation)
        return evaluate_tasks(model, data[k], tasks, settings, method=method)

    def samples(protocol):
        return (
            args.zero_step_samples if protocol == "K0" and args.zero_step_samples else args.samples
        )

    def default_rows(recs, protocol):
        variant = f"s{samples(protocol)}" if method.variational else "mean"  # ABMLL: predictive
        return [r for r in recs if r["variant"] == variant]

    seeds = [int(s) for s in args.seeds.split(",")]
    out = {
        "checkpoint": args.checkpoint,
        "method": method.name,
        "adaptation": adaptation,
        "protocols": {},
        "selection": {},
    }
    protocols = args.protocols.split(",")
    if "K0" in protocols:
        chosen = args.checkpoint
        if args.select_zero_step is not None:
            candidates = sorted(
                args.select_zero_step.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1])
            )
            rows = []
            for candidate in candidates:
                load(candidate)
                recs = default_rows(records("K0", "validation", seeds[:1]), "K0")
                metrics = all_metrics(
                    pad_probs([r["probs"] for r in recs]), np.array([r["gold"] for r in recs])
                )
                rows.append({"checkpoint": candidate.name, **metrics})
            best = min(rows, key=lambda r: r["nll"])
            chosen = str(args.select_zero_step / best["checkpoint"])
            out["selection"]["K0"] = {"rows": rows, "chosen": best["checkpoint"]}
        load(chosen)
        out["protocols"]["K0"] = default_rows(records("K0", "test", seeds), "K0")
    for protocol in protocols:
        if protocol == "K0":
            continue
        load(args.checkpoint)
        out["protocols"][protocol] = default_rows(records(protocol, "test", seeds), protocol)
    for recs in out["protocols"].values():
        for r in recs:
            r.pop("prune", None)
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    sys.exit(main())
