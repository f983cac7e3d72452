import os

import pytest
import torch

# tiktoken caches even local tokenizer files by path (torchtune-notes.md).
os.environ["TIKTOKEN_CACHE_DIR"] = ""


@pytest.fixture(autouse=True)
def _fixed_seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llama3_checkpoint(tmp_path_factory):
    from abmll_tune.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_llama3_hf", "llama3")


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(tmp_path_factory):
    from abmll_tune.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_qwen2_hf", "qwen2")
