"""Several LoRA adapters over one base, unmerged, each batch row with its own: logits against the merged models,
the adapter dirs refused (naming the file), and the base's own modules back once none is loaded."""

import json

import pytest
import torch
from helpers import make_hf_model, write_bpe_tokenizer, write_lora_adapter
from safetensors.torch import load_file, save_file

from llmasos.checkpoints.load import load_model
from llmasos.errors import CheckpointError
from llmasos.models.lora import LINEAR_NAMES
from llmasos.models.multi_lora import AdapterSet, MultiLoRALinear, read_adapter_for, use_adapters

ALL = tuple(LINEAR_NAMES)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_lora")
    base, _ = make_hf_model(root / "base", num_key_value_heads=2)
    write_bpe_tokenizer(base)
    return {
        "base": base,
        "qv": write_lora_adapter(base, root / "qv", ("q_proj", "v_proj"), rank=4, alpha=8, seed=1),
        "all": write_lora_adapter(base, root / "all", ALL, rank=8, alpha=4, seed=2),
        "mlp": write_lora_adapter(base, root / "mlp", ("gate_proj", "down_proj"), rank=2, alpha=2, seed=3),
    }


def ids(batch, seq, seed):
    return torch.randint(0, 400, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_rows_with_different_adapters_equal_each_merged_model(dirs):
    model = load_model(dirs["base"])
    adapters = AdapterSet.of(model)
    names = ["qv", "all", "mlp"]
    for name in names:
        adapters.add(read_adapter_for(model, name, dirs[name]))
    merged = {name: load_model(dirs[name]) for name in names} | {"base": load_model(dirs["base"])}
    rows = ["all", "base", "qv", "mlp", "qv"]
    x = ids(len(rows), 20, seed=0)
    with use_adapters(model, [adapters.get(r) if r != "base" else None for r in rows]):
        got = model(x)
    for i, name in enumerate(rows):
        assert (got[i] - merged[name](x[i : i + 1])[0]).abs().max() < 1e-4, name
    assert adapters.selection is None  # the selection lasts one forward pass
    assert torch.equal(model(x[1:2]), merged["base"](x[1:2]))  # outside `use_adapters`: the base model, exactly


@torch.no_grad()
def test_cached_decode_with_per_row_adapters_equals_the_merged_models(dirs):
    model = load_model(dirs["base"])
    adapters = AdapterSet.of(model)
    for name in ("qv", "all"):
        adapters.add(read_adapter_for(model, name, dirs[name]))
    rows = [adapters.get("qv"), None, adapters.get("all")]
    merged = [load_model(dirs[n]) for n in ("qv", "base", "all")]
    x = ids(3, 16, seed=1)
    cache = model.new_cache(3, 32)
    with use_adapters(model, rows):
        steps = [model(x[:, :12], torch.arange(12), cache)]
    for t in range(12, 16):
        with use_adapters(model, rows):
            steps.append(model(x[:, t : t + 1], torch.tensor([t]), cache))
    got = torch.cat(steps, 1)
    for i, m in enumerate(merged):
        assert (got[i] - m(x[i : i + 1])[0]).abs().max() < 1e-4


def test_the_base_modules_return_when_the_last_adapter_goes(dirs):
    """While adapters are loaded their projections are wrapped; with none, the model holds its own modules again
    (the fused decode kernels need them), and the retired adapter stays only while a request uses it."""
    model = load_model(dirs["base"])
    q_proj = model.model.layers[0].self_attn.q_proj
    adapters = AdapterSet.of(model)
    adapters.add(read_adapter_for(model, "qv", dirs["qv"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, MultiLoRALinear)
    assert model.model.layers[0].mlp.gate_proj.__class__ is torch.nn.Linear  # not targeted: untouched
    qv = adapters.retire("qv")
    assert adapters.get("qv") is None and qv.retired
    adapters.collect({qv})  # still in use: kept
    assert adapters.stacked == [qv]
    adapters.collect(set())
    assert adapters.stacked == [] and model.model.layers[0].self_attn.q_proj is q_proj


def test_the_fused_decode_kernels_run_again_once_adapters_are_unloaded(dirs):
    from llmasos import LLM, SamplingParams
    from llmasos.models.fast import GemvLinear, KernelBlock

    llm = LLM.load(dirs["base"])
    block = llm.model.model.layers[0]
    if not isinstance(block, KernelBlock):
        pytest.skip("the CPU kernels are not available here")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    before = llm.generate("Once upon a time", params)[0].token_ids
    assert block._plan.rows > 0  # decode ran through the fused block
    llm.load_adapter("qv", dirs["qv"])
    assert llm.generate("Once upon a time", params)[0].token_ids == before  # the base's rows: unchanged
    assert block._plan.rows == 0  # wrapped projections: module by module
    llm.unload_adapter("qv")
    assert isinstance(block.self_attn.q_proj, GemvLinear)
    assert llm.generate("Once upon a time", params)[0].token_ids == before
    assert block._plan.rows > 0


# ---- adapter dirs that do not fit -------------------------------------------------------------------


def broken(tmp_path, dirs, change):
    out = tmp_path / "adapter"
    write_lora_adapter(dirs["base"], out, ("q_proj", "v_proj"), rank=4)
    change(out)
    return out


def edit_config(**changes):
    def change(out):
        config = json.loads((out / "adapter_config.json").read_text())
        config.update(changes)
        (out / "adapter_config.json").write_text(json.dumps(config))

    return change


def edit_weights(fn):
    def change(out):
        weights = load_file(str(out / "adapter_model.safetensors"))
        save_file(fn(weights), str(out / "adapter_model.safetensors"))

    return change


def rename(weights, old, new):
    return {k.replace(old, new): v for k, v in weights.items()}


def reshape(weights):
    return {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "q_proj.lora_A" in k else v for k, v in weights.items()}


BAD = {
    "missing config": (lambda out: (out / "adapter_config.json").unlink(), r"adapter_config.json: no such file"),
    "missing weights": (lambda out: (out / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors: no such file"),
    "config not JSON": (lambda out: (out / "adapter_config.json").write_text("{"), r"adapter_config.json: unreadable"),
    "weights truncated": (
        lambda out: (out / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes()[:100]),
        r"adapter_model.safetensors: not a readable safetensors file",
    ),
    "unknown target in config": (
        edit_config(target_modules=["q_proj", "c_attn"]),
        r"adapter_config.json: unknown target module 'c_attn'",
    ),
    "unknown target in weights": (
        edit_weights(lambda w: rename(w, "v_proj", "c_attn")),
        r"adapter_model.safetensors: tensor .*c_attn.lora_A.weight targets .*c_attn, which is not a projection",
    ),
    "a layer the base lacks": (
        edit_weights(lambda w: rename(w, "layers.1.", "layers.7.")),
        r"adapter_model.safetensors: tensor .*layers.7.self_attn.* targets .*which is not a projection",
    ),
    "wrong base shape": (
        edit_weights(reshape),
        r"adapter_model.safetensors: model.layers.0.self_attn.q_proj has lora_A \[4, 65\].*needs lora_A \[4, 64\]",
    ),
    "a rank the config does not say": (edit_config(r=8), r"adapter_model.safetensors: .*with r=8"),
    "lora_B missing": (
        edit_weights(lambda w: {k: v for k, v in w.items() if "layers.0.self_attn.q_proj.lora_B" not in k}),
        r"adapter_model.safetensors: model.layers.0.self_attn.q_proj has no lora_B weight",
    ),
    "DoRA": (edit_config(use_dora=True), r"adapter_config.json: use_dora=True is not supported"),
    "not LoRA": (edit_config(peft_type="IA3"), r"adapter_config.json: peft_type is 'IA3'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_adapter_dir_that_does_not_fit_is_refused_naming_the_file(tmp_path, dirs, case):
    change, message = BAD[case]
    path = broken(tmp_path, dirs, change)
    model = load_model(dirs["base"])
    with pytest.raises(CheckpointError, match=message):
        read_adapter_for(model, "bad", path)


def test_a_path_that_is_no_dir_is_refused(tmp_path, dirs):
    model = load_model(dirs["base"])
    with pytest.raises(CheckpointError, match="no such directory"):
        read_adapter_for(model, "bad", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a usable path"):
        read_adapter_for(model, "bad", "x" * 5000)  # longer than a file name may be
