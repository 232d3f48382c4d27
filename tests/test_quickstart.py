"""The quickstart, on a tiny budget: the stored model loads and generates, and perplexity fell."""

import io

import pytest
from rich.console import Console

from llmasos import LLM, SamplingParams
from llmasos.quickstart import STORE_NAME, run


@pytest.mark.slow
def test_quickstart_trains_stores_and_samples_then_reuses_its_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    first = io.StringIO()
    result = run(minutes=0.25, out=tmp_path / "qs", corpus_mb=1.0, console=Console(file=first, width=120))
    assert result["perplexity_after"] < result["perplexity_before"] / 2
    assert result["model"] == STORE_NAME and (tmp_path / "qs" / "run" / "loss.png").exists()
    llm = LLM.load(STORE_NAME)
    out = llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert len(out.token_ids) >= 1
    assert "llmasos chat quickstart-stdlib" in first.getvalue()
    again = io.StringIO()
    run(minutes=0.1, out=tmp_path / "qs", corpus_mb=1.0, console=Console(file=again, width=120))
    assert "Tokenizer: reusing" in again.getvalue() and "Data: reusing" in again.getvalue()
