"""Our Tokenizer against transformers' AutoTokenizer, for a BPE tokenizer.json and a SentencePiece model."""

import pytest
from helpers import CORPUS, write_bpe_tokenizer

from llmasos.errors import LLMasOSError
from llmasos.tokenization import StreamDecoder, Tokenizer
from llmasos.tokenization.chat import LLAMA2_TEMPLATE

TEXTS = sorted(set(CORPUS)) + [
    "",
    "  two leading spaces",
    "a\n\nb",
    "tabs\tand\r\nCRLF",
    "<s>[INST] hi [/INST]",
    "<|begin_of_text|>hello<|eot_id|>",
    "trailing space ",
    "日本語のテキスト 🦙",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. Ünïcödé 🦙"},
    {"role": "user", "content": "Write fibonacci."},
]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def pair(request, bpe_dir, sp_dir):
    from transformers import AutoTokenizer

    path = bpe_dir if request.param == "bpe" else sp_dir
    if request.param == "sentencepiece":  # transformers 5 style: the template beside the tokenizer
        (path / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    return Tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_transformers(pair, text):
    ours, ref = pair
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_equals_transformers(pair, text):
    ours, ref = pair
    ids = ref.encode(text)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(pair, add_generation_prompt):
    ours, ref = pair
    messages = MESSAGES if add_generation_prompt else MESSAGES[:3]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt, tokenize=True) == ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.has_chat_template


def test_special_ids_come_from_the_configs(pair):
    ours, ref = pair
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.vocab_size == len(ref)


@pytest.mark.parametrize("text", ["Ünïcödé and emoji 🦙🔥 and 漢字 — déjà vu", "def f(x):\n    return x  # ok"])
def test_stream_deltas_concatenate_to_the_text_without_broken_characters(pair, text):
    ours, _ = pair
    ids = ours.encode(text, add_special_tokens=False)
    stream = StreamDecoder(ours)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == ours.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_builtin_llama3_format_when_the_checkpoint_has_no_template(tmp_path):
    tok = Tokenizer(write_bpe_tokenizer(tmp_path, chat_template=None))
    assert not tok.has_chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.token_to_id("<|eot_id|>") in tok.stop_ids


def test_builtin_llama2_format(sp_dir, tmp_path):
    import shutil

    d = tmp_path / "sp"
    shutil.copytree(sp_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tok = Tokenizer(d)
    assert not tok.has_chat_template
    text = tok.apply_chat_template(MESSAGES[:3], add_generation_prompt=False)
    assert text == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there! [/INST] Hello. Ünïcödé 🦙 </s>"
    with pytest.raises(LLMasOSError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
