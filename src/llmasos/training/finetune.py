"""Fine-tuning a model: full, LoRA, or QLoRA (LoRA over a frozen int8/int4 base), on instruction
data or a prepared corpus, or by DPO on preference pairs, through the same loop as pretraining.

A run dir holds the usual checkpoints, metrics and loss curve, and:
- `final/`: the fine-tuned model as an HF dir (full; or lora/qlora with `merge`, the adapter folded
  into the original full-precision base);
- `adapter/`: lora/qlora, the adapter alone in PEFT's format (plus the tokenizer files), which
  `LLM.load`, `llmasos generate` and `peft.PeftModel.from_pretrained` all take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from llmasos.checkpoints.gguf_vocab import tokenizer_source
from llmasos.checkpoints.hf import save_model
from llmasos.checkpoints.load import load_model
from llmasos.checkpoints.paths import resolve
from llmasos.data.instruct import IGNORE, Example, load_examples, tokenize_completion
from llmasos.data.preference import Pair, load_pairs
from llmasos.errors import ConfigError, LLMasOSError
from llmasos.evaluation.tasks import load_task
from llmasos.models.lora import LoRAConfig, adapters_disabled, apply_lora, merge_lora, save_adapter
from llmasos.models.quantize import quantize_model
from llmasos.outputs import atomic_dir
from llmasos.tokenization import Tokenizer, copy_tokenizer_files
from llmasos.training import distributed
from llmasos.training.config import FinetuneConfig, TrainConfig
from llmasos.training.dpo import DPO, PairBatch, collate_pairs, precompute_reference, sequence_logps
from llmasos.training.trainer import Job, Run, claim_run, packed_job, save_full_model, train

T = TypeVar("T")


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def collate(examples: list[Example], seq_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(inputs, labels) right-padded to the longest example (at most seq_len + 1 tokens); labels shifted by one."""
    length = min(seq_len + 1, max(len(e.input_ids) for e in examples))
    x = torch.full((len(examples), length - 1), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length - 1), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids, labels = e.input_ids[:length], e.labels[:length]
        x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, : len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


def _picks(items: Sequence[T], config: TrainConfig, step: int, micro: int) -> list[T]:
    """The items of micro-batch `micro` of step `step`: a fresh seeded order each epoch, a pure function of the step."""
    first = step * config.global_batch_size + micro * config.micro_batch_size
    picks = []
    for p in range(first, first + config.micro_batch_size):
        epoch, i = divmod(p, len(items))
        picks.append(items[_epoch_order(len(items), config.seed, epoch)[i]])
    return picks


def example_batch(examples: list[Example], config: TrainConfig, step: int, micro: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Micro-batch `micro` of step `step`: examples in a fresh seeded order each epoch, a pure function of the step."""
    return collate(_picks(examples, config, step, micro), config.seq_len, pad_id)


def pair_batch(pairs: list[Pair], config: TrainConfig, step: int, micro: int, pad_id: int) -> PairBatch:
    """Micro-batch `micro` of step `step` of preference pairs (`micro_batch_size` pairs, twice as many sequences)."""
    return collate_pairs(_picks(pairs, config, step, micro), config.seq_len, pad_id)


def split_examples(examples: list[T], config: FinetuneConfig) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded `val_fraction` held out."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = int(len(examples) * config.val_fraction)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def training_examples(config: FinetuneConfig, tokenizer) -> list[Example]:
    """The examples of `data` (an instruction file) or of `task` (a task's prompts and answers)."""
    if config.task:
        return [tokenize_completion(tokenizer, prompt, answer) for prompt, answer in load_task(config.task).training_examples()]
    return load_examples(config.data, tokenizer)


def _load_base(path: Path, config: FinetuneConfig, device: torch.device):
    """The starting model in fp32: trained whole (with weights of its own), or frozen, quantized and given
    adapters as the method asks (a frozen base stays memory-mapped: it is never written)."""
    model = load_model(path, dtype=torch.float32)
    if config.method == "full":
        for p in model.parameters():  # memory-mapped weights are copy-on-write pages; the optimizer writes them all
            p.data = p.data.clone()
        return model.to(device), None
    if config.method == "qlora":
        if device.type != "cpu":
            raise ConfigError("qlora's quantized base runs on the CPU kernels; use lora on GPUs")
        quantize_model(model, config.quantize, skip=("lm_head",))
    lora = LoRAConfig(
        config.lora_rank, config.lora_alpha, config.lora_dropout, [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    )
    return apply_lora(model.to(device), lora), lora


def _save_adapter(base: Path, lora, config: FinetuneConfig):
    """`Job.save_final` for lora/qlora: the PEFT adapter, and with `merge` the merged model in `final/`."""

    def save(state: dict[str, Tensor], run: Path) -> None:
        adapter = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        with atomic_dir(run / "adapter", replace=True) as tmp:
            save_adapter(lora, adapter, tmp, str(base))
            copy_tokenizer_files(base, tmp)
        if config.merge:
            model = apply_lora(load_model(base), lora)  # the original weights, in their stored dtype
            model.load_state_dict(adapter, strict=False)
            with atomic_dir(run / "final", replace=True) as tmp:
                save_model(merge_lora(model), tmp, tokenizer_dir=base)

    return save


def _reference(config: FinetuneConfig, base: Path, model, lora, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """DPO's reference: `(inputs, labels) -> sequence log-probabilities` of the starting model, which for lora/qlora
    is the trained model with its adapters disabled (no second copy), and for full a frozen copy (with precomputed
    log-probabilities, the model itself before its first step: no copy either)."""
    if lora is not None:

        def base_logps(x: Tensor, y: Tensor) -> Tensor:
            with adapters_disabled(model):
                return sequence_logps(model, x, y, config.precision)

        return base_logps
    if config.precompute_ref_log_probs:
        return lambda x, y: sequence_logps(model, x, y, config.precision)
    frozen = load_model(base, dtype=torch.float32).requires_grad_(False).eval().to(device)
    return lambda x, y: sequence_logps(frozen, x, y, config.precision)


def _dpo_job(config: FinetuneConfig, base: Path, model, lora, save_final, tokenizer, cluster) -> tuple[FinetuneConfig, Job]:
    """Training on preference pairs: the pairs, their split, the reference (or its precomputed log-probabilities)."""
    if config.task:
        raise ConfigError("dpo trains on preference pairs (data: a prompt/chosen/rejected file), not on a task")
    pairs = load_pairs(config.data, tokenizer)
    kept = [p for p in pairs if len(p.prompt) <= config.seq_len]  # the prompt leaves room for a completion token
    if len(kept) < len(pairs) and cluster.main:
        print(f"note: {len(pairs) - len(kept)} of {len(pairs)} pairs leave no room for a completion in seq_len; left out")
    pairs, val = split_examples(kept, config)
    if not pairs:
        raise LLMasOSError(f"{config.data}: no training pairs left after the validation split")
    longer = sum(len(p.prompt) + max(len(p.chosen), len(p.rejected)) > config.seq_len + 1 for p in pairs)
    if longer and cluster.main:
        print(f"note: {longer} of {len(pairs)} pairs are longer than seq_len {config.seq_len} and are cut")
    if config.max_steps is None and config.max_tokens is None:
        config = dataclasses.replace(config, max_steps=config.epoch_steps(len(pairs)))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    mbs = config.micro_batch_size
    reference = _reference(config, base, model, lora, cluster.device)
    if config.precompute_ref_log_probs:  # every batch then carries its pairs' reference log-probabilities
        if cluster.main:
            print(f"computing the reference's log-probabilities of {len(pairs) + len(val)} pairs")
        pairs = precompute_reference(pairs, reference, mbs, config.seq_len, pad, cluster)
        val = precompute_reference(val, reference, mbs, config.seq_len, pad, cluster)
    val_batches = [collate_pairs(val[i : i + mbs], config.seq_len, pad) for i in range(0, len(val), mbs)]
    job = Job(
        model,
        lambda step, micro: pair_batch(pairs, config, step, micro, pad),
        (lambda: val_batches[: config.eval_batches]) if val_batches else None,
        save_final,
        trainable_only=lora is not None,
        objective=DPO(
            config.beta, config.loss_type, config.label_smoothing, None if config.precompute_ref_log_probs else reference
        ),
    )
    return config, job


def finetune(
    config: FinetuneConfig,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
    inputs: Iterable[Path | str | None] = (),
) -> Run:
    """Fine-tune `config.model` on `config.data` or `config.task`; returns the run (its dir and its steps,
    which `epochs` decides when neither max_steps nor max_tokens is set).

    A new run's dir (`out`) may be one `llmasos finetune` wrote without checkpoints, anything else only with
    `force` (which clears it); never the model, the data, the task file or `inputs` (the config's YAML)."""
    if not isinstance(config.model, str) or not config.model:
        raise ConfigError("model: finetune starts from a stored model's name or a model dir")
    if not config.data and not config.task:
        raise ConfigError("data: an instruction file (JSON/JSONL) or a prepared dir is required (or a task)")
    base = resolve(config.model)
    cluster = distributed.init_cluster()
    try:
        if not resume:
            claim_run(config, cluster, "finetune", [base, config.data, config.task, *inputs], force)
        torch.manual_seed(config.seed)
        model, lora = _load_base(base, config, cluster.device)
        save_final = _save_adapter(base, lora, config) if lora else save_full_model(model.config, base)
        if config.data and (Path(config.data) / "metadata.json").exists():
            if config.dpo:
                raise ConfigError("dpo trains on preference pairs (a prompt/chosen/rejected file), not on a prepared dir")
            if config.max_steps is None and config.max_tokens is None:
                raise ConfigError("a prepared dir: set max_steps or max_tokens")
            job = packed_job(model, config, Path(config.data), cluster.device, save_final, trainable_only=lora is not None)
        elif config.dpo:
            config, job = _dpo_job(config, base, model, lora, save_final, Tokenizer(tokenizer_source(base)), cluster)
        else:
            tokenizer = Tokenizer(tokenizer_source(base))
            examples, val = split_examples(training_examples(config, tokenizer), config)
            if not examples:
                raise LLMasOSError(f"{config.data or config.task}: no training examples left after the validation split")
            longer = sum(len(e.input_ids) > config.seq_len + 1 for e in examples)
            if longer and cluster.main:
                print(f"note: {longer} of {len(examples)} examples are longer than seq_len {config.seq_len} and are cut")
            if config.max_steps is None and config.max_tokens is None:  # epochs decide: saved as steps, for resume
                config = dataclasses.replace(config, max_steps=config.epoch_steps(len(examples)))
            pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
            mbs = config.micro_batch_size
            val_batches = [collate(val[i : i + mbs], config.seq_len, pad) for i in range(0, len(val), mbs)]
            job = Job(
                model,
                lambda step, micro: example_batch(examples, config, step, micro, pad),
                (lambda: val_batches[: config.eval_batches]) if val_batches else None,
                save_final,
                trainable_only=lora is not None,
            )
        return train(config, job, cluster, resume, progress, command="finetune")
    finally:
        distributed.close_cluster(cluster)
