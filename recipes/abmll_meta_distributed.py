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
steps (one task per rank each). ``method: abmll`` or ``reptile``; Regular and Structured
LoRA have no outer step to parallelise (use torchtune's ``lora_finetune_distributed``).
"""

from __future__ import annotations

import sys

import torch
from abmll_tune.recipes.abmll_meta_single_device import MetaLearningRecipeSingleDevice, run
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, modules, training, utils
from torchtune.modules.peft import validate_missing_and_unexpected_for_lora

from abmll_tune import distributed
from abmll_tune.modules import variational_lora_layers
from abmll_tune.recipe_config import RecipeConfigError

log = utils.get_logger("INFO")


class MetaLearningRecipeDistributed(MetaLearningRecipeSingleDevice):
    """Task-parallel ABMLL and Reptile (see the module docstring)."""

    def _init_processes(self) -> tuple[int, int]:
        s = self._settings
        problems = []
        if self._meta.method not in ("abmll", "reptile"):
            problems.append(
                f"method: {self._meta.method!r} has no outer step to run task-parallel; the "
                "distributed recipe trains abmll and reptile (use torchtune's "
                "lora_finetune_distributed for plain LoRA)"
            )
        if self._meta.local_init == "persistent" or not self._meta.reset_inner_optimizer:
            problems.append(
                "local_init: persistent / inner_optimizer_reset: never keep per-rank state "
                "across tasks, which a rank-0 checkpoint cannot hold: use local_init: global "
                "and inner_optimizer_reset: per_task"
            )
        if problems:
            raise RecipeConfigError(problems)
        world_size, rank = distributed.init_process_group(self._device, s["collective_timeout_s"])
        utils.log_rank_zero(
            log, f"{world_size} processes, one task each per outer step ({self._device.type})"
        )
        self._split_validation = not s["shard_base"]
        return world_size, rank

    def _reduce_mean(self):
        return distributed.all_reduce_mean_

    def _setup_model(self, cfg: DictConfig):
        """Build on the meta device, shard, then load: no process ever holds the whole base
        model on its device. Every process reads the checkpoint into host memory, as
        torchtune's distributed recipes do (with only rank 0 reading, torch 2.13 leaves the
        root's parameters of the other ranks on the meta device)."""
        s = self._settings
        if not s["shard_base"]:  # the whole frozen model on every process: no collective in a visit
            model = super()._setup_model(cfg)
            distributed.broadcast_global_adapters_(model)
            return model
        checkpointer = config.instantiate(cfg.checkpointer)
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._checkpointer_config = getattr(checkpointer, "_config", {})
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        layers = variational_lora_layers(model)
        for prefix, layer in layers.items():  # the prior's prior_mu_var: pretrained, from W0
            layer.pin_pretrained_weight_variance(
                layer.weight_variance_of(state[f"{prefix}.weight"])
            )
        if s["enable_activation_checkpointing"]:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        distributed.shard_frozen_base(
            model,
            self._device,
            cpu_offload=s["fsdp_cpu_offload"],
            reshard_after_forward=s["fsdp_reshard_after_forward"],
        )
        with training.set_default_dtype(self._dtype), self._device:
            adapted = {id(layer) for layer in layers.values()}
            for module in model.modules():
                if id(module) in adapted:
                    module.to_empty(device=self._device)  # the adapters only
                if hasattr(module, "rope_init"):
                    module.rope_init()
        self._init_adapters(model)  # from the seed alone, as on one device
        distributed.broadcast_global_adapters_(model)  # and guaranteed equal on every rank
        missing, unexpected = training.load_from_full_model_state_dict(
            model, state, self._device, strict=False, cpu_offload=s["fsdp_cpu_offload"]
        )
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=list(cfg.model.get("lora_attn_modules", [])),
            apply_lora_to_mlp=cfg.model.get("apply_lora_to_mlp", False),
            apply_lora_to_output=cfg.model.get("apply_lora_to_output", False),
            base_missing=missing,
            base_unexpected=unexpected,
        )
        if s["compile"]:
            training.compile_model(model)
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
