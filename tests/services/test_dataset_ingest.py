"""Every dataset format and every bad input named in RELIABILITY.md, through `ingest_dataset`.

Small inputs are committed under tests/fixtures/datasets/; big ones (bad JSON at line 5000, a
10 MB row) and binary Parquet files are made here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.dataset_errors import DatasetFileError, DatasetFormatError, DatasetTooLarge
from app.dataset_store import eval_size
from app.models import DatasetStatus
from app.services.datasets.ingest import MAX_ERROR_DETAILS, IngestResult, ingest_dataset
from app.services.datasets.readers import IngestLimits

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


def ingest(tmp_path: Path, fixture: str, **options) -> IngestResult:
    file_type = fixture.rsplit(".", 1)[1]
    stored = tmp_path / f"original.{file_type}"
    shutil.copyfile(FIXTURES / fixture, stored)
    return ingest_dataset(stored, file_type, **options)


def normalized_rows(result: IngestResult) -> list[dict]:
    return [json.loads(line) for line in result.normalized_path.read_text().splitlines()]


def only_error(result: IngestResult) -> dict:
    assert result.error_count == 1, result.errors
    return result.errors[0]


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["alpaca.json", "alpaca.jsonl"])
def test_alpaca_joins_instruction_and_input(tmp_path, fixture):
    result = ingest(tmp_path, fixture)
    assert (result.format, result.status, result.rows, result.valid_rows) == (
        "alpaca",
        DatasetStatus.ready,
        3,
        3,
    )
    rows = normalized_rows(result)
    assert rows[0] == {
        "line": 1,
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
    }
    assert rows[1]["messages"][0]["content"] == "Translate to French.\n\ncat"


def test_sharegpt_roles_are_mapped(tmp_path):
    result = ingest(tmp_path, "sharegpt.jsonl")
    assert (result.format, result.status, result.error_count) == ("sharegpt", "ready", 0)
    first, second = normalized_rows(result)
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == "You are terse."
    # the empty system turn is left out; user/assistant spellings map like human/gpt
    assert [m["role"] for m in second["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_sharegpt_tool_call_turns_without_tool_definitions_are_refused_per_row(tmp_path):
    result = ingest(tmp_path, "sharegpt_tool_call.jsonl")
    assert (result.format, result.status, result.valid_rows, result.bad_rows) == (
        "sharegpt",
        "invalid",
        1,
        2,
    )
    tool, unknown = result.errors
    assert (tool["line"], tool["field"], tool["kind"]) == (2, "tools", "unknown_tool")
    assert 'calls the tool "weather"' in tool["message"]
    assert (unknown["line"], unknown["field"], unknown["kind"]) == (
        3,
        "conversations[1].from",
        "unsupported_role",
    )
    assert result.error_counts == {"unknown_tool": 1, "unsupported_role": 1}


def test_openai_messages_with_text_parts(tmp_path):
    result = ingest(tmp_path, "openai.jsonl")
    assert (result.format, result.status, result.valid_rows) == ("openai", "ready", 2)
    second = normalized_rows(result)[1]
    assert second["messages"][0] == {"role": "user", "content": "Part one.\nPart two."}


def test_openai_bad_rows_each_name_line_and_field(tmp_path):
    result = ingest(tmp_path, "openai_bad_parts.jsonl")
    assert result.format == "openai"
    found = {(e["line"], e["field"], e["kind"]) for e in result.errors}
    assert found == {
        (2, "messages[0].content[1]", "unsupported_content_part"),
        (3, "messages[1].tool_calls[0].function", "invalid_tool_call"),
        (4, "messages", "empty_conversation"),
        (5, "messages", "no_assistant_turn"),
        (6, "messages[1].content", "empty_value"),
    }
    assert (result.valid_rows, result.bad_rows) == (1, 5)


def test_prompt_completion_csv_with_quoted_newline(tmp_path):
    result = ingest(tmp_path, "prompt_completion.csv")
    assert (result.format, result.status, result.valid_rows) == ("prompt_completion", "ready", 2)
    first, second = normalized_rows(result)
    assert first["messages"][0]["content"] == "Say hi, please."
    # a quoted value spanning two physical lines: the row keeps the line it starts on
    assert second["line"] == 3
    assert second["messages"][0]["content"] == "Two\nlines"


def test_plain_text(tmp_path):
    result = ingest(tmp_path, "text.jsonl")
    assert result.format == "text"
    assert normalized_rows(result) == [
        {"line": 1, "text": "Once upon a time."},
        {"line": 2, "text": "The end."},
    ]


def test_json_object_with_one_list_field(tmp_path):
    result = ingest(tmp_path, "text_wrapped.json")
    assert (result.format, result.valid_rows) == ("text", 2)


def test_parquet_with_nested_conversations(tmp_path):
    path = tmp_path / "original.parquet"
    table = pa.table(
        {
            "conversations": [
                [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": ""}],
            ]
        }
    )
    pq.write_table(table, path)
    result = ingest_dataset(path, "parquet")
    assert (result.format, result.valid_rows) == ("sharegpt", 1)
    assert (only_error(result)["line"], only_error(result)["field"]) == (
        2,
        "conversations[1].value",
    )


@pytest.mark.parametrize(
    ("fixture", "detected"),
    [("preference.jsonl", "preference"), ("preference_chat.jsonl", "hh_preference")],
)
def test_preference_data_is_read_as_pairs_not_refused(tmp_path, fixture, detected):
    result = ingest(tmp_path, fixture)
    assert (result.format, result.status, result.valid_rows) == (detected, "ready", 1)
    assert set(normalized_rows(result)[0]) == {"line", "prompt", "chosen", "rejected"}


def test_preference_data_trains_on_chosen_with_a_mapping(tmp_path):
    result = ingest(
        tmp_path, "preference.jsonl", column_mapping={"prompt": "prompt", "completion": "chosen"}
    )
    assert (result.format, result.status) == ("prompt_completion", "ready")
    assert normalized_rows(result)[0]["messages"][1]["content"] == "Hello!"


def test_unknown_columns_name_what_was_found(tmp_path):
    with pytest.raises(DatasetFormatError) as caught:
        ingest(tmp_path, "unknown_columns.jsonl")
    assert '"foo", "bar"' in caught.value.message
    assert "column mapping" in caught.value.hint


# --- column mapping ------------------------------------------------------------------------------


def test_mapping_overrides_detection(tmp_path):
    result = ingest(
        tmp_path, "qa.jsonl", column_mapping={"prompt": "question", "completion": "answer"}
    )
    assert result.format == "prompt_completion"
    assert result.columns == {"prompt": "question", "completion": "answer"}
    assert normalized_rows(result)[0]["messages"][0]["content"] == "Why?"


def test_mapping_to_text_column(tmp_path):
    result = ingest(tmp_path, "qa.jsonl", column_mapping={"text": "body"})
    assert (result.format, normalized_rows(result)[1]["text"]) == ("text", "More")


def test_mapping_for_chat_messages(tmp_path):
    result = ingest(tmp_path, "dialog.jsonl", column_mapping={"messages": "dialog"})
    assert (result.format, result.valid_rows) == ("openai", 1)


def test_mapping_to_missing_column_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetFormatError) as caught:
        ingest(tmp_path, "qa.jsonl", column_mapping={"prompt": "query", "completion": "answer"})
    assert caught.value.field == "query"
    assert 'Column "query" (mapped to "prompt") is not in the file' in caught.value.message
    assert '"question"' in caught.value.message


def test_mapping_with_unknown_field_or_mixed_formats(tmp_path):
    with pytest.raises(DatasetFormatError, match='Unknown field "answer"'):
        ingest(tmp_path, "qa.jsonl", column_mapping={"answer": "answer"})
    with pytest.raises(DatasetFormatError, match="mixes fields"):
        ingest(tmp_path, "qa.jsonl", column_mapping={"prompt": "question", "text": "body"})


# --- bad rows ------------------------------------------------------------------------------------


def test_mixed_types_name_line_and_field(tmp_path):
    result = ingest(tmp_path, "mixed_types.jsonl")
    error = only_error(result)
    assert (error["line"], error["field"], error["kind"]) == (7, "output", "wrong_type")
    assert error["message"] == "Expected a string, found a number (42)"
    assert (result.status, result.valid_rows, result.dropped_rows) == ("invalid", 9, 0)


def test_drop_bad_rows_makes_the_dataset_ready(tmp_path):
    result = ingest(tmp_path, "mixed_types.jsonl", drop_bad_rows=True)
    assert (result.status, result.valid_rows, result.dropped_rows) == ("ready", 9, 1)
    assert 7 not in [row["line"] for row in normalized_rows(result)]


def test_missing_keys_and_empty_strings(tmp_path):
    result = ingest(tmp_path, "missing_keys.jsonl")
    assert [(e["line"], e["field"], e["kind"]) for e in result.errors] == [
        (2, "output", "missing_field"),
        (3, "instruction", "missing_field"),
        (4, "instruction", "empty_value"),
    ]


def test_non_object_rows(tmp_path):
    result = ingest(tmp_path, "non_object_rows.jsonl")
    assert [(e["line"], e["kind"]) for e in result.errors] == [
        (2, "not_an_object"),
        (3, "not_an_object"),
        (4, "not_an_object"),
    ]
    assert "found an array" in result.errors[0]["message"]
    assert result.valid_rows == 2


def test_blank_lines_are_skipped_and_lines_kept(tmp_path):
    result = ingest(tmp_path, "blank_lines.jsonl")
    assert (result.rows, result.error_count) == (2, 0)
    assert [row["line"] for row in normalized_rows(result)] == [2, 5]


@pytest.mark.parametrize("fixture", ["bom.jsonl", "bom.csv"])
def test_utf8_bom_is_accepted(tmp_path, fixture):
    result = ingest(tmp_path, fixture)
    assert (result.format, result.valid_rows, result.error_count) == ("text", 2, 0)
    assert normalized_rows(result)[0]["text"] == "first"


def test_invalid_utf8_in_jsonl_is_a_row_error(tmp_path):
    result = ingest(tmp_path, "invalid_utf8.jsonl")
    error = only_error(result)
    assert (error["line"], error["kind"]) == (2, "invalid_utf8")
    assert "0xe9" in error["message"]


def test_invalid_utf8_in_csv_names_the_line(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "invalid_utf8.csv")
    assert caught.value.line == 4
    assert "UTF-8" in caught.value.message


def test_wrong_number_of_csv_values(tmp_path):
    result = ingest(tmp_path, "wrong_field_count.csv")
    error = only_error(result)
    assert (error["line"], error["kind"]) == (3, "wrong_field_count")
    assert error["message"] == "Expected 2 values (one per header column), found 3"


def test_invalid_unicode_escape_is_a_row_error(tmp_path):
    path = tmp_path / "original.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n')
    result = ingest_dataset(path, "jsonl")
    assert (only_error(result)["line"], only_error(result)["kind"]) == (2, "invalid_unicode")


def test_bad_json_at_line_5000(tmp_path):
    path = tmp_path / "original.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(1, 10_001)]
    lines[4999] = '{"text": "row 5000" "oops"}'
    path.write_text("\n".join(lines) + "\n")
    result = ingest_dataset(path, "jsonl")
    error = only_error(result)
    assert error["line"] == 5000
    assert error["field"] is None
    assert error["message"] == "Invalid JSON at line 5000, column 21: expecting ',' delimiter"
    assert (result.rows, result.valid_rows, result.status) == (10_000, 9_999, "invalid")


def test_errors_are_counted_in_full_but_kept_for_the_first_50(tmp_path):
    path = tmp_path / "original.jsonl"
    rows = [{"text": "ok"}] + [{"text": 1}] * 70 + [{"other": "x"}] * 30
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = ingest_dataset(path, "jsonl")
    assert result.error_count == 100
    assert len(result.errors) == MAX_ERROR_DETAILS
    assert result.errors[-1]["line"] == 51
    assert result.error_counts == {"wrong_type": 70, "missing_field": 30}


def test_a_10_mb_row(tmp_path):
    path = tmp_path / "original.jsonl"
    big = "x" * (10 * 1024 * 1024)
    path.write_text(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": big}) + "\n")
    started = time.perf_counter()
    result = ingest_dataset(path, "jsonl")
    assert time.perf_counter() - started < 5
    assert (result.valid_rows, result.error_count) == (2, 0)
    assert len(normalized_rows(result)[1]["text"]) == len(big)


def test_a_10_mb_csv_cell(tmp_path):
    path = tmp_path / "original.csv"
    path.write_text("text\nsmall\n" + "y" * (10 * 1024 * 1024) + "\n")
    result = ingest_dataset(path, "csv")
    assert (result.valid_rows, result.error_count) == (2, 0)


# --- files that cannot be used -------------------------------------------------------------------


def test_empty_file(tmp_path):
    with pytest.raises(DatasetFileError, match="The file is empty"):
        ingest(tmp_path, "empty.jsonl")


@pytest.mark.parametrize("content", ["\n\n  \n", "[]"])
def test_file_without_rows(tmp_path, content):
    file_type = "json" if content == "[]" else "jsonl"
    path = tmp_path / f"original.{file_type}"
    path.write_text(content)
    with pytest.raises(DatasetFileError, match="no rows"):
        ingest_dataset(path, file_type)


def test_file_where_no_row_can_be_read(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "all_bad.jsonl")
    assert caught.value.line == 1
    assert "Invalid JSON" in caught.value.message


def test_broken_csv_quoting_names_the_row(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "broken_quoting.csv")
    assert caught.value.line == 3
    assert "Unclosed quote" in caught.value.message


def test_stray_csv_quote_names_the_row(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "stray_quote.csv")
    assert caught.value.line == 3
    assert "Broken CSV quoting" in caught.value.message


def test_broken_json_array_names_the_line(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "bad_json_array.json")
    assert caught.value.line == 4
    assert caught.value.message == "Invalid JSON at line 4, column 3: expecting ',' delimiter"


@pytest.mark.parametrize("file_type", ["json", "jsonl"])
def test_a_file_cut_short_says_where_the_unclosed_string_starts(tmp_path, file_type):
    rows = [{"instruction": "Say hi", "output": "Hi!"}, {"instruction": "Say bye", "output": "Bye"}]
    if file_type == "json":
        text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]"
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"original.{file_type}"
    path.write_text(text[: text.index("Bye") + 1])  # cut inside the last row's last string
    if file_type == "json":
        with pytest.raises(DatasetFileError) as caught:
            ingest_dataset(path, file_type)
        message, hint = caught.value.message, caught.value.hint or ""
    else:
        error = only_error(ingest_dataset(path, file_type))
        message, hint = error["message"], error["hint"]
    line = 3 if file_type == "json" else 2  # the "[" line comes first in the .json file
    column = json.dumps(rows[1]).index('"Bye') + 1
    assert message == f"Invalid JSON at line {line}, column {column}: unterminated string"
    assert "at at" not in message
    assert "ends in the middle of a value" in hint


def test_json_array_named_jsonl_gets_a_hint(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "pretty_array.jsonl")
    assert caught.value.line == 1
    assert "name the file .json" in caught.value.hint


def test_json_lines_named_json_gets_a_hint(tmp_path):
    with pytest.raises(DatasetFileError) as caught:
        ingest(tmp_path, "jsonl_as.json")
    assert caught.value.line == 2
    assert "name the file .jsonl" in caught.value.hint


def test_truncated_parquet(tmp_path):
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1000)]}), whole)
    data = whole.read_bytes()
    path = tmp_path / "original.parquet"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError) as caught:
        ingest_dataset(path, "parquet")
    assert "Not a readable Parquet file" in caught.value.message
    assert "truncated" in caught.value.hint


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "original.pkl"
    path.write_bytes(b"\x80\x04")
    accepted = r"accepted types: \.jsonl, \.json, \.csv, \.parquet"
    with pytest.raises(DatasetFileError, match=accepted):
        ingest_dataset(path, "pkl")


# --- split and files -----------------------------------------------------------------------------


def test_split_is_seeded_and_recorded(tmp_path):
    path = tmp_path / "original.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(200)))
    first = ingest_dataset(path, "jsonl")
    split = json.loads(first.split_path.read_text())
    assert (first.eval_rows, first.train_rows) == (10, 190)
    assert split["eval_rows"] == 10 and len(split["eval_lines"]) == 10
    assert set(split["eval_lines"]) <= {row["line"] for row in normalized_rows(first)}
    again = ingest_dataset(path, "jsonl")
    assert again.eval_lines == first.eval_lines
    other = ingest_dataset(path, "jsonl", split_seed=7)
    assert other.eval_lines != first.eval_lines


def test_eval_size_bounds():
    assert eval_size(0, 0.05, 1000) == 0
    assert eval_size(1, 0.05, 1000) == 0
    assert eval_size(2, 0.05, 1000) == 1
    assert eval_size(100, 0.05, 1000) == 5
    assert eval_size(1_000_000, 0.05, 1000) == 1000


def test_no_temporary_files_are_left(tmp_path):
    ingest(tmp_path, "alpaca.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "normalized.jsonl",
        "original.jsonl",
        "split.json",
    ]


# --- limits on what ingest produces (issue 21, items 2 and 7) --------------------------------------

SMALL_LIMITS = IngestLimits(row_max_bytes=1024 * 1024, output_max_bytes=64 * 1024 * 1024)


def test_a_parquet_row_over_the_row_limit_is_a_row_error_and_is_not_decoded(tmp_path):
    path = tmp_path / "original.parquet"
    texts = ["small", "z" * (3 * 1024 * 1024), "also small"]
    pq.write_table(pa.table({"text": texts}), path, compression="zstd")
    result = ingest_dataset(path, "parquet", limits=SMALL_LIMITS)
    assert (result.rows, result.valid_rows, result.status) == (3, 2, "invalid")
    error = only_error(result)
    assert (error["line"], error["kind"], error["field"]) == (2, "row_too_large", None)
    assert "TUNEBOARD_DATASET_ROW_MAX_BYTES" in error["hint"]
    assert [r["line"] for r in normalized_rows(result)] == [1, 3]


def test_a_nested_parquet_row_over_the_row_limit_is_a_row_error(tmp_path):
    path = tmp_path / "original.parquet"
    big = "w" * (2 * 1024 * 1024)
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": big}],
    ]
    pq.write_table(pa.table({"messages": conversations}), path)
    result = ingest_dataset(path, "parquet", limits=SMALL_LIMITS)
    assert (result.valid_rows, only_error(result)["line"]) == (1, 2)


@pytest.mark.parametrize("file_type", ["jsonl", "csv"])
def test_a_text_row_over_the_row_limit_is_a_row_error(tmp_path, file_type):
    path = tmp_path / f"original.{file_type}"
    big = "v" * (2 * 1024 * 1024)
    if file_type == "jsonl":
        path.write_text(f'{{"text": "a"}}\n{{"text": "{big}"}}\n{{"text": "c"}}\n')
    else:
        path.write_text(f"text\na\n{big}\nc\n")
    result = ingest_dataset(path, file_type, limits=SMALL_LIMITS)
    error = only_error(result)
    line = 2 if file_type == "jsonl" else 3  # the CSV header is line 1
    assert (error["line"], error["kind"], result.valid_rows) == (line, "row_too_large", 2)


def test_the_normalised_size_limit_stops_ingest_and_leaves_no_file(tmp_path):
    path = tmp_path / "original.jsonl"
    path.write_text(('{"text": "' + "u" * 1000 + '"}\n') * 200)
    with pytest.raises(DatasetTooLarge) as err:
        ingest_dataset(path, "jsonl", limits=IngestLimits(output_max_bytes=100_000))
    assert err.value.status_code == 413
    assert "100000 bytes" in err.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original.jsonl"]


def test_a_deeply_nested_element_of_a_json_array_is_a_row_error(tmp_path):
    path = tmp_path / "original.json"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(f'[{{"text": "a"}},\n{{"text": {deep}}},\n{{"text": "c"}}, {{"text": "d"}}]')
    result = ingest_dataset(path, "json")
    error = only_error(result)
    assert (error["line"], error["kind"]) == (2, "too_deeply_nested")
    assert [r["text"] for r in normalized_rows(result)] == ["a", "c", "d"]


def test_a_deeply_nested_json_document_that_is_not_an_array_is_a_file_error(tmp_path):
    path = tmp_path / "original.json"
    path.write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DatasetFileError, match="nested"):
        ingest_dataset(path, "json")


def test_rows_may_nest_up_to_the_limit(tmp_path):
    path = tmp_path / "original.jsonl"
    # The row object is level 1 and its "x" list level 2: 63 lists in all make 64 levels.
    at_limit = '{"text": "a", "x": ' + "[" * 63 + "]" * 63 + "}"
    over = '{"text": "b", "x": ' + "[" * 64 + "]" * 64 + "}"
    path.write_text(at_limit + "\n" + over + "\n")
    result = ingest_dataset(path, "jsonl", limits=IngestLimits(max_nesting=64))
    error = only_error(result)
    assert (error["line"], error["kind"], result.valid_rows) == (2, "too_deeply_nested", 1)


def test_a_multimodal_file_is_refused_instead_of_training_image_placeholders_as_text(tmp_path):
    """LLaMA-Factory's mllm_demo.json: OpenAI-style messages with <image> and an "images" column."""
    with pytest.raises(DatasetFormatError) as caught:
        ingest(tmp_path, "mllm_demo.json")
    assert caught.value.message.startswith(
        'This is a multimodal dataset: its rows have an "images"'
    )
    assert "<image>" in caught.value.message and caught.value.field == "images"
    assert "text-only" in (caught.value.hint or "")
    with pytest.raises(DatasetFormatError, match="multimodal"):
        ingest(tmp_path, "mllm_demo.json", column_mapping={"messages": "messages"})


def test_every_dataset_error_a_user_sees_starts_with_a_capital_letter(tmp_path):
    """Row problems ("missing; expected ...") and whole-file errors, from every fixture."""
    from app.dataset_errors import DatasetError

    seen = 0
    for number, fixture in enumerate(sorted(p.name for p in FIXTURES.iterdir())):
        folder = tmp_path / str(number)
        folder.mkdir()
        try:
            result = ingest(folder, fixture)
        except DatasetError as error:
            texts = [error.message, error.hint]
        else:
            texts = [text for e in result.errors for text in (e["message"], e["hint"])]
        for text in texts:
            if text:
                seen += 1
                assert text[0].isupper() or not text[0].isalpha(), (fixture, text)
    assert seen >= 20
