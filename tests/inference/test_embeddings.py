"""`LLM.embed`: pooled final hidden states against transformers', the pooling a model's files name, batching
through the engine beside generation, and the inputs it refuses."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_hf_model, write_bpe_tokenizer

from llmasos import LLM, SamplingParams
from llmasos.checkpoints.pooling import read_pooling, write_pooling
from llmasos.errors import CheckpointError, ContextLengthError, InvalidRequestError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Café, naïve, façade — déjà vu. Ünïcödé and emoji 🦙🔥 and 漢字",
]
VARIANTS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "mistral-sliding-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),  # inputs longer than it
}


def reference(ref, ids: list[int], pooling: str) -> torch.Tensor:
    """The pooling computed from transformers' final hidden states (after the last norm), L2-normalised."""
    with torch.no_grad():
        h = ref.model(torch.tensor([ids])).last_hidden_state[0]
    pooled = {"mean": h.mean(0), "last": h[-1], "cls": h[0], "max": h.amax(0)}[pooling]
    return F.normalize(pooled, dim=-1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    path, ref = make_hf_model(tmp_path_factory.mktemp(request.param), family, **overrides)
    write_bpe_tokenizer(path)
    return path, ref, LLM.load(path)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls", "max"])
def test_pooled_embeddings_equal_transformers_hidden_states(variant, pooling):
    _, ref, llm = variant
    got = llm.embed(TEXTS, pooling=pooling)
    assert got.shape == (len(TEXTS), llm.config.hidden_size) and got.dtype == torch.float32
    for text, row in zip(TEXTS, got):
        expected = reference(ref, llm.tokenizer.encode(text), pooling)
        assert (row - expected).abs().max() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)))


def test_mean_pooling_is_the_default_and_token_ids_embed_as_their_text(llm, tiny):
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    assert llm.pooling == "mean"
    by_text, by_ids = llm.embed(TEXTS), llm.embed(ids)
    assert torch.equal(by_text, by_ids)
    assert (llm.embed(ids[0])[0] - reference(tiny[1], ids[0], "mean")).abs().max() < 1e-5  # one list of ids: one input


def test_a_batch_equals_each_input_alone(llm):
    texts = [TEXTS[i % 4] * (1 + i % 3) for i in range(40)]  # mixed lengths, more than one engine batch
    together = llm.embed(texts)
    alone = torch.cat([llm.embed([t]) for t in texts])
    assert (together - alone).abs().max() < 1e-6


def test_embedding_is_prefill_only_and_shares_steps_with_generation(llm):
    """An embedding request queued while sequences decode: no KV cache row taken, nothing decoded for it, and the
    generated tokens exactly those of a run without it."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate([[5, 6, 7], [9, 10]], params)
    engine = llm.engine
    outs = [engine.add(p, params) for p in ([5, 6, 7], [9, 10])]
    engine.step()
    rows = engine.cache.rows
    request = engine.embedder.add(TEXTS, "mean")
    engine.step()  # one step: the embeddings (one batch) and a decode step of both sequences
    assert request.finished and request.error is None and engine.num_running == 2 and engine.cache.rows == rows
    engine.run(outs)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert torch.equal(torch.stack(request.embeddings), llm.embed(TEXTS))


def test_dimensions_keep_the_first_values_renormalised(llm):
    whole = llm.embed(TEXTS[:2])
    short = llm.embed(TEXTS[:2], dimensions=16)
    assert short.shape == (2, 16) and torch.allclose(short, F.normalize(whole[:, :16], dim=-1))
    for bad in (0, llm.config.hidden_size + 1):
        with pytest.raises(InvalidRequestError, match="dimensions"):
            llm.embed(TEXTS[:1], dimensions=bad)


def test_an_input_over_the_context_is_refused_by_its_index(llm):
    context = llm.engine.max_seq_len
    with pytest.raises(ContextLengthError, match=rf"input\[2\] has {context + 1} tokens; the context holds {context}") as e:
        llm.embed(["fine", "also fine", [5] * (context + 1)])
    assert e.value.param == "input[2]" and not llm.engine.has_work()  # nothing was queued
    assert llm.embed([[5] * context]).shape[0] == 1  # the whole context fits


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "input is empty"),
        (["ok", ""], r"input\[1\] is empty"),
        ([[1, 2], []], r"input\[1\] is empty"),
        ([[1, 2], [3, 10**6]], r"input\[1\]: token ids must be integers in \[0, 400\)"),
    ],
)
def test_bad_inputs_are_refused(llm, inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.embed(inputs)


def test_the_pooling_a_sentence_transformers_config_names(tmp_path, tiny):
    from llmasos.checkpoints.store import import_checkpoint

    path, ref = tiny
    named = tmp_path / "named"
    named.mkdir()
    import_checkpoint(path, named, progress=False)
    assert read_pooling(named) is None
    write_pooling(named, "last", 64)
    llm = LLM.load(named)
    assert llm.pooling == "last"
    expected = reference(ref, llm.tokenizer.encode(TEXTS[0]), "last")
    assert (llm.embed(TEXTS[0])[0] - expected).abs().max() < 1e-5
    assert LLM.load(named, pooling="mean").pooling == "mean"  # llama.cpp's --pooling: the caller's choice wins
    copied = tmp_path / "copied"
    copied.mkdir()
    import_checkpoint(named, copied, progress=False)  # `pull` keeps it
    assert read_pooling(copied) == "last"


def test_the_pooling_a_gguf_names_round_trips_through_export(tmp_path, tiny):
    from llmasos.checkpoints.export import export_gguf
    from llmasos.checkpoints.store import import_checkpoint

    named = tmp_path / "named"
    named.mkdir()
    import_checkpoint(tiny[0], named, progress=False)
    write_pooling(named, "cls", 64)
    gguf = export_gguf(named, tmp_path / "m.gguf", progress=False)
    assert read_pooling(gguf) == "cls" and LLM.load(gguf).pooling == "cls"


def test_a_pooling_we_cannot_compute_is_an_error_naming_the_file(tmp_path, tiny):
    from llmasos.checkpoints.store import import_checkpoint

    named = tmp_path / "named"
    named.mkdir()
    import_checkpoint(tiny[0], named, progress=False)
    write_pooling(named, "mean", 64)
    config = named / "1_Pooling" / "config.json"
    config.write_text(config.read_text().replace('"pooling_mode_lasttoken": false', '"pooling_mode_lasttoken": true'))
    llm = LLM.load(named)  # generation is unaffected
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling mean \+ last is not supported"):
        llm.embed("hello")
    assert llm.embed("hello", pooling="last").shape == (1, 64)


def test_a_failing_input_fails_its_own_request_alone_and_abort_drops_one(llm, monkeypatch):
    embedder = llm.engine.embedder
    real = embedder.embed_batch

    def broken(inputs, poolings, adapters):
        if any(13 in ids for ids in inputs):
            raise RuntimeError("this input breaks the model")
        return real(inputs, poolings, adapters)

    monkeypatch.setattr(embedder, "embed_batch", broken)
    good, bad, dropped = (embedder.add(inputs, "mean") for inputs in ([[5, 6], [7, 8, 9]], [[10, 11], [12, 13]], [[14, 15]]))
    llm.engine.abort(dropped.request_id)
    while llm.engine.has_work():
        llm.engine.step()
    assert good.error is None and torch.equal(torch.stack(good.embeddings), real([[5, 6], [7, 8, 9]], ["mean"] * 2, [None] * 2))
    assert bad.finished and bad.error == "RuntimeError: this input breaks the model"
    assert dropped.finished and dropped.error == "aborted" and embedder.waiting_tokens == 0
