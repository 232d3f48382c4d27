"""A tiny model served by uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import API_KEY, STORE_MODELS, StepGate, live_server, make_hf_model, write_bpe_tokenizer


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model decodes several times faster on one thread than on two busy ones (shared test machines);
    the engine threads the servers start take this setting too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random GQA Llama with a byte-level BPE tokenizer and a chat template; 1024 tokens of context
    so that a long request runs for a few seconds."""
    path, _ = make_hf_model(tmp_path_factory.mktemp("serve") / "tiny", num_key_value_heads=2, max_position_embeddings=1024)
    write_bpe_tokenizer(path)
    return path


@pytest.fixture(scope="package")
def llm(tiny_dir):
    from llmasos import LLM

    return LLM.load(tiny_dir, max_batch_size=16)


@pytest.fixture(scope="package")
def server(llm) -> Iterator[str]:
    """The shared server: an API key, up to 16 running sequences and 64 waiting, bodies up to 1 MiB, and only
    requests addressed to a loopback name (as `llmasos serve` on 127.0.0.1)."""
    with live_server(
        llm, served_model_name="tiny", api_key=API_KEY, max_queue=64, max_body_bytes=2**20, loopback_only=True
    ) as url:
        yield url


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def gate(llm) -> Iterator[StepGate]:
    """The shared server's engine steps, under the test's control (released and removed afterwards)."""
    gate = StepGate(llm.engine)
    yield gate
    gate.remove()


# ---- a store of several models, served by one pool ---------------------------------------------------


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> Iterator[Path]:
    """$LLMASOS_HOME with three tiny models (alpha, beta, gamma), a copy of alpha whose shard is cut short
    (`truncated`), and one whose config.json is not JSON (`badconfig`); set for the package's tests."""
    import shutil

    home = tmp_path_factory.mktemp("home")
    models = home / "models"
    for name, seed in STORE_MODELS.items():
        make_hf_model(models / name, seed=seed, num_key_value_heads=2, max_position_embeddings=256)
        write_bpe_tokenizer(models / name)
    shutil.copytree(models / "alpha", models / "truncated")
    shard = models / "truncated" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copytree(models / "alpha", models / "badconfig")
    (models / "badconfig" / "config.json").write_text("{not json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(home))
        yield home
