"""`llmasos tokenizer train`: a byte-level BPE that transformers' AutoTokenizer loads and agrees with."""

import subprocess
import sys

import pytest
from helpers import CORPUS

from llmasos.tokenization import Tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "corpus").mkdir()
    for i, text in enumerate(sorted(set(CORPUS))):
        (root / "corpus" / f"{i}.txt").write_text(text * 5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmasos",
            "tokenizer",
            "train",
            str(root / "corpus"),
            "--vocab-size",
            "400",
            "--out",
            str(root / "tok"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "trained a byte-level BPE of 400 tokens on 6 documents from 6 files" in r.stdout
    return root / "tok"


@pytest.mark.parametrize("text", sorted(set(CORPUS)) + ["unseen words: zebra quokka 42 🦙", ""])
def test_trained_tokenizer_agrees_with_autotokenizer_and_round_trips(trained, text):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer(trained), AutoTokenizer.from_pretrained(trained)
    ids = ours.encode(text)
    assert ids == ref.encode(text) and ids[0] == ours.bos_id
    assert ours.decode(ids) == text == ref.decode(ids, skip_special_tokens=True)


def test_trained_tokenizer_has_a_chat_template_transformers_renders(trained):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ours, ref = Tokenizer(trained), AutoTokenizer.from_pretrained(trained)
    assert ours.has_chat_template
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.token_to_id("<|eot_id|>") is not None and ours.pad_id is not None


def test_too_small_a_vocabulary_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmasos",
            "tokenizer",
            "train",
            str(tmp_path / "a.txt"),
            "--vocab-size",
            "100",
            "--out",
            str(tmp_path / "tok"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "--vocab-size 100 is too small" in r.stderr
