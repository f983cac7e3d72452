"""Logits at the answer positions only: the same losses and scores as full logits."""

import pytest
import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.loss import CEWithChunkedOutputLoss

from abmll_tune.data.loader import TaskData, collate_mc
from abmll_tune.embedded.backbone import TINY_EMBEDDED
from abmll_tune.embedded.suite import llama3_tokenizer
from abmll_tune.evaluation import option_probabilities
from abmll_tune.models import abmll_llama3
from abmll_tune.modules import ADAPTER_MODES, adapter_mode, adapter_params_by_group
from abmll_tune.objectives import answer_logits, answer_nll, shifted_labels


@pytest.fixture(scope="module")
def batch(embedded_split, embedded_source):
    data = TaskData(embedded_split, llama3_tokenizer(embedded_source / "tokenizer"), max_seq_len=64)
    examples = next(iter(data.train_tasks().values()))
    return collate_mc(examples[:6])  # right-padded: answer positions differ per row


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = abmll_llama3(**TINY_EMBEDDED, variational=True, sampling="local")
    with torch.no_grad():
        for p in adapter_params_by_group(model).values():
            p.normal_(0, 0.05)
    return model.eval()


def full_logits_nll(model, batch):
    """The previous computation: 768-way logits at every position, masked CE."""
    logits = model(batch["tokens"])
    labels = shifted_labels(batch["labels"])
    return logits, F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
    )


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_answer_logits_and_loss_equal_the_full_logits_path(model, batch, mode):
    assert len(set(batch["answer_positions"].tolist())) > 1
    rows = torch.arange(batch["tokens"].shape[0])
    with adapter_mode(model, mode):
        torch.manual_seed(1)  # sampling modes draw the same noise in both paths
        full, reference_nll = full_logits_nll(model, batch)
        torch.manual_seed(1)
        at_answer = answer_logits(model, batch)
        torch.manual_seed(1)
        nll = answer_nll(model, batch)
    assert at_answer.shape == (6, full.shape[-1])
    torch.testing.assert_close(at_answer, full[rows, batch["answer_positions"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(nll, reference_nll, rtol=1e-6, atol=1e-6)
    assert "unembed" not in vars(model)  # the instance override is gone


def test_option_scores_equal_the_full_logits_path(model, batch):
    with adapter_mode(model, "global_mean"):
        probs = option_probabilities(model, batch)
        full = model(batch["tokens"])
    at = full[torch.arange(6), batch["answer_positions"]]
    ids = batch["option_ids"]
    picked = at.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, float("-inf"))
    expected = torch.softmax(picked, -1).masked_fill(ids < 0, float("nan"))
    torch.testing.assert_close(probs, expected, equal_nan=True, rtol=0, atol=1e-6)


def test_chunked_output_loss_and_chunked_models_give_the_same_answer_loss(model, batch):
    with adapter_mode(model, "global_mean"):
        plain = answer_nll(model, batch)
        chunked_loss = answer_nll(model, batch, CEWithChunkedOutputLoss(num_output_chunks=8))
        model.set_num_output_chunks(8)  # as the recipe does for that loss
        try:
            chunked_model = answer_nll(model, batch)
        finally:
            model.set_num_output_chunks(0)
    torch.testing.assert_close(chunked_loss, plain)
    torch.testing.assert_close(chunked_model, plain)


class _DeviceProbe(torch.nn.Module):
    """A model whose parameters live on the meta device; its forward records where the
    tokens it was given live, then stops the objective (nothing else is needed)."""

    class Stop(Exception):
        pass

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.seen = []

    def forward(self, tokens):
        self.seen.append((tokens.device, self.unembed is not None))
        raise self.Stop


@pytest.mark.parametrize("objective", ["answer_nll", "answer_logits", "option_probabilities"])
def test_objectives_run_the_model_on_batches_moved_to_its_device(batch, objective):
    # batches are collated on the CPU; on a GPU the model is elsewhere (the first GPU run
    # failed in every recipe with "index is on cpu, different from other tensors on cuda:0")
    fn = {
        "answer_nll": answer_nll,
        "answer_logits": answer_logits,
        "option_probabilities": option_probabilities,
    }[objective]
    probe = _DeviceProbe()
    probe.unembed = None
    with pytest.raises(_DeviceProbe.Stop):
        fn(probe, batch)
    assert probe.seen == [(torch.device("meta"), True)]
    assert batch["tokens"].device.type == "cpu"  # the caller's batch is left as it was
