"""Task-grouped multiple-choice data: records, prompts, splits, sources, building, loading.

See ``docs/data.md`` and the README's "Data" section. The command line is
``python -m abmll_tune.data {build,embedded,convert-legalbench,convert-chembench,splits}``.
"""

from abmll_tune.data.build import BuildOptions, build_split, load_manifest
from abmll_tune.data.loader import (
    BuiltSplit,
    MetaTaskSampler,
    PooledBatchSampler,
    TaskData,
    TaskVisit,
    collate_mc,
    heldout_batches,
    support_batches,
    task_data,
    tokenize_tasks,
)
from abmll_tune.data.prompt import (
    INSTRUCTION,
    LETTERS,
    PromptTokenizer,
    TokenizedExample,
    answer_letter_ids,
    render_demonstrations,
    render_prompt,
    sample_demonstrations,
)
from abmll_tune.data.records import DataError, MCExample, read_jsonl_examples
from abmll_tune.data.splits import Registry, Split, TaskInfo, load_registry

__all__ = [
    "INSTRUCTION",
    "LETTERS",
    "BuildOptions",
    "BuiltSplit",
    "DataError",
    "MCExample",
    "MetaTaskSampler",
    "PooledBatchSampler",
    "PromptTokenizer",
    "Registry",
    "Split",
    "TaskData",
    "TaskInfo",
    "TaskVisit",
    "TokenizedExample",
    "answer_letter_ids",
    "build_split",
    "collate_mc",
    "heldout_batches",
    "load_manifest",
    "load_registry",
    "read_jsonl_examples",
    "render_demonstrations",
    "render_prompt",
    "sample_demonstrations",
    "support_batches",
    "task_data",
    "tokenize_tasks",
]
