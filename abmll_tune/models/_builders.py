"""ABMLL model builders: torchtune's own decoders with ``VariationalLoRALinear`` swapped in.

Approach: build the stock torchtune model (``llama3_8b()``, ``qwen2(...)``, ...), then
replace the chosen ``nn.Linear`` children (attention projections, MLP, output) by
``VariationalLoRALinear.from_linear``, which reuses the linear's own ``weight`` and
``bias`` tensors. Nothing in torchtune is patched and no global state changes, so
every decoder family torchtune builds can be adapted, and HF checkpoints load
through torchtune's checkpointers with the usual keys (``layers.0.attn.q_proj.weight``).
Build the paper-size models on the meta device (``with torch.device("meta")``) or
directly on the GPU: the swap allocates only the adapters.

Every builder accepts torchtune's LoRA argument names (``lora_attn_modules``,
``apply_lora_to_mlp``, ``apply_lora_to_output``, ``lora_rank``, ``lora_alpha``,
``lora_dropout``, ``quantize_base``) plus the ABMLL options of
:class:`~abmll_tune.modules.VariationalLoRALinear` (``std_param``, ``sampling``,
``sigma_floor``, ``sigma_floor_w0_fraction``, ``variational``, ``std_b_init_std``, ``std_scale_row``, ``chunk_elements``, ``kl_dtype``, ``kl_kernel``).
Everything except the adapters is frozen.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn
from torchtune.models.llama3 import llama3, llama3_8b, llama3_70b
from torchtune.models.llama3_1 import llama3_1, llama3_1_8b, llama3_1_70b
from torchtune.models.llama3_2 import llama3_2, llama3_2_1b, llama3_2_3b
from torchtune.models.qwen2 import qwen2, qwen2_0_5b, qwen2_1_5b, qwen2_7b
from torchtune.models.qwen2_5 import (
    qwen2_5_0_5b,
    qwen2_5_1_5b_base,
    qwen2_5_3b,
    qwen2_5_7b_base,
    qwen2_5_14b_base,
)
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from abmll_tune.modules.variational_lora import VariationalLoRALinear

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP_MODULES = ("w1", "w2", "w3")
# The paper's targets: q, v and output projections of every attention block, rank 8, alpha 16.
DEFAULT_LORA_ATTN_MODULES = ("q_proj", "v_proj", "output_proj")


def apply_variational_lora(
    model: TransformerDecoder,
    lora_attn_modules: Sequence[str] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    **abmll_kwargs,
) -> TransformerDecoder:
    """Swap ``VariationalLoRALinear`` into ``model`` in place, freeze the rest, return it.

    Args:
        model: a torchtune ``TransformerDecoder`` (any family with ``layers[i].attn``
            projections and ``layers[i].mlp.w1/w2/w3``).
        lora_attn_modules: attention projections to adapt, a subset of
            ``q_proj, k_proj, v_proj, output_proj``.
        apply_lora_to_mlp: adapt the MLP's w1, w2, w3.
        apply_lora_to_output: adapt the final projection (not possible with tied embeddings).
        lora_rank, lora_alpha, lora_dropout, quantize_base: as in torchtune's LoRA builders.
        **abmll_kwargs: ``std_param``, ``sampling``, ``sigma_floor``,
            ``sigma_floor_w0_fraction``, ``variational``,
            ``std_b_init_std``, ``std_scale_row``, ``chunk_elements``, ``kl_dtype``, ``kl_kernel`` of
            ``VariationalLoRALinear``.
    """
    unknown = sorted(set(lora_attn_modules) - set(LORA_ATTN_MODULES))
    if unknown:
        raise ValueError(
            f"lora_attn_modules has unknown entries {unknown}; choose from {list(LORA_ATTN_MODULES)}"
        )
    if not lora_attn_modules and not apply_lora_to_mlp and not apply_lora_to_output:
        raise ValueError(
            "no adapter targets: give lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output"
        )

    def swap(parent: nn.Module, child: str, qualified: str) -> None:
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"{qualified} is a {type(linear).__name__}, not an nn.Linear: it cannot carry an adapter"
            )
        layer = VariationalLoRALinear.from_linear(
            linear, lora_rank, lora_alpha, lora_dropout, quantize_base, **abmll_kwargs
        )
        layer.layer_name = qualified
        setattr(parent, child, layer)

    for i, block in enumerate(model.layers):
        for name in lora_attn_modules:
            swap(block.attn, name, f"layers.{i}.attn.{name}")
        if apply_lora_to_mlp:
            for name in MLP_MODULES:
                swap(block.mlp, name, f"layers.{i}.mlp.{name}")
    if apply_lora_to_output:
        if not isinstance(model.output, nn.Linear):
            raise ValueError(
                "apply_lora_to_output=True, but the output projection is a "
                f"{type(model.output).__name__} (tied word embeddings): set it to False"
            )
        swap(model, "output", "output")
    set_trainable_params(model, get_adapter_params(model))
    return model


def _adapted(
    base: TransformerDecoder,
    lora_attn_modules,
    apply_lora_to_mlp,
    apply_lora_to_output,
    adapter_kwargs,
):
    return apply_variational_lora(
        base, list(lora_attn_modules), apply_lora_to_mlp, apply_lora_to_output, **adapter_kwargs
    )


# ------------------------------------------------------------------ component builders
# Each takes the family's architecture arguments (any size, tiny test models included)
# plus the adapter arguments of ``apply_variational_lora``.

_ADAPTER_ARGS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "quantize_base",
    "std_param",
    "sampling",
    "sigma_floor",
    "sigma_floor_w0_fraction",
    "variational",
    "std_b_init_std",
    "std_scale_row",
    "chunk_elements",
    "kl_dtype",
    "kl_kernel",
)


def _split(kwargs: dict) -> tuple[dict, dict]:
    adapter = {k: kwargs.pop(k) for k in list(kwargs) if k in _ADAPTER_ARGS}
    return adapter, kwargs


def _component(base_fn: Callable[..., TransformerDecoder]) -> Callable[..., TransformerDecoder]:
    def builder(
        lora_attn_modules: Sequence[str] = DEFAULT_LORA_ATTN_MODULES,
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        **kwargs,
    ) -> TransformerDecoder:
        adapter_kwargs, arch_kwargs = _split(dict(kwargs))
        return _adapted(
            base_fn(**arch_kwargs),
            lora_attn_modules,
            apply_lora_to_mlp,
            apply_lora_to_output,
            adapter_kwargs,
        )

    builder.__name__ = f"abmll_{base_fn.__name__}"
    builder.__qualname__ = builder.__name__
    # what **kwargs takes, for the config check before anything is built
    builder.accepted_kwargs = tuple(inspect.signature(base_fn).parameters) + _ADAPTER_ARGS
    builder.__doc__ = (
        f"ABMLL variant of torchtune's ``{base_fn.__module__.split('._')[0]}.{base_fn.__name__}``.\n\n"
        "Architecture keyword arguments go to torchtune's builder unchanged; the adapter\n"
        "arguments (lora_rank, lora_alpha, lora_dropout, quantize_base and the ABMLL options)\n"
        "go to :func:`apply_variational_lora`."
    )
    return builder


def _sized(base_fn: Callable[[], TransformerDecoder]) -> Callable[..., TransformerDecoder]:
    def builder(
        lora_attn_modules: Sequence[str] = DEFAULT_LORA_ATTN_MODULES,
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        **adapter_kwargs,
    ) -> TransformerDecoder:
        unknown = sorted(set(adapter_kwargs) - set(_ADAPTER_ARGS))
        if unknown:
            raise TypeError(f"abmll_{base_fn.__name__}() got unexpected arguments {unknown}")
        return _adapted(
            base_fn(), lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, adapter_kwargs
        )

    builder.__name__ = f"abmll_{base_fn.__name__}"
    builder.__qualname__ = builder.__name__
    builder.accepted_kwargs = _ADAPTER_ARGS
    builder.__doc__ = (
        f"torchtune's ``{base_fn.__name__}()`` with ABMLL adapters (default: q, v, output\n"
        "projections, rank 8, alpha 16, softabs std, local reparameterization).\n"
        "Keyword arguments: see :func:`apply_variational_lora`."
    )
    return builder


abmll_llama3 = _component(llama3)
abmll_llama3_1 = _component(llama3_1)
abmll_llama3_2 = _component(llama3_2)
abmll_qwen2 = _component(qwen2)

# The paper's models.
abmll_llama3_8b = _sized(llama3_8b)
abmll_qwen2_7b = _sized(qwen2_7b)
# Other sizes torchtune has.
abmll_llama3_70b = _sized(llama3_70b)
abmll_llama3_1_8b = _sized(llama3_1_8b)
abmll_llama3_1_70b = _sized(llama3_1_70b)
abmll_llama3_2_1b = _sized(llama3_2_1b)
abmll_llama3_2_3b = _sized(llama3_2_3b)
abmll_qwen2_0_5b = _sized(qwen2_0_5b)
abmll_qwen2_1_5b = _sized(qwen2_1_5b)
abmll_qwen2_5_0_5b = _sized(qwen2_5_0_5b)
abmll_qwen2_5_1_5b = _sized(qwen2_5_1_5b_base)
abmll_qwen2_5_3b = _sized(qwen2_5_3b)
abmll_qwen2_5_7b = _sized(qwen2_5_7b_base)
abmll_qwen2_5_14b = _sized(qwen2_5_14b_base)
