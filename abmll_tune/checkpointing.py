"""Meta-training checkpoints and the PEFT export of the global posterior mean.

A checkpoint is a directory, written to a temporary sibling and renamed into place::

    adapters.safetensors     every adapter parameter (all four pairs for ABMLL), by
                             the model's own parameter names (safetensors)
    training_state.pt        optimizer states and RNG states; tensors, numbers and
                             lists only, read back with torch.load(weights_only=True)
    meta.json                format, version, method, progress (epoch, position,
                             visits), adapter shapes, the resolved config
    adapter/                 the global mean pair as a standard LoRA adapter in PEFT
                             format (adapter_model.safetensors + adapter_config.json,
                             converted with torchtune's own functions, as its
                             checkpointer writes them)

Loading checks the format version, the method and every adapter shape before touching
the model, and names the file and the mismatch.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.models import convert_weights
from torchtune.modules.peft import get_lora_module_names

from abmll_tune.io import COMPLETE_SUFFIX, atomic_directory, atomic_write_json
from abmll_tune.modules import adapter_params_by_group, variational_lora_layers

FORMAT = "abmll-tune-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run: names the file and what is wrong."""


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter by name, detached on the CPU."""
    return {
        name: p.detach().cpu().contiguous().clone()
        for name, p in adapter_params_by_group(model).items()
    }


def global_mean_as_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global mean pair of every adapted layer under torchtune's LoRA names
    (``...q_proj.lora_a.weight``): the posterior mean as a plain LoRA adapter."""
    out = {}
    for prefix, layer in variational_lora_layers(model).items():
        a, b = layer.pair("global", "mean")
        out[f"{prefix}.lora_a.weight"] = a.detach().cpu().contiguous().clone()
        out[f"{prefix}.lora_b.weight"] = b.detach().cpu().contiguous().clone()
    return out


def export_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    rank: int,
    alpha: float,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    num_heads: int,
    num_kv_heads: int,
    dim: int,
    head_dim: int | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT format) for the
    global mean pair, converted by torchtune's ``tune_to_peft_adapter_weights`` and
    ``tune_to_peft_adapter_config`` as its HF checkpointer does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = convert_weights.tune_to_peft_adapter_weights(
        global_mean_as_lora(model),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        dim=dim,
        head_dim=head_dim,
    )
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = convert_weights.tune_to_peft_adapter_config(
        {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": get_lora_module_names(
                lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output
            ),
            "peft_type": "LORA",
        },
        base_model_name_or_path=base_model_name_or_path,
    )
    # what peft.AutoPeftModelForCausalLM.from_pretrained(directory) needs to find the base
    config["task_type"] = "CAUSAL_LM"
    config["base_model_name_or_path"] = base_model_name_or_path
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def peft_to_tune_adapter(
    peft_state: dict[str, torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    dim: int,
    head_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of torchtune's ``tune_to_peft_adapter_weights``: PEFT keys back to torchtune
    LoRA keys (``layers.0.attn.q_proj.lora_a.weight``), the q/k ``lora_B`` un-permuted.

    torchtune 0.6.1 has no public inverse; this inverts its (pinned) key tables.
    """
    head_dim = head_dim or dim // num_heads
    inverse = {}
    for tune_name, peft_name in convert_weights._TO_PEFT_KEYS.items():
        if tune_name == "magnitude":
            continue
        for hf_key, tune_key in convert_weights._FROM_HF.items():
            if tune_key is not None:
                inverse[hf_key.replace(".weight", f".{peft_name}.weight")] = tune_key.replace(
                    ".weight", f".{tune_name}.weight"
                )

    def unpermute(t: torch.Tensor, n_heads: int) -> torch.Tensor:
        rank = t.shape[-1]
        return (
            t.view(n_heads, 2, head_dim // 2, rank)
            .transpose(1, 2)
            .reshape(n_heads * head_dim, rank)
        )

    out = {}
    for key, value in peft_state.items():
        try:
            tune_key = convert_weights.get_mapped_key(
                key.removeprefix("base_model.model."), inverse
            )
        except Exception:  # noqa: BLE001 - torchtune raises a bare Exception for unknown keys
            raise CheckpointError(f"unexpected PEFT adapter key {key!r}") from None
        if "q_proj" in tune_key and "lora_b" in tune_key:
            value = unpermute(value, num_heads)
        elif "k_proj" in tune_key and "lora_b" in tune_key:
            value = unpermute(value, num_kv_heads)
        out[tune_key] = value
    return out


def checkpoint_kind(directory: str | os.PathLike) -> str:
    """``"abmll"`` (an abmll-tune checkpoint, meta.json) or ``"peft"`` (a PEFT LoRA adapter:
    adapter_config.json + adapter_model.safetensors); anything else raises."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if (directory / "meta.json").is_file():
        return "abmll"
    if (directory / "adapter_config.json").is_file() and (
        directory / "adapter_model.safetensors"
    ).is_file():
        return "peft"
    raise CheckpointError(
        f"{directory}: neither an abmll-tune checkpoint (meta.json) nor a PEFT LoRA adapter "
        "(adapter_config.json + adapter_model.safetensors)"
    )


def load_peft_adapter(directory: str | os.PathLike, model: nn.Module, hf_config: dict) -> None:
    """Load a PEFT LoRA adapter (this project's export, or one trained elsewhere on the same
    base) into the model's global mean pair, after checking its rank, alpha, targets and
    every shape against the model."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: unreadable ({err})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    layers = variational_lora_layers(model)
    any_layer = next(iter(layers.values()))
    for key, mine in (("r", any_layer.rank), ("lora_alpha", any_layer.alpha)):
        if key in config and float(config[key]) != float(mine):
            raise CheckpointError(
                f"{config_path}: {key} = {config[key]}, the model's adapters have {mine}; set "
                "model.lora_rank / model.lora_alpha to the adapter's"
            )
    weights_path = directory / "adapter_model.safetensors"
    try:
        peft_state = load_file(str(weights_path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from None
    try:
        state = peft_to_tune_adapter(
            peft_state,
            num_heads=hf_config["num_attention_heads"],
            num_kv_heads=hf_config["num_key_value_heads"],
            dim=hf_config["hidden_size"],
            head_dim=hf_config.get("head_dim"),
        )
    except (CheckpointError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path}: {err}") from None
    expected = {}
    for prefix, layer in layers.items():
        a, b = layer.pair("global", "mean")
        expected[f"{prefix}.lora_a.weight"], expected[f"{prefix}.lora_b.weight"] = a, b
    problems = [f"{k}: no adapter in the file" for k in sorted(set(expected) - set(state))]
    problems += [f"{k}: not adapted in the model" for k in sorted(set(state) - set(expected))]
    problems += [
        f"{k}: shape {list(state[k].shape)} in the file, {list(p.shape)} in the model"
        for k, p in expected.items()
        if k in state and tuple(state[k].shape) != tuple(p.shape)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{weights_path} does not fit the model: {'; '.join(problems[:3])}{more}; use the "
            "base model and lora_attn_modules the adapter was trained with"
        )
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state[k])


# ------------------------------------------------------------------ training checkpoints


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(_flatten_random_state(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten_random_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    method: str,
    learner_state: dict,
    sampler_state: dict,
    progress: dict,
    config: dict,
    peft_kwargs: dict | None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write one checkpoint directory atomically (see the module docstring).

    ``rng_states``: every process's RNG state, in rank order (task-parallel jobs);
    default: this process's."""
    with atomic_directory(directory) as tmp:
        adapters = adapter_state(model)
        save_file(adapters, str(tmp / "adapters.safetensors"), metadata={"format": "pt"})
        rng_states = rng_states or [rng_state()]
        torch.save(
            {"learner": learner_state, "rng": rng_states[0], "rng_per_rank": rng_states},
            tmp / "training_state.pt",
        )
        atomic_write_json(
            tmp / "meta.json",
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "method": method,
                "progress": progress,
                "sampler": sampler_state,
                "adapter_shapes": {k: list(v.shape) for k, v in adapters.items()},
                "config": config,
            },
        )
        if peft_kwargs is not None:
            export_peft_adapter(model, tmp / "adapter", **peft_kwargs)
    return Path(directory)


def checkpoint_exists(directory: str | os.PathLike) -> bool:
    """A checkpoint is at ``directory``, or a replacement of it was cut between its two
    renames and :func:`abmll_tune.io.recover_directory` will put it there."""
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        return True
    return any(
        (m.with_name(m.name[: -len(COMPLETE_SUFFIX)]) / "meta.json").is_file()
        for m in directory.parent.glob(f".{directory.name}.*{COMPLETE_SUFFIX}")
    )


def read_checkpoint_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (meta.json missing)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT!r} v{FORMAT_VERSION}"
        )
    return meta


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


_FLOAT_DTYPES = set(_SAFETENSORS_DTYPES.values())


def check_adapter_file(path: str | os.PathLike, model: nn.Module) -> None:
    """Check every tensor of ``adapters.safetensors`` (names, shapes, dtypes) against the
    model's adapter parameters, from the file's own header, before anything is loaded.
    Floating dtypes may differ (loading casts); other dtypes must match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # fmt: skip
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the "
            "checkpoint is damaged: resume from another one (checkpoints/epoch_N) or start again"
        ) from None
    params = adapter_params_by_group(model)
    problems = [f"{k}: missing from the file" for k in sorted(set(params) - set(stored))]
    problems += [f"{k}: not an adapter of this model" for k in sorted(set(stored) - set(params))]
    for name, p in params.items():
        if name not in stored:
            continue
        shape, dtype = stored[name]
        if shape != tuple(p.shape):
            problems.append(
                f"{name}: shape {list(shape)} in the file, {list(p.shape)} in the model"
            )
        elif dtype not in _FLOAT_DTYPES and dtype != _SAFETENSORS_DTYPES.get(p.dtype, str(p.dtype)):
            # floating adapters load into any floating model by a cast (a bf16 GPU run
            # evaluated in fp32 on a CPU); anything else must match
            problems.append(f"{name}: dtype {dtype} in the file, {p.dtype} in the model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{path} does not fit the model: {'; '.join(problems[:3])}{more}; use the model "
            "config the checkpoint was trained with"
        )


def load_training_state(path: str | os.PathLike) -> dict:
    """``training_state.pt`` as plain tensors, numbers and lists (never unpickles code)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        # on the CPU whatever device wrote it (a GPU run's state on a CPU box, or every
        # rank's optimizer state landing on cuda:0); the optimizers move their states to
        # their parameters' device when they load them
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        # torch's message suggests weights_only=False, which would run the file's code
        reason = type(err).__name__
        raise CheckpointError(
            f"{path}: not a plain tensor file written by abmll-tune ({reason}); refusing to "
            "load it: a training state holds only tensors, numbers and lists. Resume from "
            "another checkpoint or start again"
        ) from None
    if not isinstance(state, dict) or "learner" not in state or "rng" not in state:
        raise CheckpointError(f"{path}: not an abmll-tune training state (keys learner, rng)")
    return state


def load_training_checkpoint(
    directory: str | os.PathLike, model: nn.Module, method: str, *, rank: int = 0
) -> tuple[dict, dict]:
    """Load adapters and RNG state (process ``rank``'s) into this process; returns
    (meta, training state).

    Validates the method, every tensor of ``adapters.safetensors`` against the model
    (names, shapes, dtypes, from the file's header) and the training state first:
    nothing is loaded from a checkpoint that does not fit or is damaged."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    if meta["method"] != method:
        raise CheckpointError(
            f"{directory}: checkpoint of method {meta['method']!r}, this run is {method!r}"
        )
    adapters = directory / "adapters.safetensors"
    check_adapter_file(adapters, model)
    state = load_training_state(directory / "training_state.pt")
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if rank >= len(per_rank):
        raise CheckpointError(
            f"{directory / 'training_state.pt'}: written by {len(per_rank)} process(es), "
            f"read by rank {rank}; resume with the same number of processes"
        )
    try:
        tensors = load_file(str(adapters))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{adapters}: unreadable ({type(err).__name__}: {err})") from None
    with torch.no_grad():
        for name, p in adapter_params_by_group(model).items():
            p.copy_(tensors[name])  # casts a floating dtype the file differs in
    set_rng_state(per_rank[rank])
    return meta, state["learner"]
