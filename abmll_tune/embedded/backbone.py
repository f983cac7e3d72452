"""Tiny backbones the project creates itself (no download): tests and the CPU demo.

``python -m abmll_tune.embedded.backbone --out DIR`` writes a randomly initialised tiny
Llama3 (or Qwen2) as an HF-format checkpoint that torchtune's
``FullModelHFCheckpointer`` loads like a real model.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerDecoder

from abmll_tune.models.hf_checkpoint import write_hf_checkpoint

# The embedded-suite backbone of the embedded suite's design (docs/data.md) (about 156k parameters).
TINY_LLAMA3 = dict(
    vocab_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=256,
    max_seq_len=64,
)
# Same size with Qwen2's biases on q/k/v.
TINY_QWEN2 = dict(TINY_LLAMA3)
# The backbone of the embedded suite: its tokenizer's vocabulary (768, see
# abmll_tune.embedded.suite.MODEL_VOCAB) and room for MetaICL prompts.
TINY_EMBEDDED = dict(TINY_LLAMA3, vocab_size=768, max_seq_len=256)

FAMILIES = {"llama3": ("LLAMA3", llama3, TINY_LLAMA3), "qwen2": ("QWEN2", qwen2, TINY_QWEN2)}


def build_tiny_base(family: str = "llama3", seed: int = 0, **overrides) -> TransformerDecoder:
    """A randomly initialised tiny base model of ``family`` (float32, CPU)."""
    _, builder, arch = FAMILIES[family]
    torch.manual_seed(seed)
    model = builder(**{**arch, **overrides})
    with torch.no_grad():
        # torchtune initialises embeddings with N(0, 1); scale to the 1/sqrt(d) of trained
        # models so initial losses are near log(vocab) instead of ~60.
        model.tok_embeddings.weight.mul_(1.0 / math.sqrt(model.tok_embeddings.embedding_dim))
    return model


def write_tiny_checkpoint(
    out: str | Path,
    family: str = "llama3",
    seed: int = 0,
    overwrite: bool = False,
    pretrain_steps: int = 0,
    tokenizer=None,
    **overrides,
) -> Path:
    """Build a tiny base model (pre-trained for ``pretrain_steps`` on the embedded suite's
    language with ``tokenizer``, see :mod:`abmll_tune.embedded.pretrain`) and write it as an
    HF checkpoint directory; returns it."""
    model_type, _, arch = FAMILIES[family]
    arch = {**arch, **overrides}
    model = build_tiny_base(family, seed, **overrides)
    if pretrain_steps:
        from abmll_tune.embedded.pretrain import pretrain

        if tokenizer is None:
            raise ValueError("pre-training needs the embedded suite's tokenizer")
        pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
    return write_hf_checkpoint(
        model.state_dict(),
        out,
        model_type=model_type,
        vocab_size=arch["vocab_size"],
        num_layers=arch["num_layers"],
        num_heads=arch["num_heads"],
        num_kv_heads=arch["num_kv_heads"],
        embed_dim=arch["embed_dim"],
        intermediate_dim=arch["intermediate_dim"],
        max_seq_len=arch["max_seq_len"],
        rope_base=500_000.0 if family == "llama3" else 1_000_000.0,
        overwrite=overwrite,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary (default 256; 768 for the embedded suite)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="RoPE table length (default 64)"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="LM pre-training steps on the embedded suite (0: random)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        default=None,
        help="the embedded suite's tokenizer/ (for --pretrain-steps)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if args.max_seq_len:
        overrides["max_seq_len"] = args.max_seq_len
    tokenizer = None
    if args.pretrain_steps:
        if not args.tokenizer_dir:
            parser.error("--pretrain-steps needs --tokenizer-dir (the embedded suite's tokenizer/)")
        from abmll_tune.embedded.suite import llama3_tokenizer

        tokenizer = llama3_tokenizer(args.tokenizer_dir)
    if Path(args.out).exists() and not args.overwrite:
        parser.exit(2, f"error: {args.out} exists; rerun with --overwrite to replace it\n")
    try:
        path = write_tiny_checkpoint(
            args.out,
            args.family,
            args.seed,
            args.overwrite,
            args.pretrain_steps,
            tokenizer,
            **overrides,
        )
    except FileExistsError:
        parser.exit(2, f"error: {args.out} exists; rerun with --overwrite to replace it\n")
    print(f"wrote a tiny {args.family} HF checkpoint to {path}")


if __name__ == "__main__":
    main()
