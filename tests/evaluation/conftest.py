import os

import pytest
from helpers import make_hf_model, write_bpe_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    """(dir, transformers model) of a tiny GQA Llama whose context holds the built-in few-shot prompts."""
    path, ref = make_hf_model(tmp_path_factory.mktemp("eval") / "tiny", num_key_value_heads=2, max_position_embeddings=512)
    write_bpe_tokenizer(path)
    return path, ref


@pytest.fixture(scope="package")
def llm(tiny):
    from llmasos import LLM

    return LLM.load(tiny[0], max_batch_size=8, kernels=False)  # scoring runs no decode kernels; skip their build
