"""`llmasos prepare`: the shards decode back to the cleaned input; dedup and bad input are counted or named."""

import json
import subprocess
import sys

import pytest

from llmasos.data.prepare import PackedData, clean, prepare
from llmasos.tokenization import Tokenizer

DOCS = [
    "The first document.\n",
    "Cafe\u0301 with a combining accent",
    "tabs\tand\x07bell\x00null\r\nCRLF",
    "The first document.\n",
    "   \n",
    "A fourth, distinct document 🦙",
    "Another one\u200b here",
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    return path


def test_clean_normalises_and_strips_controls():
    assert clean("Cafe\u0301") == "Caf\u00e9"
    assert clean("tabs\tand\x07bell\x00null\r\nCRLF") == "tabs\tandbellnull\nCRLF"


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_dedup_and_counts(jsonl, bpe_dir, tmp_path, workers):
    meta, stats, _ = prepare([jsonl], bpe_dir, tmp_path / "data", val_fraction=0.0, workers=workers, progress=False)
    assert (stats.documents_read, stats.empty, stats.duplicates) == (7, 1, 1)
    tok = Tokenizer(bpe_dir)
    expected = [clean(d) for d in DOCS if d.strip()]
    expected = list(dict.fromkeys(expected))  # first occurrence of each
    data = PackedData(tmp_path / "data", "train")
    ids = data.tokens(0, len(data)).tolist()
    docs, current = [], []
    for i in ids:
        current.append(i)
        if i == tok.eos_id:
            docs.append(current)
            current = []
    assert [tok.decode(d) for d in docs] == expected
    assert all(d[0] == tok.bos_id for d in docs)
    assert meta["splits"]["train"]["tokens"] == len(data) and meta["dtype"] == "uint16"
    assert meta["sources"][0]["path"] == str(jsonl) and len(meta["sources"][0]["sha256"]) == 64


def test_val_split_is_stable_and_disjoint(jsonl, bpe_dir, tmp_path):
    a, _, _ = prepare([jsonl], bpe_dir, tmp_path / "a", val_fraction=0.5, progress=False)
    b, _, _ = prepare([jsonl], bpe_dir, tmp_path / "b", val_fraction=0.5, workers=2, progress=False)
    assert a["splits"] == b["splits"]
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 5


def test_bad_line_fails_with_its_location_and_leaves_no_data_dir(tmp_path, bpe_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    r = subprocess.run(
        [sys.executable, "-m", "llmasos", "prepare", str(path), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "data")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and f"{path}:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmasos",
            "prepare",
            str(path),
            "--tokenizer",
            str(bpe_dir),
            "--out",
            str(tmp_path / "data"),
            "--on-error",
            "skip",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "skipped (malformed)" in r.stdout and f"skipped {path}:2" in r.stderr
