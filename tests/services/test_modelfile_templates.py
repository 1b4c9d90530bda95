"""The Modelfile's TEMPLATE renders the same prompt as the model's own chat template, per family.

Each family's published chat template (as its tokenizer_config.json carries it; Mistral's without
its tool-call branches) is written into a tokenizer folder made here; transformers renders a
system + user + assistant + user conversation with it, and tests/go_template.py renders the Go
template Tuneboard writes into the Modelfile with what Ollama hands a template. Both must give the
same text, less the BOS token that the runtime adds from the GGUF's tokenizer settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.services.exports import GO_TEMPLATES, template_family, template_lines
from tests.go_template import ollama_data, render

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == "
    "'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are "
    "Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n{%- else "
    "%}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- "
    "'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages "
    '%}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first)'
    ' or (message.role == "assistant" and not message.tool_calls) %}\n        {{- '
    "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    "
    "{%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        "
    "{%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if "
    "add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
MISTRAL = (
    '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"]'
    " %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = "
    'messages %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr("role", '
    '"equalto", "user") | list %}\n\n{%- for message in loop_messages | rejectattr("role", '
    '"equalto", "tool") | rejectattr("role", "equalto", "tool_results") | selectattr("tool_calls",'
    ' "undefined") %}\n    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}\n'
    '        {{- raise_exception("After the optional system message, conversation roles must '
    'alternate user/assistant/user/assistant/...") }}\n    {%- endif %}\n{%- endfor %}\n\n'
    '{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message["role"] == "user" '
    '%}\n        {%- if loop.last and system_message is defined %}\n            {{- "[INST] " + '
    'system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n        {%- else %}\n'
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n    '
    '{%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + '
    'eos_token}}\n    {%- else %}\n        {{- raise_exception("Only user and assistant roles '
    'are supported, with the exception of an initial optional system message!") }}\n    '
    "{%- endif %}\n{%- endfor %}\n"
)
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]"
    "['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]"
    "['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n"
    '{%- else -%}\n    {%- set first_user_prefix = "" -%}\n    {%- set loop_messages = '
    "messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception("
    '"Conversation roles must alternate user/assistant/user/assistant/...") }}\n    {%- endif '
    "-%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ "
    "'<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if"
    " message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif "
    "message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n        "
    "    {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n          "
    "  {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n          "
    '  {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception("'
    "Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}"
    "\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

FAMILIES = {
    # family: (template, bos token, eos token)
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (QWEN25, None, "<|im_end|>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "gemma": (GEMMA3, "<bos>", "<eos>"),
}
CONVERSATION = [
    {"role": "system", "content": "You answer questions about Nimbus kettles."},
    {"role": "user", "content": "How much does the Zephyr Kettle 3000 cost?"},
    {"role": "assistant", "content": "The Zephyr Kettle 3000 costs 89 euros."},
    {"role": "user", "content": "And its warranty?"},
]


def _tokenizer_folder(folder: Path, template: str, bos: str | None, eos: str) -> Path:
    """A tokenizer whose tokenizer_config.json carries the family's chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in ("<unk>", bos, eos) if t]
    vocab = {token: i for i, token in enumerate(specials)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_go_template_renders_the_models_own_prompt(family, tmp_path):
    from transformers import AutoTokenizer

    template, bos, eos = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(tmp_path, template, bos, eos))
    expected = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    if bos:
        assert expected.startswith(bos)
        expected = expected[len(bos) :]  # the runtime adds BOS from the GGUF's settings
    assert template_family(template) == family
    rendered = render(GO_TEMPLATES[family], ollama_data(CONVERSATION))
    assert rendered == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_modelfile_carries_the_familys_template_and_stops(family):
    template = FAMILIES[family][0]
    turn_end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "</s>"}
    kind, note, lines = template_lines(template)
    assert kind == family
    assert lines[0] == f'TEMPLATE """{GO_TEMPLATES[family]}"""'
    assert f'PARAMETER stop "{turn_end.get(family, "<end_of_turn>")}"' in lines
    assert "converted" in note


def test_an_untranslatable_template_is_said_plainly_and_the_gguf_offered():
    kind, note, lines = template_lines("{% for m in messages %}### {{ m.content }}\n{% endfor %}")
    assert kind == "other"
    assert "GGUF" in note and "not one Tuneboard translates" in note
    assert all(line.startswith("#") for line in lines)  # no TEMPLATE line that would be wrong
