"""The Ollama Modelfile written beside a GGUF export."""

import re

import pytest

from llmasos.checkpoints.ollama import FORMATS, GENERIC, chat_format, modelfile
from llmasos.tokenization.chat import LLAMA2_TEMPLATE, LLAMA3_TEMPLATE

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [
        (LLAMA3_TEMPLATE, "llama3"),
        (LLAMA2_TEMPLATE, "llama2"),
        (CHATML_JINJA, "chatml"),
        ("{{ messages[0]['content'] }}", "generic"),
    ],
)
def test_chat_format_is_recognised_from_the_jinja_template(template, expected):
    assert chat_format(template) == expected


@pytest.mark.parametrize("go", [t for _, t, _ in FORMATS.values()] + [GENERIC])
def test_go_templates_open_and_close_their_blocks(go):
    actions = re.findall(r"{{-?\s*(.*?)\s*-?}}", go)
    opened = sum(a.startswith(("range", "if", "with")) for a in actions)
    assert opened == sum(a == "end" for a in actions) and ".Messages" in go and go.count("{{") == go.count("}}")


def test_modelfile_for_a_llama3_model():
    text = modelfile("m-q8_0.gguf", LLAMA3_TEMPLATE, ["<|end_of_text|>", "<|eot_id|>"], 131072)
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>' in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1 and 'PARAMETER stop "<|end_of_text|>"' in lines
    assert "PARAMETER num_ctx 8192" in lines and "clipped from the model's 131072 tokens" in text


def test_modelfile_for_llama2_chatml_and_other_templates():
    llama2 = modelfile("a.gguf", LLAMA2_TEMPLATE, ["</s>"], 4096)
    assert "[INST] {{ if and $first $system }}<<SYS>>" in llama2 and 'PARAMETER stop "[INST]"' in llama2
    assert "PARAMETER num_ctx 4096" in llama2 and "clipped" not in llama2
    chatml = modelfile("b.gguf", CHATML_JINJA, ["<|im_end|>"], 2048)
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in chatml
    other = modelfile("c.gguf", "{{ messages[0]['content'] }}", ["<eos>"], 2048)
    assert "{{ .Role }}: {{ .Content }}" in other and 'PARAMETER stop "<eos>"' in other
