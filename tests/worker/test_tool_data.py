"""Tool-call rows through the demo model's chat template: the calls and answers are trained, the
tool definitions and results are not; a template without tool support is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.services.datasets.ingest import ingest_dataset
from app.tool_calls import template_takes_tools
from worker.data import CHATML_TEMPLATE, IGNORE_INDEX, tokenize_row, trained_segments
from worker.dataset_report import _tool_pieces
from worker.demo import DEMO_CHAT_TEMPLATE
from worker.errors import DatasetError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"
NO_MARKERS = DEMO_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _normalised(tmp_path: Path, fixture: str) -> list[dict]:
    file_type = fixture.rsplit(".", 1)[1]
    stored = tmp_path / f"original.{file_type}"
    shutil.copyfile(FIXTURES / fixture, stored)
    result = ingest_dataset(stored, file_type)
    assert result.bad_rows == 0, result.errors
    return [json.loads(line) for line in result.normalized_path.read_text().splitlines()]


def _trained_runs(tokenizer, example) -> list[str]:
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


def _expected_replies(row: dict) -> list[str]:
    replies = []
    for message in row["messages"]:
        if message["role"] != "assistant":
            continue
        calls = "".join(
            '<tool_call>{"name": '
            + json.dumps(call["function"]["name"])
            + ', "arguments": '
            + json.dumps(call["function"]["arguments"])
            + "}</tool_call>"
            for call in message.get("tool_calls", [])
        )
        replies.append(message["content"] + calls + "<|im_end|>")
    return replies


def test_the_demo_template_takes_tools_and_renders_plain_chats_as_chatml(tokenizer, demo_rows):
    assert template_takes_tools(tokenizer.chat_template)
    assert not template_takes_tools(CHATML_TEMPLATE)
    for line in demo_rows.read_text().splitlines()[:40]:
        messages = json.loads(line)["messages"]
        for prompt in (False, True):
            ours = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            chatml = tokenizer.apply_chat_template(
                messages,
                chat_template=CHATML_TEMPLATE,
                tokenize=False,
                add_generation_prompt=prompt,
            )
            assert ours == chatml


@pytest.mark.parametrize("fixture", ["glaive_toolcall.json", "openai_tools.jsonl"])
@pytest.mark.parametrize("template", [None, NO_MARKERS], ids=["generation-mask", "prefix-diff"])
def test_calls_and_answers_are_trained_tool_definitions_and_results_are_not(
    tmp_path, tokenizer, fixture, template
):
    for row in _normalised(tmp_path, fixture):
        example = tokenize_row(tokenizer, row, "assistant", 4096, chat_template=template)
        assert example is not None
        assert _trained_runs(tokenizer, example) == _expected_replies(row)
        text = tokenizer.decode(example.input_ids)
        for tool in row.get("tools", []):
            assert json.dumps(tool["function"]["name"]) in text  # the definitions are shown
        for message in row["messages"]:
            if message["role"] == "tool":
                assert f"<|im_start|>tool\n{message['content']}<|im_end|>" in text


def test_the_report_segments_mark_the_call_as_trained(tmp_path, tokenizer):
    row = _normalised(tmp_path, "openai_tools.jsonl")[0]
    segments = trained_segments(tokenizer, row)
    trained = "".join(text for text, is_trained in segments if is_trained)
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in trained
    )
    untrained = "".join(text for text, is_trained in segments if not is_trained)
    assert '"temperature": 18' in untrained and "<tools>" in untrained


def test_a_template_without_tool_support_is_refused_naming_the_model(tmp_path, tokenizer):
    row = _normalised(tmp_path, "openai_tools.jsonl")[0]
    with pytest.raises(DatasetError) as caught:
        tokenize_row(tokenizer, row, "assistant", 4096, chat_template=CHATML_TEMPLATE)
    assert "has no tool support" in caught.value.message
    assert "demo-tiny-llama" in caught.value.message
    plain = {"line": 1, "messages": [*row["messages"][:2], {"role": "assistant", "content": "x"}]}
    assert tokenize_row(tokenizer, plain, "assistant", 4096, chat_template=CHATML_TEMPLATE)


def test_the_report_sample_marks_tool_definitions_and_calls():
    pieces = _tool_pieces('sys <tools>{"name": "f"}</tools> ok <tool_call>{}</tool_call>', True)
    assert [(p["text"], p.get("tool")) for p in pieces] == [
        ("sys ", None),
        ('<tools>{"name": "f"}</tools>', "definitions"),
        (" ok ", None),
        ("<tool_call>{}</tool_call>", "call"),
    ]
