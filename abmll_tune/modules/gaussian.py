"""The Gaussian math of ABMLL's variational LoRA adapters.

Zhang, Snell & Griffiths, "Amortized Bayesian Meta-Learning for Low-Rank
Adaptation of Large Language Models" (arXiv 2508.14285), Section 3 and Eq. 2;
``docs/method.md`` gives the decisions taken where the
paper is silent. For an adapted layer with frozen weight W0 (d_out x d_in) and
LoRA scaling s = alpha / rank:

    mu    = s * B_mu A_mu                       (a LoRA pair)
    sigma = f(s * B_sd A_sd; c)                 (a LoRA pair and the floor c)

with the std parameterization f chosen by ``std_param``:

    softabs  sigma^2 = (s B A)^2 + c^2          (default; sigma = c at B = 0)
    affine   sigma   = |s B A + c|              (the paper's literal "BA + cI")
    exp      sigma   = c * exp(s B A)

The three quantities ABMLL needs are computed here without ever keeping a dense
d_out x d_in tensor alive between forward and backward:

* :func:`kl_diag_gaussians` - KL(q(phi|D_i) || p(phi|theta)), Eq. 2's local
  term, summed over every weight entry (W0 cancels);
* :func:`neg_log_prior` - -log p(theta) with
  p(theta) = N(mu_theta; 0, v) * Gamma(1 / sigma_theta^2; a0, b0), b0 a rate;
* :func:`local_reparam_noise` / :func:`weight_space_noise` - the stochastic part
  of the layer output for one posterior sample.

KL and prior run in float64, row-chunked, inside a custom autograd function that
computes each chunk's gradient in closed form and keeps only factor-sized
gradients for backward (extra peak memory O(chunk x d_in)). The noise
functions regenerate their Gaussian noise from a seed in backward instead of
storing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

# Elements of one dense float64 chunk (2 MiB, cache-sized; measured fastest on CPU): bounds the transient memory of KL,
# prior, dense variance and weight-space noise, whatever the layer size.
DEFAULT_CHUNK_ELEMENTS = 2**18


# ``chunk_elements: auto`` per device type: cache-sized on the CPU; on a GPU, where each
# chunk costs kernel launches, 2**23 (64 MiB in float64): an 8B q_proj (4096 x 4096) is
# two eager chunks and one compiled call, its output layer 16 compiled calls.
CHUNK_ELEMENTS_BY_DEVICE = {"cpu": DEFAULT_CHUNK_ELEMENTS, "cuda": 2**23}


def resolve_chunk_elements(chunk_elements: int | str, device: torch.device | str) -> int:
    """``chunk_elements`` as a number: ``auto`` picks the device type's
    (:data:`CHUNK_ELEMENTS_BY_DEVICE`, the CPU's for any other device)."""
    if chunk_elements == "auto":
        kind = torch.device(device).type
        return CHUNK_ELEMENTS_BY_DEVICE.get(kind, DEFAULT_CHUNK_ELEMENTS)
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
        raise ValueError(
            f"chunk_elements must be a positive integer or 'auto', got {chunk_elements!r}"
        )
    if chunk_elements < 1:
        raise ValueError(
            f"chunk_elements must be a positive integer or 'auto', got {chunk_elements}"
        )
    return chunk_elements


def chunk_rows_for(in_dim: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows of a d_out x d_in matrix that fit in ``chunk_elements`` elements."""
    return max(1, chunk_elements // max(1, in_dim))


# --------------------------------------------------------------------------------------
# The std parameterizations: sigma = f(m; c) of the pre-activation m = s B A
# --------------------------------------------------------------------------------------


class StdParam:
    """One form f of sigma = f(m; c); a new form is one subclass (registered by ``name``).

    The KL, the prior and the sampling code call only these methods.
    """

    name: str = ""
    can_reach_zero = False  # sigma = 0 possible (then log sigma^2 must be guarded)
    low_rank_variance = False  # sigma^2 x^2 has a low-rank form (no dense d_out x d_in)

    def variance(self, m: Tensor, floor: float) -> Tensor:
        """sigma^2, dense and elementwise."""
        raise NotImplementedError

    def std(self, m: Tensor, floor: float) -> Tensor:
        """sigma, dense and elementwise."""
        return torch.sqrt(self.variance(m, floor))

    def variance_inplace(
        self, m: Tensor, floor: float, half_slope_out: Tensor | None, log_out: Tensor | None
    ) -> Tensor | None:
        """Overwrite the scratch chunk ``m`` with sigma^2; write (d sigma^2 / dm) / 2 into
        ``half_slope_out`` when given and, when a ``log_out`` scratch is given, return
        sum(log sigma^2) (else None). In place because this is memory-bound work: every
        pass over a chunk, and every fresh allocation, costs."""
        raise NotImplementedError

    def half_slope(self, m: Tensor, floor: float) -> Tensor:
        """(d sigma^2 / dm) / 2, dense and elementwise (the fused kernels' form of the
        ``half_slope_out`` of :meth:`variance_inplace`)."""
        raise NotImplementedError

    def output_variance_extra(self, x2: Tensor, a: Tensor, b: Tensor, scale: float, floor: float):
        """The terms of sum_j sigma_ij^2 x_j^2 beyond (s B A)^2 x^2 + c^2 sum x^2 (low-rank forms)."""
        return None

    def __repr__(self) -> str:
        return self.name


class SoftAbs(StdParam):
    """sigma^2 = (s B A)^2 + c^2 (default; sigma = c at B = 0, never below c)."""

    name = "softabs"
    low_rank_variance = True

    def variance(self, m, floor):
        return m * m + floor * floor

    def half_slope(self, m, floor):
        return m

    def variance_inplace(self, m, floor, half_slope_out, log_out):
        if half_slope_out is not None:
            half_slope_out.copy_(m)
        m.mul_(m).add_(floor * floor)
        return None if log_out is None else _sum64(torch.log(m, out=log_out))


class Affine(StdParam):
    """sigma = |s B A + c| (the paper's literal "BA + cI"; can cross zero)."""

    name = "affine"
    can_reach_zero = True
    low_rank_variance = True

    def variance(self, m, floor):
        return (m + floor) ** 2

    def std(self, m, floor):
        return torch.abs(m + floor)

    def half_slope(self, m, floor):
        return m + floor

    def variance_inplace(self, m, floor, half_slope_out, log_out):
        m.add_(floor)
        if half_slope_out is not None:
            half_slope_out.copy_(m)
        log_sum = None
        if log_out is not None:
            log_sum = 2.0 * _sum64(torch.abs(m, out=log_out).log_())
        m.mul_(m)
        return log_sum

    def output_variance_extra(self, x2, a, b, scale, floor):
        return (2.0 * floor * scale) * ((x2 @ a.transpose(0, 1)) @ b.transpose(0, 1))


class Exp(StdParam):
    """sigma = c exp(s B A) (no low-rank variance: sampled densely, chunk by chunk)."""

    name = "exp"

    def variance(self, m, floor):
        return (floor * floor) * torch.exp(2.0 * m)

    def std(self, m, floor):
        return floor * torch.exp(m)

    def half_slope(self, m, floor):
        return self.variance(m, floor)

    def variance_inplace(self, m, floor, half_slope_out, log_out):
        m.mul_(2.0).add_(2.0 * math.log(floor))  # log sigma^2 = 2 log c + 2 m
        log_sum = None if log_out is None else _sum64(m)
        m.exp_()
        if half_slope_out is not None:
            half_slope_out.copy_(m)
        return log_sum


STD_FORMS: dict[str, StdParam] = {form.name: form for form in (SoftAbs(), Affine(), Exp())}
STD_PARAMS = tuple(STD_FORMS)


def std_form(std_param: str | StdParam) -> StdParam:
    """The :class:`StdParam` of a name (or the form itself)."""
    if isinstance(std_param, StdParam):
        return std_param
    if std_param not in STD_FORMS:
        raise ValueError(f"std_param must be one of {STD_PARAMS}, got {std_param!r}")
    return STD_FORMS[std_param]


def _check_std_param(std_param: str | StdParam) -> None:
    std_form(std_param)


def std_variance(m: Tensor, floor: float, std_param: str | StdParam) -> Tensor:
    """sigma^2 for the pre-activation ``m = s * B A`` (dense, elementwise)."""
    return std_form(std_param).variance(m, floor)


def std_dense(m: Tensor, floor: float, std_param: str | StdParam) -> Tensor:
    """sigma for the pre-activation ``m = s * B A`` (dense, elementwise)."""
    return std_form(std_param).std(m, floor)


def _variance_inplace(
    m: Tensor,
    floor: float,
    std_param: str | StdParam,
    half_slope_out: Tensor | None,
    log_out: Tensor | None,
) -> Tensor | None:
    return std_form(std_param).variance_inplace(m, floor, half_slope_out, log_out)


def _sum64(chunk: Tensor) -> Tensor:
    """A chunk's sum, as float64. Summed in the chunk's own dtype (torch's pairwise
    summation: float32 rounding grows like log(n), not n) because an upcasting sum is
    several times slower on the CPU; the chunks' sums then accumulate in float64."""
    return chunk.sum().to(torch.float64)


def _require_nonzero_variance(var: Tensor, term: str, layer: str, row0: int) -> None:
    # Only `affine` can reach sigma = 0 (|s B A + c| = 0); log(0) would be -inf and
    # its gradient NaN, so stop with the place instead.
    zero = var == 0
    if bool(zero.any()):
        r, col = (int(i) for i in zero.nonzero()[0])
        raise FloatingPointError(
            f"{term} of layer {layer!r}: sigma is exactly 0 at entry ({row0 + r}, {col}) "
            "(std_param='affine' allows sigma = |sBA + c| to cross zero). Use "
            "std_param='softabs' (sigma >= c always), a larger sigma_floor, or a smaller "
            "learning rate / std_grad_clamp for the std pairs."
        )


# --------------------------------------------------------------------------------------
# Fused chunk kernels (torch.compile)
# --------------------------------------------------------------------------------------
#
# KL and prior are memory-bound: a dozen elementwise passes over each chunk in eager
# mode, each a kernel launch on a GPU. The same arithmetic written as one pure function
# of the factors and compiled by inductor is one kernel per chunk: it generates the
# dense products itself, sums in float64 at no extra cost (the cast is fused into the
# reduction) and writes only the gradients that the factor folds read. On this
# project's 2-core CPU it measured no faster than the eager in-place code (the folds'
# skinny GEMMs and the logs dominate; bench/bench_layer.py), so ``auto`` compiles only
# on CUDA and only large layers, where a one-off compilation is cheap next to training.

KL_KERNELS = ("auto", "eager", "compiled")
# "auto" compiles CUDA layers with at least this many entries (2048 x 2048): Llama3-8B's
# projections, not the tiny or SmolLM2-135M models (compiling costs seconds per shape).
COMPILED_MIN_ENTRIES = 2**22


def resolve_kernel(
    kernel: str,
    out_dim: int,
    in_dim: int,
    std_param: str | StdParam,
    device: torch.device | None = None,
) -> str:
    """``eager`` or ``compiled`` for a layer, from the ``kl_kernel`` setting."""
    if kernel not in KL_KERNELS:
        raise ValueError(f"kl_kernel must be one of {KL_KERNELS}, got {kernel!r}")
    form = std_form(std_param)
    if form.can_reach_zero:  # affine: the eager path checks sigma != 0 entry by entry
        if kernel == "compiled":
            raise ValueError(
                f"kl_kernel='compiled' does not support std_param={form.name!r} (sigma can "
                "reach 0, which the eager kernel checks entry by entry): use kl_kernel='eager' "
                "or 'auto'."
            )
        return "eager"
    if kernel == "auto":
        large = out_dim * in_dim >= COMPILED_MIN_ENTRIES
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "compiled" if large and on_cuda else "eager"
    return kernel


def _dense(b_rows: Tensor, a: Tensor) -> Tensor:
    # B A as a broadcast sum over the rank: inductor fuses it into the elementwise loop
    # (no dense product in memory), where a skinny GEMM per chunk would write one.
    return (b_rows[:, :, None] * a[None]).sum(1)


def _fold(grad: Tensor | None, b_rows: Tensor, a: Tensor):
    # dL/dB rows = G A^T and this chunk's share of dL/dA = B^T G (see _RowChunkedSum)
    return (
        (None, None) if grad is None else (grad @ a.transpose(0, 1), b_rows.transpose(0, 1) @ grad)
    )


def _kl_chunk_kernel(b_d, a_d, b_q, a_q, b_p, a_p, floor, form, need_d, need_q, need_p):
    """One chunk of :func:`kl_diag_gaussians` from the factors: value, then per product
    (mean difference, local std, global std) the fold of dKL/dM into (dB rows, dA part)."""
    diff, m_q, m_p = _dense(b_d, a_d), _dense(b_q, a_q), _dense(b_p, a_p)
    var_q = form.variance(m_q, floor)
    var_p = form.variance(m_p, floor)
    inv_p = 1.0 / var_p
    excess = (var_q + diff * diff) * inv_p - 1.0
    value = 0.5 * (
        torch.log(var_p / var_q).to(torch.float64).sum() + excess.to(torch.float64).sum()
    )
    g_d = diff * inv_p if need_d else None
    g_q = (inv_p - 1.0 / var_q) * form.half_slope(m_q, floor) if need_q else None
    g_p = -(excess * inv_p) * form.half_slope(m_p, floor) if need_p else None
    return value, _fold(g_d, b_d, a_d), _fold(g_q, b_q, a_q), _fold(g_p, b_p, a_p)


def _prior_chunk_kernel(b_mu, a_mu, b_sd, a_sd, floor, form, inv_mu_var, a0, b0, need_mu, need_sd):
    """One chunk of :func:`neg_log_prior` without its constant, as :func:`_kl_chunk_kernel`."""
    mu, m_sd = _dense(b_mu, a_mu), _dense(b_sd, a_sd)
    var = form.variance(m_sd, floor)
    inv = 1.0 / var
    value = (mu * mu).to(torch.float64).sum() * (0.5 * inv_mu_var) + b0 * inv.to(
        torch.float64
    ).sum()
    if a0 != 1.0:
        value = value + (a0 - 1.0) * torch.log(var).to(torch.float64).sum()
    g_mu = mu * inv_mu_var if need_mu else None
    g_sd = None
    if need_sd:
        g_sd = form.half_slope(m_sd, floor) * ((2.0 * (a0 - 1.0) - 2.0 * b0 * inv) * inv)
    return value, _fold(g_mu, b_mu, a_mu), _fold(g_sd, b_sd, a_sd)


_COMPILED_KERNELS: dict[str, Callable] = {}
_COMPILE_FAILURE: list[str] = []  # the first failure's message: later calls stay eager


def _compiled_kernel(kernel: Callable) -> Callable | None:
    if _COMPILE_FAILURE:
        return None
    if kernel.__name__ not in _COMPILED_KERNELS:
        _COMPILED_KERNELS[kernel.__name__] = torch.compile(kernel, fullgraph=True)
    return _COMPILED_KERNELS[kernel.__name__]


def _fused_chunk_fn(kernel: Callable, *settings, per_entry: float = 0.0):
    """A ChunkedTerm ``fused_fn`` running the compiled ``kernel(B_0 rows, A_0, B_1 rows,
    A_1, ..., *settings, *need)``, plus ``per_entry`` times the chunk's entries (a constant
    the kernel leaves out); None after a failed compilation."""
    compiled = _compiled_kernel(kernel)
    if compiled is None:
        return None

    def fused_fn(b_rows: list[Tensor], a: list[Tensor], need: list[bool]):
        factors = [t for pair in zip(b_rows, a, strict=True) for t in pair]
        value, *folds = compiled(*factors, *settings, *need)
        return b_rows[0].shape[0] * a[0].shape[1] * per_entry + value, folds

    return fused_fn


def _fall_back_to_eager(term: str, layer: str, error: Exception) -> None:
    import warnings

    _COMPILE_FAILURE.append(f"{type(error).__name__}: {error}")
    warnings.warn(
        f"{term} of layer {layer!r}: the compiled kernel failed ({_COMPILE_FAILURE[0][:300]}); "
        "using the eager kernel from now on (same values, slower). Set kl_kernel: eager "
        "to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------
# Row-chunked float64 sums over dense low-rank products
# --------------------------------------------------------------------------------------
#
# KL and prior are sums over d_out x d_in entries of elementwise functions of a few
# dense matrices M_k = s * B_k A_k (k = mean difference, local std, global std ...).
# Their gradients with respect to the small factors are again small:
#   dL/dB_k = s * G_k A_k^T,   dL/dA_k = s * B_k^T G_k,   G_k = dL/dM_k (dense).
# So the forward pass walks the rows chunk by chunk, computes each chunk's value and
# its G_k in closed form, and folds G_k into the factor gradients at once. Only
# those factor-sized gradients are saved for backward: no dense tensor outlives its
# chunk, and nothing is recomputed.


@dataclass(frozen=True)
class LowRankProduct:
    """M = s * sum_k sign_k B_k A_k, given as indices into the factor list."""

    parts: tuple[tuple[int, int, float], ...]  # (index of A_k, index of B_k, sign_k)


@dataclass(frozen=True)
class ChunkedTerm:
    """A scalar sum over the d_out x d_in entries of one adapted layer.

    ``fn(dense, need, row0, scratch)`` gets the row chunk of every product (float64
    scratch it may overwrite), which products need a gradient, the chunk's first row
    and ``scratch(i)``, which returns the i-th reusable chunk-shaped buffer. It returns
    the chunk's sum and, for each product, the elementwise derivative dsum/dM or None.
    """

    name: str  # "kl" or "prior": used in error messages
    layer: str
    scale: float
    out_dim: int
    chunk_rows: int
    products: tuple[LowRankProduct, ...]
    fn: Callable[..., tuple[Tensor, list[Tensor | None]]]
    with_grad: bool
    dtype: torch.dtype = torch.float64  # of the dense chunks; sums accumulate in float64
    # or, compiled: fused_fn(b_rows, a, need) -> (chunk sum, per product (dB rows, dA
    # share) or (None, None)) from the factors (B rows and A of each product) directly
    fused_fn: Callable[..., tuple[Tensor, list]] | None = None


# Finiteness checks: each term (and its closed-form gradients) yields a 0-dim boolean on
# the device; inside :func:`deferred_finite_checks` they wait and are read with one host
# sync at its end (a GPU otherwise waits for its queue once per layer and term).
_PENDING: list[tuple[Tensor, Callable[[], None]]] | None = None


@contextmanager
def deferred_finite_checks() -> Iterator[None]:
    """Check every KL / prior term computed inside the block with one host sync at its
    end, raising as the immediate check would (naming the first failing layer and rows).
    Nested blocks defer to the outermost; an exception inside skips the checks."""
    global _PENDING
    if _PENDING is not None:
        yield
        return
    _PENDING = []
    try:
        yield
        pending = _PENDING
    finally:
        _PENDING = None
    if pending and not host_all([flag for flag, _ in pending]):
        for flag, fail in pending:
            if not bool(flag):
                fail()


def host_all(flags: list[Tensor]) -> bool:
    """All of ``flags`` (0-dim booleans on one device) true: the one host sync."""
    return bool(torch.stack(flags).all())


def _require_finite(flag: Tensor, fail: Callable[[], None]) -> None:
    """Raise through ``fail`` unless ``flag``: now, or at the end of a deferred block."""
    if _PENDING is not None:
        _PENDING.append((flag, fail))
    elif not host_all([flag]):
        fail()


def _check_finite_parts(
    term: ChunkedTerm, total: Tensor, parts: list[tuple[Tensor, slice]]
) -> None:
    """Require the term's total finite; on failure, name the first chunk that is not."""

    def fail() -> None:
        part, rows = next(((p, r) for p, r in parts if not bool(torch.isfinite(p))), parts[-1])
        raise FloatingPointError(
            f"{term.name} of layer {term.layer!r} is not finite ({part.item()}) "
            f"in rows {rows.start}:{rows.stop}. Check sigma_floor, the std "
            "learning rate and std_grad_clamp; NaNs are never zeroed silently."
        )

    _require_finite(torch.isfinite(total.detach()), fail)


def _eager_chunks(term: ChunkedTerm, cats, need_prod, grad_a, grad_b) -> Tensor:
    """term.fn over every row chunk, in place in reused scratch buffers."""
    a0 = cats[0][0]
    in_dim = a0.shape[1]
    buffers: list[Tensor] = []  # chunk-shaped scratch, reused by every chunk
    total = torch.zeros((), dtype=torch.float64, device=a0.device)
    parts: list[tuple[Tensor, slice]] = []
    for start in range(0, term.out_dim, term.chunk_rows):
        rows = slice(start, min(start + term.chunk_rows, term.out_dim))
        n_rows = rows.stop - rows.start

        def scratch(i: int, n_rows: int = n_rows) -> Tensor:
            while len(buffers) <= i:
                buffers.append(a0.new_empty(term.chunk_rows, in_dim))
            return buffers[i][:n_rows]

        dense = [torch.mm(b[rows], a, out=scratch(k)) for k, (a, b) in enumerate(cats)]
        part, dense_grads = term.fn(dense, need_prod, start, scratch)
        parts.append((part.detach(), rows))
        total += part
        for k, g in enumerate(dense_grads):
            if need_prod[k]:
                a, b = cats[k]
                torch.mm(g, a.transpose(0, 1), out=grad_b[k][rows])  # s G A^T
                grad_a[k].addmm_(b[rows].transpose(0, 1), g)  # B^T G (times s below)
    _check_finite_parts(term, total, parts)
    return total


# Rows per compiled chunk, as a multiple of the eager chunk: the compiled kernel keeps
# its dense products in registers, so larger chunks only amortise the call (measured
# fastest at 256 rows x 4096 on the CPU).
FUSED_CHUNK_FACTOR = 4


def _fused_chunks(term: ChunkedTerm, cats, need_prod, grad_a, grad_b) -> Tensor:
    """term.fused_fn (one compiled kernel per chunk: products, value, folds)."""
    total = torch.zeros((), dtype=torch.float64, device=cats[0][0].device)
    parts: list[tuple[Tensor, slice]] = []
    step = term.chunk_rows * FUSED_CHUNK_FACTOR
    for start in range(0, term.out_dim, step):
        rows = slice(start, min(start + step, term.out_dim))
        part, folds = term.fused_fn([b[rows] for _, b in cats], [a for a, _ in cats], need_prod)
        parts.append((part.detach(), rows))
        total += part
        for k, (fold_b, fold_a) in enumerate(folds):
            if need_prod[k]:
                grad_b[k][rows] = fold_b
                grad_a[k] += fold_a
    _check_finite_parts(term, total, parts)
    return total


class _RowChunkedSum(torch.autograd.Function):
    """sum over rows of term.fn, float64, with closed-form factor gradients (see above)."""

    @staticmethod
    def forward(ctx, term: ChunkedTerm, *factors: Tensor) -> Tensor:
        need_factor = [term.with_grad and n for n in ctx.needs_input_grad[1:]]
        f64 = [f.detach().to(term.dtype) for f in factors]
        s = term.scale
        cats = []  # per product: (s * A_cat, B_cat), the signs folded into B
        for prod in term.products:
            a_cat = torch.cat([f64[ia] for ia, _, _ in prod.parts], dim=0).mul_(s)
            b_cat = torch.cat([sign * f64[ib] for _, ib, sign in prod.parts], dim=1)
            cats.append((a_cat, b_cat))
        need_prod = [
            any(need_factor[ia] or need_factor[ib] for ia, ib, _ in prod.parts)
            for prod in term.products
        ]
        grad_a = [
            torch.zeros_like(a) if n else None for (a, _), n in zip(cats, need_prod, strict=True)
        ]
        grad_b = [
            torch.zeros_like(b) if n else None for (_, b), n in zip(cats, need_prod, strict=True)
        ]
        total = None
        if term.fused_fn is not None and not _COMPILE_FAILURE:
            try:
                total = _fused_chunks(term, cats, need_prod, grad_a, grad_b)
            except FloatingPointError:
                raise
            except Exception as error:  # no C++ compiler, an inductor bug, ...
                _fall_back_to_eager(term.name, term.layer, error)
                for g in grad_a:  # the chunks folded before the failure: start over
                    if g is not None:
                        g.zero_()
        if total is None:
            total = _eager_chunks(term, cats, need_prod, grad_a, grad_b)
        for k in range(len(cats)):
            if need_prod[k]:
                grad_a[k].mul_(s)
        grads: list[Tensor | None] = [None] * len(factors)
        for k, prod in enumerate(term.products):
            if not need_prod[k]:
                continue
            offset_a = offset_b = 0
            for ia, ib, sign in prod.parts:
                r_a, r_b = f64[ia].shape[0], f64[ib].shape[1]
                for idx, g in (
                    (ia, grad_a[k][offset_a : offset_a + r_a]),
                    (ib, sign * grad_b[k][:, offset_b : offset_b + r_b]),
                ):
                    if need_factor[idx]:
                        grads[idx] = g if grads[idx] is None else grads[idx] + g
                offset_a, offset_b = offset_a + r_a, offset_b + r_b
        present = [g for g in grads if g is not None]
        if present:

            def fail() -> None:
                raise FloatingPointError(
                    f"gradient of {term.name} of layer {term.layer!r} is not finite. "
                    "Check sigma_floor, the std learning rate and std_grad_clamp."
                )

            _require_finite(torch.stack([g.isfinite().all() for g in present]).all(), fail)
        ctx.factor_dtypes = [f.dtype for f in factors]
        ctx.has_grad = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        saved = iter(ctx.saved_tensors)
        grads = []
        for has, dtype in zip(ctx.has_grad, ctx.factor_dtypes, strict=True):
            grads.append((grad_total.to(torch.float64) * next(saved)).to(dtype) if has else None)
        return (None, *grads)


def kl_diag_gaussians(
    q_mean: tuple[Tensor, Tensor],
    q_std: tuple[Tensor, Tensor],
    p_mean: tuple[Tensor, Tensor],
    p_std: tuple[Tensor, Tensor],
    *,
    scale: float,
    floor: float,
    std_param: str,
    layer: str = "<layer>",
    chunk_rows: int | None = None,
    dtype: torch.dtype = torch.float64,
    kernel: str = "eager",
) -> Tensor:
    """KL(q || p) between two diagonal Gaussians over one layer's weights (Eq. 2).

    Each argument is a LoRA pair ``(A, B)`` with A: r x d_in, B: d_out x r. With
    ``mu = s B_mu A_mu`` and ``sigma = f(s B_sd A_sd; c)`` for q (local, phi) and
    p (global, theta), the closed form summed over all d_out x d_in entries is

        sum  log(sig_p / sig_q) + (sig_q^2 + (mu_q - mu_p)^2) / (2 sig_p^2) - 1/2.

    Computed in ``dtype`` (float64 by default; float32 halves the memory traffic, with
    sums still accumulated in float64), ``chunk_rows`` rows at a time, by the in-place eager
    code or (``kernel``: ``compiled``, or ``auto`` for large CUDA layers) one compiled
    kernel per chunk, gradients in closed form:
    dKL/d(mu_q - mu_p) = (mu_q - mu_p) / sig_p^2, dKL/dsig_q^2 = (1/sig_p^2 - 1/sig_q^2) / 2,
    dKL/dsig_p^2 = (1 - (sig_q^2 + (mu_q - mu_p)^2) / sig_p^2) / (2 sig_p^2).
    Returns a float64 scalar.
    """
    form = std_form(std_param)
    out_dim, in_dim = q_mean[1].shape[0], q_mean[0].shape[1]
    # factors: 0 qa_mu, 1 qb_mu, 2 qa_sd, 3 qb_sd, 4 pa_mu, 5 pb_mu, 6 pa_sd, 7 pb_sd
    products = (
        LowRankProduct(((0, 1, 1.0), (4, 5, -1.0))),  # mu_q - mu_p, one rank-2r product
        LowRankProduct(((2, 3, 1.0),)),  # m_q
        LowRankProduct(((6, 7, 1.0),)),  # m_p
    )

    def fn(dense: list[Tensor], need: list[bool], row0: int, scratch):
        diff, var_q, var_p = dense  # scratch chunks, overwritten step by step below
        slope_q = scratch(3) if need[1] else None
        slope_p = scratch(4) if need[2] else None
        form.variance_inplace(var_q, floor, slope_q, None)
        form.variance_inplace(var_p, floor, slope_p, None)
        if form.can_reach_zero:
            _require_nonzero_variance(var_q, "kl (local sigma)", layer, row0)
            _require_nonzero_variance(var_p, "kl (global sigma)", layer, row0)
        # log(sig_p^2 / sig_q^2) in one pass: no cancellation between two large sums of logs
        log_ratio = _sum64(torch.div(var_p, var_q, out=scratch(5)).log_())
        inv_p = var_p.reciprocal_()
        # (sig_q^2 + d^2) / sig_p^2 - 1, summed small rather than as a sum near n minus n
        excess = torch.addcmul(var_q, diff, diff, out=scratch(5)).mul_(inv_p).sub_(1.0)
        value = 0.5 * (log_ratio + _sum64(excess))
        grads: list[Tensor | None] = [None, None, None]
        if need[2]:  # (1 - ratio) / sig_p^2 * (d sig_p^2 / dm_p) / 2
            grads[2] = slope_p.mul_(excess.neg_().mul_(inv_p))
        if need[1]:  # (1 / sig_p^2 - 1 / sig_q^2) * (d sig_q^2 / dm_q) / 2
            grads[1] = torch.sub(inv_p, var_q.reciprocal_(), out=var_q).mul_(slope_q)
        if need[0]:
            grads[0] = diff.mul_(inv_p)
        return value, grads

    fused_fn = None
    if resolve_kernel(kernel, out_dim, in_dim, form, q_mean[0].device) == "compiled":
        fused_fn = _fused_chunk_fn(_kl_chunk_kernel, floor, form)

    term = ChunkedTerm(
        "kl",
        layer,
        scale,
        out_dim,
        chunk_rows or chunk_rows_for(in_dim),
        products,
        fn,
        torch.is_grad_enabled(),
        dtype,
        fused_fn,
    )
    return _RowChunkedSum.apply(term, *q_mean, *q_std, *p_mean, *p_std)


def neg_log_prior(
    mean: tuple[Tensor, Tensor],
    std: tuple[Tensor, Tensor],
    *,
    scale: float,
    floor: float,
    std_param: str,
    prior_mu_var: float,
    a0: float,
    b0: float,
    layer: str = "<layer>",
    chunk_rows: int | None = None,
    dtype: torch.dtype = torch.float64,
    kernel: str = "eager",
) -> Tensor:
    """-log p(theta) for one layer's global Gaussian (docs/method.md).

    p(theta) = N(mu_theta; 0, prior_mu_var) * Gamma(tau; a0, b0), tau = 1 / sigma_theta^2,
    with b0 a rate, evaluated as a density over (mu_theta, tau) entrywise and summed:

        sum  1/2 log(2 pi v) + mu^2 / (2 v)
             - a0 log b0 + lgamma(a0) - (a0 - 1) log tau + b0 tau.

    The constants are kept so that the value equals ``torch.distributions``'
    ``-(Normal.log_prob + Gamma.log_prob)``; they do not affect gradients.
    Computed in ``dtype``, row-chunked (``kernel`` as in :func:`kl_diag_gaussians`), gradients
    in closed form (d/dmu = mu / v, d/dsig^2 = (a0 - 1) / sig^2 - b0 / sig^4). Returns a float64 scalar.
    """
    form = std_form(std_param)
    if not prior_mu_var > 0:
        raise ValueError(f"prior_mu_var must be > 0, got {prior_mu_var}")
    if not (a0 > 0 and b0 > 0):
        raise ValueError(f"the Gamma hyperprior needs a0 > 0 and b0 > 0, got a0={a0}, b0={b0}")
    out_dim, in_dim = mean[1].shape[0], mean[0].shape[1]
    const = 0.5 * math.log(2.0 * math.pi * prior_mu_var) - a0 * math.log(b0) + math.lgamma(a0)
    products = (LowRankProduct(((0, 1, 1.0),)), LowRankProduct(((2, 3, 1.0),)))

    def fn(dense: list[Tensor], need: list[bool], row0: int, scratch):
        mu, var = dense  # scratch chunks, overwritten below
        slope = scratch(2) if need[1] else None
        # the Gamma term's (a0 - 1) sum(log sig^2) vanishes for v1's a0 = 1: skip the logs
        log_scratch = scratch(3) if a0 != 1.0 else None
        log_sum = form.variance_inplace(var, floor, slope, log_scratch)
        if form.can_reach_zero:
            _require_nonzero_variance(var, "prior (global sigma)", layer, row0)
        inv = var.reciprocal_()
        # -(a0 - 1) log tau = (a0 - 1) log sig^2 ; b0 tau = b0 / sig^2
        flat_mu = mu.reshape(-1)
        value = (
            mu.numel() * const
            + torch.dot(flat_mu, flat_mu).to(torch.float64) / (2.0 * prior_mu_var)
            + ((a0 - 1.0) * log_sum if log_sum is not None else 0.0)
            + b0 * _sum64(inv)
        )
        grads: list[Tensor | None] = [None, None]
        if need[0]:
            grads[0] = mu.mul_(1.0 / prior_mu_var)
        if need[1]:
            # ((a0 - 1) / sig^2 - b0 / sig^4) * d sig^2 / dm, the slope stored halved
            grads[1] = slope.mul_(
                torch.mul(inv, -2.0 * b0, out=scratch(3)).add_(2.0 * (a0 - 1.0)).mul_(inv)
            )
        return value, grads

    fused_fn = None
    if resolve_kernel(kernel, out_dim, in_dim, form, mean[0].device) == "compiled":
        fused_fn = _fused_chunk_fn(
            _prior_chunk_kernel, floor, form, 1.0 / prior_mu_var, a0, b0, per_entry=const
        )

    term = ChunkedTerm(
        "prior",
        layer,
        scale,
        out_dim,
        chunk_rows or chunk_rows_for(in_dim),
        products,
        fn,
        torch.is_grad_enabled(),
        dtype,
        fused_fn,
    )
    return _RowChunkedSum.apply(term, *mean, *std)


# --------------------------------------------------------------------------------------
# Sampling: the stochastic part of the layer output
# --------------------------------------------------------------------------------------


def _symmetric_pairs(rank: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    first, second = torch.triu_indices(rank, rank, device=device)
    weight = torch.where(first == second, 1.0, 2.0)
    return first, second, weight


def output_variance(
    x2: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    scale: float,
    floor: float,
    std_param: str,
    chunk_rows: int | None = None,
) -> Tensor:
    """Per-output variance sum_j sigma_ij^2 x_j^2 of the weight-space Gaussian.

    ``x2`` is x o x (..., d_in). For ``softabs`` and ``affine`` this is exact and
    low-rank, with no dense d_out x d_in tensor (docs/method.md):

        (s B A)^2 x^2 = s^2 (B * B)(A * A) x^2,

    where B * B (d_out x r^2) and A * A (r^2 x d_in) are row-wise Kronecker
    (Khatri-Rao) products; by symmetry only the r(r+1)/2 distinct pairs k <= l are
    formed, off-diagonal ones counted twice. ``softabs`` adds c^2 sum_j x_j^2;
    ``affine`` adds 2 c s B (A x^2) + c^2 sum_j x_j^2. ``exp`` has no low-rank
    form and is computed densely, ``chunk_rows`` output rows at a time.
    """
    form = std_form(std_param)
    sum_x2 = x2.sum(dim=-1, keepdim=True)
    if not form.low_rank_variance:  # dense, chunk by chunk
        rows_per_chunk = chunk_rows or chunk_rows_for(a.shape[1])
        parts = []
        for start in range(0, b.shape[0], rows_per_chunk):
            m = scale * (b[start : start + rows_per_chunk] @ a)
            parts.append(x2 @ form.variance(m, floor).transpose(0, 1))
        return torch.cat(parts, dim=-1)
    first, second, pair_weight = _symmetric_pairs(a.shape[0], a.device)
    kr_a = a[first] * a[second]  # (P, d_in)
    kr_b = b[:, first] * b[:, second] * pair_weight.to(b.dtype)  # (d_out, P)
    quad = (x2 @ kr_a.transpose(0, 1)) @ kr_b.transpose(0, 1)
    # (s B A)^2 x^2 >= 0 exactly; rounding can push it a hair below zero.
    var = (scale * scale) * quad.clamp_min(0.0) + (floor * floor) * sum_x2
    extra = form.output_variance_extra(x2, a, b, scale, floor)
    return var if extra is None else var + extra


def _normal(shape, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def draw_seed() -> int:
    """A seed for one forward's noise, drawn from torch's global RNG (so ``torch.manual_seed``
    makes runs reproducible, and activation checkpointing, which restores RNG state on
    recompute, regenerates the same noise)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The variance goes down to c^2 = e^-40: do it in at least float32.
    return torch.promote_types(dtype, torch.float32)


def _local_noise(x: Tensor, a: Tensor, b: Tensor, eps: Tensor, cfg: dict) -> Tensor:
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    var = output_variance(xc * xc, a.to(cdt), b.to(cdt), **cfg)
    tiny = torch.finfo(cdt).tiny  # keeps sqrt's gradient finite where the variance is 0
    return (torch.sqrt(var.clamp_min(tiny)) * eps).to(x.dtype)


class _LocalReparamNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, seed, cfg):
        shape = (*x.shape[:-1], b.shape[0])
        eps = _normal(shape, seed, x.device, _compute_dtype(x.dtype))
        ctx.save_for_backward(x, a, b)
        ctx.seed, ctx.cfg = seed, cfg
        return _local_noise(x, a, b, eps, cfg)

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b = ctx.saved_tensors
        shape = (*x.shape[:-1], b.shape[0])
        eps = _normal(shape, ctx.seed, x.device, _compute_dtype(x.dtype))
        need = ctx.needs_input_grad[:3]
        leaves = [t.detach().requires_grad_(n) for t, n in zip((x, a, b), need, strict=True)]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        if not wanted:
            return None, None, None, None, None
        with torch.enable_grad():
            noise = _local_noise(*leaves, eps, ctx.cfg)
            grads = iter(torch.autograd.grad(noise, wanted, grad_out))
        return (*(next(grads) if leaf.requires_grad else None for leaf in leaves), None, None)


# eager under torch.compile: its generator and seed cannot be traced, and tracing them
# anew each call only piles up graph breaks and recompilations
@torch.compiler.disable
def local_reparam_noise(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    scale: float,
    floor: float,
    std_param: str,
    seed: int | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """sqrt(sum_j sigma_ij^2 x_j^2) * eps_i, eps ~ N(0, I) per token and output.

    The local reparameterization trick: the exact per-layer marginal of
    (W0 + mu + sigma o E) x with E ~ N(0, I) elementwise, minus its mean. The
    variance is recomputed and the noise regenerated from ``seed`` in backward,
    so nothing beyond the input (which the LoRA mean path keeps anyway) is saved.
    """
    _check_std_param(std_param)
    cfg = dict(scale=scale, floor=floor, std_param=std_param, chunk_rows=chunk_rows)
    return _LocalReparamNoise.apply(x, a, b, draw_seed() if seed is None else seed, cfg)


class _WeightSpaceNoise(torch.autograd.Function):
    """x (sigma o E)^T with one E ~ N(0, I) of shape d_out x d_in shared by the batch.

    E is generated chunk by chunk (one generator seed per chunk) and regenerated in
    backward, so neither E nor sigma is stored.
    """

    @staticmethod
    def forward(ctx, x, a, b, seed, cfg):
        ctx.save_for_backward(x, a, b)
        ctx.seed, ctx.cfg = seed, cfg
        out = []
        with torch.no_grad():
            for _, _, noise_w in _weight_noise_chunks(a, b, seed, cfg):
                out.append(x @ noise_w.to(x.dtype).transpose(0, 1))
        return torch.cat(out, dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        a_leaf = a.detach().requires_grad_(need_a)
        b_leaf = b.detach().requires_grad_(need_b)
        grad_x = torch.zeros_like(x) if need_x else None
        x_flat = x.reshape(-1, x.shape[-1])
        g_flat = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.enable_grad():
            for _, rows, noise_w in _weight_noise_chunks(a_leaf, b_leaf, ctx.seed, ctx.cfg):
                g_rows = g_flat[:, rows]
                if need_x:
                    grad_x += (g_rows @ noise_w.detach().to(x.dtype)).reshape(x.shape)
                if need_a or need_b:
                    grad_w = g_rows.transpose(0, 1).to(noise_w.dtype) @ x_flat.to(noise_w.dtype)
                    noise_w.backward(grad_w)
        grad_a = a_leaf.grad if need_a else None
        grad_b = b_leaf.grad if need_b else None
        return grad_x, grad_a, grad_b, None, None


def _weight_noise_chunks(a: Tensor, b: Tensor, seed: int, cfg: dict):
    scale, floor, std_param = cfg["scale"], cfg["floor"], cfg["std_param"]
    rows_per_chunk = cfg["chunk_rows"] or chunk_rows_for(a.shape[1])
    cdt = _compute_dtype(a.dtype)
    for i, start in enumerate(range(0, b.shape[0], rows_per_chunk)):
        rows = slice(start, min(start + rows_per_chunk, b.shape[0]))
        m = scale * (b[rows].to(cdt) @ a.to(cdt))
        eps = _normal(m.shape, seed + i, a.device, cdt)
        yield i, rows, std_dense(m, floor, std_param) * eps


# eager under torch.compile: its generator and seed cannot be traced, and tracing them
# anew each call only piles up graph breaks and recompilations
@torch.compiler.disable
def weight_space_noise(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    scale: float,
    floor: float,
    std_param: str,
    seed: int | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """x (sigma o E)^T for one weight-space sample E shared by the whole batch."""
    _check_std_param(std_param)
    cfg = dict(scale=scale, floor=floor, std_param=std_param, chunk_rows=chunk_rows)
    return _WeightSpaceNoise.apply(x, a, b, draw_seed() if seed is None else seed, cfg)
