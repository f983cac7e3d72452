"""Few-shot evaluation on unseen tasks: adapt, score, report (docs/method.md, "Evaluation").

    tune run recipes/evaluate_few_shot --config configs/tiny_cpu_eval.yaml \\
        method=abmll adapter_checkpoint=outputs/tiny_cpu_abmll/checkpoints/best
    tune run recipes/evaluate_few_shot --config configs/tiny_cpu_eval.yaml method=pretrained

Loads the base model through torchtune's checkpointer and, unless ``method:
pretrained``, a meta-training checkpoint of any method (its saved config supplies the
model and the method's objective). For every evaluation task and seed it adapts a fresh
copy with the method's own objective and scores the held-out questions
(:func:`abmll_tune.evaluation.evaluate_tasks`), then writes
``{output_dir}/predictions.jsonl`` (task, example id, seed, variant, pruning level,
option probabilities, gold) and ``{output_dir}/results.json`` (per-task and macro
metrics, mean +- SE over seeds), and prints the table.

Launched with ``tune run --nproc_per_node N``, each process evaluates every N-th task
(each holds the whole model; a task's result depends only on its seed, so the results
equal a single process's) and rank 0 gathers and writes them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, training, utils
from torchtune.config._errors import ConfigError
from tqdm import tqdm

from abmll_tune.checkpointing import (
    CheckpointError,
    checkpoint_kind,
    load_peft_adapter,
    load_training_checkpoint,
    read_checkpoint_meta,
)
from abmll_tune.data.records import DataError
from abmll_tune.distributed import gather_task_records, init_process_group, launched_by_torchrun
from abmll_tune.evaluation import chance_accuracy, evaluate_tasks
from abmll_tune.io import atomic_write_json, atomic_write_text
from abmll_tune.methods import METHODS, Pretrained, method_from_saved_config
from abmll_tune.metrics import format_mean_se, summarize
from abmll_tune.models.loading import build_model
from abmll_tune.recipe_config import (
    RecipeConfigError,
    check_eval_config,
    check_input_files,
    check_output_dir,
)

log = utils.get_logger("INFO")
RESULTS_FORMAT = "abmll-tune-results"


class FewShotEvaluationRecipe:
    """Adapt-then-score evaluation of one trained adapter (or none) on a split's tasks."""

    def __init__(self, cfg: DictConfig) -> None:
        # every key is checked before anything is built (EvalRecipeSettings, EvalSettings)
        self._recipe_settings = check_eval_config(cfg)
        self._settings = self._recipe_settings.evaluation
        check_input_files(cfg)
        self._method_name = self._recipe_settings.method
        self._output_dir = check_output_dir(cfg.output_dir)
        self._device = utils.get_device(device=self._recipe_settings.device)
        self._dtype = training.get_dtype(self._recipe_settings.dtype, device=self._device)
        self._world_size, self._rank = 1, 0
        if launched_by_torchrun():
            timeout = self._recipe_settings.collective_timeout_s
            self._world_size, self._rank = init_process_group(self._device, timeout)
        training.set_seed(seed=self._recipe_settings.seed)

    def setup(self, cfg: DictConfig) -> None:
        self._checkpoint = self._recipe_settings.adapter_checkpoint
        self._epoch, model_cfg, self._train_config = None, cfg.get("model"), {}
        peft = self._checkpoint and checkpoint_kind(self._checkpoint) == "peft"
        if peft:
            method = METHODS.get(self._method_name)
            if method is None or method.variational:
                plain = [n for n, c in METHODS.items() if not c.variational and c.trains]
                raise CheckpointError(
                    f"{self._checkpoint}: a PEFT LoRA adapter holds one LoRA pair; method "
                    f"{self._method_name!r} needs an abmll-tune checkpoint (PEFT adapters evaluate "
                    f"with method {' or '.join(plain)})"
                )
            self._method = method()
            if model_cfg is None:
                raise RecipeConfigError(["model: a PEFT adapter needs the model section"])
        elif self._checkpoint:
            saved = read_checkpoint_meta(self._checkpoint)
            if self._method_name is not None and saved["method"] != self._method_name:
                raise CheckpointError(
                    f"{self._checkpoint}: a checkpoint of method {saved['method']!r}, but method "
                    f"is {self._method_name!r}"
                )
            self._train_config = saved["config"]
            try:
                self._method = method_from_saved_config(saved["config"])
            except ValueError as err:
                raise CheckpointError(f"{self._checkpoint}: {err}") from None
            model_cfg = OmegaConf.create(saved["config"]["model"])
            progress = saved["progress"]
            self._epoch = (
                progress["validation"]["epoch"]
                if "validation" in progress
                else progress.get("epoch")
            )
        else:
            self._method = Pretrained()
            if model_cfg is None:
                raise RecipeConfigError(["model: method pretrained needs a model section"])
        # the builder's adapter initialisation (seeded above) is kept: a zero B for pretrained
        adapter_dtype = self._recipe_settings.adapter_dtype
        self._model, hf_config = build_model(
            model_cfg,
            cfg.checkpointer,
            device=self._device,
            dtype=self._dtype,
            adapter_dtype=None
            if adapter_dtype is None
            else training.get_dtype(adapter_dtype, device=self._device),
        )
        if peft:
            load_peft_adapter(self._checkpoint, self._model, hf_config)
        elif self._checkpoint:
            load_training_checkpoint(self._checkpoint, self._model, self._method.name)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._data = config.instantiate(cfg.data, tokenizer=self._tokenizer)
        split = self._data.split
        tasks = split.test_tasks if self._settings.part == "test" else split.selection_tasks
        self._tasks = list(tasks[: self._settings.max_tasks] if self._settings.max_tasks else tasks)
        self._check_task_sizes()

    def _check_task_sizes(self) -> None:
        s = self._settings
        need = s.adapt_steps * s.adapt_batch_size
        for task in self._tasks:
            for seed in s.seeds:
                support = self._data.split.support(task, seed)
                heldout = getattr(self._data.split, s.part)(task)
                if len(support) < need or not heldout:
                    raise DataError(
                        f"task {task!r} (seed {seed}) has {len(support)} support and {len(heldout)} "
                        f"{s.part} examples; adaptation needs {s.adapt_steps} batches x "
                        f"{s.adapt_batch_size} = {need} support examples and at least one held-out "
                        "question: lower evaluation.adapt_steps or adapt_batch_size",
                        self._data.split.root,
                    )

    def evaluate(self) -> dict | None:
        """Evaluate (this process's share of) the tasks; rank 0 writes and returns the results."""
        s = self._settings
        mine = self._tasks[self._rank :: self._world_size]
        with tqdm(
            total=len(mine) * len(s.seeds),
            desc=f"evaluating {self._method.name}",
            unit="task",
            disable=self._rank != 0,
        ) as bar:
            records = evaluate_tasks(
                self._model,
                self._data,
                mine,
                s,
                method=self._method,
                progress=bar,
            )
        records = gather_task_records(records, self._tasks)
        if self._rank != 0:
            return None
        results = {
            "format": RESULTS_FORMAT,
            "version": 1,
            "method": self._method.name,
            "run": self._output_dir.name,
            "split": self._data.split.name,
            "part": s.part,
            "tasks": self._tasks,
            "checkpoint": self._checkpoint,
            "checkpoint_epoch": self._epoch,
            "default_variant": self._method.default_variant,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()},
            "training": {  # what the report's ablation tables read (beta, gamma, outer_grad)
                **{k: self._train_config[k] for k in ("seed", "epochs") if k in self._train_config},
                **(dataclasses.asdict(self._method) if self._train_config else {}),
            },
            "chance_accuracy": chance_accuracy(self._data, self._tasks, s.part),
            "processes": self._world_size,
            "metrics": summarize(records),
        }
        atomic_write_text(
            self._output_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records)
        )
        atomic_write_json(self._output_dir / "results.json", results)
        return results


def format_results(results: dict) -> str:
    lines = [
        f"{results['method']} on {results['split']} ({results['part']}, {len(results['tasks'])} tasks, "
        f"seeds {results['settings']['seeds']}); chance {results['chance_accuracy']:.3f}",
        f"{'variant':<14}{'accuracy':>20}{'ECE':>20}{'NLL':>10}{'Brier':>10}",
    ]
    for key, m in results["metrics"].items():
        acc, ece = m["summary"]["accuracy"], m["summary"]["ece"]
        lines.append(
            f"{key:<14}{format_mean_se(acc):>20}{format_mean_se(ece):>20}"
            f"{m['summary']['nll']['mean']:>10.3f}{m['summary']['brier']['mean']:>10.3f}"
        )
    return "\n".join(lines)


@record  # under torchrun: a failing rank's traceback is reported and the job stops
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="FewShotEvaluationRecipe", cfg=cfg)
    start = time.perf_counter()
    try:
        recipe = FewShotEvaluationRecipe(cfg)
        recipe.setup(cfg)
    except (RecipeConfigError, CheckpointError, DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with torch.inference_mode(False):
        results = recipe.evaluate()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if results is not None:
        print(format_results(results))
        print(
            f"done in {time.perf_counter() - start:.0f} s: {Path(cfg.output_dir) / 'results.json'}"
        )


if __name__ == "__main__":
    sys.exit(recipe_main())
