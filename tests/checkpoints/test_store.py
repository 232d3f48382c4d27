"""The local store: pull, resolve, list, and nothing half-written after a failure."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_hf_model, write_bpe_tokenizer
from safetensors.torch import load_file

from llmasos.checkpoints.load import load_model
from llmasos.checkpoints.store import models_dir, pull, resolve
from llmasos.errors import LLMasOSError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("hf") / "Tiny-Llama", num_key_value_heads=2)
    write_bpe_tokenizer(path)
    return path


def llmasos(*args, env_home=None):
    env = {**os.environ, "LLMASOS_HOME": str(env_home)} if env_home else None
    return subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, env=env)


@torch.no_grad()
def test_pull_hf_dir_then_use_it_by_name(home, hf_dir):
    stored = pull(str(hf_dir))
    assert stored == models_dir() / "tiny-llama" and resolve("tiny-llama") == stored
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in stored.iterdir()}
    x = torch.randint(0, 400, (1, 8))
    assert torch.equal(load_model(stored)(x), load_model(hf_dir)(x))
    assert not [p for p in models_dir().iterdir() if p.name.startswith(".")]


def test_pull_refuses_to_overwrite_without_force(home, hf_dir):
    pull(str(hf_dir), name="m")
    with pytest.raises(LLMasOSError, match="already exists"):
        pull(str(hf_dir), name="m")
    assert pull(str(hf_dir), name="m", force=True).exists()


def test_pull_converts_pytorch_bin_to_safetensors(home, hf_dir, tmp_path):
    d = tmp_path / "bin-model"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    torch.save(load_file(hf_dir / "model.safetensors"), d / "pytorch_model.bin")
    stored = pull(str(d))
    assert (stored / "model.safetensors").exists() and not (stored / "pytorch_model.bin").exists()


def test_failed_pull_leaves_nothing_behind(home, hf_dir, tmp_path):
    bad = shutil.copytree(hf_dir, tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LLMasOSError, match="truncated"):
        pull(str(bad))
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_hub_id_offline_is_a_clear_error(home):
    r = subprocess.run(
        [sys.executable, "-m", "llmasos", "pull", "someone/some-model"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMASOS_HOME": str(home), "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "could not download 'someone/some-model' from the Hugging Face Hub" in r.stderr
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_a_name_with_a_trailing_newline_is_refused(home, hf_dir):
    with pytest.raises(LLMasOSError, match=r"invalid model name 'evil\\n'"):
        pull(str(hf_dir), name="evil\n")
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_a_hub_id_with_a_trailing_newline_is_not_a_hub_id(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMasOSError, match="no such file or directory, and not a hub id"):
        pull("someone/some-model\n")


def test_unknown_model_name_says_where_it_looked(home):
    with pytest.raises(LLMasOSError, match="not in the store .* import one with `llmasos pull"):
        resolve("nope")


def test_cli_models_and_info_show_a_stored_model(home, hf_dir):
    pull(str(hf_dir), name="tiny")
    r = llmasos("models", env_home=home)
    assert r.returncode == 0 and "tiny" in r.stdout and "llama-3.1-8b" in r.stdout
    r = llmasos("info", "tiny", env_home=home)
    assert r.returncode == 0, r.stderr
    for expected in ("LlamaForCausalLM", "tokenizers", "chat template", "yes", "float32"):
        assert expected in r.stdout
