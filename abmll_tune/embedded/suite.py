"""The embedded task suite: small synthetic multiple-choice tasks for CPU runs and tests.

Generated deterministically by the project (no licensed text; the design follows a
prototype measured to make few-shot adaptation visible on a CPU). Pseudo-words form
8 *concepts* of 10 words, plus 40 noise words and 60 *symbol* words. An input is 5-8 shuffled words, mostly from one concept, with 1-3
noise words and, with probability 0.3, one distractor word of another concept. A task
picks 2-4 concepts, shows its options as random per-task symbol words and assigns
concepts to options at random, so the mapping can only be learnt from the task's own
examples: what transfers across tasks is *how to adapt fast*, which is what
meta-learning should learn. 40 meta-training, 16 validation and 30 test tasks of 200
examples each, written in MetaICL's layout, plus a byte-level BPE tokenizer trained on
the suite (every word one token) in Llama3 (tiktoken) and Qwen2 (vocab/merges) formats.

    python -m abmll_tune.embedded.suite --out data/embedded_src
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path

from abmll_tune.data.prompt import LETTERS, render_demonstrations, render_prompt
from abmll_tune.data.records import MCExample, write_jsonl_examples
from abmll_tune.data.sources import METAICL_SEEDS, kshot_indices, metaicl_file
from abmll_tune.io import atomic_directory

N_CONCEPTS, WORDS_PER_CONCEPT, N_NOISE, N_SYMBOLS = 8, 10, 40, 60
N_TRAIN_TASKS, N_VAL_TASKS, N_TEST_TASKS = 40, 16, 30
EXAMPLES_PER_TASK = 200
EVAL_POOL = 100  # of an evaluation task's 200 examples: 100 support pool, 100 held out
SUPPORT_K = 16
TRAIN_K, TRAIN_SEED = 16384, 100  # MetaICL's names for meta-training files
# The tokenizer: BPE ids 0..BPE_VOCAB-1, special tokens after; the backbone's vocab is MODEL_VOCAB.
BPE_VOCAB = 752
MODEL_VOCAB = 768
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def task_names() -> dict[str, list[str]]:
    return {
        "train": [f"emb-train-{i:02d}" for i in range(N_TRAIN_TASKS)],
        "validation": [f"emb-val-{i:02d}" for i in range(N_VAL_TASKS)],
        "test": [f"emb-test-{i:02d}" for i in range(N_TEST_TASKS)],
    }


@dataclass(frozen=True)
class Lexicon:
    concepts: tuple[tuple[str, ...], ...]
    noise: tuple[str, ...]
    symbols: tuple[str, ...]

    @property
    def words(self) -> list[str]:
        return [w for c in self.concepts for w in c] + list(self.noise) + list(self.symbols)


def make_lexicon(seed: int = 0) -> Lexicon:
    """Unique lowercase pseudo-words from consonant-vowel syllables."""
    rng = random.Random(f"lexicon:{seed}")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    reserved = {
        "question",
        "choices",
        "answer",
        "return",
        "label",
        "correct",
        "below",
        "the",
        "for",
        "of",
    }
    words: list[str] = []
    seen = set(reserved)
    total = N_CONCEPTS * WORDS_PER_CONCEPT + N_NOISE + N_SYMBOLS
    while len(words) < total:
        word = "".join(
            rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3))
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    n_c = N_CONCEPTS * WORDS_PER_CONCEPT
    concepts = tuple(
        tuple(words[i : i + WORDS_PER_CONCEPT]) for i in range(0, n_c, WORDS_PER_CONCEPT)
    )
    return Lexicon(concepts, tuple(words[n_c : n_c + N_NOISE]), tuple(words[n_c + N_NOISE :]))


def make_task(name: str, lexicon: Lexicon, n_examples: int = EXAMPLES_PER_TASK) -> list[MCExample]:
    """One task: its concepts, option symbols and concept-to-option map come from its name."""
    rng = random.Random(f"task:{name}")
    n_options = rng.randint(2, 4)
    concepts = rng.sample(range(N_CONCEPTS), n_options)
    options = tuple(rng.sample(lexicon.symbols, n_options))
    answer_of = dict(zip(concepts, rng.sample(range(n_options), n_options), strict=True))
    examples = []
    for i in range(n_examples):
        concept = rng.choice(concepts)
        n_words, n_noise = rng.randint(5, 8), rng.randint(1, 3)
        distractor = rng.random() < 0.3
        words = rng.sample(lexicon.concepts[concept], n_words - n_noise - int(distractor))
        words += rng.sample(lexicon.noise, n_noise)
        if distractor:
            other = rng.choice([c for c in range(N_CONCEPTS) if c != concept])
            words.append(rng.choice(lexicon.concepts[other]))
        rng.shuffle(words)
        examples.append(
            MCExample(
                task=name,
                input=" ".join(words),
                output=options[answer_of[concept]],
                options=options,
                id=f"{name}:{i}",
            )
        )
    return examples


def generate_suite(out: str | Path, seed: int = 0) -> dict:
    """Write the suite in MetaICL's layout plus ``tokenizer/``; returns a summary."""
    lexicon = make_lexicon(seed)
    names = task_names()
    tasks = {name: make_task(name, lexicon) for part in names.values() for name in part}

    def write(tmp: Path) -> None:
        for name in names["train"]:
            write_jsonl_examples(
                tmp / metaicl_file(name, TRAIN_K, TRAIN_SEED, "train"), tasks[name]
            )
        for name in names["validation"] + names["test"]:
            pool, heldout = tasks[name][:EVAL_POOL], tasks[name][EVAL_POOL:]
            for s in METAICL_SEEDS:
                order = kshot_indices(len(pool), 2 * SUPPORT_K, s)
                write_jsonl_examples(
                    tmp / metaicl_file(name, SUPPORT_K, s, "train"),
                    [pool[i] for i in order[:SUPPORT_K]],
                )
                write_jsonl_examples(
                    tmp / metaicl_file(name, SUPPORT_K, s, "dev"),
                    [pool[i] for i in order[SUPPORT_K:]],
                )
                write_jsonl_examples(tmp / metaicl_file(name, SUPPORT_K, s, "test"), heldout)
        write_tokenizer(tmp / "tokenizer", tasks, lexicon)

    with atomic_directory(out) as tmp:
        write(tmp)
    return {
        "tasks": {part: len(v) for part, v in names.items()},
        "examples_per_task": EXAMPLES_PER_TASK,
    }


# ------------------------------------------------------------------------------ tokenizer


def _corpus(tasks: dict[str, list[MCExample]], lexicon: Lexicon) -> list[str]:
    """Prompts with answers and demonstrations, and every word, for BPE training."""
    texts = []
    for examples in tasks.values():
        for e in examples[:20]:
            texts.append(render_demonstrations([e]) + render_prompt(e) + f" {LETTERS[e.gold]}")
    texts.append(" " + " ".join(lexicon.words))
    return texts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by byte-level BPE files)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tokenizer(directory: Path, tasks: dict[str, list[MCExample]], lexicon: Lexicon) -> None:
    """Train a byte-level BPE on the suite and write it for torchtune's Llama3 and Qwen2.

    Files: ``tokenizer.model`` + ``special_tokens.json`` (``llama3_tokenizer``),
    ``vocab.json`` + ``merges.txt`` + ``qwen2_special_tokens.json`` (``qwen2_tokenizer``).
    HF ``tokenizers`` training is deterministic for a fixed corpus.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(tasks, lexicon), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    missing = [w for w in lexicon.words if "Ġ" + w not in vocab]
    if missing:
        raise RuntimeError(
            f"BPE_VOCAB={BPE_VOCAB} is too small: words {missing[:5]} are not single tokens"
        )
    if len(vocab) > BPE_VOCAB:
        raise RuntimeError(f"BPE vocabulary has {len(vocab)} tokens, more than {BPE_VOCAB}")
    directory.mkdir(parents=True, exist_ok=True)
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    # tiktoken: base64(token bytes) and rank (= id) per line
    lines = [
        f"{base64.b64encode(bytes(byte_of[ch] for ch in token)).decode()} {idx}"
        for token, idx in by_id
    ]
    (directory / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "added_tokens": [{"id": BPE_VOCAB + i, "content": t} for i, t in enumerate(LLAMA3_SPECIALS)]
    }
    (directory / "special_tokens.json").write_text(
        json.dumps(special, indent=1) + "\n", encoding="utf-8"
    )
    (directory / "vocab.json").write_text(
        json.dumps(dict(by_id), ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    qwen_special = {
        "added_tokens": [{"id": BPE_VOCAB + i, "content": t} for i, t in enumerate(QWEN2_SPECIALS)]
    }
    (directory / "qwen2_special_tokens.json").write_text(
        json.dumps(qwen_special, indent=1) + "\n", encoding="utf-8"
    )


def llama3_tokenizer(directory: str | Path, max_seq_len: int | None = None):
    """torchtune's Llama3 tokenizer on the suite's tokenizer files."""
    from torchtune.models.llama3 import llama3_tokenizer as build

    directory = Path(directory)
    return build(
        str(directory / "tokenizer.model"), str(directory / "special_tokens.json"), max_seq_len
    )


def qwen2_tokenizer(directory: str | Path, max_seq_len: int | None = None):
    """torchtune's Qwen2 tokenizer on the suite's tokenizer files."""
    from torchtune.models.qwen2 import qwen2_tokenizer as build

    directory = Path(directory)
    return build(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        str(directory / "qwen2_special_tokens.json"),
        max_seq_len,
    )


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.embedded.suite",
        description="generate the embedded CPU suite (MetaICL layout + tokenizer)",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = generate_suite(args.out, args.seed)
    print(f"wrote the embedded suite to {args.out}: {summary['tasks']} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
