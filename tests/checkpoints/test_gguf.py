"""GGUF export and import, checked with the `gguf` library's reader and, where it is installed, llama.cpp itself."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from helpers import CORPUS, make_hf_model, write_bpe_tokenizer, write_sp_tokenizer

from llmasos import LLM, SamplingParams
from llmasos.checkpoints.export import export_gguf
from llmasos.checkpoints.gguf_vocab import write_tokenizer
from llmasos.checkpoints.load import load_model
from llmasos.errors import CheckpointError
from llmasos.tokenization import Tokenizer

Q = gguf.GGMLQuantizationType
# Hidden 64 and FFN 96 fill whole 32-value blocks (Q8_0, Q4_0); 4 heads over 2 KV heads exercises the K reorder.
SHAPE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
PROMPT = "Once upon a time, the quick brown fox"


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """A store of the test's own: loading a .gguf caches its rebuilt tokenizer there."""
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny Llama with a Llama 3 style tokenizer (byte-level BPE, llama-bpe split)."""
    path, hf = make_hf_model(tmp_path_factory.mktemp("gguf") / "tiny-bpe", **SHAPE)
    write_bpe_tokenizer(path, llama3_split=True)
    return path, hf


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny Llama with a Llama 2 style SentencePiece tokenizer."""
    path, hf = make_hf_model(tmp_path_factory.mktemp("gguf") / "tiny-sp", seed=2, **SHAPE)
    write_sp_tokenizer(path)
    return path, hf


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    """A tiny Qwen2: bias on q, k and v; GGUF architecture qwen2 (no Q/K reorder)."""
    path, hf = make_hf_model(
        tmp_path_factory.mktemp("gguf") / "tiny-qwen2", family="qwen2", seed=1, tie_word_embeddings=False, **SHAPE
    )
    write_bpe_tokenizer(path, llama3_split=True)
    return path, hf


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A tiny Qwen2 with tied embeddings, as the small Qwen2 models have (its greedy path repeats itself)."""
    path, hf = make_hf_model(
        tmp_path_factory.mktemp("gguf") / "tiny-tied", family="qwen2", seed=2, tie_word_embeddings=True, **SHAPE
    )
    write_bpe_tokenizer(path, llama3_split=True)
    return path, hf


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """256 wide, so every matrix row fills K-quant blocks (256 values)."""
    path, hf = make_hf_model(
        tmp_path_factory.mktemp("gguf") / "tiny-wide", **{**SHAPE, "hidden_size": 256, "intermediate_size": 512}
    )
    write_bpe_tokenizer(path, llama3_split=True)
    return path, hf


@pytest.fixture(scope="module")
def exports(bpe_model, tmp_path_factory):
    """One export of the BPE model per dtype, shared by the tests that only read them."""
    out = tmp_path_factory.mktemp("exports")
    return {
        dtype: export_gguf(bpe_model[0], out / dtype / f"tiny-{dtype}.gguf", dtype, progress=False)
        for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0")
    }


def field(reader, key):
    return reader.get_field(key).contents()


def logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


# ---- export ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, matrix_type", [("f32", Q.F32), ("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)]
)
def test_export_writes_the_metadata_names_and_shapes_llama_cpp_reads(exports, bpe_model, dtype, matrix_type):
    reader = gguf.GGUFReader(exports[dtype])
    expect = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 512,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    assert {k: field(reader, k) for k in expect} == expect
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[0] == "<|begin_of_text|>" and tokens[-1] == "[PAD511]"
    assert len(field(reader, "tokenizer.ggml.merges")) > 100
    assert "<|start_header_id|>" in field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in layer
    }
    shapes = {
        "token_embd.weight": [64, 512],
        "output.weight": [64, 512],
        "blk.1.attn_q.weight": [64, 64],
        "blk.1.attn_k.weight": [64, 32],
        "blk.1.ffn_down.weight": [96, 64],
        "blk.0.ffn_norm.weight": [64],
    }
    assert {n: tensors[n].shape.tolist() for n in shapes} == shapes  # GGUF lists the fastest dimension first
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            assert t.tensor_type == Q.F32, name
        elif name == "output.weight" and dtype == "q4_0":
            assert t.tensor_type == Q.Q8_0  # the output projection keeps more precision
        else:
            assert t.tensor_type == matrix_type, name


def test_export_reorders_q_and_k_rows_into_llama_cpp_rotary_layout(exports, bpe_model):
    reader = gguf.GGUFReader(exports["f32"])
    tensors = {t.name: t for t in reader.tensors}
    hf_q = bpe_model[1].model.layers[0].self_attn.q_proj.weight.detach()
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    # llama.cpp rotates rows (2i, 2i+1) of each head; transformers rotates (i, i + head_dim/2).
    assert torch.equal(q[0], hf_q[0]) and torch.equal(q[1], hf_q[8]) and torch.equal(q[2], hf_q[1])
    v = torch.from_numpy(np.array(tensors["blk.0.attn_v.weight"].data))
    assert torch.equal(v, bpe_model[1].model.layers[0].self_attn.v_proj.weight.detach())


def test_export_writes_an_ollama_modelfile_beside_the_gguf(exports):
    text = (exports["q8_0"].parent / "Modelfile").read_text()
    assert "FROM ./tiny-q8_0.gguf\n" in text
    assert "{{ .Role }}<|end_header_id|>" in text and "<|start_header_id|>assistant<|end_header_id|>" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    assert "PARAMETER num_ctx 256" in text


def test_export_to_a_directory_names_the_file_and_refuses_to_overwrite(bpe_model, tmp_path):
    from llmasos.errors import LLMasOSError

    path = export_gguf(bpe_model[0], tmp_path, "q8_0", progress=False)
    assert path == tmp_path / "tiny-bpe-q8_0.gguf" and (tmp_path / "Modelfile").exists()
    with pytest.raises(LLMasOSError, match="already exists"):
        export_gguf(bpe_model[0], tmp_path, "q8_0", progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_export_writes_llama3_rope_scaling_as_the_rope_freqs_tensor_and_reads_it_back(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path, _ = make_hf_model(
        tmp_path / "rope", rope_scaling=scaling, rope_theta=500000.0, **{**SHAPE, "max_position_embeddings": 512}
    )
    write_bpe_tokenizer(path, llama3_split=True)
    with pytest.raises(CheckpointError, match="rope_freqs.weight holds rope frequency factors"):
        load_model(export_gguf(path, tmp_path / "rope.gguf", "f32", progress=False))  # 64 is not Llama 3.1's 8192
    scaling["original_max_position_embeddings"] = 8192
    path, _ = make_hf_model(
        tmp_path / "rope31", rope_scaling=scaling, rope_theta=500000.0, **{**SHAPE, "max_position_embeddings": 512}
    )
    write_bpe_tokenizer(path, llama3_split=True)
    out = export_gguf(path, tmp_path / "rope31.gguf", "f32", progress=False)
    factors = {t.name: t for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    assert factors.data.shape == (8,) and factors.data.max() == pytest.approx(8.0)
    ours = load_model(out)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = list(range(3, 40))
    assert torch.equal(logits(ours, ids), logits(load_model(path), ids))


def test_mistral_sliding_window_clips_the_context_loudly(tmp_path):
    path, _ = make_hf_model(tmp_path / "mistral", family="mistral", sliding_window=64, **SHAPE)
    write_bpe_tokenizer(path, llama3_split=True)
    with pytest.warns(UserWarning, match="clipped to the window, 64 tokens"):
        out = export_gguf(path, tmp_path / "m.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama" and field(reader, "llama.context_length") == 64
    assert "PARAMETER num_ctx 64" in (tmp_path / "Modelfile").read_text()


# ---- import ----------------------------------------------------------------------------------------------


def test_qwen2_exports_as_the_qwen2_architecture_with_biases_and_a_tied_output(tied_model, tmp_path):
    reader = gguf.GGUFReader(export_gguf(tied_model[0], tmp_path / "q.gguf", "q4_0", progress=False))
    assert field(reader, "general.architecture") == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_q.bias"].tensor_type == Q.F32 and "blk.0.attn_output.bias" not in tensors


@pytest.mark.parametrize("fixture", ["bpe_model", "sp_model", "qwen2_model", "tied_model"])
def test_f32_round_trip_gives_identical_logits(fixture, request, tmp_path):
    path, hf = request.getfixturevalue(fixture)
    ours = load_model(export_gguf(path, tmp_path / "m.gguf", "f32", progress=False))
    ids = list(range(3, 60))
    assert torch.equal(logits(ours, ids), logits(load_model(path), ids))
    assert (logits(ours, ids) - logits(hf, ids)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "dtype, max_error, mean_error", [("f16", 0.02, 0.002), ("bf16", 0.1, 0.01), ("q8_0", 0.2, 0.03), ("q4_0", 3.0, 0.4)]
)
def test_quantized_round_trip_logits_are_close(exports, bpe_model, dtype, max_error, mean_error):
    """Logits of this model have a standard deviation of 0.86. Measured errors (max / mean): f16 0.005 / 0.0006,
    bf16 0.033 / 0.0047, Q8_0 0.098 / 0.015, Q4_0 2.0 / 0.24 (random Gaussian weights are Q4_0's worst case)."""
    ids = list(range(3, 60))
    exact = logits(load_model(bpe_model[0]), ids)
    error = (logits(load_model(exports[dtype], dtype=torch.float32), ids) - exact).abs()
    assert error.max() < max_error and error.mean() < mean_error


def test_gguf_file_loads_with_llm_load_and_generates_as_the_original(exports, bpe_model):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ours = LLM.load(exports["f32"], kernels=False).generate([PROMPT], params)[0]
    original = LLM.load(bpe_model[0], kernels=False).generate([PROMPT], params)[0]
    assert ours.token_ids == original.token_ids and ours.text == original.text


def test_pull_gguf_stores_an_hf_dir_that_transformers_loads(exports, bpe_model):
    import transformers

    from llmasos.checkpoints.store import pull

    stored = pull(str(exports["q8_0"]), progress=False)
    assert stored.name == "tiny-q8_0"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in stored.iterdir()
    }
    ids = list(range(3, 40))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(stored).eval()
    assert (logits(theirs, ids) - logits(load_model(exports["q8_0"]), ids)).abs().max() < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(stored)
    assert auto(PROMPT)["input_ids"] == Tokenizer(bpe_model[0]).encode(PROMPT)


def rewrite_gguf(source, target, fields=None, tensors=None):
    """A copy of `source` with some string fields replaced ({key: value}) and each tensor's data and type
    from tensors(index, tensor) -> (array, type or None); without `tensors`, no tensors (a vocabulary only)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, field(reader, "general.architecture"))
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name in (fields or {}):
            writer.add_string(f.name, fields[f.name])
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(f.name, f.contents(), f.types[0])
    for n, t in enumerate(reader.tensors if tensors else []):
        data, qtype = tensors(n, t)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _k_quant_bytes(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks (the gguf library has no K-quant quantizer) with small finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = np.full((data.shape[0], 1), 0.002, np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # d is the block's last fp16
        data[:, -2:] = scales
    else:  # Q4_K, Q5_K: d and dmin first
        data[:, 0:2], data[:, 2:4] = scales, scales
    return data.reshape(rows, cols // block * size)


def test_k_quant_tensors_are_dequantised_and_q_k_reordered(wide_model, tmp_path):
    """A GGUF whose matrices are Q4_K, Q5_K and Q6_K imports to the values the gguf library's dequantizer
    gives, with Q and K rows back in our layout."""
    from llmasos.checkpoints.meta import permute_rotary

    rng = np.random.default_rng(0)
    kinds = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    expected = {}

    def k_quant(n, t):
        if len(t.data.shape) == 1:
            return np.array(t.data), None
        data = _k_quant_bytes(kinds[n % 3], *t.data.shape, rng)
        expected[t.name] = (torch.from_numpy(gguf.quants.dequantize(data, kinds[n % 3])), kinds[n % 3])
        return data, kinds[n % 3]

    rewrite_gguf(export_gguf(wide_model[0], tmp_path / "f32.gguf", "f32", progress=False), tmp_path / "k.gguf", tensors=k_quant)
    model = load_model(tmp_path / "k.gguf")
    state = model.state_dict()
    assert {q for _, q in expected.values()} == set(kinds)
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], expected["blk.1.ffn_down.weight"][0])
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], permute_rotary(expected["blk.0.attn_q.weight"][0], 4))
    assert torch.equal(state["model.layers.0.self_attn.k_proj.weight"], permute_rotary(expected["blk.0.attn_k.weight"][0], 2))
    assert torch.isfinite(logits(model, [1, 2, 3])).all()


@pytest.mark.parametrize("fixture", ["bpe_model", "sp_model"])
def test_tokenizer_rebuilt_from_gguf_encodes_and_decodes_as_the_original(fixture, request, tmp_path):
    path, _ = request.getfixturevalue(fixture)
    write_tokenizer(export_gguf(path, tmp_path / "m.gguf", "f32", progress=False), tmp_path / "tok")
    original, rebuilt = Tokenizer(path), Tokenizer(tmp_path / "tok")
    texts = sorted(set(CORPUS)) + ["  two leading spaces", "tabs\tand\nnew\n\nlines  ", "1234567 digits", "🦙🔥 漢字"]
    for text in texts:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids), text
    assert (rebuilt.bos_id, rebuilt.eos_id) == (original.bos_id, original.eos_id)
    assert rebuilt.chat_template == original.chat_template


def test_gpt2_split_tokenizer_round_trips_through_gguf(tmp_path):
    path, _ = make_hf_model(tmp_path / "gpt2", **SHAPE)
    write_bpe_tokenizer(path)
    out = export_gguf(path, tmp_path / "m.gguf", "f32", progress=False)
    assert field(gguf.GGUFReader(out), "tokenizer.ggml.pre") == "gpt-2"
    write_tokenizer(out, tmp_path / "tok")
    original, rebuilt = Tokenizer(path), Tokenizer(tmp_path / "tok")
    for text in sorted(set(CORPUS)):
        assert rebuilt.encode(text) == original.encode(text)


def test_sentencepiece_gguf_pulled_then_exported_again_keeps_its_vocabulary(sp_model, tmp_path):
    """The store holds a SentencePiece GGUF's tokenizer as tokenizer.json (BPE with byte fallback); exported
    again it is a `llama` vocabulary once more, with scores recovered from the merge ranks."""
    from llmasos.checkpoints.store import pull

    first = export_gguf(sp_model[0], tmp_path / "first.gguf", "f32", progress=False)
    second = export_gguf(pull(str(first), progress=False), tmp_path / "second.gguf", "f32", progress=False)
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
    ):
        assert field(b, key) == field(a, key), key
    write_tokenizer(second, tmp_path / "tok")
    original, rebuilt = Tokenizer(sp_model[0]), Tokenizer(tmp_path / "tok")
    for text in sorted(set(CORPUS)):
        assert rebuilt.encode(text) == original.encode(text)
    ids = list(range(3, 40))
    assert torch.equal(logits(load_model(second), ids), logits(load_model(sp_model[0]), ids))


# ---- errors ----------------------------------------------------------------------------------------------


def _tiny_gguf(path, arch="llama", tensor_type=Q.F32):
    writer = gguf.GGUFWriter(path, arch)
    block, size = gguf.GGML_QUANT_SIZES[tensor_type]
    if tensor_type == Q.F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, 256 // block * size), np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF architecture 'gemma' is not supported"):
        load_model(_tiny_gguf(tmp_path / "g.gguf", arch="gemma"))


def test_unsupported_tensor_type_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="token_embd.weight is stored as IQ2_XXS"):
        load_model(_tiny_gguf(tmp_path / "iq.gguf", tensor_type=Q.IQ2_XXS))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_model(bad)


def _patched(source, target, change):
    """A copy of `source` with values overwritten in place: change(reader) assigns into the reader's memory map."""
    shutil.copy(source, target)
    reader = gguf.GGUFReader(target, "r+")
    change(reader)
    reader.data.flush()
    return target


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("llama.attention.head_count", 0, "head_count is 0; expected an integer from 1 to 64 \\(the embedding width\\)"),
        ("llama.attention.head_count_kv", 0, "head_count_kv is 0; expected an integer from 1 to 4 \\(the head count\\)"),
        ("llama.attention.head_count", 65, "head_count is 65; expected an integer from 1 to 64"),
        (
            "llama.block_count",
            100_000,
            "block_count is 100000; expected an integer from 1 to \\d+ \\(the file holds \\d+ tensors\\)",
        ),
        ("llama.feed_forward_length", 2**32 - 1, "feed_forward_length is 4294967295; expected .* \\(the file has \\d+ bytes"),
    ],
)
def test_gguf_counts_and_sizes_are_bounded_by_the_file(exports, tmp_path, key, value, message):
    def change(reader):
        reader.fields[key].parts[-1][0] = value

    bad = _patched(exports["f32"], tmp_path / "bad.gguf", change)
    with pytest.raises(CheckpointError, match=f"bad.gguf: .*{message}"):
        load_model(bad)


def test_gguf_head_dim_beyond_the_file_is_refused(exports, tmp_path):
    """Our export writes no key_length (head_dim is hidden / heads); one of 2**32 - 1, with a rotary
    dimension to match, is refused."""
    reader = gguf.GGUFReader(exports["f32"])
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    writer.add_key_length(2**32 - 1)
    writer.add_rope_dimension_count(2**32 - 1)
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name not in ("general.architecture", "llama.rope.dimension_count"):
            sub = {"sub_type": f.types[-1]} if f.types[0] == gguf.GGUFValueType.ARRAY else {}
            writer.add_key_value(f.name, f.contents(), f.types[0], **sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed(t.shape.tolist())))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError,
        match=r"key_length is 4294967295; expected an integer from 1 to \d+ "
        r"\(the file has \d+ bytes\)",
    ):
        load_model(tmp_path / "bad.gguf")


@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")  # the reader's own sum
def test_gguf_tensor_offset_that_wraps_around_onto_the_metadata_is_refused(exports, tmp_path):
    """The report: offset 2**64 - 616 made the reader's uint64 sum point into the metadata, read as weights."""

    def change(reader):
        t = next(t for t in reader.tensors if t.name == "output_norm.weight")
        t.field.parts[-1][0] = 2**64 - reader.data_offset + 24

    bad = _patched(exports["f32"], tmp_path / "bad.gguf", change)
    assert next(t for t in gguf.GGUFReader(bad).tensors if t.name == "output_norm.weight").data_offset == 24
    with pytest.raises(
        CheckpointError,
        match=r"bad.gguf: tensor output_norm.weight's data \(bytes \d+ to \d+\) "
        r"lies outside the file",
    ):
        load_model(bad)


def test_gguf_tensor_dimension_of_zero_or_beyond_the_file_is_refused(exports, tmp_path):
    """[2**40, 0] holds no bytes, so no data check catches it, yet it is no model's shape."""

    def change(reader):
        next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").field.parts[3][:] = [2**40, 0]

    bad = _patched(exports["f32"], tmp_path / "bad.gguf", change)
    with pytest.raises(
        CheckpointError,
        match=r"bad.gguf: tensor blk.0.attn_q.weight has dimensions "
        r"\[1099511627776, 0\]; each must be from 1 to the file's size",
    ):
        load_model(bad)


def test_unknown_pre_tokenizer_is_named(exports, tmp_path):
    reader = _Renamed(gguf.GGUFReader(exports["f32"]), "tokenizer.ggml.pre", "tekken")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'tekken' is not supported"):
        write_tokenizer(exports["f32"], tmp_path / "tok", reader=reader)


class _Renamed:
    """A reader whose one string field says something else."""

    def __init__(self, reader, key, value):
        self.reader, self.key, self.value = reader, key, value

    def get_field(self, key):
        if key != self.key:
            return self.reader.get_field(key)
        value = self.value
        return type("F", (), {"contents": lambda self: value})()


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_cli_export_gguf_and_hf(bpe_model, tmp_path, capsys):
    from llmasos.cli import main

    assert main(["export", str(bpe_model[0]), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tiny-bpe-q8_0.gguf").exists() and (tmp_path / "Modelfile").exists()
    assert "ollama create tiny-bpe -f Modelfile" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "tiny-bpe-q8_0.gguf"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    assert main(["export", str(bpe_model[0]), "--format", "hf", "--dtype", "q4_0", "--out", str(tmp_path / "x")]) == 1
    assert "q8_0 and q4_0 are GGUF types" in capsys.readouterr().err


# ---- against llama.cpp -----------------------------------------------------------------------------------

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama_cpp is not importable: pip install 'llmasos[llamacpp]' (CI installs it)"
)


def llama_cpp_model(path):
    """Its KV cache in f32 (type 0), not the default f16, so that an f32 model computes in f32 throughout."""
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False
    )


def llama_cpp_logits(llm, ids) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_cpp_greedy(llm, ids, n: int) -> list[int]:
    """llama.cpp's own forward passes, argmax taken here: no sampler settings in the way."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def greedy(model_path, ids, n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return LLM.load(model_path, kernels=False).generate([ids], params)[0].token_ids


@needs_llama_cpp
@pytest.mark.parametrize("fixture", ["bpe_model", "sp_model", "qwen2_model"])
def test_llama_cpp_runs_our_f32_export_as_we_do(fixture, request, tmp_path):
    """Same prompt tokens, same 32 greedy tokens from llama.cpp, from our engine on the original model and
    from our import of the file; logits within 1e-4 (measured: 2e-5)."""
    path, _ = request.getfixturevalue(fixture)
    out = export_gguf(path, tmp_path / "m.gguf", "f32", progress=False)
    llm = llama_cpp_model(out)
    ids = Tokenizer(path).encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids
    ours = greedy(path, ids, 32)
    assert len(set(ours)) > 8  # a path that wanders, not one token repeated
    assert llama_cpp_greedy(llm, ids, 32) == ours
    assert greedy(out, ids, 32) == ours
    assert (llama_cpp_logits(llm, ids) - logits(load_model(path), ids)).abs().max() < 1e-4


@needs_llama_cpp
def test_llama_cpp_reads_our_tied_qwen2_export_as_we_do(tied_model, tmp_path):
    ids = Tokenizer(tied_model[0]).encode(PROMPT)
    llm = llama_cpp_model(export_gguf(tied_model[0], tmp_path / "t.gguf", "f32", progress=False))
    assert (llama_cpp_logits(llm, ids) - logits(load_model(tied_model[0]), ids)).abs().max() < 1e-4


def quantization_errors(theirs, ours, exact) -> tuple[float, float, float]:
    """Mean |llama.cpp - our import|, its max, and mean |llama.cpp - the unquantized model|."""
    return (theirs - ours).abs().mean(), (theirs - ours).abs().max(), (theirs - exact).abs().mean()


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_llama_cpp_logits_on_our_quantized_export_match_our_import_of_it(exports, bpe_model, dtype):
    """Both dequantise the same blocks; llama.cpp also rounds the activations to 8-bit blocks for its
    quantized products, which alone moves logits (standard deviation 0.86 here) by about 0.012 on average
    and 0.07 at most (measured, Q8_0 and Q4_0 alike)."""
    ids = Tokenizer(bpe_model[0]).encode(PROMPT)
    theirs = llama_cpp_logits(llama_cpp_model(exports[dtype]), ids)
    mean, worst, from_exact = quantization_errors(
        theirs, logits(load_model(exports[dtype]), ids), logits(load_model(bpe_model[0]), ids)
    )
    assert mean < 0.025 and worst < 0.15
    if dtype == "q4_0":  # Q4_0's own error is 15x that: we must land on llama.cpp's side of it
        assert mean < 0.2 * from_exact


@needs_llama_cpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_llama_cpp_quantized_files_import_to_llama_cpp_logits(wide_model, tmp_path, ftype):
    """Files quantized by llama.cpp itself (K-quants, as the common downloads are) read back to its logits.
    On this model (logit standard deviation 1.6) llama.cpp's 8-bit activations alone account for a mean
    difference of about 0.065 (max 0.5, measured); the K-quants' own error is 2.4x (Q6_K) to 9x (Q4_K_M) that."""
    import ctypes

    source = export_gguf(wide_model[0], tmp_path / "f32.gguf", "f32", progress=False)
    target = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(target).tensors} & {"Q4_K", "Q5_K", "Q6_K"}
    ids = Tokenizer(wide_model[0]).encode(PROMPT)
    theirs = llama_cpp_logits(llama_cpp_model(target), ids)
    mean, worst, from_exact = quantization_errors(theirs, logits(load_model(target), ids), logits(load_model(wide_model[0]), ids))
    assert mean < 0.1 and worst < 0.8
    assert mean < {"Q4_K_M": 0.25, "Q5_K_M": 0.4, "Q6_K": 0.6}[ftype] * from_exact


@needs_llama_cpp
@pytest.mark.parametrize(
    "model, pre",
    [("bpe_model", "llama-bpe"), ("bpe_model", "qwen2"), ("bpe_model", "gpt-2"), ("bpe_model", "default"), ("sp_model", None)],
)
def test_tokenizer_rebuilt_from_gguf_tokenizes_as_llama_cpp(model, pre, request, tmp_path):
    """The same vocabulary under each pre-tokenizer name we rebuild (and SentencePiece): our tokenizer.json
    from the file and llama.cpp's tokenizer from the file give the same ids."""
    path, _ = request.getfixturevalue(model)
    out = export_gguf(path, tmp_path / "m.gguf", "f32", progress=False)
    if pre is not None:
        out = rewrite_gguf(out, tmp_path / f"{pre}.gguf", fields={"tokenizer.ggml.pre": pre})
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    write_tokenizer(out, tmp_path / "tok")
    ours = Tokenizer(tmp_path / "tok")
    texts = sorted(set(CORPUS)) + ["tabs\tand\nnew\n\nlines  ", "1234567 digits; a+b<=c|d", "I've told you, 'RE you sure?'"]
    if model == "bpe_model":  # SentencePiece: llama.cpp (as sentencepiece) puts "▁" before a leading space too,
        texts.append("  two leading spaces")  # transformers (and we) do not
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ours.encode(text), text
