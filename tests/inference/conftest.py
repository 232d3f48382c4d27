import pytest
from helpers import make_hf_model, write_bpe_tokenizer


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    """(dir, transformers model) of a tiny GQA Llama with a byte-level BPE tokenizer."""
    path, ref = make_hf_model(tmp_path_factory.mktemp("engine") / "tiny", num_key_value_heads=2, max_position_embeddings=128)
    write_bpe_tokenizer(path)
    return path, ref


@pytest.fixture(scope="package")
def llm(tiny):
    from llmasos import LLM

    return LLM.load(tiny[0], max_batch_size=16)
