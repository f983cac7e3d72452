"""Adapter modules: the variational LoRA layer and the Gaussian math behind it."""

from abmll_tune.modules.gaussian import (
    STD_PARAMS,
    kl_diag_gaussians,
    local_reparam_noise,
    neg_log_prior,
    output_variance,
    weight_space_noise,
)
from abmll_tune.modules.variational_lora import (
    ADAPTER_MODES,
    DEFAULT_SIGMA_FLOOR,
    SAMPLING,
    VariationalLoRALinear,
    adapter_mode,
    adapter_param_groups,
    adapter_params_by_group,
    kl_local_global,
    neg_log_prior_global,
    reset_local_from_global,
    set_adapter_mode,
    set_trainable_scope,
    sigma_summary,
    variational_lora_layers,
)

__all__ = [
    "ADAPTER_MODES",
    "DEFAULT_SIGMA_FLOOR",
    "SAMPLING",
    "STD_PARAMS",
    "VariationalLoRALinear",
    "adapter_mode",
    "adapter_param_groups",
    "adapter_params_by_group",
    "kl_diag_gaussians",
    "kl_local_global",
    "local_reparam_noise",
    "neg_log_prior",
    "neg_log_prior_global",
    "output_variance",
    "reset_local_from_global",
    "set_adapter_mode",
    "set_trainable_scope",
    "sigma_summary",
    "variational_lora_layers",
    "weight_space_noise",
]
