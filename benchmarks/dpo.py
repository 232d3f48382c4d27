"""DPO step throughput against TRL's DPOTrainer, same shape, batch, precision and optimizer, same run.

~110M shape, 2 pairs of 256-token sequences (128 prompt + 128 answer tokens) per step, 2 threads, full
DPO (sigmoid loss, beta 0.1): each step runs the policy forward and backward on the 4 sequences and the
frozen reference forward on them, then AdamW (ours as `finetune` builds it; TRL's model with torch's
AdamW, as the training benchmark's transformers loop). TRL's step is `DPOTrainer.compute_loss` (its
fused LM head over the answer positions, its reference model) and backward. A second row gives both
with precomputed reference log-probabilities (`precompute_ref_log_probs`: no reference forward).
tok/s counts the positions each runs (prompt and answer, both sequences of each pair).
Target (issue: DPO): with a reference model, >= 1.0x TRL's DPOTrainer.
"""

from __future__ import annotations

import os

from benchmarks.common import SMALL, print_table, run_child

STEPS = int(os.environ.get("LLMASOS_BENCH_DPO_STEPS", "2"))
DEVICE = os.environ.get("LLMASOS_BENCH_DEVICE", "cpu")  # cuda: the same comparison on a GPU (bf16-mixed there too)
PAIRS, PROMPT, ANSWER = (2, 128, 128) if DEVICE == "cpu" else (8, 256, 256)

CHILD = r"""
import copy, json, statistics, tempfile, time, torch, transformers, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from datasets import Dataset
from tokenizers import Tokenizer, models
from trl import DPOConfig, DPOTrainer
from llmasos.models.config import ModelConfig
from llmasos.models.llama import Transformer
from llmasos.training.config import FinetuneConfig
from llmasos.training.dpo import DPO, PairBatch, sequence_logps
from llmasos.training.trainer import make_optimizer
SHAPE, PRECISION, STEPS, PAIRS, PROMPT, ANSWER = {shape!r}, {precision!r}, {steps}, {pairs}, {prompt}, {answer}
DEVICE = torch.device({device!r})
torch.manual_seed(0)
ours = Transformer(ModelConfig(**SHAPE)); ours.init_weights(); ours.train()
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, attn_implementation="sdpa"))
hf.load_state_dict(ours.state_dict()); hf.train()
ours, hf = ours.to(DEVICE), hf.to(DEVICE)
ours_ref = copy.deepcopy(ours).requires_grad_(False).eval()
hf_ref = copy.deepcopy(hf).eval()
# DPOTrainer wants a tokenizer and a data set; the batches below are token ids already.
words = models.WordLevel({{"a": 0, "b": 1, "c": 2, "<eos>": 3, "<unk>": 4}}, unk_token="<unk>")
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words), eos_token="<eos>", pad_token="<eos>")
args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=DEVICE.type == "cpu", bf16=PRECISION == "bf16-mixed",
                 per_device_train_batch_size=PAIRS, loss_type=["sigmoid"], beta=0.1)
trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=args, processing_class=tok,
                     train_dataset=Dataset.from_list([{{"prompt": "a", "chosen": "b", "rejected": "c"}}]))
config = FinetuneConfig(model="m", data="d", method="dpo", lr=1e-6)
ours_opt = make_optimizer([p for p in ours.parameters() if p.requires_grad], config)  # what `finetune` uses
hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-6)
objective = DPO(0.1, "sigmoid", 0.0, reference=lambda x, y: sequence_logps(ours_ref, x, y, PRECISION))

def batches(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPE["vocab_size"], (2 * PAIRS, PROMPT + ANSWER + 1), generator=g).to(DEVICE)
    answer = torch.zeros_like(ids); answer[:, PROMPT + 1:] = 1
    theirs = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": answer}}
    mine = PairBatch(ids[:, :-1], torch.where(answer[:, 1:].bool(), ids[:, 1:], -100))
    return mine, theirs

def ours_step(batch, theirs):
    summed, _ = objective.loss(ours, batch, DEVICE, PRECISION)
    (summed / batch.pairs).backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
    ours_opt.step(); ours_opt.zero_grad(set_to_none=True)

def trl_step(batch, theirs):
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16-mixed"):
        loss = trainer.compute_loss(trainer.model, theirs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    hf_opt.step(); hf_opt.zero_grad(set_to_none=True)

def precomputed(batch, theirs):
    with torch.no_grad():
        ref = sequence_logps(ours_ref, batch.inputs, batch.labels, PRECISION)
    batch = PairBatch(batch.inputs, batch.labels, ref)
    theirs = {{**theirs, "ref_chosen_logps": ref[:PAIRS], "ref_rejected_logps": ref[PAIRS:]}}
    return batch, theirs

sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
positions = {{"llmasos": 2 * PAIRS * (PROMPT + ANSWER), "trl": 2 * PAIRS * (PROMPT + ANSWER + 1)}}
out = {{}}
for mode in ("reference", "precomputed"):
    trainer.precompute_ref_logps = mode == "precomputed"
    steps = {{"llmasos": ours_step, "trl": trl_step}}
    data = [batches(i) for i in range(STEPS + 1)]
    if mode == "precomputed":
        data = [precomputed(*d) for d in data]
    for fn in steps.values():
        fn(*data[0])  # warm-up
    rates = {{k: [] for k in steps}}
    for i in range(1, STEPS + 1):
        for k, fn in steps.items():
            sync(); t = time.perf_counter(); fn(*data[i]); sync(); rates[k].append(positions[k] / (time.perf_counter() - t))
    out[mode] = {{k: statistics.median(v) for k, v in rates.items()}}
print(json.dumps(out))
"""


def main() -> dict:
    rows, checks = [], []
    from llmasos.kernels import native_bf16

    for precision in ("fp32", "bf16-mixed"):
        if precision == "bf16-mixed" and DEVICE == "cpu" and not native_bf16():
            print("bf16-mixed skipped: this CPU has no bf16 arithmetic (AVX512_BF16/AMX)")
            continue
        try:
            r = run_child(
                CHILD.format(
                    shape=SMALL, precision=precision, steps=STEPS, pairs=PAIRS, prompt=PROMPT, answer=ANSWER, device=DEVICE
                )
            )
        except RuntimeError as e:
            if "No module named 'trl'" in str(e):
                print("dpo skipped: trl is not installed (pip install trl, or the [test] extra)")
                return {"passed": 0, "checked": 0}
            raise
        for mode, target in (("reference", 1.0), ("precomputed", None)):
            ours, ref = r[mode]["llmasos"], r[mode]["trl"]
            ratio = ours / ref
            if target is not None:
                checks.append(ratio >= target)
            verdict = "reported" if target is None else ("PASS" if ratio >= target else "FAIL")
            rows.append(
                [
                    precision,
                    "reference model" if mode == "reference" else "precomputed ref log-probs",
                    f"{ours:.0f}",
                    f"{ref:.0f}",
                    f"{ratio:.2f}x",
                    "reported" if target is None else f"{target:.2f}x",
                    verdict,
                ]
            )
    print_table(
        f"DPO step tok/s on {DEVICE}, ~110M shape, {PAIRS} pairs x 2 x {PROMPT + ANSWER} tokens, AdamW "
        f"(median of {STEPS} alternating steps)",
        ["precision", "reference", "ours", "TRL DPOTrainer", "ratio", "target", "verdict"],
        rows,
    )
    return {"passed": sum(checks), "checked": len(checks)}


if __name__ == "__main__":
    main()
