"""On CUDA: load, generate, train ten bf16 steps, fine-tune with LoRA and serve, each held to the CPU where the
two can agree. Marked `gpu`; skipped (with the reason printed) where no CUDA device is present, which is every
CI machine: run them with `pytest -m gpu` on a machine with a GPU."""

import json

import pytest
import torch
from helpers import CORPUS, live_server, make_hf_model, write_bpe_tokenizer, write_jsonl, write_lora_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("gpu") / "tiny", num_key_value_heads=2)
    write_bpe_tokenizer(path)
    return path


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make CUDA's fp32 products differ from the CPU's by ~1e-3; the comparisons want fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_a_model_loads_onto_the_gpu_with_the_cpus_logits(model_dir):
    from llmasos.checkpoints.load import load_model

    x = torch.randint(0, 400, (2, 24))
    cpu = load_model(model_dir, dtype=torch.float32)(x)
    gpu = load_model(model_dir, dtype=torch.float32, device="cuda")
    assert gpu.model.embed_tokens.weight.device.type == "cuda"
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu, atol=1e-4, rtol=1e-4)
    bf16 = load_model(model_dir, dtype=torch.bfloat16, device="cuda")(x.cuda()).float().cpu()
    torch.testing.assert_close(bf16, cpu, atol=0.1, rtol=0.1)


def test_generation_on_the_gpu_equals_the_cpu_and_samples_with_seeds(model_dir):
    from llmasos import LLM, SamplingParams

    prompts = ["def fibonacci(n):", "import os", "The quick brown fox", "class Model:"]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    gpu = LLM.load(model_dir, dtype="float32", device="cuda")
    cpu = LLM.load(model_dir, dtype="float32")
    assert [o.token_ids for o in gpu.generate(prompts, greedy)] == [o.token_ids for o in cpu.generate(prompts, greedy)]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=2, ignore_eos=True)
    first, again = gpu.generate(prompts, seeded), gpu.generate(prompts, seeded)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert "".join(gpu.stream("import os", greedy)) == cpu.generate(["import os"], greedy)[0].text
    bf16 = LLM.load(model_dir, dtype="bfloat16", device="cuda")
    assert all(len(o.token_ids) == 8 for o in bf16.generate(prompts, greedy))


def test_cached_and_chunked_prefill_on_the_gpu_equal_whole_prompts_on_the_cpu(model_dir):
    from llmasos import LLM, SamplingParams

    system = "You are a helpful assistant who answers in code. " * 3
    prompts = [system + " def fibonacci(n):", system + " import os", "The quick brown fox"]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cpu = LLM.load(model_dir, dtype="float32", enable_prefix_caching=False)
    expected = [o.token_ids for o in cpu.generate(prompts, greedy)]
    gpu = LLM.load(model_dir, dtype="float32", device="cuda", max_num_batched_tokens=16)
    first = gpu.generate(prompts[:1], greedy)[0]
    rest = gpu.generate(prompts[1:], greedy)
    assert [first.token_ids] + [o.token_ids for o in rest] == expected
    assert rest[0].num_cached_tokens > 0  # the shared system prompt came from the cache


def test_embeddings_and_per_row_adapters_on_the_gpu_equal_the_cpu(model_dir, tmp_path):
    from llmasos import LLM, SamplingParams
    from llmasos.models.multi_lora import AdapterSet

    texts = ["def fibonacci(n):", "import os", "The quick brown fox"]
    cpu, gpu = LLM.load(model_dir, dtype="float32"), LLM.load(model_dir, dtype="float32", device="cuda")
    torch.testing.assert_close(gpu.embed(texts).cpu(), cpu.embed(texts), atol=1e-4, rtol=1e-4)
    adapter = write_lora_adapter(model_dir, tmp_path / "qv", rank=4, seed=1)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    merged = [o.token_ids for o in LLM.load(adapter, dtype="float32").generate(texts, greedy)]
    base = [o.token_ids for o in cpu.generate(texts, greedy)]
    gpu.load_adapter("qv", adapter)
    qv = AdapterSet.of(gpu.model).get("qv")
    rows = [gpu.engine.add(t, greedy, adapter=a) for t in texts for a in (None, qv)]  # one batch, mixed rows
    while not all(r.finished for r in rows):
        gpu.engine.step()
    assert [r.token_ids for r in rows[0::2]] == base and [r.token_ids for r in rows[1::2]] == merged


def test_the_cli_generates_on_the_gpu(model_dir, capsys):
    from llmasos.cli import main

    flags = ["-p", "import os", "--device", "cuda", "--max-tokens", "4", "--temperature", "0", "--json"]
    assert main(["generate", str(model_dir), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] >= 1


def _losses(run) -> list[float]:
    return [float(r.split(",")[1]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_ten_bf16_mixed_pretraining_steps_on_the_gpu(tmp_path, bpe_dir):
    from llmasos.data.prepare import prepare
    from llmasos.training import trainer
    from llmasos.training.config import TrainConfig

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"{CORPUS[i % 6]} number {i}"} for i in range(200)])
    prepare([corpus], bpe_dir, tmp_path / "data", val_fraction=0.1, progress=False)
    torch.cuda.reset_peak_memory_stats()
    config = TrainConfig.from_dict(
        dict(
            model="tiny-gqa",
            data=str(tmp_path / "data"),
            out=str(tmp_path / "run"),
            seq_len=32,
            micro_batch_size=4,
            global_batch_size=8,
            lr=3e-3,
            warmup_steps=2,
            max_steps=10,
            eval_every=10,
            checkpoint_every=5,
            log_every=1,
            precision="bf16-mixed",
        )
    )
    run = trainer.pretrain(config, progress=False)
    assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
    curve = _losses(run.dir)
    assert len(curve) == 10 and all(loss == loss for loss in curve)  # ten steps, no NaN
    assert curve[-1] < curve[0]
    from llmasos import LLM, SamplingParams

    out = LLM.load(run.dir / "final", device="cuda").generate(["The quick"], SamplingParams(max_tokens=4, temperature=0))
    assert out[0].finish_reason in ("stop", "length")


def test_lora_fine_tuning_on_the_gpu_leaves_an_adapter_the_cpu_serves(model_dir, tmp_path):
    from llmasos import LLM, SamplingParams
    from llmasos.training.config import FinetuneConfig
    from llmasos.training.finetune import finetune

    sums = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(4)]
    data = write_jsonl(tmp_path / "a.jsonl", sums)
    torch.cuda.reset_peak_memory_stats()
    config = FinetuneConfig.from_dict(
        dict(
            model=str(model_dir),
            data=str(data),
            out=str(tmp_path / "run"),
            method="lora",
            seq_len=64,
            micro_batch_size=4,
            global_batch_size=8,
            lr=3e-3,
            max_steps=10,
            eval_every=10,
            checkpoint_every=5,
            log_every=1,
            precision="bf16-mixed",
            merge=True,
        )
    )
    run = finetune(config, progress=False)
    assert torch.cuda.max_memory_allocated() > 0
    curve = _losses(run.dir)
    assert curve[-1] < curve[0]
    assert json.loads((run.dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged = LLM.load(run.dir / "final")
    out = merged.generate(["Add 1 and 2."], SamplingParams(max_tokens=4, temperature=0))
    assert out[0].finish_reason in ("stop", "length")


def test_the_server_answers_from_a_model_on_the_gpu(model_dir):
    import httpx

    from llmasos import LLM, SamplingParams

    llm = LLM.load(model_dir, dtype="float32", device="cuda")
    expected = llm.generate(["import os"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].text
    with live_server(llm) as url:
        name = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        body = {"model": name, "prompt": "import os", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
