"""Pretraining: the loss falls, an interrupted run resumes to the same curve, bad configs are named."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from llmasos.errors import ConfigError, LLMasOSError
from llmasos.training import trainer
from llmasos.training.config import TrainConfig


def config(data, out, **kw):
    values = dict(
        model="tiny-gqa",
        data=str(data),
        out=str(out),
        seq_len=32,
        micro_batch_size=2,
        global_batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        max_steps=16,
        eval_every=8,
        checkpoint_every=4,
        log_every=1,
        keep_checkpoints=2,
    )
    return TrainConfig.from_dict({**values, **kw})


def pretrain_args(data, out, *more: str) -> list[str]:
    """`llmasos pretrain`'s arguments for a run of the tiny-gqa shape on `data`: sequences of 32 tokens, one
    micro-batch of 2 a step; `more` adds flags."""
    shape = ["--model", "tiny-gqa", "--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "2"]
    return ["pretrain", *shape, "--data", str(data), "--out", str(out), *more]


def losses(run):
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    return [(int(r.split(",")[0]), r.split(",")[1]) for r in rows]


def test_loss_falls_and_the_run_leaves_a_loadable_model(data, tmp_path):
    from llmasos import LLM, SamplingParams

    run = trainer.pretrain(config(data, tmp_path / "run", max_steps=30, log_every=5), progress=False).dir
    curve = [float(loss) for _, loss in losses(run)]
    assert curve[-1] < curve[0] - 1.0
    assert (run / "loss.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 31))
    assert len(events.Scalars("val/perplexity")) == 4  # steps 8, 16, 24 and the last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000028", "step-0000030"]
    llm = LLM.load(run / "final")
    assert len(llm.generate(["The quick"], SamplingParams(max_tokens=5, temperature=0))[0].token_ids) >= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(data, tmp_path, monkeypatch, precision):
    whole = trainer.pretrain(config(data, tmp_path / "whole", precision=precision), progress=False).dir
    real_batch = trainer.batch_at

    def interrupt_at_step_10(data_, cfg, step, micro, split_seed=0):
        if step == 10 and split_seed == 0:
            raise KeyboardInterrupt
        return real_batch(data_, cfg, step, micro, split_seed)

    monkeypatch.setattr(trainer, "batch_at", interrupt_at_step_10)
    with pytest.raises(LLMasOSError, match="interrupted at step 10; continue with `llmasos pretrain --resume"):
        trainer.pretrain(config(data, tmp_path / "cut", precision=precision), progress=False)
    monkeypatch.setattr(trainer, "batch_at", real_batch)
    cut = trainer.pretrain(config(data, tmp_path / "cut", precision=precision), resume=True, progress=False).dir
    assert losses(cut) == losses(whole)
    x = torch.randint(0, 400, (1, 16))
    from llmasos.checkpoints.load import load_model

    assert torch.equal(load_model(cut / "final")(x), load_model(whole / "final")(x))


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(data, tmp_path, monkeypatch, capsys):
    from llmasos.cli import main

    def flags(out):
        return pretrain_args(data, out, "--max-steps", "3", "--log-every", "1")

    assert main(flags(tmp_path / "whole")) == 0

    real_batch = trainer.batch_at

    def ctrl_c_at_step_0(data_, cfg, step, micro, split_seed=0):
        if split_seed == 0:
            raise KeyboardInterrupt
        return real_batch(data_, cfg, step, micro, split_seed)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "batch_at", ctrl_c_at_step_0)
        assert main(flags(tmp_path / "cut")) == 1
    cut = tmp_path / "cut"
    assert trainer.latest_checkpoint(cut) is None and (cut / "config.yaml").exists()
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(cut)]) == 0
    assert f"no checkpoint in {cut} yet: starting it over from step 0" in capsys.readouterr().err
    assert losses(cut) == losses(tmp_path / "whole") and len(losses(cut)) == 3
    assert (cut / "final" / "config.json").exists()


def test_kill_9_leaves_the_last_checkpoint_loadable(data, tmp_path):
    out = tmp_path / "killed"
    more = ["--max-steps", "100000", "--checkpoint-every", "1", "--eval-every", "1000", "--log-every", "1000"]
    cmd = [sys.executable, "-m", "llmasos", *pretrain_args(data, out, *more)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last = trainer.latest_checkpoint(out)
    assert last is not None
    from llmasos.checkpoints.weights import read_safetensors_header

    assert read_safetensors_header(last / "model.safetensors")
    assert torch.load(last / "optimizer.pt", weights_only=True)["optimizer"]["state"]


def test_unknown_key_and_wrong_type_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key\(s\) learning_rate; valid keys: model, data, out"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match="max_steps must be int or NoneType, got 'ten'"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_flags_override_the_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 10\nlr: 0.1\nprecision: fp32\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml", {"max_steps": "20", "activation_checkpointing": "true"})
    assert (cfg.max_steps, cfg.lr, cfg.precision, cfg.activation_checkpointing) == (20, 0.1, "fp32", True)


def test_cli_pretrain_refuses_an_unknown_model_shape(data, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmasos",
            "pretrain",
            "--model",
            "tiny-nope",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "x"),
            "--max-steps",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "unknown model shape 'tiny-nope'" in r.stderr and "Traceback" not in r.stderr


def test_a_saved_run_config_is_read_back_without_the_other_verbs_keys(tmp_path):
    """Runs written when one config served both verbs saved fine-tuning's keys too; pretrain --resume takes them."""
    saved = {**config("d", "x").to_dict(), "method": "full", "lora_rank": 8, "epochs": None, "merge": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = TrainConfig.from_run(tmp_path, {"max_steps": "20"})
    assert (cfg.out, cfg.max_steps, cfg.lr) == (str(tmp_path), 20, 3e-3)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved, "learning_rate": 0.1}))
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rate"):
        TrainConfig.from_run(tmp_path)
