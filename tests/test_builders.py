"""Model builders: targets, freezing, parameter counts, paper-size shapes, HF checkpoints."""

import pytest
import torch
from torchtune import training
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2
from torchtune.modules.peft import get_adapter_params, get_adapter_state_dict
from torchtune.training import FullModelHFCheckpointer

from abmll_tune import models
from abmll_tune.embedded.backbone import TINY_LLAMA3, TINY_QWEN2
from abmll_tune.modules import VariationalLoRALinear, adapter_mode, variational_lora_layers

PAIRS = 4


def expected_adapter_count(model, targets, rank, pairs=PAIRS):
    """sum over adapted linears of pairs * rank * (d_in + d_out), read off the stock model."""
    total = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, torch.nn.Linear):
            total += pairs * rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize(
    "builder, stock, arch",
    [(models.abmll_llama3, llama3, TINY_LLAMA3), (models.abmll_qwen2, qwen2, TINY_QWEN2)],
)
@pytest.mark.parametrize(
    "attn, mlp, output",
    [(["q_proj", "v_proj", "output_proj"], False, False), (["k_proj"], True, True)],
)
def test_only_the_four_pairs_on_targets_are_trainable(builder, stock, arch, attn, mlp, output):
    model = builder(attn, mlp, output, lora_rank=4, lora_alpha=8, **arch)
    targets = set(attn) | ({"w1", "w2", "w3"} if mlp else set()) | ({"output"} if output else set())
    adapted = variational_lora_layers(model)
    assert {n.split(".")[-1] for n in adapted} == targets
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(get_adapter_params(model))
    assert all(".lora_" in n for n in trainable)
    reference = expected_adapter_count(stock(**arch), targets, rank=4)
    assert sum(p.numel() for p in trainable.values()) == reference
    # base weights are the frozen `weight`/`bias` of the swapped layers
    q = adapted.get("layers.0.attn.q_proj") or adapted["layers.0.attn.k_proj"]
    assert not q.weight.requires_grad and (q.bias is None or not q.bias.requires_grad)


@pytest.mark.parametrize(
    "builder, stock_name, shapes",
    [
        (
            models.abmll_llama3_8b,
            "llama3_8b",
            {"q_proj": (4096, 4096), "v_proj": (1024, 4096), "output_proj": (4096, 4096)},
        ),
        (
            models.abmll_qwen2_7b,
            "qwen2_7b",
            {"q_proj": (3584, 3584), "v_proj": (512, 3584), "output_proj": (3584, 3584)},
        ),
    ],
)
def test_paper_models_build_on_meta_with_right_shapes(builder, stock_name, shapes):
    with torch.device("meta"):
        model = builder()
    assert len(model.layers) == (32 if "llama" in stock_name else 28)
    layer = model.layers[0].attn
    for name, (d_out, d_in) in shapes.items():
        module = getattr(layer, name)
        assert isinstance(module, VariationalLoRALinear)
        assert module.weight.shape == (d_out, d_in) and module.weight.is_meta
        assert module.rank == 8 and module.alpha == 16
        assert module.lora_global_std_a.weight.shape == (8, d_in)
        assert module.lora_local_mean_b.weight.shape == (d_out, 8)
    if "qwen" in stock_name:  # Qwen2's q/k/v carry biases, which must be kept
        assert layer.v_proj.bias.shape == (512,) and layer.output_proj.bias is None
    n_layers = len(model.layers)
    per_block = sum(PAIRS * 8 * (d_in + d_out) for d_out, d_in in shapes.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_layers * per_block


@pytest.mark.parametrize(
    "name",
    [n for n in models.__all__ if n.startswith("abmll_") and n.split("_")[-1][-1] == "b"],
)
def test_every_sized_builder_builds_on_meta(name):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert len(variational_lora_layers(model)) == 3 * len(model.layers)


def test_builder_rejects_bad_targets():
    with pytest.raises(ValueError, match="unknown entries"):
        models.abmll_llama3(["q_proj", "gate_proj"], **TINY_LLAMA3)
    with pytest.raises(ValueError, match="tied word embeddings"):
        models.abmll_qwen2(
            ["q_proj"], apply_lora_to_output=True, tie_word_embeddings=True, **TINY_QWEN2
        )
    with pytest.raises(TypeError, match="unexpected arguments"):
        with torch.device("meta"):
            models.abmll_llama3_8b(lora_rnak=8)


def load_through_checkpointer(ckpt_dir, model_type, out_dir):
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model.safetensors"],
        model_type=model_type,
        output_dir=str(out_dir),
    )
    return checkpointer.load_checkpoint()[training.MODEL_KEY]


@pytest.mark.parametrize(
    "family, builder, stock, arch, model_type",
    [
        ("llama3", models.abmll_llama3, llama3, TINY_LLAMA3, "LLAMA3"),
        ("qwen2", models.abmll_qwen2, qwen2, TINY_QWEN2, "QWEN2"),
    ],
)
def test_hf_checkpoint_loads_into_abmll_model(
    family, builder, stock, arch, model_type, request, tmp_path
):
    ckpt = request.getfixturevalue(f"tiny_{family}_checkpoint")
    state = load_through_checkpointer(ckpt, model_type, tmp_path / "out")
    model = builder(["q_proj", "v_proj", "output_proj"], **arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing and all(
        ".lora_" in k for k in missing
    )  # only adapters are not in the checkpoint
    # the adapted model at its (zero) global mean is exactly the stock torchtune model
    reference = stock(**arch)
    reference.load_state_dict(state, strict=True)
    tokens = torch.randint(0, arch["vocab_size"], (2, 9))
    with torch.no_grad(), adapter_mode(model, "global_mean"):
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)
    # adapter keys are what torchtune's adapter utilities expect
    adapter_keys = set(get_adapter_state_dict(model.state_dict()))
    assert adapter_keys == set(get_adapter_params(model)) == set(missing)


def test_backbone_pretraining_lowers_the_lm_loss_deterministically(embedded_source):
    from abmll_tune.embedded.backbone import build_tiny_base
    from abmll_tune.embedded.pretrain import pretrain, pretraining_texts
    from abmll_tune.embedded.suite import MODEL_VOCAB, llama3_tokenizer, task_names

    texts = pretraining_texts(40)
    assert any(t.startswith("Return the label") for t in texts) and any(
        "Question" not in t for t in texts
    )
    suite_tasks = {n for names in task_names().values() for n in names}
    assert not any(
        name in " ".join(texts) for name in suite_tasks
    )  # fresh tasks, never the suite's
    tok = llama3_tokenizer(embedded_source / "tokenizer")
    runs = []
    for _ in range(2):
        model = build_tiny_base("llama3", 0, vocab_size=MODEL_VOCAB, max_seq_len=256)
        runs.append(pretrain(model, tok, steps=60, batch_size=8, log=None))
    assert runs[0] == runs[1]
    assert sum(runs[0][-10:]) / 10 < sum(runs[0][:10]) / 10 - 1.0
