"""Reading documents: every malformed record is named by file:line, and skipped ones are counted."""

import json

import pytest

from llmasos.data.sources import InputError, SourceStats, iter_documents
from llmasos.errors import LLMasOSError


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second ✓")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("never read")
    lines = [json.dumps({"text": "third"}), "", json.dumps({"text": "fourth", "id": 4})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_directories_files_and_jsonl_in_order(corpus):
    stats = SourceStats()
    docs = list(iter_documents([corpus], stats=stats))
    assert [d.text for d in docs] == ["first document\n", "third", "fourth", "second ✓"]
    assert docs[2].source == f"{corpus / 'd.jsonl'}:3"
    assert (stats.files, stats.documents, stats.skipped) == (3, 4, 0)


def test_glob_selects_files(corpus):
    assert [d.text for d in iter_documents([corpus], glob="*.txt")] == ["first document\n", "second ✓"]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", r"d.jsonl:2: not valid JSON"),
        (json.dumps({"content": "x"}), r"d.jsonl:2: no field 'text' \(fields: content\)"),
        (json.dumps({"text": 5}), r"d.jsonl:2: field 'text' is int, not a string"),
        (json.dumps(["text"]), r"d.jsonl:2: expected a JSON object, found list"),
    ],
)
def test_bad_jsonl_line_is_named_and_fails_by_default(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n" + json.dumps({"text": "ok too"}) + "\n")
    with pytest.raises(InputError, match=reason):
        list(iter_documents([path]))
    stats = SourceStats()
    assert [d.text for d in iter_documents([path], on_error="skip", stats=stats)] == ["ok", "ok too"]
    assert stats.skipped == 1 and stats.errors[0].startswith(f"{path}:2: ")


def test_undecodable_text_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nstill fine\nbad \xff byte\n")
    with pytest.raises(InputError, match=r"bad.txt:3: not UTF-8"):
        list(iter_documents([path]))


def test_missing_input_is_named(tmp_path):
    with pytest.raises(LLMasOSError, match="nope.txt: no such file or directory"):
        list(iter_documents([tmp_path / "nope.txt"]))
