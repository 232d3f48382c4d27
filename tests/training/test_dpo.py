"""DPO: preference data as TRL reads it, the losses and gradients of TRL's DPOTrainer, learning, logging,
the reference (a frozen copy, the adapter-disabled base, or precomputed), exact resume, torchrun."""

import copy
import csv
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import run_llmasos, tiny_finetune_config, write_jsonl

from llmasos.data.preference import load_pairs
from llmasos.data.sources import InputError
from llmasos.errors import ConfigError
from llmasos.tokenization import Tokenizer
from llmasos.training import finetune as ft
from llmasos.training.config import FinetuneConfig
from llmasos.training.dpo import DPO, collate_pairs, dpo_loss, sequence_logps

# Correct sums are preferred to wrong ones (10 to 16 too large: wrong in a way a tiny model can learn to see).
SUMS = [
    {"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 10 + (a * b) % 7}"}
    for a in range(10)
    for b in range(8)
]
CHATS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What comes after {i}?"}],
        "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
        "rejected": [{"role": "assistant", "content": f"{i + 2}, I think"}],
    }
    for i in range(6)
]
IMPLICIT = [
    {
        "chosen": [{"role": "user", "content": f"Double {i}."}, {"role": "assistant", "content": f"{2 * i}"}],
        "rejected": [{"role": "user", "content": f"Double {i}."}, {"role": "assistant", "content": f"{2 * i + 1}"}],
    }
    for i in range(4)
]


def config(base, data, out, **kw):
    dpo = dict(method="dpo", seq_len=32, lr=1e-3, max_steps=8, eval_every=4)
    return tiny_finetune_config(base, data, out, **{**dpo, **kw})


def rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


TRAIN = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def curve(run, keys=(*TRAIN, "val_loss")):
    return [[r[k] for k in keys] for r in rows(run)]


# ---- TRL's DPOTrainer, for reference ---------------------------------------------------------------


def trl_trainer(base, records, tmp_path, **args):
    """TRL's DPOTrainer on the transformers twin of our model (offline: a local model and tokenizer)."""
    trl = pytest.importorskip("trl", reason="trl is not installed")
    from datasets import Dataset
    from transformers import AutoTokenizer

    path, hf = base
    hf = copy.deepcopy(hf).float()
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4, **args
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    ref = copy.deepcopy(hf)  # not used: the reference log-probabilities are given with the batch
    return trl.DPOTrainer(
        model=hf, ref_model=ref, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer
    )


@pytest.mark.parametrize("records", [SUMS[:6], CHATS, IMPLICIT], ids=["text", "conversational", "implicit-prompt"])
def test_pairs_are_tokenized_as_trl_tokenizes_them(base, tmp_path, records):
    trainer = trl_trainer(base, records, tmp_path)
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), Tokenizer(base[0]))
    theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == theirs


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)],
)
def test_loss_and_gradient_equal_trl_dpo_trainer(base, tmp_path, loss_type, label_smoothing):
    """The same tiny model, batch and reference log-probabilities: TRL's `DPOTrainer._compute_loss` and ours."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from llmasos.checkpoints.load import load_model

    records = SUMS[::9]  # 9 pairs of uneven lengths: padding in both batches
    beta = 0.3
    trainer = trl_trainer(base, records, tmp_path, loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing)
    features = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
    inputs = DataCollatorForPreference(pad_token_id=0)(features)
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), Tokenizer(base[0]))
    batch = collate_pairs(pairs, seq_len=256, pad_id=0)
    # the same sequences, and the completion tokens are exactly the labelled ones
    has_next = inputs["attention_mask"][:, 1:]  # our inputs are each sequence but its last token
    assert torch.equal(batch.inputs * has_next, inputs["input_ids"][:, :-1] * has_next)
    assert torch.equal(batch.labels != -100, inputs["completion_mask"][:, 1:].bool())

    ours = load_model(base[0], dtype=torch.float32)
    with torch.no_grad():  # a reference a little away from the policy, so that every loss has a gradient
        ref = sequence_logps(ours, batch.inputs, batch.labels, "fp32") + torch.linspace(-2.0, 2.0, len(batch.inputs))
    batch.ref = ref
    k = batch.pairs
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:k], ref[k:]
    trainer.precompute_ref_logps = True  # as with precompute_ref_log_probs: the batch carries them
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    theirs.backward()

    objective = DPO(beta, loss_type, label_smoothing, reference=None)
    losses, chosen, rejected = objective.pair_losses(ours, batch, "fp32")
    losses.mean().backward()  # TRL's loss is the mean over the pairs; the loop normalises our sum the same way
    assert losses.mean().item() == pytest.approx(theirs.item(), abs=1e-5, rel=1e-5)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())


def test_sigmoid_label_smoothing_is_conservative_dpo():
    """TRL 1.x moved label smoothing from `sigmoid` to `robust`/`exo_pair`; ours keeps conservative DPO, the formula
    of TRL's sigmoid loss before (and of its CPO trainer's still): -(1-e) log s(b d) - e log s(-b d)."""
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta, e = 0.2, 0.15
    d = (c - rc) - (r - rr)
    expected = -F.logsigmoid(beta * d) * (1 - e) - F.logsigmoid(-beta * d) * e
    torch.testing.assert_close(dpo_loss(c, r, rc, rr, beta, "sigmoid", e)[0], expected)
    plain = dpo_loss(c, r, rc, rr, beta, "sigmoid", 0.0)[0]
    torch.testing.assert_close(plain, -F.logsigmoid(beta * d))


# ---- data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "x", "chosen": "y"', "not valid JSON"),
        ('{"prompt": "x", "chosen": "y"}', "not a preference record"),
        ('{"prompt": "x", "chosen": 3, "rejected": "z"}', "'chosen' must be a string or a list of messages"),
        ('{"prompt": ["x"], "chosen": "y", "rejected": "z"}', "'prompt' must be a string"),
        ('{"prompt": "x", "chosen": "", "rejected": "z"}', "must be non-empty"),
        ('{"chosen": [{"role": "robot", "content": "y"}], "rejected": []}', "chosen[0] must have a role"),
        (
            '{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}',
            "share no prompt",
        ),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_malformed_pairs_are_named_by_file_and_line(base, tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SUMS[0]) + "\n" + line + "\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{re.escape(reason)}"):
        load_pairs(path, Tokenizer(base[0]))


def test_only_completion_tokens_are_labelled_and_long_pairs_are_cut(base, tmp_path):
    tok = Tokenizer(base[0])
    [pair] = load_pairs(write_jsonl(tmp_path / "c.jsonl", CHATS[:1]), tok)
    assert tok.decode(pair.chosen, skip_special_tokens=False) == "1<|eot_id|>"
    asked = tok.apply_chat_template(CHATS[0]["prompt"], add_generation_prompt=True, tokenize=True)
    assert pair.prompt == asked  # the prompt inference builds
    batch = collate_pairs([pair], seq_len=64, pad_id=0)
    labelled = [t for t in batch.labels[0].tolist() if t != -100]
    assert labelled == pair.chosen
    assert [t for t in batch.labels[1].tolist() if t != -100] == pair.rejected
    short = collate_pairs([pair], seq_len=len(pair.prompt) + 1, pad_id=0)  # room for one completion token and a half
    assert short.inputs.shape[1] == len(pair.prompt) + 1
    assert [t for t in short.labels[0].tolist() if t != -100] == pair.chosen[:2]


# ---- training ----------------------------------------------------------------------------------------


def test_dpo_raises_held_out_preference_accuracy_and_margin_and_logs_trl_metrics(base, tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)  # 80 pairs: 64 to train on, 16 held out
    run = ft.finetune(config(base[0], data, tmp_path / "run", max_steps=16, eval_every=8, lr=1e-3, beta=0.1), progress=False).dir
    logged = rows(run)
    assert list(logged[0])[6:] == [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "val_rewards/accuracies",
        "val_rewards/margins",
    ]
    assert float(logged[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert float(logged[0]["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    val = [r for r in logged if r["val_loss"]]
    assert [int(r["step"]) for r in val] == [8, 16]
    assert float(val[-1]["val_rewards/accuracies"]) >= 0.75
    assert float(val[-1]["val_rewards/margins"]) > 0.1
    assert float(val[-1]["val_loss"]) < math.log(2) - 0.05
    assert float(logged[-1]["rewards/accuracies"]) >= 0.75
    assert all(r["val_ppl"] == "" for r in logged)  # no perplexity of a preference loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag in (
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/accuracies",
        "train/rewards/margins",
    ):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 17)), tag
    assert len(events.Scalars("val/rewards/accuracies")) == 2
    assert (run / "loss.png").stat().st_size > 0
    assert (run / "final" / "config.json").exists()

    # The held-out pairs, scored afresh: the trained model prefers the chosen answers more than the base does.
    from llmasos.checkpoints.load import load_model

    tok = Tokenizer(base[0])
    cfg = config(base[0], data, tmp_path / "x")
    _, held_out = ft.split_examples(load_pairs(data, tok), cfg)
    batch = collate_pairs(held_out, 32, 0)
    with torch.no_grad():
        before = sequence_logps(load_model(base[0], dtype=torch.float32), batch.inputs, batch.labels, "fp32")
        after = sequence_logps(load_model(run / "final", dtype=torch.float32), batch.inputs, batch.labels, "fp32")
    k = batch.pairs
    margin_before, margin_after = before[:k] - before[k:], after[:k] - after[k:]
    assert (margin_after > margin_before).float().mean() >= 0.75
    assert (margin_after > 0).float().mean() > (margin_before > 0).float().mean()


def test_lora_dpo_uses_the_base_as_reference_and_writes_a_peft_adapter(base, tmp_path):
    from safetensors.torch import load_file

    from llmasos.checkpoints.load import load_model
    from llmasos.models.lora import LoRAConfig, adapters_disabled, apply_lora

    # adapters_disabled gives the base's logits exactly, with trained (non-zero) adapters in place
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = load_model(base[0], dtype=torch.float32)
    adapted = apply_lora(load_model(base[0], dtype=torch.float32), LoRAConfig(targets=["all-linear"]))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    with torch.no_grad():
        assert not torch.allclose(adapted(ids), plain(ids), atol=1e-3)
        with adapters_disabled(adapted):
            torch.testing.assert_close(adapted(ids), plain(ids))
        assert not torch.allclose(adapted(ids), plain(ids), atol=1e-3)  # enabled again after the block

    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    cfg = config(base[0], data, tmp_path / "lora", method="lora", dpo=True, lora_targets="all-linear", merge=True, max_steps=8)
    run = ft.finetune(cfg, progress=False).dir
    assert float(rows(run)[-1]["rewards/margins"]) > 0
    ckpt = load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "final" / "config.json").exists()
    peft = pytest.importorskip("peft", reason="peft is not installed")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base[1]), str(run / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, load_model(run / "final", dtype=torch.float32)(ids), atol=1e-5, rtol=1e-5)

    # precomputed reference log-probabilities: the same curve, with no reference forward per step
    pre = ft.finetune(
        config(
            base[0],
            data,
            tmp_path / "pre",
            method="lora",
            dpo=True,
            lora_targets="all-linear",
            max_steps=8,
            precompute_ref_log_probs=True,
        ),
        progress=False,
    ).dir
    for a, b in zip(curve(pre), curve(run)):
        assert [float(x or 0) for x in a] == pytest.approx([float(x or 0) for x in b], abs=1e-5)


def test_qlora_dpo_trains_adapters_over_a_quantized_base(base, tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    cfg = config(base[0], data, tmp_path / "q", method="qlora", dpo=True, quantize="int8", lora_targets="all-linear", max_steps=6)
    run = ft.finetune(cfg, progress=False).dir
    logged = rows(run)
    assert float(logged[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # the quantized base is the reference
    assert float(logged[-1]["rewards/margins"]) > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_interrupted_dpo_resumes_to_the_same_curve(base, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    whole = ft.finetune(config(base[0], data, tmp_path / "whole"), progress=False).dir
    real = ft.pair_batch

    def interrupt_at_step_6(pairs, cfg, step, micro, pad_id):
        if step == 6:
            raise KeyboardInterrupt
        return real(pairs, cfg, step, micro, pad_id)

    monkeypatch.setattr(ft, "pair_batch", interrupt_at_step_6)
    with pytest.raises(Exception, match="interrupted at step 6"):
        ft.finetune(config(base[0], data, tmp_path / "cut"), progress=False)
    monkeypatch.setattr(ft, "pair_batch", real)
    cut = ft.finetune(config(base[0], data, tmp_path / "cut"), resume=True, progress=False).dir
    assert curve(cut) == curve(whole)
    from llmasos.checkpoints.load import load_model

    x = torch.randint(0, 400, (1, 12))
    assert torch.equal(load_model(cut / "final")(x), load_model(whole / "final")(x))


def test_dpo_configs(base, tmp_path):
    cfg = FinetuneConfig(model="m", data="p.jsonl", method="dpo")
    assert (cfg.method, cfg.dpo, cfg.lr, cfg.beta, cfg.loss_type, cfg.label_smoothing) == (
        "full",
        True,
        1e-6,
        0.1,
        "sigmoid",
        0.0,
    )
    assert FinetuneConfig(model="m", data="p.jsonl", method="lora", dpo=True).lr == 1e-5
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid and robust losses, not hinge"):
        FinetuneConfig(model="m", method="dpo", loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="loss_type: 'kto' is not one of sigmoid, ipo, hinge, robust"):
        FinetuneConfig(model="m", method="dpo", loss_type="kto")
    with pytest.raises(ConfigError, match="beta: must be positive"):
        FinetuneConfig(model="m", method="dpo", beta=0)
    with pytest.raises(ConfigError, match="not on a task"):
        ft.finetune(config(base[0], "", tmp_path / "t", task="arithmetic_qa"), progress=False)


# ---- torchrun ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_under_ddp_equals_one_process(base, tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS[:32])
    flags = ["finetune", base[0], "--data", data, "--max-steps", "3", "--micro-batch-size", "2", "--global-batch-size", "8"]
    flags += ["--precision", "fp32", "--lr", "1e-3", "--val-fraction", "0", "--log-every", "1", "--seq-len", "32"]
    for name, extra in (("full", ["--method", "dpo"]), ("lora-pre", ["--method", "lora", "--dpo", "--precompute-ref-log-probs"])):
        run_llmasos([*flags, *extra, "--out", tmp_path / f"{name}-one"])
        run_llmasos([*flags, *extra, "--out", tmp_path / f"{name}-two", "--strategy", "ddp"], procs=2)
        one, two = curve(tmp_path / f"{name}-one", TRAIN), curve(tmp_path / f"{name}-two", TRAIN)
        assert len(one) == len(two) == 3
        for a, b in zip(one, two):
            assert [float(x) for x in b] == pytest.approx([float(x) for x in a], rel=1e-4, abs=1e-5), name


# ---- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_dpo_on_the_gpu_equals_the_cpu_and_learns_in_bf16_mixed(base, tmp_path):
    from llmasos.checkpoints.load import load_model

    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
        batch = collate_pairs(load_pairs(data, Tokenizer(base[0]))[:8], 32, 0)
        losses = {}
        for device in ("cpu", "cuda"):
            model, frozen = (load_model(base[0], dtype=torch.float32).to(device) for _ in range(2))
            with torch.no_grad():
                frozen.lm_head.weight.mul_(1.1)  # a reference apart from the policy
            objective = DPO(0.1, "sigmoid", 0.0, lambda x, y, frozen=frozen: sequence_logps(frozen, x, y, "fp32"))
            loss = objective.pair_losses(model, batch.to(torch.device(device)), "fp32")[0].mean()
            loss.backward()
            losses[device] = (loss.item(), model.lm_head.weight.grad.cpu())
        assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], abs=1e-5)
        torch.testing.assert_close(losses["cuda"][1], losses["cpu"][1], atol=1e-5, rtol=1e-4)
        runs = {
            pre: ft.finetune(
                config(
                    base[0],
                    data,
                    tmp_path / f"run-{pre}",
                    precision="bf16-mixed",
                    max_steps=16,
                    eval_every=8,
                    precompute_ref_log_probs=pre,
                ),
                progress=False,
            ).dir
            for pre in (False, True)
        }
        for a, b in zip(curve(runs[True]), curve(runs[False])):  # precomputed on the GPU: the same curve
            assert [float(x or 0) for x in a] == pytest.approx([float(x or 0) for x in b], abs=1e-4)
        logged = rows(runs[False])
        assert float(logged[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)
        assert float(logged[-1]["val_rewards/accuracies"]) >= 0.75 and float(logged[-1]["val_rewards/margins"]) > 0.1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
