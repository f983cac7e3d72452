"""Task-grouped multiple-choice data: records, prompts, splits, sources, building, loading.

See ``docs/data.md`` and ``docs/data-preparation.md``. The command line is
``python -m abmll_tune.data {build,embedded,convert-legalbench,convert-chembench,splits}``.
"""

import importlib

# Each name's module, imported on first use (PEP 562): the data command
# (python -m abmll_tune.data) builds and converts without torch or torchtune, so it starts
# in a second instead of the ~8 s their imports take; the loader's names bring them in.
_MODULE_OF = {
    **dict.fromkeys(("BuildOptions", "build_split", "load_manifest"), "build"),
    **dict.fromkeys(
        (
            "BuiltSplit",
            "MetaTaskSampler",
            "PooledBatchSampler",
            "TaskData",
            "TaskVisit",
            "collate_mc",
            "heldout_batches",
            "support_batches",
            "task_data",
            "tokenize_tasks",
        ),
        "loader",
    ),
    **dict.fromkeys(
        (
            "INSTRUCTION",
            "LETTERS",
            "PromptTokenizer",
            "TokenizedExample",
            "answer_letter_ids",
            "render_demonstrations",
            "render_prompt",
            "sample_demonstrations",
        ),
        "prompt",
    ),
    **dict.fromkeys(("DataError", "MCExample", "read_jsonl_examples"), "records"),
    **dict.fromkeys(("Registry", "Split", "TaskInfo", "load_registry"), "splits"),
}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = sorted(_MODULE_OF)
