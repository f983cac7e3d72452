"""One decoder layer of a sized model: its attention shapes, a small MLP and vocabulary,
random frozen weights. For measurements that depend on an adapted layer's shape and
scale only, such as the KL's pull after one inner step
(:func:`abmll_tune.methods.abmll.kl_pull_after_one_step`), without the model's weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from abmll_tune.models._builders import abmll_llama3, abmll_qwen2
from abmll_tune.modules import VariationalLoRALinear

# a sized builder's component path -> (the generic builder, the attention shapes it uses)
ONE_LAYER_SHAPES: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "abmll_tune.models.abmll_llama3_8b": (abmll_llama3, dict(num_heads=32, num_kv_heads=8, embed_dim=4096)),
    "abmll_tune.models.abmll_qwen2_7b": (abmll_qwen2, dict(num_heads=28, num_kv_heads=4, embed_dim=3584)),
    "abmll_tune.models.abmll_llama3_70b": (abmll_llama3, dict(num_heads=64, num_kv_heads=8, embed_dim=8192)),
    "abmll_tune.models.smollm2.abmll_smollm2_135m": (abmll_llama3, dict(num_heads=9, num_kv_heads=3, embed_dim=576)),
}  # fmt: skip
VOCAB = 256


def one_layer_model(
    component: str,
    adapters: dict,
    *,
    adapted: Sequence[str] = ("q_proj",),
    w0_std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """One layer shaped as ``component``'s, vocabulary 256, MLP width 256, frozen weights
    drawn from N(0, ``w0_std``^2) (about a pretrained Llama's projection RMS), ABMLL
    adapters with ``adapters`` (a config's model keys: rank, alpha, the std's settings) at
    ``adapted`` projections, initialised as training starts."""
    if component not in ONE_LAYER_SHAPES:
        raise ValueError(f"no one-layer shape for {component}; known: {sorted(ONE_LAYER_SHAPES)}")
    builder, arch = ONE_LAYER_SHAPES[component]
    torch.manual_seed(seed)
    model = builder(
        vocab_size=VOCAB, num_layers=1, intermediate_dim=256, max_seq_len=64, **arch,
        lora_attn_modules=list(adapted), **adapters,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dim() == 2:
                p.normal_(0.0, w0_std)
    for module in model.modules():
        if isinstance(module, VariationalLoRALinear):
            module.initialize_parameters()
    return model
