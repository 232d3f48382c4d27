"""Fine-tuning: instruction data with loss masks, full / LoRA / QLoRA, PEFT adapters, merge, resume."""

import json
import re

import pytest
import torch
from helpers import tiny_finetune_config, write_jsonl
from safetensors.torch import load_file

from llmasos.data.instruct import IGNORE, load_examples
from llmasos.data.sources import InputError
from llmasos.errors import ConfigError
from llmasos.tokenization import Tokenizer
from llmasos.training import finetune as ft
from llmasos.training.config import FinetuneConfig

ALPACA = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(4)]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Name a number after {i}."},
            {"role": "assistant", "content": f"{i + 1}"},
            {"role": "user", "content": "And the one after?"},
            {"role": "assistant", "content": f"{i + 2}"},
        ]
    }
    for i in range(10)
]


def config(base, data, out, **kw):
    run = dict(seq_len=64, lr=3e-3, min_lr=0.0, max_steps=12, eval_every=6)
    return tiny_finetune_config(base, data, out, **{**run, **kw})


def losses(run):
    return [float(r.split(",")[1]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]


# ---- data ------------------------------------------------------------------------------------------


def test_alpaca_labels_cover_exactly_the_answer_and_the_end_of_turn(base, tmp_path):
    tok = Tokenizer(base[0])
    [ex] = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA[7:8]), tok)
    trained = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == "4<|eot_id|><|end_of_text|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Add 1 and 3."}], add_generation_prompt=True, tokenize=True)
    assert ex.input_ids[: len(prompt)] == prompt  # the prompt inference builds, untrained
    assert all(t == IGNORE for t in ex.labels[: len(prompt)])


def test_chat_trains_every_assistant_turn_and_nothing_else(base, tmp_path):
    tok = Tokenizer(base[0])
    [ex] = load_examples(write_jsonl(tmp_path / "c.jsonl", CHATS[3:4]), tok)
    runs, current = [], []
    for i, t in zip(ex.input_ids, ex.labels):
        if t != IGNORE:
            assert t == i
            current.append(t)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    runs.append(tok.decode(current, skip_special_tokens=False))
    assert runs == ["4<|eot_id|>", "5<|eot_id|><|end_of_text|>"]


def test_alpaca_json_list_and_completion_records(base, tmp_path):
    tok = Tokenizer(base[0])
    (tmp_path / "a.json").write_text(json.dumps(ALPACA[:3]))
    assert len(load_examples(tmp_path / "a.json", tok)) == 3
    [ex] = load_examples(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}]), tok)
    assert tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=False) == " 4<|end_of_text|>"


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"instruction": "x"', "not valid JSON"),
        ('{"instruction": "x", "input": ""}', "not an instruction record"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0] must have a role"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_malformed_records_are_named_by_file_and_line(base, tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n" + line + "\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{re.escape(reason)}"):
        load_examples(path, Tokenizer(base[0]))


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch(base, tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA), Tokenizer(base[0]))
    cfg = config(base[0], tmp_path / "a.jsonl", tmp_path / "run", micro_batch_size=4, global_batch_size=8)
    x1, y1 = ft.example_batch(examples, cfg, 5, 1, pad_id=0)
    x2, y2 = ft.example_batch(examples, cfg, 5, 1, pad_id=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    firsts = {
        tuple(ft.example_batch(examples, cfg, s, m, 0)[0][r].tolist()) for s in range(3) for m in range(2) for r in range(4)
    }
    assert len(firsts) == len(examples)  # 24 examples = 3 steps of 8: each seen once in epoch 0


# ---- training ----------------------------------------------------------------------------------------


def test_full_finetune_lowers_the_loss_and_writes_a_loadable_model(base, tmp_path):
    from llmasos import LLM, SamplingParams

    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    run = ft.finetune(config(base[0], data, tmp_path / "run", method="full", lr=1e-3), progress=False).dir
    curve = losses(run)
    assert curve[-1] < curve[0] * 0.7
    llm = LLM.load(run / "final")
    out = llm.chat([{"role": "user", "content": "Add 2 and 3."}], SamplingParams(max_tokens=4, temperature=0))
    assert out.token_ids  # the fine-tuned model loads and generates
    assert (run / "loss.png").exists()


def test_lora_trains_only_the_adapter_and_every_way_to_load_it_agrees(base, tmp_path):
    from llmasos.checkpoints.load import load_model
    from llmasos.models.lora import load_adapter

    data = write_jsonl(tmp_path / "c.jsonl", CHATS + CHATS)
    cfg = config(base[0], data, tmp_path / "run", method="lora", lora_rank=4, lora_targets="q_proj,v_proj,down_proj", merge=True)
    run = ft.finetune(cfg, progress=False).dir
    assert losses(run)[-1] < losses(run)[0]
    ckpt = load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)  # checkpoints hold the adapter alone
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B left zero init: trained

    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = load_model(base[0], dtype=torch.float32)
    with torch.no_grad():
        base_logits = plain(ids)
        unmerged = load_adapter(load_model(base[0], dtype=torch.float32), run / "adapter")(ids)
        via_adapter_dir = load_model(run / "adapter", dtype=torch.float32)(ids)  # merged on load
        merged = load_model(run / "final", dtype=torch.float32)(ids)
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(via_adapter_dir, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    final_state = load_model(run / "final", dtype=torch.float32).state_dict()
    for name, p in plain.state_dict().items():  # outside the adapted projections, the base is untouched
        if not any(t in name for t in ("q_proj", "v_proj", "down_proj")):
            torch.testing.assert_close(final_state[name], p)

    peft = pytest.importorskip("peft", reason="peft is not installed")
    ref = peft.PeftModel.from_pretrained(base[1], str(run / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_qlora_trains_adapters_over_a_quantized_base(base, tmp_path):
    from llmasos import LLM, SamplingParams

    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    for bits in ("int8", "int4"):
        run = ft.finetune(
            config(
                base[0],
                data,
                tmp_path / bits,
                method="qlora",
                quantize=bits,
                lora_rank=8,
                lora_targets="all-linear",
                merge=True,
                max_steps=8,
            ),
            progress=False,
        ).dir
        curve = losses(run)
        assert curve[-1] < curve[0], bits
        assert (run / "adapter" / "adapter_config.json").exists()
        out = LLM.load(run / "final").generate(["Add 1 and 2."], SamplingParams(max_tokens=3, temperature=0))
        assert len(out[0].token_ids) >= 1


def test_interrupted_lora_run_resumes_to_the_same_curve(base, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    whole = ft.finetune(config(base[0], data, tmp_path / "whole", method="lora"), progress=False).dir
    real = ft.example_batch

    def interrupt_at_step_6(examples, cfg, step, micro, pad_id):
        if step == 6:
            raise KeyboardInterrupt
        return real(examples, cfg, step, micro, pad_id)

    monkeypatch.setattr(ft, "example_batch", interrupt_at_step_6)
    with pytest.raises(Exception, match="interrupted at step 6"):
        ft.finetune(config(base[0], data, tmp_path / "cut", method="lora"), progress=False)
    monkeypatch.setattr(ft, "example_batch", real)
    cut = ft.finetune(config(base[0], data, tmp_path / "cut", method="lora"), resume=True, progress=False).dir
    assert losses(cut) == losses(whole)


def test_bad_finetune_configs_are_named(base, tmp_path):
    with pytest.raises(ConfigError, match="method: 'dora' is not one of full, lora, qlora"):
        config(base[0], "x.jsonl", tmp_path, method="dora")
    with pytest.raises(ConfigError, match="lora_targets: unknown module.*qkv"):
        ft.finetune(
            config(base[0], write_jsonl(tmp_path / "a.jsonl", ALPACA), tmp_path / "r", method="lora", lora_targets="qkv"),
            progress=False,
        )


def test_a_task_drives_finetuning_through_its_template(base, tmp_path):
    from llmasos.evaluation import load_task

    task = load_task("arithmetic_qa")
    examples = ft.training_examples(config(base[0], "", tmp_path / "r", task="arithmetic_qa"), Tokenizer(base[0]))
    prompt, answer = task.training_examples()[0]
    tok = Tokenizer(base[0])
    assert examples[0].input_ids[: len(tok.encode(prompt))] == tok.encode(prompt)
    assert tok.decode([t for t in examples[0].labels if t != IGNORE]) == answer
    run = ft.finetune(config(base[0], "", tmp_path / "run", task="arithmetic_qa", method="lora", max_steps=2), progress=False).dir
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_finetune_config_carries_the_fine_tuning_defaults():
    full, lora = FinetuneConfig(model="m", data="d.jsonl"), FinetuneConfig(model="m", data="d.jsonl", method="lora")
    assert (full.lr, lora.lr, FinetuneConfig(model="m", method="lora", lr=1e-3).lr) == (2e-5, 2e-4, 1e-3)
    assert (full.out, full.weight_decay, full.min_lr, full.warmup_steps, full.seq_len, full.epochs) == (
        "runs/finetune",
        0.0,
        0.0,
        10,
        512,
        1.0,
    )
    with pytest.raises(ConfigError, match="set max_steps, max_tokens or epochs"):
        FinetuneConfig(model="m", data="d.jsonl", epochs=None)


def test_epochs_set_the_steps_the_run_returns_and_saves_without_changing_the_config(base, tmp_path):
    import yaml

    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)  # 24 examples, 4 held out: 2 epochs of 20 are 5 steps of 8
    cfg = config(base[0], data, tmp_path / "run", method="lora", max_steps=None, epochs=2.0)
    run = ft.finetune(cfg, progress=False)
    assert run.steps == 5 and len(losses(run.dir)) == 5 and cfg.max_steps is None
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert (saved["max_steps"], saved["epochs"], saved["method"]) == (5, 2.0, "lora")
