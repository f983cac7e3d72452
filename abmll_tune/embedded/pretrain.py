"""Brief language-model pre-training of the tiny backbone on the embedded suite's language.

A randomly initialised backbone cannot use a few support examples: every method stays
at chance. the embedded suite's design pre-trains the tiny Llama3 as a plain LM
on two kinds of text, half each:

* concept sentences: shuffled words of one concept (with a little noise), so that the
  model knows which words belong together;
* task-format prompts of *fresh* tasks (never the suite's own) with a uniformly random
  answer letter, so that it knows the format but no concept-to-option mapping.

What few-shot adaptation must then learn, the mapping of a task, is not in the backbone.
Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F
from torchtune.modules import TransformerDecoder

from abmll_tune.data.prompt import LETTERS, render_prompt
from abmll_tune.embedded.suite import Lexicon, make_lexicon, make_task


def _concept_sentence(lexicon: Lexicon, rng: random.Random) -> str:
    concept = rng.choice(lexicon.concepts)
    words = rng.sample(concept, rng.randint(4, 8)) + rng.sample(lexicon.noise, rng.randint(0, 2))
    rng.shuffle(words)
    return " ".join(words)


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """n training texts, half concept sentences, half prompts with random answers."""
    rng = random.Random(f"pretrain:{seed}")
    lexicon = make_lexicon()
    texts = []
    task_examples: list = []
    for i in range(n):
        if i % 2 == 0:
            texts.append(_concept_sentence(lexicon, rng))
            continue
        if not task_examples:  # a fresh task every 20 prompts; names never used by the suite
            task_examples = make_task(f"pretrain-{seed}-{i}", lexicon, n_examples=20)
        example = task_examples.pop()
        texts.append(render_prompt(example) + " " + LETTERS[rng.randrange(len(example.options))])
    return texts


def pretrain(
    model: TransformerDecoder,
    tokenizer,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Train all of ``model``'s weights as a causal LM; returns the loss per step."""
    torch.manual_seed(seed)
    texts = pretraining_texts(steps * batch_size, seed)
    pad = tokenizer.pad_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        batch = [
            tokenizer.encode(t, add_bos=True, add_eos=True)
            for t in texts[step * batch_size : (step + 1) * batch_size]
        ]
        width = max(len(b) for b in batch)
        tokens = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        labels = torch.tensor([b[1:] + [-100] * (width - len(b) + 1) for b in batch])
        logits = model(tokens)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(
                f"pretraining step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f} ({time.perf_counter() - start:.0f} s)"
            )
    model.eval()
    return losses
