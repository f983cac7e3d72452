"""Task-parallel meta-training on ``torch.distributed`` (``tune run --nproc_per_node N``).

Each rank runs the inner loop of a *different* task at the same time; the outer step
averages the ranks' contributions with an all-reduce, so one outer step processes N
tasks (the effective outer batch is N tasks; see docs/distributed.md):

* :class:`DistributedTaskSampler`: rank r takes positions r, r + N, r + 2N, ... of the
  single-device sampler's epoch plan (so no task is visited twice per epoch across
  ranks under ``task_sampling: uniform``), the same number of visits on every rank;
* :func:`all_reduce_mean_`: the hook :class:`abmll_tune.meta.MetaLearner` calls on
  the outer step's deltas (local - global) and on the global adapters' gradients;
* :func:`shard_frozen_base`: FSDP2 (``fully_shard``) shards the frozen base weights
  per decoder layer, as torchtune's ``lora_finetune_distributed`` does, while every
  adapter stays a plain replicated tensor: the local adapters differ between ranks by
  design (each rank adapts to its own task), and the global ones are kept identical
  by the all-reduced outer step, so no collective ever touches an inner step.

With one process the sampler and the reduction are the identity: ``--nproc_per_node 1``
reproduces the single-device recipe exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from abmll_tune.data.loader import MetaTaskSampler, TaskVisit
from abmll_tune.modules import adapter_params_by_group


def world_size_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def launched_by_torchrun() -> bool:
    """True when torchrun (``tune run --nproc_per_node``) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_process_group(device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Join the job's process group (gloo on the CPU, NCCL on GPUs); returns (world, rank).

    ``timeout_s`` bounds every collective: a rank whose peer died stops with an error
    after that long instead of hanging (torchrun also stops the surviving ranks as soon
    as one fails)."""
    from torchtune.training import get_distributed_backend

    if not launched_by_torchrun():
        raise RuntimeError(
            "the distributed recipe needs torchrun's environment (RANK, WORLD_SIZE, "
            "MASTER_ADDR, MASTER_PORT): launch it with `tune run --nproc_per_node N ...`"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend=get_distributed_backend(device.type),
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_world_size(), dist.get_rank()


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over the ranks, in place, with one flat all-reduce.

    Summed in float32 (or wider), so bf16 adapters lose nothing to the reduction."""
    world, _ = world_size_and_rank()
    if world == 1 or not tensors:
        return
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_global_adapters_(model: nn.Module) -> None:
    """Make every rank start from rank 0's global adapters (torchtune seeds rank r with
    seed + r, so the ranks initialise their adapters differently)."""
    if world_size_and_rank()[0] == 1:
        return
    with torch.no_grad():
        for p in adapter_params_by_group(model, "global").values():
            dist.broadcast(p.data, src=0)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (small, picklable values between this job's
    own processes: task names, metrics, RNG states)."""
    world, _ = world_size_and_rank()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_task_records(records: list[dict], tasks: Sequence[str]) -> list[dict]:
    """Every rank's evaluation records (each rank evaluated ``tasks[rank::N]``), in the
    order one process would have produced them: by task, then as each rank ran them."""
    if world_size_and_rank()[0] == 1:
        return records
    order = {task: i for i, task in enumerate(tasks)}
    gathered = [r for share in all_gather_objects(records) for r in share]
    return sorted(gathered, key=lambda r: order[r["task"]])


def shard_frozen_base(
    model: nn.Module,
    device: torch.device,
    *,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2-shard the frozen base weights of each decoder layer (and the root), keeping
    every adapter parameter out of FSDP (replicated, updated only by this project's code).

    Works on a model built on the meta device (then load the base weights with torchtune's
    ``training.load_from_full_model_state_dict``). Pin each layer's W0 variance first
    (``pin_pretrained_weight_variance``): after sharding no rank holds a whole W0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torchtune.modules import TransformerSelfAttentionLayer

    ignored = set(adapter_params_by_group(model).values())
    kwargs = dict(
        mesh=init_device_mesh(device.type, (dist.get_world_size(),)),
        reshard_after_forward=reshard_after_forward,
        ignored_params=ignored,
    )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    sharded = 0
    for _, module in reversed(list(model.named_modules())):
        if isinstance(module, TransformerSelfAttentionLayer):
            fully_shard(module, **kwargs)
            sharded += 1
    if sharded == 0:
        raise ValueError(
            "no TransformerSelfAttentionLayer to shard: build the model with abmll_tune.models"
        )
    fully_shard(model, **kwargs)


class DistributedTaskSampler:
    """Rank ``rank``'s share of a :class:`MetaTaskSampler`'s epochs.

    Outer step s of an epoch is the plan's positions s*N ... s*N + N - 1, one per rank;
    ``len(self)`` outer steps per epoch (the last ``len(plan) % N`` positions of each
    epoch are not visited, so every rank takes the same number of steps). A visit is a
    pure function of (seed, epoch, position), as on one device; ``state_dict`` stores the
    outer steps done and the world size, which a resume must keep.
    """

    def __init__(self, sampler: MetaTaskSampler, *, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if len(sampler) < world_size:
            raise ValueError(
                f"{len(sampler)} training tasks cannot feed {world_size} ranks one task each per "
                "outer step: use fewer processes or more tasks"
            )
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.epoch, self.position = 0, 0  # position: outer steps done in this epoch

    def __len__(self) -> int:
        """Outer steps (visits per rank) per epoch."""
        return len(self.sampler) // self.world_size

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.sampler) % self.world_size

    def plan_position(self, step: int) -> int:
        return step * self.world_size + self.rank

    def visits(self, epoch: int, start: int = 0) -> Iterator[TaskVisit]:
        plan = self.sampler.epoch_plan(epoch)
        for step in range(start, len(self)):
            position = self.plan_position(step)
            visit = self.sampler.visit(epoch, position, plan[position])
            self.epoch, self.position = epoch, step + 1
            yield visit

    def resume_point(self) -> tuple[int, int]:
        if self.position >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.position

    def state_dict(self) -> dict:
        inner = self.sampler.state_dict()
        inner.update(epoch=self.epoch, position=self.position, world_size=self.world_size)
        return inner

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size', 1)} processes, this run "
                f"has {self.world_size}: resume with the same --nproc_per_node (the task order "
                "depends on it)"
            )
        self.sampler.load_state_dict({k: v for k, v in state.items() if k != "world_size"})
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
