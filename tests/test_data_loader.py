"""Task-grouped loading: determinism, coverage, resume, collation, evaluation batches."""

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll_tune.data.loader import (
    BuiltSplit,
    MetaTaskSampler,
    PooledBatchSampler,
    TaskData,
    TokenizeReport,
    collate_mc,
    heldout_batches,
    support_batches,
    tokenize_tasks,
)
from abmll_tune.data.prompt import PromptTokenizer
from abmll_tune.data.records import DataError


@pytest.fixture(scope="module")
def train_tasks(embedded_split, tokenizers):
    data = TaskData(embedded_split, tokenizers["llama3"], max_seq_len=64)
    tasks = data.train_tasks()
    return {name: tasks[name] for name in sorted(tasks)[:6]}


def visit_ids(visit):
    return [tuple(b["id"]) for b in visit.batches]


def test_meta_sampler_visits_each_task_once_per_epoch_in_seeded_order(train_tasks):
    sampler = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=6, seed=3)
    epoch0 = list(sampler.visits(0))
    epoch1 = list(sampler.visits(1))
    assert sorted(v.task for v in epoch0) == sorted(train_tasks) == sorted(v.task for v in epoch1)
    assert [v.task for v in epoch0] != [v.task for v in epoch1]
    for visit in epoch0:
        assert len(visit.batches) == 6 and all(b["tokens"].shape[0] == 2 for b in visit.batches)
        ids = [i for b in visit.batches for i in b["id"]]
        assert len(set(ids)) == 12  # K batches drawn without replacement
        assert {b_task for b in visit.batches for b_task in b["task"]} == {visit.task}
    again = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=6, seed=3)
    assert [visit_ids(v) for v in again.visits(0)] == [visit_ids(v) for v in epoch0]
    other_seed = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=6, seed=4)
    assert [visit_ids(v) for v in other_seed.visits(0)] != [visit_ids(v) for v in epoch0]


def test_meta_sampler_resumes_exactly_from_its_state(train_tasks):
    reference = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=1)
    full = [visit_ids(v) for e in range(2) for v in reference.visits(e)]
    interrupted = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=1)
    seen = []
    for visit in interrupted.visits(0):
        seen.append(visit_ids(visit))
        if len(seen) == 4:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4
    resumed = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=1)
    resumed.load_state_dict(state)
    seen += [visit_ids(v) for v in resumed.visits(*resumed.resume_point())]
    assert resumed.resume_point() == (1, 0)
    seen += [visit_ids(v) for v in resumed.visits(*resumed.resume_point())]
    assert seen == full
    with pytest.raises(ValueError, match="seed"):
        MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=2).load_state_dict(
            state
        )


def test_proportional_sampling_follows_task_sizes(train_tasks):
    names = sorted(train_tasks)
    sized = {names[0]: train_tasks[names[0]], names[1]: train_tasks[names[1]][:20]}
    sampler = MetaTaskSampler(
        sized, batch_size=2, batches_per_task=5, seed=0, task_sampling="proportional"
    )
    counts = {names[0]: 0, names[1]: 0}
    for epoch in range(300):
        for task in sampler.epoch_plan(epoch):
            counts[task] += 1
    expected = len(sized[names[0]]) / (len(sized[names[0]]) + 20)
    assert abs(counts[names[0]] / 600 - expected) < 0.04


def test_k_larger_than_a_tasks_batches_is_a_clear_error(train_tasks):
    with pytest.raises(DataError, match=r"fewer than batches_per_task x batch_size = 6 x 40 = 240"):
        MetaTaskSampler(train_tasks, batch_size=40, batches_per_task=6, seed=0)


def test_pooled_sampler_covers_everything_once_and_resumes(train_tasks):
    sampler = PooledBatchSampler(train_tasks, batch_size=8, seed=0)
    ids = [i for b in sampler.batches(0) for i in b["id"]]
    assert sorted(ids) == sorted(e.id for ex in train_tasks.values() for e in ex)
    assert len({tuple(b["task"]) for b in sampler.batches(0)}) > 1
    second = PooledBatchSampler(train_tasks, batch_size=8, seed=0)
    first_half = []
    for b in second.batches(0):
        first_half.append(b["id"])
        if len(first_half) == 10:
            break
    third = PooledBatchSampler(train_tasks, batch_size=8, seed=0)
    third.load_state_dict(second.state_dict())
    rest = [b["id"] for b in third.batches(*third.resume_point())]
    assert [i for b in first_half + rest for i in b] == ids


def test_collation_pads_like_torchtune_and_locates_the_answer(train_tasks, tokenizers):
    examples = list(train_tasks.values())[0][:4]
    batch = collate_mc(examples, pad_id=7)
    lengths = [len(e.tokens) for e in examples]
    assert batch["tokens"].shape == (4, max(lengths))
    for i, e in enumerate(examples):
        assert batch["tokens"][i, len(e.tokens) :].eq(7).all()
        assert batch["labels"][i, len(e.tokens) :].eq(CROSS_ENTROPY_IGNORE_IDX).all()
        pos = int(batch["answer_positions"][i])
        gold_letter = int(batch["option_ids"][i, batch["gold"][i]])
        assert int(batch["tokens"][i, pos + 1]) == gold_letter == int(batch["labels"][i, pos + 1])
        assert batch["option_ids"][i, len(e.option_ids) :].eq(-1).all()
    assert batch["task"] == [e.task for e in examples] and batch["id"] == [e.id for e in examples]


def test_evaluation_batches(embedded_split, tokenizers):
    data = TaskData(embedded_split, tokenizers["qwen2"], max_seq_len=64)
    support, heldout = data.eval_task("emb-test-04", seed=21, part="test")
    assert len(support) == 16 and len(heldout) == 50
    first = support_batches(support, batch_size=2, n_batches=5, seed=0)
    assert (
        len(first) == 5
        and first[0]["id"] == support_batches(support, batch_size=2, n_batches=5, seed=0)[0]["id"]
    )
    assert first[0]["id"] != support_batches(support, batch_size=2, n_batches=5, seed=1)[0]["id"]
    with pytest.raises(DataError, match="fewer than 10 batches x 2 = 20"):
        support_batches(support, batch_size=2, n_batches=10, seed=0)
    batches = heldout_batches(heldout, batch_size=16)
    assert [len(b["id"]) for b in batches] == [16, 16, 16, 2]
    assert [i for b in batches for i in b["id"]] == [e.id for e in heldout]
    _, validation = data.eval_task("emb-test-04", seed=21, part="validation")
    assert not {e.id for e in validation} & {e.id for e in heldout}


def test_metaicl_variant_uses_support_examples_as_demonstrations(embedded_split, tokenizers):
    plain = TaskData(embedded_split, tokenizers["llama3"], max_seq_len=256)
    icl = TaskData(embedded_split, tokenizers["llama3"], max_seq_len=256, n_demos=3)
    support, heldout = icl.eval_task("emb-val-02", seed=100, part="validation")
    _, plain_heldout = plain.eval_task("emb-val-02", seed=100, part="validation")
    assert all(e.n_demos == 3 for e in heldout)
    assert all(
        len(a.tokens) > len(b.tokens) + 30 for a, b in zip(heldout, plain_heldout, strict=True)
    )
    support_inputs = {e.input for e in BuiltSplit(embedded_split).support("emb-val-02", 100)}
    text = tokenizers["llama3"].decode(heldout[0].tokens)
    demo_questions = [
        line.removeprefix("Question: ")
        for line in text.split("\n")
        if line.startswith("Question: ")
    ][:-1]
    assert len(demo_questions) == 3 and set(demo_questions) <= support_inputs


def test_too_long_questions_are_skipped_and_counted(embedded_split, tokenizers):
    split = BuiltSplit(embedded_split)
    examples = {"emb-train-00": split.train("emb-train-00")}
    report = TokenizeReport()
    prompt = PromptTokenizer(tokenizers["llama3"], max_seq_len=46)  # prompts are 45-48 tokens
    tokenized = tokenize_tasks(examples, prompt, report=report)
    assert 0 < report.too_long["emb-train-00"] < 200
    assert report.kept == len(tokenized["emb-train-00"]) == 200 - report.too_long["emb-train-00"]
    assert all(len(e.tokens) <= 46 for e in tokenized["emb-train-00"])
    with pytest.raises(DataError, match="longer than max_seq_len=10"):
        tokenize_tasks(examples, PromptTokenizer(tokenizers["llama3"], max_seq_len=10))


def test_built_split_rejects_unknown_seed_and_missing_manifest(embedded_split, tmp_path):
    with pytest.raises(DataError, match="seed 7 was not built"):
        BuiltSplit(embedded_split).support("emb-val-00", 7)
    with pytest.raises(DataError, match="no manifest.json"):
        BuiltSplit(tmp_path)


def test_merged_batches_score_as_the_batches_did(train_tasks):
    """One forward of the merged batch gives every question the logits its own batch gave
    (right padding is never read by a causal model)."""
    import torch

    from abmll_tune.data.loader import merge_batches
    from abmll_tune.embedded.backbone import TINY_EMBEDDED
    from abmll_tune.models import abmll_llama3
    from abmll_tune.objectives import answer_logits

    visit = next(MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=3, seed=0).visits(0))
    merged = merge_batches(visit.batches)
    assert merged["tokens"].shape[0] == 6 and merged["id"] == [
        i for b in visit.batches for i in b["id"]
    ]
    torch.manual_seed(0)
    model = abmll_llama3(variational=False, sampling="mean", **TINY_EMBEDDED).eval()
    with torch.no_grad():
        separate = torch.cat([answer_logits(model, b) for b in visit.batches])
        together = answer_logits(model, merged)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)
    assert merge_batches(visit.batches[:1]) is visit.batches[0]


def test_a_data_epoch_uses_every_example_at_most_once_and_drops_only_remainders(train_tasks):
    names = sorted(train_tasks)
    # uneven sizes: 37 examples make 3 visits of 12 (1 left out), 25 make 2 (1 left out)
    sized = {names[0]: train_tasks[names[0]][:37], names[1]: train_tasks[names[1]][:25],
             names[2]: train_tasks[names[2]]}  # fmt: skip
    sampler = MetaTaskSampler(
        sized, batch_size=2, batches_per_task=6, seed=5, visits_per_epoch="data"
    )
    expected = {t: len(ex) // 12 for t, ex in sized.items()}
    assert len(sampler) == sum(expected.values())
    epochs = []
    for epoch in range(2):
        visits = list(sampler.visits(epoch))
        assert len(visits) == len(sampler)
        used = {t: [] for t in sized}
        for visit in visits:
            assert {t for b in visit.batches for t in b["task"]} == {visit.task}
            used[visit.task] += [i for b in visit.batches for i in b["id"]]
        for task, ids in used.items():
            assert len(ids) == len(set(ids)) == 12 * expected[task]  # each once, no repeats
            assert len(sized[task]) - len(ids) < 12  # only a remainder smaller than a visit
        epochs.append(([v.task for v in visits], used))
    # tasks interleave (not one task's visits in a row) and each epoch reshuffles
    plan = epochs[0][0]
    assert plan != sorted(plan) and epochs[0][0] != epochs[1][0]
    assert epochs[0][1][names[0]] != epochs[1][1][names[0]]


def test_a_data_epoch_resumes_exactly_and_refuses_another_epoch_definition(train_tasks):
    def make(visits_per_epoch="data"):
        return MetaTaskSampler(
            train_tasks, batch_size=2, batches_per_task=5, seed=2, visits_per_epoch=visits_per_epoch
        )

    reference = make()
    full = [visit_ids(v) for e in range(2) for v in reference.visits(e)]
    interrupted = make()
    seen = []
    for visit in interrupted.visits(0):
        seen.append(visit_ids(visit))
        if len(seen) == 7:
            break
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    while len(seen) < len(full):
        seen += [visit_ids(v) for v in resumed.visits(*resumed.resume_point())]
    assert seen == full
    with pytest.raises(ValueError, match="visits_per_epoch='data'"):
        make("tasks").load_state_dict(state)
    legacy = {k: v for k, v in make("tasks").state_dict().items() if k != "visits_per_epoch"}
    make("tasks").load_state_dict(legacy)  # a checkpoint from before the setting


def test_an_integer_epoch_cycles_through_fresh_task_shuffles(train_tasks):
    n = len(train_tasks)
    sampler = MetaTaskSampler(
        train_tasks, batch_size=2, batches_per_task=5, seed=0, visits_per_epoch=2 * n + 1
    )
    plan = sampler.epoch_plan(0)
    assert len(sampler) == len(plan) == 2 * n + 1
    assert sorted(plan[:n]) == sorted(plan[n : 2 * n]) == sorted(train_tasks)
    assert plan[:n] != plan[n : 2 * n]
    tasks_mode = MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=0)
    assert plan[:n] == tasks_mode.epoch_plan(0)  # the first turn is the `tasks` epoch


@pytest.mark.parametrize("bad", ["everything", 0, -3, True, 2.5])
def test_visits_per_epoch_must_be_tasks_data_or_a_positive_integer(train_tasks, bad):
    with pytest.raises(ValueError, match="visits_per_epoch must be 'tasks', 'data' or an integer"):
        MetaTaskSampler(train_tasks, batch_size=2, batches_per_task=5, seed=0, visits_per_epoch=bad)
