"""What applying the output layer at the answer positions only saves, on SmolLM2 and the tiny model.

    python bench/bench_answer_logits.py --out bench_results/answer_logits.json   (or: make bench)

Training and scoring need the logits of one position per question (the answer letter),
but torchtune's decoder projects every position onto the vocabulary (49152-way for
SmolLM2-135M). Two paths are timed on the same model and batch, alternating, float32
on the CPU, ABMLL adapters (local reparameterization) on q, v and output projections:

* ``full``:   ``model(tokens)`` for all positions, then the masked cross-entropy (the
              computation before ``abmll_tune.objectives.answer_logits``);
* ``answer``: :func:`abmll_tune.objectives.answer_nll` / ``answer_logits``.

Measured: an inner training step (forward + backward of the answer loss, batch 2) and a
scoring forward (no grad, batch 8), each at the sequence length given (default 128, the
real cls45 p90 is 109 tokens), plus the size of the logits tensor. Weights are random:
the cost does not depend on them. Ratios are within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll_tune.embedded.backbone import TINY_EMBEDDED
from abmll_tune.io import atomic_write_json
from abmll_tune.models import abmll_llama3
from abmll_tune.models.smollm2 import abmll_smollm2_135m
from abmll_tune.modules import adapter_mode
from abmll_tune.objectives import answer_logits, answer_nll, shifted_labels

MODELS = {
    "smollm2_135m": lambda: abmll_smollm2_135m(std_b_init_std=1e-3),
    "tiny": lambda: abmll_llama3(**TINY_EMBEDDED, std_b_init_std=1e-3),
}


def make_batch(batch_size: int, seq_len: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.full_like(tokens, CROSS_ENTROPY_IGNORE_IDX)
    labels[:, -1] = tokens[:, -1]  # the answer letter is the last token
    return {
        "tokens": tokens,
        "labels": labels,
        "answer_positions": torch.full((batch_size,), seq_len - 2),
    }


def full_nll(model, batch):
    logits = model(batch["tokens"])
    labels = shifted_labels(batch["labels"])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
    )


def full_scores(model, batch):
    logits = model(batch["tokens"])
    return logits[torch.arange(logits.shape[0]), batch["answer_positions"]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, seq_len: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]()
    vocab = model.tok_embeddings.num_embeddings
    train, score = make_batch(2, seq_len, vocab), make_batch(8, seq_len, vocab)

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(model, train).backward()

        return run

    def scoring(score_fn):
        def run():
            with torch.no_grad():
                score_fn(model, score)

        return run

    paths = {
        ("train", "full"): step(full_nll),
        ("train", "answer"): step(answer_nll),
        ("score", "full"): scoring(full_scores),
        ("score", "answer"): scoring(answer_logits),
    }
    times: dict = {key: [] for key in paths}
    with adapter_mode(model, "local_sample"):
        for fn in paths.values():  # warm-up
            fn()
        for _ in range(reps):
            for key, fn in paths.items():  # alternating: drift hits both paths alike
                times[key].append(timed(fn))
    out = {"seq_len": seq_len, "vocab": vocab, "reps": reps}
    for kind, batch in (("train", 2), ("score", 8)):
        full = statistics.median(times[(kind, "full")])
        answer = statistics.median(times[(kind, "answer")])
        out[kind] = {
            "batch": batch,
            "full_s": full,
            "answer_s": answer,
            "speedup": full / answer,
            "logits_mib_full": batch * seq_len * vocab * 4 / 2**20,
            "logits_mib_answer": batch * vocab * 4 / 2**20,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/answer_logits.json")
    parser.add_argument("--models", default="smollm2_135m,tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    args = parser.parse_args()
    results = {m: bench_model(m, args.seq_len, args.reps) for m in args.models.split(",")}
    print(
        "| model | step | full logits (s) | answer logits (s) | speed-up | logits MiB full -> answer |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for kind in ("train", "score"):
            x = r[kind]
            print(
                f"| {name} | {kind} (batch {x['batch']} x {r['seq_len']}) | {x['full_s']:.4f} | "
                f"{x['answer_s']:.4f} | {x['speedup']:.2f}x | "
                f"{x['logits_mib_full']:.1f} -> {x['logits_mib_answer']:.2f} |"
            )
    atomic_write_json(Path(args.out), results)
    print(f"wrote {args.out}")
    if args.results:
        from abmll_tune.report import results_provenance

        names = {"smollm2_135m": "SmolLM2-135M", "tiny": "tiny (embedded suite)"}
        rows = []
        for name, r in results.items():
            for kind, label in (("train", "inner step"), ("score", "scoring")):
                x = r[kind]
                rows.append([
                    names.get(name, name), f"{label}, batch {x['batch']} x {r['seq_len']} tokens",
                    f"{x['full_s']:.4f} s", f"{x['answer_s']:.4f} s", f"{x['speedup']:.2f}x",
                    f"{x['logits_mib_full']:.1f} MiB -> {x['logits_mib_answer']:.2f} MiB",
                ])  # fmt: skip
        command = (
            f"python bench/bench_answer_logits.py --models {args.models} "
            f"--seq-len {args.seq_len} --reps {args.reps}"
        )
        header = ["model", "step", "logits at every position", "at the answer positions only"]
        header += ["speed-up", "logits tensor"]
        summary = {
            **results_provenance(command),
            "models": results,
            "tables": [{"title": "", "header": header, "rows": rows}],
        }
        atomic_write_json(args.results, summary)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
