"""Test helpers: tiny tokenizers and random-weight models built on the spot (no downloads)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a land far away, there lived a small language model.",
    "Café, naïve, façade — déjà vu. Ünïcödé and emoji 🦙🔥 and 漢字 and Ελληνικά.",
    "import os\nimport sys\n\nclass Model:\n    def __init__(self):\n        self.x = 1\n",
    "Numbers 12345 and symbols !@#$%^&*() [brackets] {braces} <angles>.",
] * 20

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_bpe_tokenizer(
    out: Path, vocab_size: int = 400, chat_template: str | None = CHATML_TEMPLATE, llama3_split: bool = False
) -> Path:
    """A byte-level BPE `tokenizer.json` like Llama 3's, with its special tokens and a BOS post-processor.

    llama3_split: split words with Llama 3's regex and match whole words first (`ignore_merges`), as Llama 3's
    own tokenizer.json does; otherwise GPT-2's ByteLevel split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=llama3_split))
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def write_sp_tokenizer(out: Path, vocab_size: int = 500) -> Path:
    """A SentencePiece BPE `tokenizer.model` trained as Llama 2's was (byte fallback, no normalisation)."""
    import io

    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
TINY = dict(
    vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)


def make_hf_model(out: Path, family: str = "llama", seed: int = 0, **overrides):
    """A random-weight transformers model saved as an HF dir (fp32); returns (dir, model)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # transformers zero-initialises some tensors (biases); make every value count
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out, model


def write_lora_adapter(
    base: Path, out: Path, targets=("q_proj", "v_proj"), rank: int = 4, alpha: float = 8.0, seed: int = 0
) -> Path:
    """A PEFT LoRA adapter dir for the model dir `base`, as `finetune --method lora` writes one (with the base's
    tokenizer files), but with random `lora_B` too, so that it changes what the model says."""
    from llmasos.checkpoints.load import load_model
    from llmasos.models.lora import LoRAConfig, save_adapter
    from llmasos.tokenization import copy_tokenizer_files

    model = load_model(base)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.2
    save_adapter(LoRAConfig(rank, alpha, targets=list(targets)), state, out, str(base))
    copy_tokenizer_files(base, out)
    return out


# ---- serving --------------------------------------------------------------------------------------

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(llm, **options) -> Iterator[str]:
    """The app for `llm` served at the yielded base URL until the block ends."""
    import uvicorn

    from llmasos.serving import create_app

    port = free_port()
    config = uvicorn.Config(create_app(llm, **options), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class StepGate:
    """The test's own clock for an engine: `hold_after(k)` lets k more steps run, then holds every step
    (commands such as aborts still run; nothing is generated) until `release()`. A test that needs a
    request still running, or a client to leave first, holds it there instead of hoping the machine is slow."""

    def __init__(self, engine):
        self.engine, self._step = engine, engine.step
        self._left: int | None = None  # None: every step runs
        self._lock = threading.Lock()
        engine.step = self.step

    def step(self):
        with self._lock:
            held = self._left == 0
            if self._left:
                self._left -= 1
        if held:
            time.sleep(0.002)
            return []
        return self._step()

    def hold_after(self, steps: int = 0) -> None:
        with self._lock:
            self._left = steps

    def release(self) -> None:
        with self._lock:
            self._left = None

    def remove(self) -> None:
        self.release()
        del self.engine.step  # the instance attribute; the class's method shows through again


# ---- several models, one pool --------------------------------------------------------------------

STORE_MODELS = {"alpha": 1, "beta": 2, "gamma": 3}  # name -> seed: three different tiny models


class Clock:
    """The pool's clock, moved by the test: keep-alive runs out when the test says, not after real seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(clock: Clock | None = None, **options):
    """A pool over the store: options go to LoadOptions (max_running, kv_cache_memory, ...) or the pool
    (memory_budget, keep_alive, loader)."""
    from llmasos.serving.pool import Catalog, LoadOptions, ModelPool

    pool_keys = {"memory_budget", "keep_alive", "loader", "names"}
    pool_options = {k: options.pop(k) for k in list(options) if k in pool_keys}
    names = pool_options.pop("names", None)
    return ModelPool(
        Catalog(names=names), LoadOptions(**{"max_running": 8, **options}), tick=0.02, clock=clock or Clock(), **pool_options
    )


# ---- evaluation and fine-tuning data ---------------------------------------------------------------

MC_RECORDS = [
    {"question": "Which letter comes after A?", "choices": [" A", " B", " C"], "answer": 1},
    {"question": "Pick the second letter.", "choices": [" B", " C", " A"], "answer": 0},
    {"question": "Which one is B?", "choices": [" C", " A", " B"], "answer": 2},
    {"question": "Say A.", "choices": [" A", " C", " B"], "answer": 0},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
