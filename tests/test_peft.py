"""HF PEFT in the project's own environment (pip install abmll-tune[peft]; peft 0.18.1 is
the newest release that imports beside torchao 0.15, which torchtune 0.6.1 needs): the
exported adapter loads with PeftModel and AutoPeftModelForCausalLM and gives the logits of
the project's model, and a LoRA adapter made by peft itself evaluates through the project."""

import peft
import torch
import transformers
from omegaconf import OmegaConf

from abmll_tune.checkpointing import export_peft_adapter, load_peft_adapter
from abmll_tune.embedded.backbone import TINY_LLAMA3
from abmll_tune.models.loading import build_model
from abmll_tune.modules import adapter_mode, adapter_params_by_group

TARGETS = ["q_proj", "v_proj", "output_proj"]
HF_TARGETS = ["q_proj", "v_proj", "o_proj"]


def _model(checkpoint_dir, out):
    model_cfg = OmegaConf.create(
        {
            "_component_": "abmll_tune.models.abmll_llama3",
            **TINY_LLAMA3,
            "lora_attn_modules": TARGETS,
            "lora_rank": 8,
            "lora_alpha": 16,
        }
    )
    ckpt_cfg = OmegaConf.create(
        {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(out),
        }
    )
    model, hf_config = build_model(
        model_cfg, ckpt_cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0
    )
    return model.eval(), hf_config


def _ours(model, tokens):
    with torch.no_grad(), adapter_mode(model, "global_mean"):
        return model(tokens)


def _tokens():
    return torch.randint(
        0, TINY_LLAMA3["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3)
    )


def test_the_export_loads_in_peft_with_the_same_logits(tiny_llama3_checkpoint, tmp_path):
    model, _ = _model(tiny_llama3_checkpoint, tmp_path / "out")
    with torch.no_grad():  # a trained-looking global mean (LoRA's B starts at zero)
        for p in adapter_params_by_group(model, "global", "mean").values():
            p.copy_(0.05 * torch.randn_like(p))
    export_peft_adapter(
        model, tmp_path / "adapter", rank=8, alpha=16, lora_attn_modules=TARGETS,
        apply_lora_to_mlp=False, apply_lora_to_output=False, num_heads=TINY_LLAMA3["num_heads"],
        num_kv_heads=TINY_LLAMA3["num_kv_heads"], dim=TINY_LLAMA3["embed_dim"],
        base_model_name_or_path=str(tiny_llama3_checkpoint),
    )  # fmt: skip
    tokens = _tokens()
    expected = _ours(model, tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama3_checkpoint, dtype=torch.float32
    )
    with torch.no_grad():
        plain = base(tokens).logits
        assert (plain - expected).abs().max() > 1e-3  # the adapter changes the logits
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=1e-4)
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        torch.testing.assert_close(auto(tokens).logits, expected, rtol=0, atol=1e-4)


def test_a_lora_adapter_made_by_peft_runs_in_the_project(tiny_llama3_checkpoint, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama3_checkpoint, dtype=torch.float32
    )
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS, lora_dropout=0.0)
    theirs = peft.get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    tokens = _tokens()
    with torch.no_grad():
        expected = theirs.eval()(tokens).logits
    model, hf_config = _model(tiny_llama3_checkpoint, tmp_path / "out")
    load_peft_adapter(tmp_path / "peft_adapter", model, hf_config)
    torch.testing.assert_close(_ours(model, tokens), expected, rtol=0, atol=1e-4)
