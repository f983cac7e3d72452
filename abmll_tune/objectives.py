"""Training objectives: the answer NLL and ABMLL's tempered ELBO (arXiv 2508.14285, Eq. 2).

Per inner step on a batch of task i (``docs/method.md``)::

    L = NLL(batch | phi ~ q)  +  beta * KL(q(phi | D_i) || p(phi | theta))  +  gamma * (-log p(theta))

* NLL is the mean cross-entropy over the answer tokens of the batch, computed as
  torchtune's recipes do (labels shifted by one, the prompt masked): one answer letter
  per question, so it is the mean over questions, and logits are computed at the answer
  positions only. beta and gamma are relative to it.
* KL is summed over every weight entry of every adapted layer
  (:func:`abmll_tune.modules.kl_local_global`), -log p(theta) likewise
  (:func:`abmll_tune.modules.neg_log_prior_global`); both in float64.
* In the inner loop only the local pairs are trained, so -log p(theta), a function of
  the global pairs alone, is constant there and is evaluated in the outer step only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from abmll_tune.modules import VariationalLoRALinear, kl_local_global, neg_log_prior_global


def shifted_labels(labels: Tensor) -> Tensor:
    """torchtune's convention: position t predicts token t + 1."""
    ignore = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    return torch.cat([labels[:, 1:], ignore], dim=1)


@contextmanager
def output_at(model: nn.Module, positions: Tensor) -> Iterator[None]:
    """Within the block, ``model(tokens)`` returns ``(B, vocab)`` logits at
    ``positions[b]`` of each row only.

    torchtune's decoder applies its final norm and output projection to every position
    (49152-way for SmolLM2: about a fifth of the forward). Scoring and the answer loss
    need one position per question, so the decoder's ``unembed`` is replaced, for this
    model instance only, by one that selects those positions first; the layers, their
    hooks (FSDP, activation checkpointing, compile) and the root forward are untouched.
    """
    rows = torch.arange(positions.shape[0], device=positions.device)

    def unembed(h: Tensor) -> Tensor:
        selected = model.norm(h[rows, positions.to(h.device)])
        return model.output(selected).float()

    model.unembed = unembed
    try:
        yield
    finally:
        del model.unembed


def on_model_device(model: nn.Module, batch: dict) -> dict:
    """``batch`` with its tensors on the device of ``model``'s parameters.

    Batches are collated on the CPU (the data loaders know nothing of the device); every
    objective that runs the model on a batch moves it here, so training, validation and
    evaluation run wherever the recipe put the model. Tensors already there are not copied.
    The adapters' device is the compute device: a base FSDP2 offloads to the CPU
    (``fsdp_cpu_offload``) still computes on the GPU, where the adapters stay.
    """
    # the first adapter module found ends the walk: this runs on every batch
    layer = next((m for m in model.modules() if isinstance(m, VariationalLoRALinear)), None)
    if layer is not None:
        device = layer.get_parameter(layer.adapter_params()[0]).device
    else:
        device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _logits_at_answers(model: nn.Module, batch: dict) -> Tensor:
    with output_at(model, batch["answer_positions"]):
        return model(batch["tokens"])


def answer_logits(model: nn.Module, batch: dict) -> Tensor:
    """``(B, vocab)`` float logits at each question's answer position (see :func:`output_at`)."""
    return _logits_at_answers(model, on_model_device(model, batch))


def answer_targets(batch: dict) -> Tensor:
    """The answer token of each question: the label after its answer position."""
    labels = shifted_labels(batch["labels"])
    rows = torch.arange(labels.shape[0], device=labels.device)
    return labels[rows, batch["answer_positions"].to(labels.device)]


def answer_nll(model: nn.Module, batch: dict, loss_fn: nn.Module | None = None) -> Tensor:
    """Mean cross-entropy of the answer tokens of ``batch`` (the prompt is masked).

    Each question has one answer token (its letter), so this is the mean over questions
    of the cross-entropy at the answer position, and the output projection is applied
    there only (:func:`answer_logits`). ``loss_fn`` may be torchtune's
    ``CEWithChunkedOutputLoss`` (given the answer logits as its single chunk) or any
    ``(logits, targets)`` loss; default: plain CE.
    """
    batch = on_model_device(model, batch)  # once: the logits and the targets use it
    logits = _logits_at_answers(model, batch)
    targets = answer_targets(batch)
    if loss_fn is None:
        return F.cross_entropy(logits, targets, ignore_index=CROSS_ENTROPY_IGNORE_IDX)
    if hasattr(loss_fn, "num_output_chunks"):  # chunked loss: one chunk of one position
        return loss_fn([logits[:, None]], targets[:, None])
    return loss_fn(logits, targets)


@dataclass(frozen=True)
class ELBOWeights:
    """Temperatures and hyperprior of the tempered ELBO.

    beta weighs the local KL, gamma the global prior (v1: beta = 5e-10, gamma = 1e-6,
    a0 = 1, b0 = 0.01). ``prior_mu_var`` is the variance of N(mu_theta; 0, v):
    ``"pretrained"`` (the frozen weight's variance, default), ``"sigma_floor"`` (c, the
    literal reading) or a number. (v3's single beta is gamma = beta.)
    """

    beta: float = 5e-10
    gamma: float = 1e-6
    prior_mu_var: float | str = "pretrained"
    a0: float = 1.0
    b0: float = 0.01


def beta_kl(model: nn.Module, weights: ELBOWeights) -> Tensor:
    """beta * KL(q(phi | D_i) || p(phi | theta)), float64."""
    return weights.beta * kl_local_global(model)


def gamma_prior(model: nn.Module, weights: ELBOWeights) -> Tensor:
    """gamma * (-log p(theta)), float64."""
    return weights.gamma * neg_log_prior_global(model, weights.prior_mu_var, weights.a0, weights.b0)
