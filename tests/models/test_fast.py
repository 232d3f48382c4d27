"""The swap onto the kernels' fast modules, the one module-swapping walk, and the inference dtypes decided once."""

import pytest
import torch
from torch import nn

import llmasos.kernels
from llmasos.kernels import load_ops
from llmasos.models.fast import GemvLinear, KernelAttention, KernelBlock, set_inference_dtypes, use_gemv_kernels
from llmasos.models.llama import Transformer
from llmasos.models.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from llmasos.models.quantize import Int8Linear, quantize_model
from llmasos.models.swap import swap_modules
from llmasos.models.zoo import zoo_config


def tiny() -> Transformer:
    config = zoo_config("tiny-gqa")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model


def test_the_walk_offers_children_before_parents_and_never_the_new_modules():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    offered = []

    def replace(name, module):
        offered.append(name)
        return nn.Sequential(nn.Linear(2, 2)) if isinstance(module, nn.Linear) else None

    swap_modules(model, replace)
    assert offered == ["0.0", "0.1", "0", "1"]
    assert [type(m) for m in (model[0][0], model[1])] == [nn.Sequential, nn.Sequential]


@pytest.mark.skipif(load_ops() is None, reason="kernels unavailable here")
def test_the_kernel_swap_keeps_the_module_tree_and_the_very_tensors():
    model = tiny()
    names = [name for name, _ in model.named_modules()]
    state = model.state_dict(keep_vars=True)
    old_block = model.model.layers[0]
    assert use_gemv_kernels(model)
    assert [name for name, _ in model.named_modules()] == names
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is v for k, v in state.items())  # the very tensors
    block = model.model.layers[0]
    assert type(block) is KernelBlock and type(block.self_attn) is KernelAttention
    assert type(block.self_attn.q_proj) is GemvLinear and type(model.lm_head) is GemvLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert type(old_block) is not KernelBlock and old_block.self_attn.q_proj.weight is block.self_attn.q_proj.weight


def test_quantization_and_lora_swap_in_place_and_lora_merges_back():
    model = tiny()
    quantize_model(model, "int8", skip=("lm_head",))
    assert type(model.model.layers[1].mlp.down_proj) is Int8Linear and type(model.lm_head) is nn.Linear
    plain = tiny()
    weight = plain.model.layers[0].self_attn.v_proj.weight
    apply_lora(plain, LoRAConfig(targets=["q_proj", "v_proj"]))
    assert type(plain.model.layers[0].self_attn.v_proj) is LoRALinear
    assert type(plain.model.layers[0].self_attn.k_proj) is nn.Linear
    merge_lora(plain)
    assert plain.model.layers[0].self_attn.v_proj.weight is weight


@pytest.mark.parametrize(
    "native, kernels, activation, cache",
    [
        (True, True, torch.float32, torch.float32),  # one decode policy: fp32 over bf16 weights, as llama.cpp
        (False, True, torch.float32, torch.float32),
        (True, False, None, torch.bfloat16),  # no kernels, bf16 arithmetic: bf16 throughout
        (False, False, None, torch.float32),  # no kernels to widen the weights: bf16 activations, fp32 cache
    ],
)
def test_the_inference_dtypes_are_decided_once_and_kept_on_the_model(monkeypatch, native, kernels, activation, cache):
    monkeypatch.setattr(llmasos.kernels, "native_bf16", lambda: native)
    model = tiny().to(torch.bfloat16)
    set_inference_dtypes(model, kernels)
    assert (model.activation_dtype, model.cache_dtype) == (activation, cache)
    assert model.new_cache(1, 8).k[0].dtype == cache
    fp32 = tiny()
    set_inference_dtypes(fp32, kernels)
    assert (fp32.activation_dtype, fp32.cache_dtype) == (None, torch.float32)
