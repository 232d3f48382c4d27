"""Ollama's `Modelfile` beside an exported GGUF, so that `ollama create NAME -f Modelfile` takes it as it is.

Ollama renders prompts with Go templates, not Jinja. The chat formats we ship (Llama 3, Llama 2,
ChatML) are written out in its syntax; any other template gets a plain role-prefixed one. The BOS
token is left out: llama.cpp adds it, as the GGUF's `add_bos_token` says.
"""

from __future__ import annotations

import uuid
from pathlib import Path

LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA2 = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}'
    "{{- end }}{{- end }}\n"
    "{{- $first := true }}\n"
    "{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}[INST] {{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n'
    "{{ end }}{{- $first = false }}{{ .Content }} [/INST]\n"
    '{{- else if eq .Role "assistant" }} {{ .Content }}</s><s>\n'
    "{{- end }}\n{{- end }}"
)
CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
GENERIC = "{{- range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant: "

# name -> (a marker that identifies the format in a Jinja template, Go template, the format's stop strings)
FORMATS = {
    "llama3": ("<|start_header_id|>", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "chatml": ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama2": ("[INST]", LLAMA2, ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]),
}
MAX_NUM_CTX = 8192  # Ollama allocates the whole context's KV cache up front
HEADER = "# Ollama model file, written by `llmasos export`"  # the first line: how a rerun knows the file is ours


def chat_format(template: str) -> str:
    """The format a Jinja chat template renders: llama3, chatml, llama2, or generic."""
    return next((name for name, (marker, _, _) in FORMATS.items() if marker in template), "generic")


def modelfile(gguf_name: str, chat_template: str, stop_tokens: list[str], context_length: int) -> str:
    """The text of a Modelfile for `./gguf_name` (a file in the same directory)."""
    fmt = chat_format(chat_template)
    _, template, stops = FORMATS.get(fmt, (None, GENERIC, ["user:"]))
    stops = list(dict.fromkeys(stops + stop_tokens))
    num_ctx = min(context_length, MAX_NUM_CTX)
    lines = [
        f"{HEADER}: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f"# The {fmt} chat format, from the model's chat template.",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{s}"' for s in stops if '"' not in s),
    ]
    if num_ctx < context_length:
        lines.append(
            f"# Context clipped from the model's {context_length} tokens to {num_ctx}: raise num_ctx if "
            f"you need more (the KV cache grows with it)."
        )
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.parent / "Modelfile"


def written_by_export(path: Path) -> bool:
    """Whether the Modelfile at `path` is one `llmasos export` wrote, which a later export may replace."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def write_modelfile(gguf_path: Path, chat_template: str, stop_tokens: list[str], context_length: int) -> Path:
    """`Modelfile` in the GGUF's directory (the caller has checked that any one there may be replaced)."""
    path = modelfile_path(gguf_path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(modelfile(gguf_path.name, chat_template, stop_tokens, context_length), encoding="utf-8")
    tmp.replace(path)
    return path
