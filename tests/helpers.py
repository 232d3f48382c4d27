"""Test helpers: tiny tokenizers and random-weight models built on the spot (no downloads)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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

# Chat templates that take tools, in the styles of Llama 3.1 (a JSON call, tools in the first user turn) and of
# Hermes/Qwen2.5 (<tool_call> blocks, tools in the system turn), for the tool-calling tests.
LLAMA31_TOOLS_TEMPLATE = """{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- "<|start_header_id|>user<|end_header_id|>\n\n" }}
    {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments." }}
    {{- ' Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) + "\n\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""
HERMES_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>" }}
    {%- for tool in tools %}{{- "\n" + tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within" }}
    {{- ' <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' }}
    {{- '\n</tool_call><|im_end|>\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
MISTRAL_TOOLS_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- if tools and loop.last %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
        {{- '[INST] ' + message.content + '[/INST]' }}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '[TOOL_CALLS] [' }}
        {%- for call in message.tool_calls %}
            {%- if call.id is not defined or call.id | length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- '{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments | tojson }}
            {{- ', "id": "' + call.id + '"}' }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']' + eos_token }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content + eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content | tojson }}
        {{- ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
"""
MISTRAL_SPECIALS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
LLAMA31_SPECIALS = ("<|eom_id|>", "<|python_tag|>")
HERMES_SPECIALS, HERMES_ADDED = ("<|im_start|>", "<|im_end|>"), ("<tool_call>", "</tool_call>")


def write_tool_tokenizer(out: Path, style: str) -> Path:
    """A tiny tokenizer whose chat template takes tools: style "llama3.1", "hermes" or "mistral" (400 tokens in all)."""
    if style == "llama3.1":
        return write_bpe_tokenizer(out, chat_template=LLAMA31_TOOLS_TEMPLATE, specials=LLAMA31_SPECIALS, eos_token="<|eot_id|>")
    if style == "mistral":
        return write_bpe_tokenizer(out, chat_template=MISTRAL_TOOLS_TEMPLATE, specials=MISTRAL_SPECIALS)
    return write_bpe_tokenizer(
        out,
        vocab_size=400 - len(HERMES_ADDED),
        chat_template=HERMES_TEMPLATE,
        specials=HERMES_SPECIALS,
        added=HERMES_ADDED,
        eos_token="<|im_end|>",
    )


def make_tool_model(out: Path, style: str) -> Path:
    """A tiny random GQA Llama with 4096 tokens of context whose chat template takes tools (`write_tool_tokenizer`'s
    style: "llama3.1", "hermes" or "mistral")."""
    path, _ = make_hf_model(out, num_key_value_heads=2, max_position_embeddings=4096)
    write_tool_tokenizer(path, style)
    return path


# Functions to offer a model: the weather in a city named freely (at most 10 characters) or picked from two.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

CITY_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_bpe_tokenizer(
    out: Path,
    vocab_size: int = 400,
    chat_template: str | None = CHATML_TEMPLATE,
    llama3_split: bool = False,
    specials: tuple[str, ...] = (),
    added: tuple[str, ...] = (),
    eos_token: str = "<|end_of_text|>",
) -> Path:
    """A byte-level BPE `tokenizer.json` like Llama 3's, with its special tokens and a BOS post-processor.

    llama3_split: split words with Llama 3's regex and match whole words first (`ignore_merges`), as Llama 3's
    own tokenizer.json does; otherwise GPT-2's ByteLevel split. specials: more special tokens (after Llama 3's);
    added: tokens added as plain text (as Qwen2.5 adds `<tool_call>`); eos_token: what ends a turn."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
        special_tokens=LLAMA3_SPECIALS + list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": eos_token,
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


def tiny_finetune_config(model, data, out, **values):
    """A FinetuneConfig for a fine-tuning run of a tiny model on the CPU in seconds: batches of 8 in micro-batches
    of 4, fp32, a checkpoint every 4 steps, a metrics row every step, a fifth of the data for validation;
    `values` set the rest (seq_len, lr, max_steps, method...) or override these."""
    from llmasos.training.config import FinetuneConfig

    defaults = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        micro_batch_size=4,
        global_batch_size=8,
        warmup_steps=2,
        weight_decay=0.0,
        checkpoint_every=4,
        log_every=1,
        precision="fp32",
        val_fraction=0.2,
    )
    return FinetuneConfig.from_dict({**defaults, **values})


MC_RECORDS = [
    {"question": "Which letter comes after A?", "choices": [" A", " B", " C"], "answer": 1},
    {"question": "Pick the second letter.", "choices": [" B", " C", " A"], "answer": 0},
    {"question": "Which one is B?", "choices": [" C", " A", " B"], "answer": 2},
    {"question": "Say A.", "choices": [" A", " C", " B"], "answer": 0},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_llmasos(args, procs: int = 1) -> subprocess.CompletedProcess:
    """`llmasos ARGS` in a child process (under torchrun with `procs` > 1, one thread each), asserted to exit 0."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        if procs > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + ["-m", "llmasos", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


class FailingPrefill:
    """A model that raises RuntimeError("simulated failure") on a forward of several positions (a prefill or a
    chunk of one) holding token `token`, and is `real` otherwise: for tests that one request's failure stays its own."""

    def __init__(self, real, token: int):
        self.real, self.token = real, token

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, ids, *args, **kwargs):
        if ids.shape[1] > 1 and bool((ids == self.token).any()):
            raise RuntimeError("simulated failure")
        return self.real(ids, *args, **kwargs)


def wait_for(condition, timeout: float = 30.0) -> bool:
    """Whether `condition()` comes true within `timeout` seconds (asked every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
