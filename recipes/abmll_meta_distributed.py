"""Task-parallel meta-training on several processes: ABMLL and Reptile.

    tune run --nproc_per_node 8 recipes/abmll_meta_distributed --config configs/llama3_8b_cls45_8gpu.yaml
    tune run --nproc_per_node 2 recipes/abmll_meta_distributed --config configs/tiny_cpu_abmll_distributed.yaml

The single-device recipe (``recipes/abmll_meta_single_device.py``) with four changes,
in the style of torchtune's ``lora_finetune_distributed``:

1. the process group (NCCL on GPUs, gloo on the CPU) with a bounded collective
   timeout (``collective_timeout_s``), one device per process;
2. the model is built on the meta device, FSDP2 shards the frozen base per decoder
   layer, and the base weights are loaded into the shards
   (torchtune's ``load_from_full_model_state_dict``); the adapters stay plain replicated
   tensors (:func:`abmll_tune.distributed.shard_frozen_base`), initialised from the seed
   as on one device and broadcast from rank 0. ``shard_base: false`` instead keeps the
   whole frozen model on every process (when it fits): then a task visit needs no
   collective at all, only the outer step's all-reduces;
3. each rank visits different tasks (:class:`abmll_tune.distributed.DistributedTaskSampler`),
   runs its inner loop alone, and the outer step averages the ranks' deltas and
   gradients (:func:`abmll_tune.distributed.all_reduce_mean_`): N processes = N tasks
   per outer step. ``--nproc_per_node 1`` reproduces the single-device run exactly;
4. rank 0 logs and writes the checkpoints (the adapters are replicated, so nothing is
   gathered but every rank's RNG state); validation spreads its tasks over the ranks
   with a replicated base, and runs on every rank in lockstep with a sharded one (the
   sharded forward needs all of them); rank 0 records it.

``stop_after_visits``, ``save_every_n_visits`` and ``log_every_n_visits`` count outer
steps (one task per rank each). Meta-learned methods (ABMLL, Reptile); Regular and
Structured LoRA have no outer step to parallelise (use torchtune's
``lora_finetune_distributed``).
"""

from __future__ import annotations

import sys
from functools import partial

from abmll_tune.recipes.abmll_meta_single_device import MetaLearningRecipeSingleDevice, run
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, utils

from abmll_tune import distributed
from abmll_tune.models.loading import build_model
from abmll_tune.recipe_config import RecipeConfigError

log = utils.get_logger("INFO")


class MetaLearningRecipeDistributed(MetaLearningRecipeSingleDevice):
    """Task-parallel ABMLL and Reptile (see the module docstring)."""

    def _init_processes(self) -> tuple[int, int]:
        s = self._settings
        problems = []
        if not self._method.meta_learned:
            problems.append(
                f"method: {self._method.name!r} has no outer step to run task-parallel; the "
                "distributed recipe trains meta-learned methods such as abmll and reptile "
                "(use torchtune's lora_finetune_distributed for plain LoRA)"
            )
        if self._method.keeps_state_across_tasks:
            problems.append(
                "local_init: persistent / inner_optimizer_reset: never keep per-rank state "
                "across tasks, which a rank-0 checkpoint cannot hold: use local_init: global "
                "and inner_optimizer_reset: per_task"
            )
        if problems:
            raise RecipeConfigError(problems)
        world_size, rank = distributed.init_process_group(self._device, s.collective_timeout_s)
        utils.log_rank_zero(
            log, f"{world_size} processes, one task each per outer step ({self._device.type})"
        )
        self._split_validation = not s.shard_base
        return world_size, rank

    def _reduce_mean(self):
        return distributed.all_reduce_mean_

    def _setup_model(self, cfg: DictConfig):
        """With ``shard_base``: build on the meta device, shard, then load, so no process
        ever holds the whole base model on its device. Every process reads the checkpoint
        into host memory, as torchtune's distributed recipes do (with only rank 0 reading,
        torch 2.13 leaves the root's parameters of the other ranks on the meta device)."""
        s = self._settings
        shard = None
        if s.shard_base:
            shard = partial(
                distributed.shard_frozen_base,
                device=self._device,
                cpu_offload=s.fsdp_cpu_offload,
                reshard_after_forward=s.fsdp_reshard_after_forward,
            )
        model, self._checkpointer_config = build_model(
            cfg.model,
            cfg.checkpointer,
            device=self._device,
            dtype=self._dtype,
            seed=s.seed,  # adapters from the seed alone, as on one device
            activation_checkpointing=s.enable_activation_checkpointing,
            compile=s.compile,
            shard=shard,
            cpu_offload=s.fsdp_cpu_offload,
            adapter_dtype=self._adapter_dtype(),
        )
        distributed.broadcast_global_adapters_(model)  # and guaranteed equal on every rank
        return model

    def _setup_sampler(self, cfg: DictConfig):
        sampler = distributed.DistributedTaskSampler(
            super()._setup_sampler(cfg), rank=self._rank, world_size=self._world_size
        )
        if sampler.dropped_per_epoch:
            utils.log_rank_zero(
                log,
                f"{len(sampler.sampler)} tasks over {self._world_size} processes: "
                f"{len(sampler)} outer steps per epoch, the last {sampler.dropped_per_epoch} "
                "positions of each epoch's (reshuffled) plan are not visited",
            )
        return sampler

    def cleanup(self) -> None:
        super().cleanup()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@record  # torchrun reports a failing rank's traceback and stops the other ranks
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg, recipe_class=MetaLearningRecipeDistributed)


if __name__ == "__main__":
    sys.exit(recipe_main())
