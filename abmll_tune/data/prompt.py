"""The paper's prompt (arXiv 2508.14285, appendix A.4), tokenization and answer letters.

    Return the label of the correct answer for the question below.

    Question: {input}
    Choices:
    A) {option 0}
    B) {option 1}
    Answer:

The target is one answer letter (" A", " B", ...), a single token; the prompt is
masked out of the loss. Options are scored by the logits of the letter tokens at the
last prompt position. The MetaICL variant puts k solved examples of the same task
before the prompt; when the whole is longer than ``max_seq_len`` the demonstrations
are cut from the left, never the question or the answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll_tune.data.records import MCExample

INSTRUCTION = "Return the label of the correct answer for the question below."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def render_question(example: MCExample) -> str:
    """``Question: ...`` through ``Answer:`` (no instruction, no answer)."""
    if len(example.options) > len(LETTERS):
        raise ValueError(
            f"at most {len(LETTERS)} options can be lettered, got {len(example.options)}"
        )
    choices = "\n".join(f"{LETTERS[i]}) {option}" for i, option in enumerate(example.options))
    return f"Question: {example.input}\nChoices:\n{choices}\nAnswer:"


def render_prompt(example: MCExample) -> str:
    """The paper's prompt for one question, ending in ``Answer:``."""
    return f"{INSTRUCTION}\n\n{render_question(example)}"


def render_demonstrations(demos: Sequence[MCExample]) -> str:
    """Solved examples for the MetaICL variant, each ending in a blank line."""
    return "".join(f"{render_question(d)} {LETTERS[d.gold]}\n\n" for d in demos)


def answer_letter_ids(tokenizer, n_letters: int = 4) -> list[int]:
    """Token id of " A", " B", ... after ``Answer:`` for this tokenizer.

    Found by encoding ``Answer:`` with and without the letter, so it holds for any
    torchtune tokenizer (tiktoken, GPT-2 BPE, SentencePiece). Raises if a letter is not
    exactly one token there: option scoring needs single-token answers.
    """
    base = tokenizer.encode("Answer:", add_bos=False, add_eos=False)
    ids = []
    for letter in LETTERS[:n_letters]:
        full = tokenizer.encode(f"Answer: {letter}", add_bos=False, add_eos=False)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(
                f"the tokenizer does not encode ' {letter}' after 'Answer:' as one token "
                f"({base} -> {full}); option scoring needs single-token answer letters"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer letters map to repeated token ids {ids}")
    return ids


@dataclass(frozen=True)
class TokenizedExample:
    """Model input for one question: ``labels`` is ``tokens`` with all but the answer masked."""

    tokens: list[int]
    labels: list[int]
    option_ids: list[int]  # token id of each option's letter
    gold: int
    task: str
    id: str
    n_demos: int = 0

    @property
    def answer_position(self) -> int:
        """Index of the logits that predict the answer letter (the last prompt token)."""
        return len(self.tokens) - 2


class PromptTokenizer:
    """Renders and tokenizes questions with a torchtune tokenizer.

    Args:
        tokenizer: any torchtune ``ModelTokenizer`` (``encode(text, add_bos, add_eos)``).
        max_seq_len: longest sequence allowed, answer included.
        max_options: the most options a question may have (letters A..).
    """

    def __init__(self, tokenizer, max_seq_len: int, max_options: int = 4):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.letter_ids = answer_letter_ids(tokenizer, max_options)
        bos_id = getattr(tokenizer, "bos_id", None)  # Qwen2 has none
        self.bos = [bos_id] if bos_id is not None else []
        self.pad_id = getattr(tokenizer, "pad_id", None) or 0

    def __call__(
        self, example: MCExample, demos: Sequence[MCExample] = ()
    ) -> TokenizedExample | None:
        """Tokens and labels for ``example``, or None if even without demonstrations
        it is longer than ``max_seq_len`` (the caller counts those; nothing is cut)."""
        prompt = self.tokenizer.encode(render_prompt(example), add_bos=False, add_eos=False)
        answer = self.letter_ids[example.gold]
        budget = self.max_seq_len - len(self.bos) - len(prompt) - 1
        if budget < 0:
            return None
        context: list[int] = []
        if demos:
            context = self.tokenizer.encode(
                render_demonstrations(demos), add_bos=False, add_eos=False
            )
            context = context[len(context) - budget :] if len(context) > budget else context
        tokens = self.bos + context + prompt + [answer]
        labels = [CROSS_ENTROPY_IGNORE_IDX] * (len(tokens) - 1) + [answer]
        return TokenizedExample(
            tokens=tokens,
            labels=labels,
            option_ids=self.letter_ids[: len(example.options)],
            gold=example.gold,
            task=example.task,
            id=example.id,
            n_demos=len(demos),
        )


def sample_demonstrations(
    example: MCExample, pool: Sequence[MCExample], k: int, seed: int
) -> list[MCExample]:
    """k solved examples of the same task from ``pool``, never ``example`` itself.

    Deterministic for (seed, example id): the same question always gets the same
    demonstrations, whatever order questions are processed in.
    """
    if k <= 0:
        return []
    candidates = [d for d in pool if d.id != example.id]
    rng = random.Random(f"{seed}:{example.task}:{example.id}")
    return rng.sample(candidates, min(k, len(candidates)))
