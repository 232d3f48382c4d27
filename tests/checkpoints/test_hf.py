"""HF dirs: sharded safetensors, pytorch_model.bin, and every bad-file case with its error."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_hf_model
from safetensors.torch import load_file, save_file

from llmasos.checkpoints.hf import save_model
from llmasos.checkpoints.load import load_model
from llmasos.errors import CheckpointError


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf"), num_key_value_heads=2)


@pytest.fixture
def model_dir(hf, tmp_path):
    """A fresh copy of the tiny model's dir that a test may damage."""
    import shutil

    return shutil.copytree(hf[0], tmp_path / "model")


X = torch.randint(0, 400, (1, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_sharded_save_writes_an_index_and_loads_back(hf, tmp_path):
    import transformers

    ours = load_model(hf[0])
    save_model(ours, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).exists() for s in shards)
    assert torch.equal(load_model(tmp_path / "sharded")(X), ours(X))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert torch.equal(back(X).logits, hf[1](X).logits)


@torch.no_grad()
def test_pytorch_model_bin_loads(hf, tmp_path):
    import shutil

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf[0] / "config.json", d)
    torch.save(load_file(hf[0] / "model.safetensors"), d / "pytorch_model.bin")
    assert (load_model(d)(X) - hf[1](X).logits).abs().max() < 1e-4


@torch.no_grad()
def test_load_in_bfloat16_casts_every_weight(hf):
    model = load_model(hf[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (model(X).float() - hf[1](X).logits).abs().max() < 0.1


def test_truncated_safetensors(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor \S+ needs bytes up to"):
        load_model(model_dir)


def test_missing_shard(hf, tmp_path):
    save_model(load_model(hf[0]), tmp_path / "m", max_shard_bytes=200_000)
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        load_model(tmp_path / "m")


def test_shape_mismatch_names_the_tensor(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has "
        r"shape \[96, 64\], the config implies \[128, 64\]",
    ):
        load_model(model_dir)


def test_missing_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_model(model_dir)


def test_unexpected_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor model.layers.1.mlp.extra.weight"):
        load_model(model_dir)


def test_config_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text('{"hidden_size": 64,,}')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON \(line 1, column 20"):
        load_model(model_dir)


def test_cli_reports_a_bad_file_in_one_line_without_traceback(model_dir):
    (model_dir / "config.json").write_text("not json")
    r = subprocess.run([sys.executable, "-m", "llmasos", "info", str(model_dir)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "config.json: not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr


def test_memory_mapped_weights_can_be_trained_without_touching_the_file(model_dir):
    before = (model_dir / "model.safetensors").read_bytes()
    model = load_model(model_dir)
    model.train()
    loss = model(X).logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-0.1)
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert not torch.equal(load_model(model_dir)(X), model.eval()(X))


def test_loading_a_model_imports_no_compiler_stack(tmp_path):
    """A cold start pays for what it uses: arithmetic on the meta device (initialising the modules that are about
    to be loaded, rotary frequencies) imports torch._dynamo, 2-3 s of every `llmasos generate`."""
    import subprocess
    import sys

    from helpers import make_hf_model

    path, _ = make_hf_model(tmp_path / "m")
    code = f"import sys; from llmasos.checkpoints.load import load_model; load_model({str(path)!r})"
    code += "; print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
