"""Write a torchtune model as a Hugging Face-format checkpoint directory.

Used to create the project's own small backbones (tests, the CPU demo) so that they
load through torchtune's ``FullModelHFCheckpointer`` exactly like a downloaded
Llama3 or Qwen2 checkpoint: ``model.safetensors`` with HF key names (converted by
torchtune's own ``convert_weights``) and a ``config.json``. The directory is written
to a temporary sibling and renamed into place, so a failed write leaves nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.models import convert_weights
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

from abmll_tune.io import atomic_directory

_ARCHITECTURES = {
    "LLAMA3": "LlamaForCausalLM",
    "LLAMA3_2": "LlamaForCausalLM",
    "QWEN2": "Qwen2ForCausalLM",
}


def write_hf_checkpoint(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    model_type: str,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float = 500_000.0,
    norm_eps: float = 1e-5,
    tie_word_embeddings: bool = False,
    overwrite: bool = False,
    extra_config: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a torchtune-format (base model) ``state_dict`` as an HF checkpoint directory.

    Adapter keys (containing ``lora``) are rejected: this writes base models only.
    ``extra_config`` adds keys to ``config.json``; ``extra_files`` (name -> text, e.g.
    tokenizer files) are written into the same directory, in the same atomic step.
    Returns the directory.
    """
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(_ARCHITECTURES)}, got {model_type!r}")
    adapter_keys = [k for k in state_dict if "lora" in k]
    if adapter_keys:
        raise ValueError(
            f"write_hf_checkpoint writes base weights only; got adapter keys {adapter_keys[:3]}"
        )
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    convert_kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, dim=embed_dim)
    if model_type == "QWEN2":
        hf_state = qwen2_tune_to_hf(
            state_dict, tie_word_embeddings=tie_word_embeddings, **convert_kwargs
        )
    else:
        hf_state = convert_weights.tune_to_hf(state_dict, **convert_kwargs)
    config = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": "qwen2" if model_type == "QWEN2" else "llama",
        "vocab_size": vocab_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_size": embed_dim,
        "head_dim": embed_dim // num_heads,
        "intermediate_size": intermediate_dim,
        "max_position_embeddings": max_seq_len,
        "rope_theta": rope_base,
        "rms_norm_eps": norm_eps,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": str(next(iter(hf_state.values())).dtype).removeprefix("torch."),
        **(extra_config or {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state.items()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return directory
