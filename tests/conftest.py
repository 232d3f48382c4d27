"""Shared fixtures: tiny tokenizers built on the spot (no downloads)."""

import os
from pathlib import Path

import pytest
import torch
from helpers import write_bpe_tokenizer, write_sp_tokenizer

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    return write_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    return write_sp_tokenizer(tmp_path_factory.mktemp("sp"))
