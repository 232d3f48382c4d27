"""torchrun with 2 processes on the gloo backend: DDP and FSDP2 follow the single-process loss curve
with the same global batch, and checkpoints move between strategies and process counts."""

import pytest
from helpers import make_hf_model, run_llmasos, write_bpe_tokenizer, write_jsonl

pytestmark = pytest.mark.slow

FLAGS = [
    "--model",
    "tiny-gqa",
    "--seq-len",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--max-steps",
    "6",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "3",
    "--log-every",
    "1",
    "--precision",
    "fp32",
    "--eval-batches",
    "2",
]


def curve(run):
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    return [float(r[1]) for r in rows], [float(r[4]) for r in rows if r[4]]


def assert_same_curve(a, b):
    assert len(a[0]) == len(b[0]) and len(a[1]) == len(b[1])
    assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-5)
    assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-5)


def test_ddp_and_fsdp_follow_the_single_process_curve_and_checkpoints_cross_strategies(data, tmp_path):
    run_llmasos(["pretrain", "--data", data, "--out", tmp_path / "one", *FLAGS])
    one = curve(tmp_path / "one")
    assert one[0][-1] < one[0][0]
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        run_llmasos(["pretrain", "--data", data, "--out", run, "--strategy", strategy, *FLAGS], procs=2)
        assert_same_curve(curve(run), one)
        assert (run / "final" / "config.json").exists()

    # 2 FSDP processes stop at step 3; one process resumes that checkpoint and ends on the same curve.
    cut = tmp_path / "cut"
    run_llmasos(["pretrain", "--data", data, "--out", cut, "--strategy", "fsdp", *FLAGS, "--max-steps", "3"], procs=2)
    assert (cut / "checkpoints" / "step-0000003").exists()
    run_llmasos(["pretrain", "--resume", cut, "--max-steps", "6"])
    assert_same_curve(curve(cut), one)


def test_lora_finetune_under_ddp_equals_one_process(tmp_path):
    base, _ = make_hf_model(tmp_path / "base", num_key_value_heads=2)
    write_bpe_tokenizer(base)
    records = [{"instruction": f"Add {a} and {b}.", "output": f"{a + b}"} for a in range(4) for b in range(4)]
    write_jsonl(tmp_path / "a.jsonl", records)
    flags = [
        "finetune",
        base,
        "--data",
        tmp_path / "a.jsonl",
        "--method",
        "lora",
        "--max-steps",
        "4",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--precision",
        "fp32",
        "--lr",
        "1e-2",
        "--val-fraction",
        "0",
        "--log-every",
        "1",
    ]
    run_llmasos([*flags, "--out", tmp_path / "one"])
    run_llmasos([*flags, "--out", tmp_path / "two", "--strategy", "ddp"], procs=2)
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()
