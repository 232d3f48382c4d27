"""Our transformer against transformers, logit for logit, on random weights (fp32)."""

import pytest
import torch
from helpers import make_hf_model

from llmasos.checkpoints.hf import save_model
from llmasos.checkpoints.load import load_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "mha": ("llama", {}),
    "gqa": ("llama", dict(num_key_value_heads=2)),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "attention-bias": ("llama", dict(attention_bias=True, head_dim=32)),
    "mistral-sliding-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2-qkv-bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    path, ref = make_hf_model(tmp_path_factory.mktemp(request.param), family, **overrides)
    return path, ref, load_model(path)


def ids(batch=2, seq=40, seed=1):
    return torch.randint(0, 400, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(pair):
    _, ref, ours = pair
    x = ids()
    assert (ours(x) - ref(x).logits).abs().max() < 1e-4


@torch.no_grad()
def test_cached_decode_equals_full_forward(pair):
    _, ref, ours = pair
    x = ids()
    expected = ref(x).logits
    cache = ours.new_cache(2, 64)
    steps = [ours(x[:, :30], torch.arange(30), cache)]
    for t in range(30, 40):
        steps.append(ours(x[:, t : t + 1], torch.tensor([t]), cache))
    assert (torch.cat(steps, 1) - expected).abs().max() < 1e-4


@torch.no_grad()
def test_rows_of_different_lengths_share_a_batch(pair):
    """Right-padded prompts with per-row positions give each row what it gives alone."""
    _, ref, ours = pair
    a, b = ids(1, 12, seed=2), ids(1, 20, seed=3)
    batch = torch.cat([torch.cat([a, torch.zeros(1, 8, dtype=torch.long)], 1), b])
    cache = ours.new_cache(2, 64)
    logits = ours(batch, torch.arange(20), cache, logits_at=torch.tensor([11, 19]))
    assert (logits[0, 0] - ref(a).logits[0, -1]).abs().max() < 1e-4
    assert (logits[1, 0] - ref(b).logits[0, -1]).abs().max() < 1e-4
    nxt = torch.tensor([[5], [7]])
    step = ours(nxt, torch.tensor([[12], [20]]), cache)
    assert (step[0, 0] - ref(torch.cat([a, nxt[:1]], 1)).logits[0, -1]).abs().max() < 1e-4
    assert (step[1, 0] - ref(torch.cat([b, nxt[1:]], 1)).logits[0, -1]).abs().max() < 1e-4


@torch.no_grad()
def test_round_trip_through_our_hf_dir(pair, tmp_path):
    import transformers

    _, ref, ours = pair
    save_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    assert torch.equal(back(x).logits, ref(x).logits)
