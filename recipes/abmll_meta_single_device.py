"""Meta-training on one device: ABMLL, Reptile, Structured LoRA and Regular LoRA.

    tune run recipes/abmll_meta_single_device --config configs/tiny_cpu_abmll.yaml
    tune run recipes/abmll_meta_single_device --config configs/llama3_8b_cls45.yaml epochs=3

The recipe follows torchtune's ``lora_finetune_single_device``: ``setup`` builds the
pieces a config names (model through torchtune's checkpointer, tokenizer, task data,
optimizers, metric logger), ``train`` walks the epochs and the task visits, and
``save_checkpoint`` writes the adapters, optimizer, sampler and RNG states. The config's
``method`` section is the method, a component (:mod:`abmll_tune.methods`, one module
each: ``abmll``, ``reptile``, ``structured_lora``, ``lora``); what happens inside one
task visit (its start, K inner steps, its outer step) is
:class:`abmll_tune.meta.MetaLearner`, the one loop all methods share. The ABMLL math is
in :mod:`abmll_tune.methods.abmll`, :mod:`abmll_tune.objectives` and
:mod:`abmll_tune.modules.gaussian`. ``recipes/reptile_single_device`` is this recipe
with Reptile as the default method.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.config._errors import ConfigError
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from abmll_tune.checkpointing import (
    CheckpointError,
    checkpoint_exists,
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
)
from abmll_tune.data.loader import EpochCap, MetaTaskSampler, PooledBatchSampler, PooledVisits
from abmll_tune.data.records import DataError
from abmll_tune.distributed import all_gather_objects, gather_task_records
from abmll_tune.evaluation import evaluate_tasks
from abmll_tune.io import atomic_write_text, recover_directory
from abmll_tune.meta import MetaLearner
from abmll_tune.metrics import summarize
from abmll_tune.models.loading import build_model
from abmll_tune.recipe_config import (
    RESUME_INVARIANTS,
    RecipeConfigError,
    check_input_files,
    check_output_dir,
    check_recipe_config,
    config_warnings,
)
from abmll_tune.rundir import (
    RunDirError,
    RunLock,
    clear_previous_run,
    is_disk_full,
    refuse_existing_run,
)

log = utils.get_logger("INFO")


class MetaLearningRecipeSingleDevice(FTRecipeInterface):
    """Meta-training of LoRA adapters on one device (see the module docstring).

    Config keys and their defaults: :class:`abmll_tune.recipe_config.RecipeSettings` and
    the method's class; docs/training.md has their tables.
    """

    def __init__(self, cfg: DictConfig) -> None:
        # Everything a config can get wrong is checked here, before any model is built.
        self._settings, self._method = check_recipe_config(cfg)
        for warning in config_warnings(self._settings):
            log.warning(warning)
        check_input_files(cfg)
        self._output_dir = check_output_dir(cfg.output_dir)
        latest = self._output_dir / "checkpoints" / "latest"
        if self._settings.resume_from_checkpoint and not checkpoint_exists(latest):
            raise CheckpointError(
                f"resume_from_checkpoint: true, but {latest} holds no checkpoint yet; "
                "start without resume_from_checkpoint"
            )
        # a run owns its directory: another run's checkpoints are never overwritten unasked
        refuse_existing_run(
            self._output_dir,
            resume=self._settings.resume_from_checkpoint,
            overwrite=self._settings.overwrite_output_dir,
        )
        self._lock: RunLock | None = None
        self._device = utils.get_device(device=self._settings.device)
        self._dtype = training.get_dtype(self._settings.dtype, device=self._device)
        self._split_validation = False  # one process: it validates on every task
        # one process here; the distributed recipe joins its process group at this point
        self._world_size, self._rank = self._init_processes()
        if self._is_rank_zero:  # and no two jobs write into it at once
            self._created_output_dir = not self._output_dir.exists()
            self._lock = RunLock(self._output_dir).acquire()
            if self._lock.took_over is not None:
                log.warning(
                    f"took over {self._lock.path} left by process {self._lock.took_over['pid']}, "
                    "which is no longer running"
                )
            if self._settings.overwrite_output_dir:  # before setup opens logs in it
                removed = clear_previous_run(self._output_dir)
                if removed:
                    log.info(
                        f"overwrite_output_dir: removed the previous run's {', '.join(removed)}"
                    )
        self._seed = training.set_seed(seed=self._settings.seed)  # + rank, if distributed
        self._epochs = self._settings.epochs
        self._visits_done = 0
        self._start_epoch, self._start_position = 0, 0
        self._validation_history: list[dict] = []

    def _init_processes(self) -> tuple[int, int]:
        return 1, 0

    @property
    def _is_rank_zero(self) -> bool:
        return self._rank == 0

    def _reduce_mean(self):
        """How the outer step averages over processes: nothing to average on one device."""
        return None

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self._metric_logger = None  # rank 0 logs
        self._model = self._setup_model(cfg)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = None
        if "loss" in cfg:
            self._loss_fn = config.instantiate(cfg.loss)
            if hasattr(self._loss_fn, "num_output_chunks"):
                self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)
        self._learner = MetaLearner(
            self._model,
            self._method,
            make_inner_optimizer=partial(config.instantiate, cfg.inner_optimizer),
            make_outer_optimizer=partial(config.instantiate, cfg.outer_optimizer)
            if "outer_optimizer" in cfg
            else None,
            inner_steps=self._settings.inner_steps,
            gradient_accumulation_steps=self._settings.gradient_accumulation_steps,
            loss_fn=self._loss_fn,
            reduce_mean=self._reduce_mean(),
            clip_grad_norm=self._settings.clip_grad_norm,
        )
        self._sampler = self._setup_sampler(cfg)
        steps_per_visit = self._method.steps_per_visit(self._settings.inner_steps)
        if self._settings.max_steps_per_epoch is not None:  # torchtune's key, in whole visits
            cap = max(self._settings.max_steps_per_epoch // steps_per_visit, 1)
            self._sampler = EpochCap(self._sampler, cap)
            utils.log_rank_zero(
                log, f"max_steps_per_epoch: epochs of at most {len(self._sampler)} visits"
            )
        self._pending_epoch_end = None
        if self._is_rank_zero:
            for line in self._recover_checkpoints():
                log.info(line)
        all_gather_objects(None)  # every rank resumes only once rank 0 has recovered
        if self._settings.resume_from_checkpoint:
            self._resume(cfg)
        self._lr_schedule = self._setup_lr_schedule(cfg)
        self._profiler = config.instantiate(cfg.profiler)[0] if cfg.get("profiler") else None
        # Every check has passed: only now is anything written (a failing start, or a
        # failing resume, leaves the output directory as it was).
        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            self._metric_logger = (
                config.instantiate(cfg.metric_logger)
                if "metric_logger" in cfg
                else training.metric_logging.DiskLogger(log_dir=str(self._output_dir / "logs"))
            )
            self._metric_logger.log_config(cfg)

    def _setup_lr_schedule(self, cfg: DictConfig):
        """torchtune's ``lr_scheduler`` component over task visits (outer steps), or None.

        It runs on a stand-in optimizer of rate 1, so its rate is the factor
        (:attr:`MetaLearner.lr_scale`) applied to every learning rate and outer step size
        of the next visit; resumed at the visits done, as torchtune's recipes resume it.
        """
        if cfg.get("lr_scheduler") is None:
            return None
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        stand_in.param_groups[0]["initial_lr"] = 1.0
        scheduler = config.instantiate(
            cfg.lr_scheduler,
            optimizer=stand_in,
            num_training_steps=self._epochs * len(self._sampler),
            last_epoch=self._visits_done - 1,
        )
        return scheduler, stand_in

    def _recover_checkpoints(self) -> list[str]:
        """Finish a checkpoint replacement cut short by a kill, remove stale temporaries."""
        root = self._output_dir / "checkpoints"
        if not root.is_dir():
            return []
        names = {p.name[1:].split(".", 1)[0] for p in root.iterdir() if p.name.startswith(".")}
        return [line for name in sorted(names) for line in recover_directory(root / name)]

    def _setup_model(self, cfg: DictConfig) -> torch.nn.Module:
        model, self._checkpointer_config = build_model(
            cfg.model,
            cfg.checkpointer,
            device=self._device,
            dtype=self._dtype,
            seed=self._settings.seed,  # adapters from the seed alone, on every device
            activation_checkpointing=self._settings.enable_activation_checkpointing,
            compile=self._settings.compile,
            adapter_dtype=self._adapter_dtype(),
        )
        return model

    def _adapter_dtype(self) -> torch.dtype | None:
        name = self._settings.adapter_dtype
        return None if name is None else training.get_dtype(name, device=self._device)

    def _setup_sampler(self, cfg: DictConfig):
        self._data = config.instantiate(cfg.data, tokenizer=self._tokenizer)
        tasks = self._data.train_tasks()
        too_long = sum(self._data.report.too_long.values())
        utils.log_rank_zero(
            log,
            f"{len(tasks)} training tasks, {self._data.report.kept} questions"
            + (f" ({too_long} longer than max_seq_len skipped)" if too_long else ""),
        )
        s = self._settings
        if self._method.pools_tasks:  # Regular LoRA: every task's batches, pooled
            if isinstance(s.visits_per_epoch, int):
                raise RecipeConfigError(
                    [
                        f"visits_per_epoch: {self._method.name}'s epoch is a pass over the "
                        "pooled training examples; set `tasks` or `data` (both mean that)"
                    ]
                )
            pooled = PooledBatchSampler(
                tasks, batch_size=s.batch_size, seed=s.seed, pad_id=self._data.pad_id
            )
            sampler = PooledVisits(pooled, self._learner.batches_per_task)
        else:
            sampler = MetaTaskSampler(
                tasks,
                batch_size=s.batch_size,
                batches_per_task=self._learner.batches_per_task,
                seed=s.seed,
                task_sampling=s.task_sampling,
                pad_id=self._data.pad_id,
                visits_per_epoch=s.visits_per_epoch,
            )
        per_visit = self._learner.batches_per_task * s.batch_size
        utils.log_rank_zero(
            log,
            f"an epoch ({'data' if self._method.pools_tasks else s.visits_per_epoch}): "
            f"{len(sampler)} task visits of {per_visit} questions, "
            f"{len(sampler) * self._method.steps_per_visit(s.inner_steps)} gradient steps",
        )
        return sampler

    def _resume(self, cfg: DictConfig) -> None:
        directory = self._output_dir / "checkpoints" / "latest"
        meta, learner_state = load_training_checkpoint(
            directory, self._model, self._method.name, rank=self._rank
        )
        now = OmegaConf.to_container(cfg, resolve=True)
        changed = [
            k for k in RESUME_INVARIANTS if k != "method" and meta["config"].get(k) != now.get(k)
        ]
        if changed:
            raise RecipeConfigError(
                [
                    f"{k}: differs from the checkpoint in {directory}; resume with the same setting"
                    for k in changed
                ]
            )
        try:  # a checkpoint of another task order (data, seed, number of processes)
            self._sampler.load_state_dict(meta["sampler"])
        except ValueError as err:
            raise CheckpointError(f"{directory}: {err}") from None
        self._learner.load_state_dict(learner_state)
        self._start_epoch, self._start_position = self._sampler.resume_point()
        self._visits_done = meta["progress"]["visits"]
        history = self._output_dir / "validation.jsonl"
        if history.is_file():
            self._validation_history = [  # rows after the checkpoint are redone
                row
                for line in history.read_text().splitlines()
                if line.strip() and (row := json.loads(line))["visits"] <= self._visits_done
            ]
        # A periodic checkpoint after an epoch's last visit, with the epoch-end work
        # (validation, epoch_N/) not done yet: the resumed run must do it first.
        epoch = meta["progress"]["epoch"]
        if self._start_position == 0 and self._start_epoch == epoch + 1:
            if not meta["progress"].get("epoch_end", False):
                self._pending_epoch_end = epoch
                # rows of a validation cut short are redone (same RNG, same result)
                self._validation_history = [
                    r for r in self._validation_history if r["epoch"] <= epoch
                ]
        utils.log_rank_zero(
            log,
            f"Resumed from {directory} at epoch {self._start_epoch}, visit {self._start_position}",
        )

    # ------------------------------------------------------------------ checkpoints

    def _peft_kwargs(self) -> dict | None:
        c, m = self._checkpointer_config, self._cfg.model
        if not {"num_attention_heads", "num_key_value_heads", "hidden_size"} <= set(c):
            return None
        return dict(
            rank=m.get("lora_rank", 8),
            alpha=m.get("lora_alpha", 16),
            lora_attn_modules=list(m.get("lora_attn_modules", ["q_proj", "v_proj", "output_proj"])),
            apply_lora_to_mlp=m.get("apply_lora_to_mlp", False),
            apply_lora_to_output=m.get("apply_lora_to_output", False),
            num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            dim=c["hidden_size"],
            head_dim=c.get("head_dim"),
            # what peft.AutoPeftModelForCausalLM loads the base from
            base_model_name_or_path=self._settings.peft_base_model
            or str(Path(self._cfg.checkpointer.checkpoint_dir).resolve()),
        )

    def save_checkpoint(
        self, epoch: int, *, epoch_end: bool = False, best: dict | None = None
    ) -> Path:
        """Write ``checkpoints/latest`` (and ``checkpoints/epoch_{epoch}`` at an epoch's end),
        or ``checkpoints/best`` when ``best`` (a validation row) is given."""
        root = self._output_dir / "checkpoints"
        progress = {"epoch": epoch, "visits": self._visits_done, "epoch_end": epoch_end}
        if best is not None:
            progress["validation"] = best
        # every process's RNG state, so a resumed job draws the same noise on every rank
        rng_states = all_gather_objects(rng_state())
        target = root / ("best" if best is not None else "latest")
        if not self._is_rank_zero:
            return target  # adapters and optimizer states are the same on every rank
        kwargs = dict(
            model=self._model,
            method=self._method.name,
            learner_state=self._learner.state_dict(),
            sampler_state=self._sampler.state_dict(),
            progress=progress,
            config=OmegaConf.to_container(self._cfg, resolve=True),
            peft_kwargs=self._peft_kwargs(),
            rng_states=rng_states,
        )
        save_training_checkpoint(target, **kwargs)
        if best is None and epoch_end and self._settings.keep_epoch_checkpoints:
            save_training_checkpoint(root / f"epoch_{epoch}", **kwargs)
        return target

    # ------------------------------------------------------------------ train

    def validate(self, validation_epoch: int, within_epoch: bool = False) -> dict | None:
        """Few-shot validation on the selection tasks' validation parts; keeps the best
        (highest accuracy) adapters in ``checkpoints/best``. Epoch 0 is before training;
        ``validation_epoch`` N is after N epochs. ``within_epoch``: a validation during
        epoch ``validation_epoch`` (0-based), ``validate_every_n_visits``."""
        settings = self._settings.validation
        if settings is None:
            return None
        tasks = self._data.split.selection_tasks
        tasks = tasks[: settings.max_tasks] if settings.max_tasks else tasks
        # processes that hold the whole model split the tasks (a sharded forward instead
        # needs every rank on every task)
        mine = tasks[self._rank :: self._world_size] if self._split_validation else tasks
        rng = torch.get_rng_state()  # validation must not change the training's randomness
        with tqdm(
            total=len(mine) * len(settings.seeds),
            desc=f"validation {validation_epoch}",
            unit="task",
            disable=not self._is_rank_zero,
        ) as bar:
            records = evaluate_tasks(
                self._model,
                self._data,
                mine,
                settings,
                method=self._method,
                progress=bar,
            )
        torch.set_rng_state(rng)
        if self._split_validation:
            records = gather_task_records(records, tasks)
            utils.log_rank_zero(
                log, f"validation: {len(tasks)} tasks spread over {self._world_size} processes"
            )
        summary = summarize(records)
        chosen = summary[f"{self._method.default_variant}@0"]["summary"]
        # a row's epoch: epochs completed when it was taken (within an epoch: that epoch's
        # 0-based index, so a resume that redoes an epoch's end keeps the rows inside it)
        row = {"epoch": validation_epoch, "visits": self._visits_done}
        if within_epoch:
            row["within_epoch"] = True
        row.update({m: chosen[m]["mean"] for m in ("accuracy", "ece", "nll", "brier")})
        # per task, averaged over the support seeds: what a benchmark's SE over tasks needs
        by_seed = summary[f"{self._method.default_variant}@0"]["per_task"].values()
        row["per_task"] = {
            task: {
                m: sum(t[task][m] for t in by_seed) / len(by_seed)
                for m in ("accuracy", "ece", "nll")
            }
            for task in next(iter(by_seed))
        }
        row["variants"] = {
            k: {m: v["summary"][m]["mean"] for m in ("accuracy", "ece")} for k, v in summary.items()
        }
        row = all_gather_objects(row)[0]  # every rank keeps rank 0's (identical) row
        best_before = max((r["accuracy"] for r in self._validation_history), default=None)
        self._validation_history.append(row)
        if self._is_rank_zero:
            atomic_write_text(
                self._output_dir / "validation.jsonl",
                "".join(json.dumps(r) + "\n" for r in self._validation_history),
            )
            self._metric_logger.log_dict(
                {f"val/{m}": row[m] for m in ("accuracy", "ece", "nll", "brier")},
                step=self._visits_done,
            )
        if best_before is None or row["accuracy"] > best_before:
            epoch = validation_epoch if within_epoch else max(validation_epoch - 1, 0)
            self.save_checkpoint(epoch, best=row)
        if self._is_rank_zero:
            when = (
                f"at visit {self._visits_done} (epoch {validation_epoch + 1})"
                if within_epoch
                else f"after epoch {validation_epoch}"
            )
            log.info(f"validation {when}: accuracy {row['accuracy']:.3f}, ECE {row['ece']:.3f}")
        return row

    def train(self) -> None:
        """Meta-train (under torchtune's profiler when the config has one)."""
        if self._profiler is not None:
            self._profiler.start()
        try:
            self._train()
        finally:
            if self._profiler is not None:
                self._profiler.stop()

    def _train(self) -> None:
        s = self._settings
        stop_after = s.stop_after_visits
        if not self._validation_history and self._start_epoch == 0 and self._start_position == 0:
            self.validate(0)
        if self._pending_epoch_end is not None:
            self._finish_epoch(self._pending_epoch_end, tasks_per_second=None)
        if self._validation_stalled():  # a resumed run that had already stopped
            return
        for epoch in range(self._start_epoch, self._epochs):
            start = self._start_position if epoch == self._start_epoch else 0
            progress = tqdm(
                total=len(self._sampler),
                initial=start,
                desc=f"{self._method.name} epoch {epoch + 1}/{self._epochs}",
                unit="task" if self._world_size == 1 else "outer step",
                disable=not self._is_rank_zero,
            )
            busy_seconds, visits = 0.0, 0  # time inside task visits (no checkpoints, no validation)
            for visit in self._sampler.visits(epoch, start):
                every_diag = s.diagnostics_every_n_visits  # the same visits on every rank
                diagnose = bool(every_diag) and self._visits_done % every_diag == 0
                if self._lr_schedule is not None:
                    self._learner.lr_scale = self._lr_schedule[1].param_groups[0]["lr"]
                metrics = self._learner.train_task(visit, diagnose=diagnose)
                if self._lr_schedule is not None:
                    metrics["lr_scale"] = self._learner.lr_scale
                    self._lr_schedule[1].step()  # the stand-in has no gradients: a no-op
                    self._lr_schedule[0].step()
                if self._profiler is not None:
                    self._profiler.step()
                busy_seconds, visits = busy_seconds + metrics["seconds"], visits + 1
                self._visits_done += 1
                self._record_visit(visit)
                progress.update(1)
                progress.set_postfix(nll=f"{metrics['nll']:.3f}")
                if self._is_rank_zero and (diagnose or self._log_due()):
                    self._log(visit, metrics, diagnose)
                every = s.save_every_n_visits
                if (every and self._visits_done % every == 0) or self._visits_done == stop_after:
                    self.save_checkpoint(epoch)
                every_val = s.validate_every_n_visits
                if (
                    every_val
                    and self._visits_done % every_val == 0
                    and self._sampler.resume_point()[1] > 0  # not the epoch's end: it validates
                    and self._visits_done != stop_after
                ):
                    self.validate(epoch, within_epoch=True)
                    if self._validation_stalled():
                        progress.close()
                        self.save_checkpoint(epoch)
                        utils.log_rank_zero(
                            log,
                            f"Stopped at visit {self._visits_done}: validation accuracy has not "
                            f"improved for {s.early_stopping_patience} validations "
                            "(early_stopping_patience)",
                        )
                        return
                if self._visits_done == stop_after:
                    progress.close()
                    utils.log_rank_zero(
                        log,
                        f"Stopped after {stop_after} task visits (stop_after_visits); resume with resume_from_checkpoint=true",
                    )
                    return
            progress.close()
            # every process trains one task per visit: the job's throughput
            tasks_per_second = self._world_size * visits / max(busy_seconds, 1e-9)
            if self._is_rank_zero and visits:
                self._metric_logger.log_dict(
                    {"train/tasks_per_second": tasks_per_second}, step=self._visits_done
                )
            self._finish_epoch(epoch, tasks_per_second)
            if self._validation_stalled():
                utils.log_rank_zero(
                    log,
                    f"Stopped after epoch {epoch + 1}: validation accuracy has not improved for "
                    f"{s.early_stopping_patience} validations (early_stopping_patience)",
                )
                return

    def _log_due(self) -> bool:
        """Log this visit? Every ``log_every_n_visits``, or with torchtune's
        ``log_every_n_steps``, every visit whose gradient steps pass a multiple of it."""
        s = self._settings
        if s.log_every_n_steps is None:
            return self._visits_done % s.log_every_n_visits == 0
        per_visit = self._method.steps_per_visit(s.inner_steps)
        after, before = self._visits_done * per_visit, (self._visits_done - 1) * per_visit
        return after // s.log_every_n_steps > before // s.log_every_n_steps

    def _validation_stalled(self) -> bool:
        """True when the last ``early_stopping_patience`` validations all failed to beat the
        best one before them (the same rows on every rank)."""
        patience = self._settings.early_stopping_patience
        history = self._validation_history
        if not patience or len(history) <= patience:
            return False
        best_before = max(r["accuracy"] for r in history[:-patience])
        return all(r["accuracy"] <= best_before for r in history[-patience:])

    def _finish_epoch(self, epoch: int, tasks_per_second: float | None) -> None:
        """The epoch-end work: validation, then ``latest`` and ``epoch_{epoch}`` marked done."""
        self.validate(epoch + 1)
        latest = self.save_checkpoint(epoch, epoch_end=True)
        speed = f" ({tasks_per_second:.2f} tasks/s)" if tasks_per_second is not None else ""
        utils.log_rank_zero(log, f"Epoch {epoch + 1} done{speed}; checkpoint in {latest}")

    def _record_visit(self, visit) -> None:
        """Append the visit to ``logs/task_visits_rank{rank}.jsonl``: which task each
        process trained on, visit by visit (the trail a task-parallel run is audited by)."""
        path = self._output_dir / "logs" / f"task_visits_rank{self._rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"visit": self._visits_done, "epoch": visit.epoch, "position": visit.position}
        with open(path, "a") as f:
            f.write(json.dumps({**row, "task": visit.task}) + "\n")

    def _log(self, visit, metrics: dict, diagnose: bool) -> None:
        out = {k: v for k, v in metrics.items() if k != "seconds"}
        out[f"nll/{visit.task}"] = metrics["nll"]
        out["epoch"] = visit.epoch
        for group in self._learner.inner_optimizer.param_groups:
            out[f"lr/inner_{group.get('name', 'all')}"] = group["lr"]
        if diagnose:  # the method's summaries pass over every adapted weight: not every visit
            out.update(self._method.log_metrics(self._model))
        if self._settings.log_peak_memory_stats:
            if self._device.type == "cuda":
                out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self._device) / 2**30
            else:  # training.get_memory_stats does not work on the CPU: peak RSS
                out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self._metric_logger.log_dict(out, step=self._visits_done)

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        self.release_output_dir()

    def release_output_dir(self, *, failed_setup: bool = False) -> None:
        """Drop the run lock; after a failed setup, also the directory the run created."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if failed_setup and self._created_output_dir:
                try:
                    self._output_dir.rmdir()  # only if nothing else was written
                except OSError:
                    pass


def run(
    cfg: DictConfig,
    recipe_name: str | None = None,
    recipe_class: type[MetaLearningRecipeSingleDevice] = MetaLearningRecipeSingleDevice,
) -> None:
    """Run the recipe; bad input ends the process with one message and status 2."""
    config.log_config(recipe_name=recipe_name or recipe_class.__name__, cfg=cfg)
    start = time.perf_counter()
    recipe = None
    try:
        recipe = recipe_class(cfg=cfg)
        recipe.setup(cfg=cfg)
    except (RecipeConfigError, CheckpointError, DataError, ConfigError, RunDirError) as err:
        if recipe is not None:
            recipe.release_output_dir(failed_setup=True)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        if recipe is not None:
            recipe.release_output_dir(failed_setup=True)
        raise
    try:
        recipe.train()
    except Exception as err:
        recipe.release_output_dir()
        if is_disk_full(err):
            latest = Path(cfg.output_dir) / "checkpoints" / "latest"
            intact = (
                f"the last complete checkpoint {latest} is intact (resume with "
                "resume_from_checkpoint=true once there is space)"
                if checkpoint_exists(latest)
                else "no checkpoint was complete yet"
            )
            tqdm.write(  # on its own line, below any progress bar
                f"error: no space left on device while writing under {cfg.output_dir}; {intact}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        if recipe._world_size > 1:  # torchrun stops the other ranks and reports this one
            log.error(
                f"rank {recipe._rank} of {recipe._world_size} failed ({type(err).__name__}: {err}); "
                "the job stops"
            )
        raise
    except BaseException:
        recipe.release_output_dir()
        raise
    recipe.cleanup()
    if recipe._is_rank_zero:
        out = Path(cfg.output_dir)
        print(
            f"done in {time.perf_counter() - start:.0f} s: checkpoint {out / 'checkpoints' / 'latest'} "
            f"(PEFT adapter in its adapter/), logs in {out / 'logs'}"
        )


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
