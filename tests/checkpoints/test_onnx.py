"""ONNX export: onnxruntime on the exported graph reproduces our logits and our engine's greedy tokens."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import make_hf_model

from llmasos.checkpoints.load import load_model
from llmasos.checkpoints.onnx import export_onnx
from llmasos.errors import LLMasOSError

# GQA, tied embeddings, biases and Llama 3.1 rope scaling in one model; Mistral's sliding window in the other.
LLAMA = {
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "attention_bias": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}
MISTRAL = {"num_key_value_heads": 1, "sliding_window": 4}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, bpe_dir):
    """A stored model, exported by its store name."""
    from llmasos.checkpoints.store import pull

    root = tmp_path_factory.mktemp("llama")
    src, _ = make_hf_model(root / "hf", **LLAMA)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe_dir / f, src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(root / "home"))
        stored = pull(str(src), "tiny", progress=False)
        path = export_onnx("tiny", root / "onnx")
    return SimpleNamespace(model=load_model(stored), session=ort.InferenceSession(str(path)), out=path.parent, stored=stored)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    src, _ = make_hf_model(tmp_path_factory.mktemp("mistral") / "hf", family="mistral", **MISTRAL)
    path = export_onnx(src, src.parent / "onnx")
    return load_model(src), ort.InferenceSession(str(path))


def run(session, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: list[np.ndarray]):
    """One onnxruntime pass: (logits, present)."""
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update((i.name, p) for i, p in zip(session.get_inputs()[3:], past))
    logits, *present = session.run(None, feeds)
    return torch.from_numpy(logits), present


def empty_past(model, batch: int) -> list[np.ndarray]:
    c = model.config
    return [np.zeros((batch, c.num_key_value_heads, 0, c.head_dim), np.float32)] * (2 * c.num_hidden_layers)


def prefill_and_decode_error(model, session, length: int) -> float:
    """Largest logit difference over a prefill of `length` tokens and two decode steps with past, batch 2."""
    ids = torch.randint(0, model.config.vocab_size, (2, length + 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    logits, past = run(
        session,
        ids[:, :length],
        torch.ones(2, length, dtype=torch.int64),
        torch.arange(length).expand(2, length),
        empty_past(model, 2),
    )
    errors = [(logits - want[:, :length]).abs().max()]
    for p in (length, length + 1):
        logits, past = run(session, ids[:, p : p + 1], torch.ones(2, p + 1, dtype=torch.int64), torch.full((2, 1), p), past)
        errors.append((logits - want[:, p : p + 1]).abs().max())
    return float(max(errors))


def test_export_is_a_self_contained_dir_with_the_optimum_layout(llama):
    model, session, out = llama.model, llama.session, llama.out
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    n = model.config.num_hidden_layers
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch", "past + seq"]
    assert inputs[f"past_key_values.{n - 1}.value"] == ["batch", 2, "past", 16]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(outputs) == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert outputs["logits"] == ["batch", "seq", 400]
    for names, pattern in [(inputs, genai["inputs"]["past_value_names"]), (outputs, genai["outputs"]["present_key_names"])]:
        assert all(pattern % i in names for i in range(n))
    assert genai["num_key_value_heads"] == 2 and genai["head_size"] == 16


def test_prefill_and_decode_logits_match_ours(llama):
    assert prefill_and_decode_error(llama.model, llama.session, 9) < 1e-4


def test_sliding_window_logits_match_ours(mistral):
    assert prefill_and_decode_error(*mistral, 9) < 1e-4  # 9 + 2 tokens: well past the window of 4


def test_greedy_loop_on_onnxruntime_gives_our_engines_tokens(llama):
    from llmasos import LLM, SamplingParams

    model, session = llama.model, llama.session
    prompt = [5, 17, 230, 42, 9]
    llm = LLM.load(llama.stored, kernels=False)
    want = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    ids, past, got = torch.tensor([prompt]), empty_past(model, 1), []
    while len(got) < 16:
        length = len(prompt) + len(got)
        logits, past = run(
            session, ids, torch.ones(1, length, dtype=torch.int64), torch.arange(length - ids.shape[1], length)[None], past
        )
        ids = logits[:, -1].argmax(-1, keepdim=True)
        got.append(int(ids))
    assert got == want


def test_readme_example_decodes_our_engines_greedy_tokens(llama, tmp_path, monkeypatch, capsys):
    from llmasos import LLM, SamplingParams

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = readme.split("### ONNX export")[1].split("```python runnable\n")[1].split("```")[0]
    (tmp_path / "tiny-onnx").symlink_to(llama.out)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    llm = LLM.load(llama.stored, kernels=False)
    want = llm.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert scope["out"] == want.token_ids
    assert capsys.readouterr().out == scope["tok"].decode(want.token_ids) + "\n"


def test_left_padded_batch_matches_each_prompt_alone(llama):
    model, session = llama.model, llama.session
    prompts = [[5, 17, 230, 42, 9, 61, 7], [88, 3, 150]]
    pad = [len(prompts[0]) - len(p) for p in prompts]
    ids = torch.tensor([[0] * k + p for k, p in zip(pad, prompts)])
    mask = torch.tensor([[0] * k + [1] * len(p) for k, p in zip(pad, prompts)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, past = run(session, ids, mask, positions, empty_past(model, 2))
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    step, _ = run(session, nxt, torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1), positions[:, -1:] + 1, past)
    with torch.no_grad():
        for row, p in enumerate(prompts):
            want = model(torch.tensor([p + [int(nxt[row])]]))[0, -2:]
            assert (torch.stack([logits[row, -1], step[row, 0]]) - want).abs().max() < 1e-4


def test_export_refuses_a_dir_with_files_in_it(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LLMasOSError, match="not an empty dir"):
        export_onnx(tmp_path / "model", tmp_path)


def test_export_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(LLMasOSError, match="bfloat16"):
        export_onnx(tmp_path / "model", tmp_path / "out", dtype="bfloat16")
