"""Building a config's model from a base checkpoint: the one place every recipe uses.

:func:`build_model` instantiates the config's model builder, loads the frozen base
weights through the config's torchtune checkpointer, validates the base keys against the
adapted layers, (re)initialises the adapters from the seed, and applies activation
checkpointing, FSDP2 sharding of the frozen base (task-parallel recipes) and
``torch.compile``, in the order torchtune's recipes apply them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from abmll_tune.checkpointing import CheckpointError
from abmll_tune.modules import keep_adapters_in, variational_lora_layers

ATTENTION_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "output_proj"}


def _validate_base_keys(model: nn.Module, missing, unexpected) -> None:
    """torchtune's LoRA check of the loaded base keys, with the adapted layers as built
    (a builder's defaults included), not as the config spells them."""
    from torchtune.modules.peft import validate_missing_and_unexpected_for_lora

    adapted = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if hasattr(module, "adapter_params")
    }
    validate_missing_and_unexpected_for_lora(
        lora_attn_modules=sorted(adapted & ATTENTION_PROJECTIONS),
        apply_lora_to_mlp=bool(adapted & {"w1", "w2", "w3"}),
        apply_lora_to_output="output" in adapted,
        base_missing=missing,
        base_unexpected=unexpected,
    )


def init_adapters(model: nn.Module, seed: int) -> None:
    """(Re)initialise every adapter from ``seed`` alone, then seed the training's own
    random stream: a model built on the meta device or on the CPU, on any rank, starts
    from the same adapters and draws the same noise."""
    from torchtune import training

    torch.manual_seed(seed)
    for layer in variational_lora_layers(model).values():
        layer.initialize_parameters()
    training.set_seed(seed=seed)


def build_model(
    model_cfg,
    checkpointer_cfg,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    shard: Callable[[nn.Module], None] | None = None,
    cpu_offload: bool = False,
    adapter_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, dict]:
    """The config's model with the checkpoint's base weights; returns ``(model, hf_config)``.

    ``seed``: re-initialise the adapters from it (:func:`init_adapters`; None keeps the
    builder's initialisation). ``shard``: build on the meta device and call
    ``shard(model)`` before any weight is materialised, so no process ever holds the
    whole base on its device (``abmll_tune.distributed.shard_frozen_base``). A
    checkpoint that does not fit the model raises :class:`CheckpointError` naming the
    checkpoint directory; missing or unexpected base keys fail torchtune's own check.
    ``adapter_dtype``: store the adapter weights in it (float32 under a bf16 base,
    :func:`abmll_tune.modules.keep_adapters_in`); None: the model's dtype.
    """
    from torchtune import config, modules, training

    checkpointer = config.instantiate(checkpointer_cfg)
    base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    hf_config = getattr(checkpointer, "_config", {})

    def checkpoint_activations(model: nn.Module) -> None:
        if activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )

    if shard is None:
        with training.set_default_dtype(dtype), device:
            model = config.instantiate(model_cfg)
        try:
            missing, unexpected = model.load_state_dict(base_state, strict=False)
        except RuntimeError as err:
            raise CheckpointError(
                f"{checkpointer_cfg.checkpoint_dir}: the checkpoint does not fit model "
                f"{model_cfg._component_} ({str(err).splitlines()[-1].strip()}); use the builder "
                "and architecture arguments of the model the checkpoint holds"
            ) from None
        _validate_base_keys(model, missing, unexpected)
        if seed is not None:
            init_adapters(model, seed)
        checkpoint_activations(model)
    else:
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = config.instantiate(model_cfg)
        layers = variational_lora_layers(model)
        for prefix, layer in layers.items():  # the prior's prior_mu_var: pretrained, from W0
            layer.pin_pretrained_weight_variance(
                layer.weight_variance_of(base_state[f"{prefix}.weight"])
            )
        checkpoint_activations(model)
        shard(model)
        with training.set_default_dtype(dtype), device:
            adapted = {id(layer) for layer in layers.values()}
            for module in model.modules():
                if id(module) in adapted:
                    module.to_empty(device=device)  # the adapters only
                if hasattr(module, "rope_init"):
                    module.rope_init()
        if seed is not None:
            init_adapters(model, seed)
        missing, unexpected = training.load_from_full_model_state_dict(
            model, base_state, device, strict=False, cpu_offload=cpu_offload
        )
        _validate_base_keys(model, missing, unexpected)
    if adapter_dtype is not None:
        keep_adapters_in(model, adapter_dtype)
    if compile:
        # the base is frozen: its variance (the prior's pretrained scale) is read once here,
        # not in the compiled forward, where the float() would break the graph every call
        for layer in variational_lora_layers(model).values():
            if not layer.weight_variance_pinned:  # a sharded build pinned it from the checkpoint
                layer.pin_pretrained_weight_variance()
        training.compile_model(model)
    return model, hf_config
