"""Chat templates: the checkpoint's Jinja template rendered as transformers renders it.

transformers renders with a sandboxed Jinja environment (`trim_blocks`, `lstrip_blocks`,
loop controls, a `tojson` that keeps non-ASCII, `raise_exception`, `strftime_now`) and passes
the special tokens as variables; we do the same so the strings are identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmasos.errors import CheckpointError, LLMasOSError

# Built-in formats for checkpoints that carry no template of their own.
LLAMA2_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{{ bos_token ~ '[INST] ' ~ (ns.system if loop.first else '') ~ m['content'] | trim ~ ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' ~ m['content'] | trim ~ ' ' ~ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ m['content'] | trim ~ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE}


def load_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The checkpoint's template: `chat_template.jinja` (transformers 5), `chat_template.json`, or
    `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: "default" wins)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template: Any = tokenizer_config.get("chat_template")
    json_file = model_dir / "chat_template.json"
    if template is None and json_file.exists():
        try:
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{json_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}` marks assistant text for masks; here it renders its body, so such templates parse."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LLMasOSError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render `messages` (OpenAI-style dicts with `role` and `content`)."""
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LLMasOSError(f"message {i}: expected an object with 'role' and 'content', got {m!r}")
    variables = {k: v for k, v in variables.items() if v is not None}
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=variables.pop("tools", None),
            documents=variables.pop("documents", None),
            **variables,
        )
    except jinja2.TemplateError as e:
        raise LLMasOSError(f"chat template: {e}") from None
