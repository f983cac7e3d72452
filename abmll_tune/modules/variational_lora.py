"""``VariationalLoRALinear``: a drop-in for torchtune's ``LoRALinear`` carrying ABMLL's
global and task-specific Gaussians over the adapted weight (arXiv 2508.14285, Sec. 3).

The layer keeps torchtune's frozen base as the direct parameters ``weight`` and
``bias`` (so HF checkpoints converted by torchtune load unchanged) and adds four
LoRA pairs, all named ``lora_*`` so torchtune's adapter utilities see them:

===========================  =======================================================
``lora_global_mean_{a,b}``   mu_theta    = s B A                  (global mean)
``lora_global_std_{a,b}``    sigma_theta = f(s B A; c)            (global std)
``lora_local_mean_{a,b}``    mu_phi      = s B A                  (task mean)
``lora_local_std_{a,b}``     sigma_phi   = f(s B A; c)            (task std)
===========================  =======================================================

with s = alpha / rank, c = ``sigma_floor`` and f the ``std_param`` (see
:mod:`abmll_tune.modules.gaussian`). ``p(phi | theta) = N(W0 + mu_theta, sigma_theta^2)``
and ``q(phi | D_i) = N(W0 + mu_phi, sigma_phi^2)``, both diagonal.

The ``mode`` attribute says which weights a forward uses:

* ``local_sample``  - a sample of q(phi | D_i) (training, ABMLL inner/outer loss);
* ``local_mean``    - the task posterior mean W0 + mu_phi;
* ``global_mean``   - the global mean W0 + mu_theta (the exported "plain LoRA");
* ``global_sample`` - a sample of p(phi | theta).

How a sample is drawn is ``sampling``: ``local`` (local reparameterization,
default), ``weight`` (one weight-space sample per forward) or ``mean`` (no noise).
With ``variational=False`` the std pairs do not exist (Reptile keeps only a
global and a local mean pair) and every mode is a mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.modules.peft import AdapterModule
from torchtune.modules.peft.lora import _lora_a_init_params, _lora_b_init_params

from abmll_tune.modules import gaussian


class AdapterMode(str, Enum):
    """Which weights a forward uses: a (scope, sample-or-mean) pair, parsed once."""

    LOCAL_SAMPLE = "local_sample"  # a sample of q(phi | D_i): ABMLL's training forward
    LOCAL_MEAN = "local_mean"  # W0 + mu_phi: Reptile's inner loop, adapted scoring
    GLOBAL_MEAN = "global_mean"  # W0 + mu_theta: the LoRA baselines, the exported adapter
    GLOBAL_SAMPLE = "global_sample"  # a sample of p(phi | theta): inspecting the prior

    @property
    def scope(self) -> str:
        return "local" if self in (AdapterMode.LOCAL_SAMPLE, AdapterMode.LOCAL_MEAN) else "global"

    @property
    def sample(self) -> bool:
        return self in (AdapterMode.LOCAL_SAMPLE, AdapterMode.GLOBAL_SAMPLE)

    def __str__(self) -> str:
        return self.value


ADAPTER_MODES = tuple(m.value for m in AdapterMode)


def _adapter_mode(mode: str | AdapterMode) -> AdapterMode:
    try:
        return AdapterMode(mode)
    except ValueError:
        raise ValueError(f"mode must be one of {ADAPTER_MODES}, got {mode!r}") from None


SAMPLING = ("local", "weight", "mean")
SCOPES = ("global", "local")
KINDS = ("mean", "std")
KL_DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_SIGMA_FLOOR = math.exp(-20.0)


class VariationalLoRALinear(nn.Module, AdapterModule):
    """LoRA linear layer with a global and a task-specific diagonal Gaussian over the adapter.

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
        rank (int): rank of every LoRA pair.
        alpha (float): LoRA scaling numerator; s = alpha / rank.
        dropout (float): dropout on the adapter input, as in ``LoRALinear``. Default 0.
        use_bias (bool): whether the frozen base linear has a bias. Default False.
        quantize_base (bool): store the frozen base weight in NF4 (QLoRA). Default False.
        std_param (str): ``softabs`` (default), ``affine`` or ``exp``: how a LoRA pair
            parameterizes sigma (docs/method.md).
        sampling (str): ``local`` (default), ``weight`` or ``mean`` (docs/method.md).
        sigma_floor (float): c, the std floor; sigma = c while B = 0. Default e^-20 (v1).
            With ``exp``, c is the std's base scale: sigma = c exp(s B A).
        sigma_floor_w0_fraction (float): c as this fraction of the RMS of the layer's
            frozen W0, taken once the base weights are loaded (overrides
            ``sigma_floor``; docs/method.md "A std of the right scale"). Default None.
        variational (bool): if False the std pairs are not created (Reptile, LoRA
            baselines); ``sampling`` must then be ``mean``. Default True.
        std_b_init_std (float): standard deviation of the std pairs' B at init. LoRA's
            zero init (the default, 0) makes ``softabs`` start at a stationary point:
            d sigma / d(BA) = s^2 BA / sigma = 0 at B = 0, so its std pairs receive
            no gradient until B moves. A small value (e.g. 1e-3) breaks the tie.
        std_scale_row (bool): the std pairs' A is fixed at [1; 0; ...; 0] (its gradient
            is zeroed before every step, :func:`zero_fixed_std_grads`), so sigma is one
            level per output row, B's first column: a log-scale with ``exp``, reached by a
            gradient step directly. With LoRA's random A, a uniform change of sigma needs
            A to learn a constant row first (a bilinear saddle), and under Adam the
            product B A turns small consistent gradients into full steps on both factors
            that spread sigma over orders of magnitude (measured on the planted family:
            max sigma 100x the mean within 300 visits). For ``outer_grad:
            marginal_likelihood`` (docs/method.md "Fitting the prior"); use it with an
            optimizer without weight decay (AdamW decays a weight whose gradient is zero).
            Default False.
        chunk_elements (int | str): elements of one dense chunk in KL, prior and dense
            sampling (bounds their transient memory), or ``auto`` (default): 2**18 on
            the CPU (cache-sized), 2**23 on CUDA (a few calls per layer; the launches
            and syncs of small chunks would bind a GPU).
        kl_dtype (str): precision of the dense KL and prior work: ``float64`` (default,
            docs/method.md) or ``float32`` (about half the time of that memory-bound
            work; sums still accumulate in float64; gradients agree to float32 precision,
            less where ``affine``'s sigma nears 0: keep float64 with ``affine``).
        kl_kernel (str): how KL and prior run over each chunk: ``auto`` (default: one
            ``torch.compile`` kernel per chunk on CUDA for layers of at least 2048 x 2048
            entries, else the eager in-place code), ``eager`` or ``compiled``. Same
            values to rounding; a failed compilation falls back to eager with a warning.
        **quantization_kwargs: passed to ``to_nf4`` when ``quantize_base``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
        *,
        std_param: str = "softabs",
        sampling: str = "local",
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
        sigma_floor_w0_fraction: float | None = None,
        variational: bool = True,
        std_b_init_std: float = 0.0,
        std_scale_row: bool = False,
        chunk_elements: int | str = "auto",
        kl_dtype: str = "float64",
        kl_kernel: str = "auto",
        **quantization_kwargs,
    ):
        super().__init__()
        if kl_dtype not in KL_DTYPES:
            raise ValueError(f"kl_dtype must be one of {tuple(KL_DTYPES)}, got {kl_dtype!r}")
        gaussian.resolve_kernel(kl_kernel, out_dim, in_dim, std_param)  # validates
        self.kl_kernel = kl_kernel
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        gaussian.std_form(std_param)
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if not variational and sampling != "mean":
            raise ValueError(
                f"sampling={sampling!r} needs the variance adapters: a non-variational "
                "layer (Reptile, LoRA baselines) has none. Use sampling='mean'."
            )
        if not sigma_floor > 0:
            raise ValueError(f"sigma_floor must be > 0, got {sigma_floor}")
        if sigma_floor_w0_fraction is not None and not sigma_floor_w0_fraction > 0:
            raise ValueError(
                f"sigma_floor_w0_fraction must be > 0 (or null), got {sigma_floor_w0_fraction}"
            )
        if not quantize_base and any(v for v in quantization_kwargs.values()):
            raise ValueError(
                f"quantize_base is False, but quantization arguments were given: {quantization_kwargs}"
            )
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.use_bias = use_bias
        self.std_param, self.sampling = std_param, sampling
        self._sigma_floor = float(sigma_floor)
        self.sigma_floor_w0_fraction = (
            None if sigma_floor_w0_fraction is None else float(sigma_floor_w0_fraction)
        )
        self.variational = variational
        self.std_b_init_std = float(std_b_init_std)
        self.std_scale_row = bool(std_scale_row)
        gaussian.resolve_chunk_elements(chunk_elements, "cpu")  # refuse a bad value now
        self.chunk_elements = chunk_elements
        self.kl_dtype = kl_dtype
        self._quantize_base = quantize_base
        self.mode = AdapterMode.LOCAL_SAMPLE if variational else AdapterMode.LOCAL_MEAN
        self.disabled = False  # honoured by torchtune.modules.peft.disable_adapter
        self.layer_name = f"VariationalLoRALinear({in_dim}->{out_dim})"  # set by builders
        self._weight_var_cache: tuple | None = None
        self._weight_var_pinned: float | None = None

        linear = nn.Linear(in_features=in_dim, out_features=out_dim, bias=use_bias)
        weight = linear.weight
        if quantize_base:
            from torchao.dtypes.nf4tensor import to_nf4

            weight = to_nf4(linear.weight, **quantization_kwargs)
        self.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        self.register_parameter(
            "bias", nn.Parameter(linear.bias, requires_grad=False) if use_bias else None
        )
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        for scope in SCOPES:
            for kind in self.kinds:
                setattr(self, _name(scope, kind, "a"), nn.Linear(in_dim, rank, bias=False))
                setattr(self, _name(scope, kind, "b"), nn.Linear(rank, out_dim, bias=False))
        self.initialize_parameters()

    # ----------------------------------------------------------------- structure

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        quantize_base: bool = False,
        **abmll_kwargs,
    ) -> VariationalLoRALinear:
        """Wrap an existing frozen ``nn.Linear``, reusing its ``weight`` and ``bias`` tensors.

        Only the adapters are allocated (on the linear's device, in the default dtype, as
        torchtune's LoRA builders do), so swapping layers of an 8B model built on the meta
        device or on a GPU costs no throwaway copy of the base weights.
        """
        with torch.device("meta"):
            layer = cls(
                linear.in_features,
                linear.out_features,
                rank,
                alpha,
                dropout,
                use_bias=linear.bias is not None,
                **abmll_kwargs,
            )
        weight = linear.weight.detach()
        if quantize_base:
            from torchao.dtypes.nf4tensor import to_nf4

            weight = to_nf4(weight)
            layer._quantize_base = True
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer.to_empty(device=linear.weight.device)
        layer.initialize_parameters()
        return layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.variational else ("mean",)

    def pair(self, scope: str, kind: str) -> tuple[Tensor, Tensor]:
        """The (A, B) weights of one LoRA pair: A is r x d_in, B is d_out x r."""
        return (
            getattr(self, _name(scope, kind, "a")).weight,
            getattr(self, _name(scope, kind, "b")).weight,
        )

    def adapter_params(self) -> list[str]:
        """Names of the adapter parameters (torchtune's ``AdapterModule`` protocol)."""
        return [
            f"{_name(scope, kind, ab)}.weight"
            for scope in SCOPES
            for kind in self.kinds
            for ab in ("a", "b")
        ]

    def to_empty(self, *, device=None, recurse: bool = True):
        # As LoRALinear: only the adapters are materialised; the base comes from a checkpoint.
        for scope in SCOPES:
            for kind in self.kinds:
                for ab in ("a", "b"):
                    getattr(self, _name(scope, kind, ab)).to_empty(device=device, recurse=recurse)
        return self

    def initialize_parameters(self) -> None:
        """LoRA init for the global pairs (A as torchtune does, B zero), local <- global."""
        for kind in self.kinds:
            _lora_a_init_params(getattr(self, _name("global", kind, "a")))
            _lora_b_init_params(getattr(self, _name("global", kind, "b")))
        if self.variational and self.std_b_init_std > 0:
            with torch.no_grad():
                getattr(self, _name("global", "std", "b")).weight.normal_(0.0, self.std_b_init_std)
        if self.variational and self.std_scale_row:
            with torch.no_grad():
                a = getattr(self, _name("global", "std", "a")).weight
                a.zero_()
                a[0].fill_(1.0)
        self.reset_local_from_global()

    @torch.no_grad()
    def reset_local_from_global(self) -> None:
        """phi <- theta: copy both global pairs into the local ones (start of a task)."""
        for kind in self.kinds:
            for ab in ("a", "b"):
                local = getattr(self, _name("local", kind, ab)).weight
                local.copy_(getattr(self, _name("global", kind, ab)).weight)

    @property
    def sigma_floor(self) -> float:
        """c: ``sigma_floor``, or ``sigma_floor_w0_fraction`` x RMS(W0) (population std of
        the frozen weight, cached per weight version, pinned under FSDP)."""
        if self.sigma_floor_w0_fraction is None:
            return self._sigma_floor
        return self.sigma_floor_w0_fraction * math.sqrt(self.pretrained_weight_variance())

    def extra_repr(self) -> str:
        floor = (
            f"sigma_floor={self._sigma_floor:.3g}"
            if self.sigma_floor_w0_fraction is None
            else f"sigma_floor={self.sigma_floor_w0_fraction:g} x RMS(W0)"
        )
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"std_param={self.std_param}, sampling={self.sampling}, "
            f"{floor}, variational={self.variational}, mode={self.mode}"
        )

    @property
    def mode(self) -> AdapterMode:
        """The :class:`AdapterMode` of the next forward (a string name is accepted)."""
        return self._mode

    @mode.setter
    def mode(self, value: str | AdapterMode) -> None:
        self._mode = _adapter_mode(value)

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        """Base output plus the adapter of the current ``mode`` (see module docstring)."""
        if self._quantize_base:
            from torchao.dtypes.nf4tensor import linear_nf4

            out = linear_nf4(input=x, weight=self.weight)
            if self.use_bias:
                out = out + self.bias
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        mode = self._mode
        x_adapter = self.dropout(x)
        # adapters kept in float32 under a bf16 base (keep_adapters_in) compute in the
        # activations' dtype; the cast's gradient reaches the float32 weights
        a_mu, b_mu = (w.to(x.dtype) for w in self.pair(mode.scope, "mean"))
        out = out + self.scale * F.linear(F.linear(x_adapter, a_mu), b_mu)
        if mode.sample and self.variational and self.sampling != "mean":
            a_sd, b_sd = (w.to(x.dtype) for w in self.pair(mode.scope, "std"))
            noise_fn = (
                gaussian.local_reparam_noise
                if self.sampling == "local"
                else gaussian.weight_space_noise
            )
            out = out + noise_fn(
                x_adapter,
                a_sd,
                b_sd,
                scale=self.scale,
                floor=self.sigma_floor,
                std_param=self.std_param,
                chunk_rows=self.chunk_rows(),
            )
        return out

    # ----------------------------------------------------------------- ELBO terms

    def kl_local_global(self) -> Tensor:
        """KL(q(phi | D_i) || p(phi | theta)) summed over this layer's weights (float64)."""
        self._require_variational("kl_local_global")
        return gaussian.kl_diag_gaussians(
            self.pair("local", "mean"),
            self.pair("local", "std"),
            self.pair("global", "mean"),
            self.pair("global", "std"),
            scale=self.scale,
            floor=self.sigma_floor,
            std_param=self.std_param,
            layer=self.layer_name,
            chunk_rows=self.chunk_rows(),
            dtype=KL_DTYPES[self.kl_dtype],
            kernel=self.kl_kernel,
        )

    def neg_log_prior_global(
        self,
        prior_mu_var: float | str | None = "pretrained",
        a0: float = 1.0,
        b0: float = 0.01,
    ) -> Tensor:
        """-log p(theta) for this layer's global Gaussian (float64).

        Args:
            prior_mu_var: variance of the prior N(mu_theta; 0, v): ``"pretrained"`` or
                None (default) for the empirical variance of this layer's frozen W0,
                ``"sigma_floor"`` for c (the paper's literal reading), or a number.
            a0, b0: shape and rate of the Gamma hyperprior on 1 / sigma_theta^2
                (v1: a0 = 1, b0 = 0.01).
        """
        self._require_variational("neg_log_prior_global")
        return gaussian.neg_log_prior(
            self.pair("global", "mean"),
            self.pair("global", "std"),
            scale=self.scale,
            floor=self.sigma_floor,
            std_param=self.std_param,
            prior_mu_var=self.resolve_prior_mu_var(prior_mu_var),
            a0=a0,
            b0=b0,
            layer=self.layer_name,
            chunk_rows=self.chunk_rows(),
            dtype=KL_DTYPES[self.kl_dtype],
            kernel=self.kl_kernel,
        )

    def resolve_prior_mu_var(self, prior_mu_var: float | str | None) -> float:
        if prior_mu_var is None or prior_mu_var == "pretrained":
            return self.pretrained_weight_variance()
        if prior_mu_var == "sigma_floor":
            return self.sigma_floor
        if isinstance(prior_mu_var, str):
            raise ValueError(
                f"prior_mu_var must be 'pretrained', 'sigma_floor' or a positive number, "
                f"got {prior_mu_var!r}"
            )
        return float(prior_mu_var)

    @torch.no_grad()
    def pin_pretrained_weight_variance(self, value: float | None = None) -> float:
        """Fix W0's variance to ``value`` (default: computed now from ``self.weight``) for
        good. For FSDP, which shards W0 so that no rank holds the whole weight (the base
        is frozen, so the value cannot change)."""
        self._weight_var_pinned = None
        self._weight_var_pinned = (
            self.pretrained_weight_variance() if value is None else float(value)
        )
        return self._weight_var_pinned

    @property
    def weight_variance_pinned(self) -> bool:
        """Whether W0's variance is fixed (:meth:`pin_pretrained_weight_variance`)."""
        return self._weight_var_pinned is not None

    def chunk_rows(self) -> int:
        """Rows of this layer per dense chunk, on the device its weight lives on."""
        elements = gaussian.resolve_chunk_elements(self.chunk_elements, self.weight.device)
        return gaussian.chunk_rows_for(self.in_dim, elements)

    def pretrained_weight_variance(self) -> float:
        """Population variance of the frozen W0 (float64, row-chunked, cached per weight version)."""
        if self._weight_var_pinned is not None:
            return self._weight_var_pinned
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._weight_var_cache is not None and self._weight_var_cache[0] == key:
            return self._weight_var_cache[1]
        if w.is_meta:
            raise RuntimeError(f"{self.layer_name}: the base weight is on the meta device")
        if self._quantize_base:
            w = w.get_original_weight()
        var = self.weight_variance_of(w)
        self._weight_var_cache = (key, var)
        return var

    def weight_variance_of(self, w: Tensor) -> float:
        """Population variance of a d_out x d_in weight (float64, row-chunked)."""
        if tuple(w.shape) != (self.out_dim, self.in_dim):
            raise ValueError(
                f"{self.layer_name}: weight of shape {tuple(w.shape)}, expected "
                f"{(self.out_dim, self.in_dim)}"
            )
        rows = self.chunk_rows()
        total = torch.zeros((), dtype=torch.float64, device=w.device)
        total_sq = torch.zeros((), dtype=torch.float64, device=w.device)
        for start in range(0, w.shape[0], rows):
            chunk = w[start : start + rows].to(torch.float64)
            total += chunk.sum()
            total_sq += (chunk * chunk).sum()
        n = w.numel()
        mean = total / n
        var = float(total_sq / n - mean * mean)
        if not var > 0:
            raise ValueError(
                f"{self.layer_name}: the frozen weight has variance {var}; prior_mu_var="
                "'pretrained' needs loaded pretrained weights. Load the checkpoint first or "
                "give prior_mu_var as a number."
            )
        return var

    def _require_variational(self, what: str) -> None:
        if not self.variational:
            raise RuntimeError(
                f"{what} needs the std pairs; {self.layer_name} was built with variational=False"
            )


def _name(scope: str, kind: str, ab: str) -> str:
    return f"lora_{scope}_{kind}_{ab}"


# ------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------


# Wrappers that insert a module level without changing the state dict's keys (torch's
# activation-checkpoint wrapper removes its prefix in a state-dict hook; compile's too).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` as the model's state dict spells it (wrapper levels removed)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def variational_lora_layers(model: nn.Module) -> dict[str, VariationalLoRALinear]:
    """Every ``VariationalLoRALinear`` of ``model`` by qualified name, as the state dict
    names it (activation checkpointing and compile wrappers do not change the names)."""
    return {
        clean_name(n): m for n, m in model.named_modules() if isinstance(m, VariationalLoRALinear)
    }


def _layers_or_raise(model: nn.Module) -> dict[str, VariationalLoRALinear]:
    layers = variational_lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no VariationalLoRALinear layers (was it built by abmll_tune?)"
        )
    return layers


def keep_adapters_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every adapter weight in ``dtype`` (float32 under a bf16 base: a bf16 weight
    of 0.02 moves only in steps of ~1e-4, so AdamW's steps at the 8B configs' learning
    rates, 1e-6 to 5e-5, would leave most entries unchanged). The forward computes in the
    activations' dtype. Returns the number of weights converted; call it before the
    optimizers are built."""
    converted = 0
    for layer in variational_lora_layers(model).values():
        for name in layer.adapter_params():
            weight = layer.get_parameter(name)
            if weight.dtype != dtype:
                weight.data = weight.data.to(dtype)
                converted += weight.numel()
    return converted


def set_adapter_mode(model: nn.Module, mode: str | AdapterMode) -> None:
    """Set ``mode`` (an :class:`AdapterMode` or its name) on every variational layer."""
    mode = _adapter_mode(mode)
    for layer in _layers_or_raise(model).values():
        layer.mode = mode


@contextmanager
def adapter_mode(model: nn.Module, mode: str | AdapterMode) -> Iterator[None]:
    """Temporarily set every variational layer's ``mode``; restores each layer's own."""
    layers = _layers_or_raise(model)
    before = {name: layer.mode for name, layer in layers.items()}
    set_adapter_mode(model, mode)
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.mode = before[name]


def zero_fixed_std_grads(model: nn.Module) -> None:
    """Zero the gradients of the std pairs' A in layers built with ``std_scale_row`` (the
    methods call this before every optimizer step, so those factors never move)."""
    for layer in _layers_or_raise(model).values():
        if layer.variational and layer.std_scale_row:
            for scope in SCOPES:
                a = layer.pair(scope, "std")[0]
                if a.grad is not None:
                    a.grad.zero_()


@contextmanager
def adapter_sampling(model: nn.Module, sampling: str) -> Iterator[None]:
    """Temporarily draw every variational layer's samples by ``sampling`` (``local``,
    ``weight`` or ``mean``); restores each layer's own. ``weight`` is what a marginal
    likelihood of a whole batch needs: one weight for all of its examples."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    layers = [layer for layer in _layers_or_raise(model).values() if layer.variational]
    before = [layer.sampling for layer in layers]
    for layer in layers:
        layer.sampling = sampling
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            layer.sampling = value


def reset_local_from_global(model: nn.Module) -> None:
    """phi <- theta in every variational layer (the start of each task)."""
    for layer in _layers_or_raise(model).values():
        layer.reset_local_from_global()


def kl_local_global(model: nn.Module) -> Tensor:
    """Sum of KL(q(phi|D_i) || p(phi|theta)) over all variational layers (float64),
    checked finite with one host sync for the whole model."""
    with gaussian.deferred_finite_checks():
        return torch.stack([m.kl_local_global() for m in _layers_or_raise(model).values()]).sum()


def neg_log_prior_global(
    model: nn.Module,
    prior_mu_var: float | str | None = "pretrained",
    a0: float = 1.0,
    b0: float = 0.01,
) -> Tensor:
    """Sum of -log p(theta) over all variational layers (float64), checked finite with
    one host sync for the whole model."""
    layers = _layers_or_raise(model).values()
    with gaussian.deferred_finite_checks():
        return torch.stack([m.neg_log_prior_global(prior_mu_var, a0, b0) for m in layers]).sum()


def adapter_params_by_group(
    model: nn.Module, scope: str | None = None, kind: str | None = None
) -> dict[str, nn.Parameter]:
    """Adapter parameters selected by name: ``scope`` in {global, local} and ``kind`` in
    {mean, std}; None selects both. Names look like ``...q_proj.lora_global_std_b.weight``."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} or None, got {scope!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    selected = {}
    for prefix, layer in _layers_or_raise(model).items():
        for pname in layer.adapter_params():
            _, p_scope, p_kind, _ = pname.split(".")[0].split("_")
            if scope in (None, p_scope) and kind in (None, p_kind):
                selected[f"{prefix}.{pname}"] = layer.get_parameter(pname)
    return selected


def adapter_param_groups(
    model: nn.Module, scope: str, mean_lr: float, std_lr: float, **group_options
) -> list[dict]:
    """Optimizer parameter groups for one scope: means and stds get their own learning
    rates (docs/method.md: one rate for both drives sigma away). Empty groups are
    left out (non-variational layers have no std pairs)."""
    groups = []
    for kind, lr in (("mean", mean_lr), ("std", std_lr)):
        params = list(adapter_params_by_group(model, scope, kind).values())
        if params:
            groups.append({"params": params, "lr": lr, "name": f"{scope}_{kind}", **group_options})
    return groups


def set_trainable_scope(model: nn.Module, scope: str | None) -> None:
    """requires_grad only on the adapters of ``scope`` (None: all adapters).

    The inner loop trains the local pairs only; freezing the global ones there saves
    their gradient computation and memory.
    """
    chosen = set(adapter_params_by_group(model, scope)) if scope else None
    for name, param in adapter_params_by_group(model).items():
        param.requires_grad_(chosen is None or name in chosen)


@torch.no_grad()
def sigma_summary(model: nn.Module, scope: str = "global") -> dict[str, float]:
    """Mean, min and max of sigma over every weight entry of every variational layer
    (``scope`` global: sigma_theta), row-chunked; for logging how far sigma moved from c."""
    sums, lows, highs, count = [], [], [], 0  # on the device; read back once
    for layer in _layers_or_raise(model).values():
        if not layer.variational:
            continue
        a, b = layer.pair(scope, "std")
        rows = layer.chunk_rows()
        for start in range(0, b.shape[0], rows):
            sigma = gaussian.std_dense(
                layer.scale * (b[start : start + rows].double() @ a.double()),
                layer.sigma_floor,
                layer.std_param,
            )
            sums.append(sigma.sum())
            lows.append(sigma.min())
            highs.append(sigma.max())
            count += sigma.numel()
    if count == 0:
        raise ValueError("the model has no std pairs (variational=False)")
    total, low, high = torch.stack(
        [torch.stack(sums).sum(), torch.stack(lows).min(), torch.stack(highs).max()]
    ).tolist()
    return {"mean": total / count, "min": low, "max": high}


@torch.no_grad()
def pinned_share(layer: VariationalLoRALinear, beta: float, scope: str = "global") -> float:
    """Share of the layer's weight entries whose KL stiffness beta / sigma^2 exceeds 1.

    beta KL pulls every entry of the local mean toward the global one with the force
    beta (mu_q - mu_p) / sigma_p^2: the stiffness beta / sigma_p^2 is the curvature the
    KL adds to that entry. Where it exceeds 1 (far above the NLL's per-entry curvature),
    the inner loop cannot move the entry away from the global mean: it is pinned.
    ``docs/method.md`` ("Leaving the stationary point") uses this to choose
    ``std_b_init_std``.
    """
    if not layer.variational:
        raise ValueError("pinned_share needs the std pairs (variational=True)")
    a, b = layer.pair(scope, "std")
    rows = layer.chunk_rows()
    pinned = 0
    for start in range(0, b.shape[0], rows):
        m = layer.scale * (b[start : start + rows].double() @ a.double())
        var = gaussian.std_variance(m, layer.sigma_floor, layer.std_param)
        pinned += int((var < beta).sum())  # beta / sigma^2 > 1
    return pinned / (layer.out_dim * layer.in_dim)
