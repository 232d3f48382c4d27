import pytest

from llmasos.errors import ConfigError
from llmasos.models import ModelConfig, zoo_config
from llmasos.models.zoo import ZOO

# Parameter counts published with each checkpoint (Hugging Face model cards / safetensors totals).
PUBLISHED = {
    "llama-7b": 6.74e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "llama-3-8b": 8.03e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "tinyllama-1.1b": 1.10e9,
    "smollm2-135m": 134.5e6,
    "smollm2-360m": 361.8e6,
    "smollm2-1.7b": 1.71e9,
    "mistral-7b-v0.1": 7.24e9,
    "qwen2.5-0.5b": 494e6,
    "qwen2.5-1.5b": 1.54e9,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published(name):
    assert zoo_config(name).num_parameters() == pytest.approx(PUBLISHED[name], rel=0.01)


def test_every_real_zoo_entry_has_a_published_count():
    real = {n for n, v in ZOO.items() if "hf_id" in v}
    assert real == set(PUBLISHED)


def test_parameter_count_equals_the_module(tiny_shapes=("tiny-mha", "tiny-gqa", "tiny-mqa")):
    from llmasos.models.llama import Transformer

    for name in tiny_shapes:
        cfg = zoo_config(name)
        model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    qwen = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        qkv_bias=True,
        tie_word_embeddings=True,
        architecture="Qwen2ForCausalLM",
    )
    assert sum(p.numel() for p in Transformer(qwen).parameters()) == qwen.num_parameters()


def test_unknown_zoo_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="llama-2-7b"):
        zoo_config("llama-9")


def test_unknown_config_key_is_refused_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) hidden_sise; valid keys: .*hidden_size"):
        ModelConfig.from_dict({"hidden_sise": 64})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=48), "not a multiple"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
        (dict(architecture="GPT2LMHeadModel"), "architecture 'GPT2LMHeadModel'"),
    ],
)
def test_unsupported_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"hidden_size": 64, "num_attention_heads": 4, **bad})


def test_hf_config_v4_and_v5_styles_read_the_same():
    v4 = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "rope_theta": 5e5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "torch_dtype": "bfloat16",
    }
    v5 = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "dtype": "bfloat16",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    a, b = ModelConfig.from_hf_config(v4), ModelConfig.from_hf_config(v5)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling == b.rope_scaling and a.rope_type == "llama3"
    assert a.dtype == b.dtype == "bfloat16"


def test_hf_config_unsupported_architecture_is_named():
    with pytest.raises(ConfigError, match="config.json: architecture 'GemmaForCausalLM' is not supported"):
        ModelConfig.from_hf_config({"architectures": ["GemmaForCausalLM"]})
