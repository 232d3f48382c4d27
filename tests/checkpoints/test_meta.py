"""Meta `params.json` + `consolidated.NN.pth` checkpoints, one shard or model-parallel shards."""

import json

import pytest
import torch
from helpers import make_hf_model, write_sp_tokenizer

from llmasos.checkpoints.load import load_model

# HF name -> (Meta name, dim the model-parallel shards split it on)
TO_META = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def to_meta_layout(w, n_heads):
    """HF half-split rotary pairs back to Meta's interleaved ones (the inverse of the import permutation)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def write_meta_checkpoint(hf_model, out, shards=1, embed_split=1):
    cfg = hf_model.config
    sd = hf_model.state_dict()
    meta = {}  # name -> (tensor, split dim)
    meta["tok_embeddings.weight"] = (sd["model.embed_tokens.weight"], embed_split)
    meta["norm.weight"] = (sd["model.norm.weight"], None)
    meta["output.weight"] = (sd["lm_head.weight"], 0)
    for i in range(cfg.num_hidden_layers):
        for hf_name, (meta_name, split) in TO_META.items():
            w = sd[f"model.layers.{i}.{hf_name}"]
            if meta_name == "attention.wq.weight":
                w = to_meta_layout(w, cfg.num_attention_heads)
            elif meta_name == "attention.wk.weight":
                w = to_meta_layout(w, cfg.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}"] = (w, split)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        part = {k: (t if d is None else t.chunk(shards, d)[rank]).clone() for k, (t, d) in meta.items()}
        torch.save(part, out / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 32,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 10000.0,
    }
    (out / "params.json").write_text(json.dumps(params))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf"), num_key_value_heads=2, rms_norm_eps=1e-5)[1]


@pytest.mark.parametrize(
    "shards, embed_split", [(1, 1), (2, 1), (2, 0)], ids=["one-shard", "two-shards-llama2", "two-shards-llama3-vocab-split"]
)
@torch.no_grad()
def test_meta_checkpoint_loads_to_the_hf_logits(hf, tmp_path, shards, embed_split):
    path = write_meta_checkpoint(hf, tmp_path / "meta", shards, embed_split)
    ours = load_model(path)
    x = torch.randint(0, 400, (2, 24))
    assert (ours(x) - hf(x).logits).abs().max() < 1e-4


@torch.no_grad()
def test_pull_meta_dir_writes_an_hf_dir_transformers_loads(hf, tmp_path, monkeypatch):
    import transformers

    from llmasos.checkpoints.store import pull
    from llmasos.tokenization import Tokenizer

    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    path = write_meta_checkpoint(hf, tmp_path / "llama-tiny", shards=2)
    write_sp_tokenizer(path)
    (path / "tokenizer_config.json").unlink()  # Meta dirs ship only tokenizer.model
    stored = pull(str(path))
    assert stored.name == "llama-tiny"
    back = transformers.AutoModelForCausalLM.from_pretrained(stored).eval()
    x = torch.randint(0, 400, (1, 16))
    assert (back(x).logits - hf(x).logits).abs().max() < 1e-4
    tok = Tokenizer(stored)
    assert tok.kind == "sentencepiece" and tok.bos_id == 1 and tok.encode("hello")[0] == 1
