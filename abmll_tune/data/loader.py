"""Task-grouped loading of a built split for meta-training, pooled training and evaluation.

* :class:`BuiltSplit` reads what ``python -m abmll_tune.data build`` wrote.
* :func:`tokenize_tasks` turns each task's examples into model inputs (optionally with
  MetaICL demonstrations), skipping and counting the questions longer than
  ``max_seq_len``.
* :class:`MetaTaskSampler` yields, for meta-training, one task at a time with its K
  batches (K inner + any query batch); :class:`PooledBatchSampler` yields shuffled
  batches pooled over tasks (Regular LoRA). Both are deterministic for a seed and
  resume from ``(epoch, position)``, which is all their state.
* :func:`support_batches` and :func:`heldout_batches` give evaluation batches.

Batches are collated as torchtune does (``padded_collate_sft``: right padding, labels
padded with the ignore index) plus what option scoring needs.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from abmll_tune.data.build import load_manifest
from abmll_tune.data.prompt import PromptTokenizer, TokenizedExample, sample_demonstrations
from abmll_tune.data.records import DataError, MCExample, read_jsonl_examples


class BuiltSplit:
    """A split built by the data command: its manifest and per-task example files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        split = self.manifest["split"]
        self.name: str = split["name"]
        self.train_tasks: list[str] = split["train"]
        self.test_tasks: list[str] = split["test"]
        self.selection_tasks: list[str] = split["selection"]
        self.seeds: list[int] = self.manifest["options"]["seeds"]

    def _read(self, relpath: str) -> list[MCExample]:
        path = self.root / relpath
        return read_jsonl_examples(path, max_options=self.manifest["options"]["max_options"])

    def train(self, task: str) -> list[MCExample]:
        return self._read(f"train/{task}.jsonl")

    def support(self, task: str, seed: int) -> list[MCExample]:
        if seed not in self.seeds:
            raise DataError(f"seed {seed} was not built; built seeds: {self.seeds}", self.root)
        return self._read(f"eval/{task}/support_{seed}.jsonl")

    def validation(self, task: str) -> list[MCExample]:
        return self._read(f"eval/{task}/validation.jsonl")

    def test(self, task: str) -> list[MCExample]:
        return self._read(f"eval/{task}/test.jsonl")

    def license(self, task: str) -> str:
        roles = self.manifest["tasks"][task]
        return next(iter(roles.values()))["license"]


@dataclass
class TokenizeReport:
    """Questions skipped because they exceed ``max_seq_len`` even without demonstrations."""

    kept: int = 0
    too_long: Counter = None

    def __post_init__(self):
        self.too_long = Counter() if self.too_long is None else self.too_long


def tokenize_tasks(
    examples_by_task: dict[str, list[MCExample]],
    prompt_tokenizer: PromptTokenizer,
    *,
    n_demos: int = 0,
    demo_pools: dict[str, Sequence[MCExample]] | None = None,
    demo_seed: int = 0,
    report: TokenizeReport | None = None,
) -> dict[str, list[TokenizedExample]]:
    """Tokenize every task. With ``n_demos > 0`` (the MetaICL variant) each question gets
    that many solved examples from ``demo_pools[task]`` (default: the task's own
    examples), never itself. Questions too long even alone are skipped and counted; a
    task left with none raises."""
    report = report if report is not None else TokenizeReport()
    out = {}
    for task, examples in examples_by_task.items():
        pool = (demo_pools or {}).get(task, examples)
        tokenized = []
        for example in examples:
            demos = sample_demonstrations(example, pool, n_demos, demo_seed) if n_demos else ()
            item = prompt_tokenizer(example, demos)
            if item is None:
                report.too_long[task] += 1
                continue
            tokenized.append(item)
        if not tokenized:
            raise DataError(
                f"task {task!r}: all {len(examples)} questions are longer than max_seq_len="
                f"{prompt_tokenizer.max_seq_len}; raise max_seq_len"
            )
        report.kept += len(tokenized)
        out[task] = tokenized
    return out


def collate_mc(batch: Sequence[TokenizedExample], pad_id: int = 0) -> dict:
    """torchtune's SFT collation plus answer positions, option token ids and gold indices."""
    collated = padded_collate_sft(
        [{"tokens": e.tokens, "labels": e.labels} for e in batch],
        padding_idx=pad_id,
        ignore_idx=CROSS_ENTROPY_IGNORE_IDX,
    )
    max_options = max(len(e.option_ids) for e in batch)
    option_ids = torch.full((len(batch), max_options), -1, dtype=torch.long)
    for i, e in enumerate(batch):
        option_ids[i, : len(e.option_ids)] = torch.tensor(e.option_ids)
    collated.update(
        answer_positions=torch.tensor([e.answer_position for e in batch], dtype=torch.long),
        option_ids=option_ids,
        gold=torch.tensor([e.gold for e in batch], dtype=torch.long),
        task=[e.task for e in batch],
        id=[e.id for e in batch],
    )
    return collated


def merge_batches(batches: Sequence[dict]) -> dict:
    """Collated batches as one batch: tensors concatenated along the first dimension,
    right-padded along the second where widths differ (``labels`` with the ignore index,
    ``option_ids`` with -1, anything else with 0: a causal model never reads what follows
    a question), lists concatenated. One batch is returned as it is."""
    if len(batches) == 1:
        return batches[0]
    fills = {"labels": CROSS_ENTROPY_IGNORE_IDX, "option_ids": -1}
    merged = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if isinstance(first, torch.Tensor):
            if first.dim() >= 2:
                width = max(v.shape[1] for v in values)
                values = [
                    torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fills.get(key, 0))
                    if v.dim() == 2
                    else v
                    for v in values
                ]
            merged[key] = torch.cat(values)
        else:
            merged[key] = [x for v in values for x in v]
    return merged


@dataclass(frozen=True)
class TaskVisit:
    """One visit of a task in meta-training: ``batches[:K]`` inner, the rest query."""

    epoch: int
    position: int
    task: str
    batches: list[dict]


def check_visits_per_epoch(value) -> None:
    """Raise ValueError unless ``value`` is ``"tasks"``, ``"data"`` or an integer >= 1."""
    if value in ("tasks", "data"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"visits_per_epoch must be 'tasks', 'data' or an integer >= 1, got {value!r}"
        )


class MetaTaskSampler:
    """Tasks one at a time, each with ``batches_per_task`` batches of its own examples.

    Args:
        tasks: tokenized examples per task.
        batch_size: examples per batch.
        batches_per_task: batches drawn per visit (K inner steps, plus 1 for a query
            batch where the method uses one); drawn without replacement.
        seed: the sampler's seed.
        task_sampling: ``uniform`` (tasks in turn, order shuffled per epoch) or
            ``proportional`` (each visit's task drawn with probability proportional to
            its size). Ignored with ``visits_per_epoch="data"``.
        pad_id: padding token id.
        visits_per_epoch: ``"tasks"`` (one visit per task: an epoch is a pass over the
            tasks), ``"data"`` (an epoch is a pass over the training examples: each
            task's examples are shuffled and cut into visits of ``batch_size x
            batches_per_task`` examples, every example used at most once; the
            remainder smaller than a visit, different examples each epoch, is left out;
            the visits of all tasks are shuffled together, which draws a task with
            probability proportional to the visits it has left), or an integer N (N
            visits, tasks as ``task_sampling`` says; under ``uniform`` N > number of
            tasks cycles through fresh shuffles).

    A visit depends only on (seed, epoch, position), so ``visits(epoch, start)``
    resumes exactly where a saved ``state_dict`` says.
    """

    def __init__(
        self,
        tasks: dict[str, list[TokenizedExample]],
        *,
        batch_size: int,
        batches_per_task: int,
        seed: int,
        task_sampling: str = "uniform",
        pad_id: int = 0,
        visits_per_epoch: str | int = "tasks",
    ):
        check_visits_per_epoch(visits_per_epoch)
        if task_sampling not in ("uniform", "proportional"):
            raise ValueError(
                f"task_sampling must be 'uniform' or 'proportional', got {task_sampling!r}"
            )
        if batch_size < 1 or batches_per_task < 1:
            raise ValueError("batch_size and batches_per_task must be >= 1")
        need = batch_size * batches_per_task
        small = {t: len(ex) for t, ex in tasks.items() if len(ex) < need}
        if small:
            raise DataError(
                f"{len(small)} tasks have fewer than batches_per_task x batch_size = "
                f"{batches_per_task} x {batch_size} = {need} examples (e.g. {dict(list(small.items())[:3])}); "
                "lower K or the batch size, or drop those tasks from the split"
            )
        self.tasks = dict(sorted(tasks.items()))
        self.names = list(self.tasks)
        self.batch_size, self.batches_per_task = batch_size, batches_per_task
        self.seed, self.task_sampling, self.pad_id = seed, task_sampling, pad_id
        self.visits_per_epoch = visits_per_epoch
        self.epoch, self.position = 0, 0
        self._plans: dict[int, list[str]] = {}  # epoch -> plan (the last two kept)
        self._slots: dict[int, tuple[list[str], list[int]]] = {}

    @property
    def examples_per_visit(self) -> int:
        return self.batch_size * self.batches_per_task

    def __len__(self) -> int:
        """Visits per epoch."""
        if self.visits_per_epoch == "tasks":
            return len(self.names)
        if self.visits_per_epoch == "data":
            return sum(len(ex) // self.examples_per_visit for ex in self.tasks.values())
        return int(self.visits_per_epoch)

    def epoch_plan(self, epoch: int) -> list[str]:
        """The tasks of ``epoch``'s visits, in order."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> list[str]:
        rng = random.Random(f"{self.seed}:plan:{epoch}")
        if self.visits_per_epoch == "data":
            plan = [
                t for t, ex in self.tasks.items() for _ in range(len(ex) // self.examples_per_visit)
            ]
            rng.shuffle(plan)
            return plan
        n = len(self)
        if self.task_sampling == "uniform":
            plan = []
            while len(plan) < n:  # whole shuffles of the tasks, the last one cut
                turn = list(self.names)
                rng.shuffle(turn)
                plan.extend(turn)
            return plan[:n]
        weights = [len(self.tasks[t]) for t in self.names]
        return rng.choices(self.names, weights=weights, k=n)

    def _slot(self, epoch: int) -> list[int]:
        """Per position of ``epoch``'s plan: how many visits of its task come before it."""
        plan = self.epoch_plan(epoch)
        if self._slots.get(epoch, (None,))[0] is not plan:
            seen: dict[str, int] = {}
            slots = []
            for task in plan:
                slots.append(seen.get(task, 0))
                seen[task] = slots[-1] + 1
            self._slots = {epoch: (plan, slots)}
        return self._slots[epoch][1]

    def _chosen(self, epoch: int, position: int, task: str) -> list[int]:
        """Indices of ``task``'s examples in the visit at ``position``."""
        need, n = self.examples_per_visit, len(self.tasks[task])
        if self.visits_per_epoch == "data":
            # the task's j-th visit of the epoch takes the j-th slice of its shuffle
            j = self._slot(epoch)[position]
            order = list(range(n))
            random.Random(f"{self.seed}:pass:{epoch}:{task}").shuffle(order)
            return order[j * need : (j + 1) * need]
        rng = random.Random(f"{self.seed}:visit:{epoch}:{position}:{task}")
        return rng.sample(range(n), need)

    def visit(self, epoch: int, position: int, task: str) -> TaskVisit:
        examples = self.tasks[task]
        chosen = self._chosen(epoch, position, task)
        batches = [
            collate_mc([examples[i] for i in chosen[b : b + self.batch_size]], self.pad_id)
            for b in range(0, len(chosen), self.batch_size)
        ]
        return TaskVisit(epoch, position, task, batches)

    def visits(self, epoch: int, start: int = 0) -> Iterator[TaskVisit]:
        """The visits of ``epoch`` from position ``start``; updates ``state_dict()`` as it goes."""
        plan = self.epoch_plan(epoch)
        for position in range(start, len(plan)):
            visit = self.visit(epoch, position, plan[position])
            # the state counts a visit as consumed once handed out: a checkpoint written
            # while (or after) processing it resumes with the next one
            self.epoch, self.position = epoch, position + 1
            yield visit

    def resume_point(self) -> tuple[int, int]:
        """(epoch, position) to continue from; a finished epoch continues with the next."""
        if self.position >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.position

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "task_sampling": self.task_sampling,
            "visits_per_epoch": self.visits_per_epoch,
            "tasks": self.names,
        }

    def load_state_dict(self, state: dict) -> None:
        processes = state.get("world_size", 1)
        if processes != 1:  # its position counts each process's visits: another task order
            raise ValueError(
                f"the checkpoint was written by {processes} processes (recipes/"
                "abmll_meta_distributed): resume with the same recipe and --nproc_per_node"
            )
        state = {"visits_per_epoch": "tasks", **state}  # written before visits_per_epoch
        for key, mine in (
            ("seed", self.seed),
            ("task_sampling", self.task_sampling),
            ("visits_per_epoch", self.visits_per_epoch),
            ("tasks", self.names),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)!r}, but this run has "
                    f"{key}={mine!r}: resume with the same data and seed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class PooledBatchSampler:
    """Shuffled batches pooled over all tasks (Regular LoRA): no task structure.

    Deterministic for (seed, epoch); ``batches(epoch, start)`` resumes mid-epoch.
    """

    def __init__(
        self,
        tasks: dict[str, list[TokenizedExample]],
        *,
        batch_size: int,
        seed: int,
        pad_id: int = 0,
    ):
        self.examples = [e for _, ex in sorted(tasks.items()) for e in ex]
        if not self.examples:
            raise DataError("no training examples")
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:pooled:{epoch}").shuffle(order)
        for position in range(start, len(self)):
            idx = order[position * self.batch_size : (position + 1) * self.batch_size]
            batch = collate_mc([self.examples[i] for i in idx], self.pad_id)
            self.epoch, self.position = epoch, position + 1  # consumed once handed out
            yield batch

    def resume_point(self) -> tuple[int, int]:
        """(epoch, position) to continue from; a finished epoch continues with the next."""
        if self.position >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.position

    def visits(self, epoch: int, start: int = 0, batches_per_visit: int = 1) -> Iterator[TaskVisit]:
        """The epoch's batches grouped ``batches_per_visit`` at a time as visits of the
        pseudo-task ``<pooled>``, so the meta-training loop runs Regular LoRA unchanged.
        ``start`` counts visits; the state's position counts batches."""
        group: list[dict] = []
        for batch in self.batches(epoch, start * batches_per_visit):
            group.append(batch)
            if len(group) == batches_per_visit:
                yield TaskVisit(epoch, self.position // batches_per_visit - 1, "<pooled>", group)
                group = []

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n": len(self.examples),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("n") != len(self.examples):
            raise ValueError(
                "sampler state does not match this data and seed: resume with the same ones"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def support_batches(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    n_batches: int,
    seed: int,
    pad_id: int = 0,
    repeat: bool = False,
) -> list[dict]:
    """``n_batches`` test-adaptation batches from a task's support examples (seeded order).
    With ``repeat``, more batches than the support fills are taken in passes over it, each
    pass in its own seeded order (a batch never holds an example twice)."""
    need = batch_size * n_batches
    task = examples[0].task if examples else "?"
    if len(examples) < (batch_size if repeat else need):
        raise DataError(
            f"task {task!r} has {len(examples)} support examples, fewer than "
            f"{n_batches} batches x {batch_size} = {need}; lower K_test or the batch size"
            + ("" if repeat else ", or repeat the support (adapt_repeat_support: true)")
        )
    order: list[int] = []
    passes = 0
    while len(order) < need:
        one_pass = list(range(len(examples)))
        random.Random(f"{seed}:support" + (f":{passes}" if passes else "")).shuffle(one_pass)
        whole = len(one_pass) - len(one_pass) % batch_size  # batches stay within a pass
        order += one_pass[:whole]
        passes += 1
    return [
        collate_mc([examples[i] for i in order[b : b + batch_size]], pad_id)
        for b in range(0, need, batch_size)
    ]


def heldout_batches(
    examples: Sequence[TokenizedExample], *, batch_size: int, pad_id: int = 0
) -> list[dict]:
    """All held-out examples in file order, in batches."""
    if not examples:
        raise DataError("no held-out examples to evaluate")
    return [
        collate_mc(examples[b : b + batch_size], pad_id)
        for b in range(0, len(examples), batch_size)
    ]


class TaskData:
    """A built split with a tokenizer: what recipes get from a config's ``data`` section.

    Meta-training tasks draw MetaICL demonstrations from their own examples; evaluation
    tasks from their support set (the only labelled data of an unseen task).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer,
        *,
        max_seq_len: int,
        n_demos: int = 0,
        demo_seed: int = 0,
        max_options: int = 4,
    ):
        self.split = BuiltSplit(path)
        self.prompt = PromptTokenizer(tokenizer, max_seq_len, max_options)
        self.n_demos, self.demo_seed = n_demos, demo_seed
        self.report = TokenizeReport()

    @property
    def pad_id(self) -> int:
        return self.prompt.pad_id

    def train_tasks(self) -> dict[str, list[TokenizedExample]]:
        examples = {task: self.split.train(task) for task in self.split.train_tasks}
        return tokenize_tasks(
            examples,
            self.prompt,
            n_demos=self.n_demos,
            demo_seed=self.demo_seed,
            report=self.report,
        )

    def eval_task(
        self, task: str, seed: int, part: str
    ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
        """(support, held-out) tokenized examples of ``task`` for ``seed``; ``part`` is
        ``validation`` or ``test``."""
        if part not in ("validation", "test"):
            raise ValueError(f"part must be 'validation' or 'test', got {part!r}")
        support = self.split.support(task, seed)
        heldout = getattr(self.split, part)(task)
        pools = {task: support}
        kwargs = dict(
            n_demos=self.n_demos, demo_pools=pools, demo_seed=self.demo_seed, report=self.report
        )
        return (
            tokenize_tasks({task: support}, self.prompt, **kwargs)[task],
            tokenize_tasks({task: heldout}, self.prompt, **kwargs)[task],
        )


def task_data(
    path: str, tokenizer, max_seq_len: int, n_demos: int = 0, demo_seed: int = 0
) -> TaskData:
    """Config entry point: ``data: {_component_: abmll_tune.data.task_data, path: ..., ...}``
    (the recipe passes the tokenizer)."""
    return TaskData(path, tokenizer, max_seq_len=max_seq_len, n_demos=n_demos, demo_seed=demo_seed)


class PooledVisits:
    """A :class:`PooledBatchSampler` seen as task visits of ``batches_per_visit`` batches,
    with the interface of :class:`MetaTaskSampler` (positions count visits)."""

    def __init__(self, sampler: PooledBatchSampler, batches_per_visit: int = 1):
        self.sampler, self.batches_per_visit = sampler, batches_per_visit

    def __len__(self) -> int:
        return len(self.sampler) // self.batches_per_visit

    def visits(self, epoch: int, start: int = 0) -> Iterator[TaskVisit]:
        return self.sampler.visits(epoch, start, self.batches_per_visit)

    def resume_point(self) -> tuple[int, int]:
        position = self.sampler.position // self.batches_per_visit
        if position >= len(self):
            return self.sampler.epoch + 1, 0
        return self.sampler.epoch, position

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "batches_per_visit": self.batches_per_visit}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches_per_visit") != self.batches_per_visit:
            raise ValueError("sampler state was saved with another gradient_accumulation_steps")
        self.sampler.load_state_dict(state)


class EpochCap:
    """At most ``max_visits`` visits of every epoch of ``sampler`` (any of the samplers
    above, or the distributed one): torchtune's ``max_steps_per_epoch``. The state is
    the wrapped sampler's; an epoch cut at the cap resumes with the next one."""

    def __init__(self, sampler, max_visits: int):
        if max_visits < 1:
            raise ValueError(f"max_visits must be >= 1, got {max_visits}")
        self.sampler, self.max_visits = sampler, max_visits

    def __len__(self) -> int:
        return min(len(self.sampler), self.max_visits)

    def visits(self, epoch: int, start: int = 0) -> Iterator[TaskVisit]:
        for i, visit in enumerate(self.sampler.visits(epoch, start), start=start):
            if i >= len(self):
                return
            yield visit

    def resume_point(self) -> tuple[int, int]:
        epoch, position = self.sampler.resume_point()
        return (epoch + 1, 0) if position >= len(self) else (epoch, position)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
