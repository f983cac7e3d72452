"""Prompt rendering (exact strings), label masking and answer-letter ids per tokenizer family,
MetaICL demonstrations and their truncation."""

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll_tune.data.prompt import (
    PromptTokenizer,
    answer_letter_ids,
    render_demonstrations,
    render_prompt,
    sample_demonstrations,
)
from abmll_tune.data.records import MCExample

FAMILIES = ["llama3", "qwen2", "sentencepiece"]

Q = MCExample("emb-x", "poba nikeki nulo", "gogu", ("pefatu", "gogu", "tiko"), id="emb-x:0")


def test_prompt_is_the_papers_template_exactly():
    assert render_prompt(Q) == (
        "Return the label of the correct answer for the question below.\n"
        "\n"
        "Question: poba nikeki nulo\n"
        "Choices:\n"
        "A) pefatu\n"
        "B) gogu\n"
        "C) tiko\n"
        "Answer:"
    )


def test_demonstrations_render_solved_questions():
    demo = MCExample("emb-x", "vebe sumape", "pefatu", ("pefatu", "gogu"), id="emb-x:1")
    assert render_demonstrations([demo]) == (
        "Question: vebe sumape\nChoices:\nA) pefatu\nB) gogu\nAnswer: A\n\n"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_letters_are_single_distinct_tokens(tokenizers, family):
    tok = tokenizers[family]
    ids = answer_letter_ids(tok, 4)
    assert len(set(ids)) == 4
    for letter, token in zip("ABCD", ids, strict=True):
        base = tok.encode("Answer:", add_bos=False, add_eos=False)
        assert tok.encode(f"Answer: {letter}", add_bos=False, add_eos=False) == base + [token]


@pytest.mark.parametrize("family", FAMILIES)
def test_label_is_the_answer_letter_only_and_prompt_is_masked(tokenizers, family):
    tok = tokenizers[family]
    prompt_tokenizer = PromptTokenizer(tok, max_seq_len=128)
    item = prompt_tokenizer(Q)
    letter = answer_letter_ids(tok, 4)[1]  # gold is "gogu" = B
    assert item.tokens[-1] == letter and item.gold == 1
    assert item.labels[:-1] == [CROSS_ENTROPY_IGNORE_IDX] * (len(item.tokens) - 1)
    assert item.labels[-1] == letter
    assert item.option_ids == answer_letter_ids(tok, 3)
    prompt_ids = tok.encode(render_prompt(Q), add_bos=False, add_eos=False)
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    assert item.tokens == bos + prompt_ids + [letter]
    assert item.answer_position == len(item.tokens) - 2
    assert tok.decode(item.tokens).endswith("Answer: B")


def test_demonstrations_are_seeded_same_task_and_never_the_question():
    pool = [MCExample("emb-x", f"w{i}", "a", ("a", "b"), id=f"emb-x:{i}") for i in range(10)]
    first = sample_demonstrations(pool[3], pool, 4, seed=7)
    assert len(first) == 4 and pool[3] not in first
    assert sample_demonstrations(pool[3], pool, 4, seed=7) == first
    assert sample_demonstrations(pool[3], pool, 4, seed=8) != first
    assert len(sample_demonstrations(pool[3], pool[:3], 16, seed=7)) == 3  # fewer available
    assert sample_demonstrations(pool[3], pool, 0, seed=7) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_demonstrations_are_cut_from_the_left_never_the_question(tokenizers, family):
    tok = tokenizers[family]
    demos = [
        MCExample("emb-x", "vebe sumape " * 3, "gogu", ("pefatu", "gogu"), id=f"emb-x:{i}")
        for i in range(5)
    ]
    alone = PromptTokenizer(tok, max_seq_len=512)(Q)
    full = PromptTokenizer(tok, max_seq_len=512)(Q, demos)
    assert len(full.tokens) > len(alone.tokens) + 40 and full.n_demos == 5
    limit = len(alone.tokens) + 10
    cut = PromptTokenizer(tok, max_seq_len=limit)(Q, demos)
    assert len(cut.tokens) == limit
    n_bos = 1 if getattr(tok, "bos_id", None) is not None else 0
    question_and_answer = alone.tokens[n_bos:]
    assert cut.tokens[:n_bos] == alone.tokens[:n_bos]
    assert cut.tokens[-len(question_and_answer) :] == question_and_answer
    # the kept demonstration tokens are the *last* ones of the full demonstration block
    kept = cut.tokens[n_bos : len(cut.tokens) - (len(alone.tokens) - n_bos)]
    full_demo = full.tokens[n_bos : len(full.tokens) - (len(alone.tokens) - n_bos)]
    assert kept == full_demo[-len(kept) :]


@pytest.mark.parametrize("family", FAMILIES)
def test_question_longer_than_max_seq_len_is_skipped_not_cut(tokenizers, family):
    tok = tokenizers[family]
    alone = PromptTokenizer(tok, max_seq_len=512)(Q)
    assert PromptTokenizer(tok, max_seq_len=len(alone.tokens))(Q) is not None
    assert PromptTokenizer(tok, max_seq_len=len(alone.tokens) - 1)(Q) is None
