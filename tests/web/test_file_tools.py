"""Tools for every row of a file (issue #25): the upload's "Tools for every row" field and a JSON
file's top-level `tools` list, through a real HTTP client against the ASGI app and a real database.
Rows without tools of their own take the file's; rows with their own keep theirs."""

from __future__ import annotations

import json

from bs4 import BeautifulSoup

from app.dataset_store import iter_rows

HTML = {"accept": "text/html"}


def _tool(name: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }


def _calling(tool: str, **row) -> dict:
    """A conversation that calls `tool` once and answers from its result."""
    return {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": tool, "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "content": '{"temperature": -3}'},
            {"role": "assistant", "content": "It is -3 degrees in Oslo."},
        ],
        **row,
    }


ROWS = [
    _calling("get_weather"),
    _calling("get_time", tools=[_tool("get_time")]),  # its own tools: kept
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


def _rows_of(settings, dataset_id: str) -> list[dict]:
    return list(iter_rows(settings.datasets_dir, dataset_id))


def _post(client, filename: str, content: bytes, **data):
    return client.post("/api/datasets", files={"file": (filename, content)}, data=data)


def _names(row: dict) -> list[str]:
    return [tool["function"]["name"] for tool in row.get("tools", [])]


def test_the_upload_form_has_a_tools_for_every_row_field(client):
    page = BeautifulSoup(client.get("/datasets", headers=HTML).text, "html.parser")
    field = page.select_one("form.upload textarea#tools[name=tools]")
    assert field is not None
    assert "Tools for every row" in page.select_one("label[for=tools]").text


def test_tools_for_every_row_go_to_rows_without_their_own_and_a_reimport_repeats_them(
    client, settings
):
    tools = [_tool("get_weather"), {"type": "function", "function": {"name": "noop"}}]
    response = _post(client, "calls.jsonl", _jsonl(ROWS), tools=json.dumps(tools))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["valid_rows"]) == ("ready", 3)
    weather, timed, plain = _rows_of(settings, body["id"])
    assert _names(weather) == ["get_weather", "noop"]
    assert _names(timed) == ["get_time"]
    assert _names(plain) == ["get_weather", "noop"]
    assert weather["tools"][0] == _tool("get_weather")

    facts = BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
    said = " ".join(facts.select_one("#tool-calls").text.split())
    assert "3 rows define tools" in said
    assert "Tools for every row without its own, given at upload: get_weather, noop." in said

    reimported = client.post(f"/api/datasets/{body['id']}/reimport")
    assert reimported.status_code == 200, reimported.text
    assert [_names(r) for r in _rows_of(settings, body["id"])] == [
        ["get_weather", "noop"],
        ["get_time"],
        ["get_weather", "noop"],
    ]


def test_a_call_to_a_tool_neither_the_row_nor_the_file_defines_is_a_bad_row_by_line(client):
    rows = [_calling("get_weather"), _calling("book_flight")]
    response = _post(client, "calls.jsonl", _jsonl(rows), tools=json.dumps([_tool("get_weather")]))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["valid_rows"]) == ("invalid", 1)
    [error] = body["errors"]
    assert (error["line"], error["kind"]) == (2, "unknown_tool")
    assert 'calls the tool "book_flight"' in error["message"]
    assert "tools for every row" in error["hint"]

    without = _post(client, "calls.jsonl", _jsonl(rows)).json()
    assert without["valid_rows"] == 0  # without the field, neither row defines its tool


def test_bad_tools_for_every_row_are_a_400_naming_what_and_where(client):
    good = _tool("get_weather")
    for given, says in [
        ("{nope", "The tools field is not valid JSON"),
        ('{"name": "get_weather"}', "tools must be a JSON list of tool definitions, found an"),
        (json.dumps([good, "get_time"]), "tools[1] must be an object, found a string"),
        (json.dumps([{"function": {"name": "x"}}]), 'tools[0].type must be "function", found'),
        (json.dumps([good, {"type": "function", "function": {}}]), "tools[1].function.name is"),
        (json.dumps([{"type": "function"}]), "tools[0].function is missing"),
        (json.dumps([good, good]), 'tools[1].function.name "get_weather" is defined twice'),
        (
            json.dumps([{"type": "function", "function": {"name": "x", "parameters": "{}"}}]),
            "tools[0].function.parameters must be a JSON Schema object, found a string",
        ),
    ]:
        response = _post(client, "calls.jsonl", _jsonl(ROWS), tools=given)
        assert response.status_code == 400, (given, response.text)
        error = response.json()["error"]
        assert says in error["message"], (given, error)
        assert '[{"type": "function", "function":' in error["hint"]
    assert client.get("/api/datasets").json() == []


def test_tools_for_every_row_of_a_file_without_tool_calls_are_refused(client):
    alpaca = _jsonl([{"instruction": "Say hi", "output": "Hi"}])
    response = _post(client, "qa.jsonl", alpaca, tools=json.dumps([_tool("get_weather")]))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "whose rows have no tool calls" in error["message"]
    assert "leave the field empty" in error["hint"]


def test_a_json_file_with_a_top_level_tools_list_gives_them_to_every_row(client, settings):
    for key in ("data", "messages", "conversations", "rows"):
        rows = ROWS if key != "conversations" else [_sharegpt_call()]
        document = {"tools": [_tool("get_weather")], key: rows}
        response = _post(client, "calls.json", json.dumps(document).encode())
        assert response.status_code == 201, (key, response.text)
        body = response.json()
        assert body["status"] == "ready", (key, body["errors"])
        names = [_names(r) for r in _rows_of(settings, body["id"])]
        expected = [["get_weather"], ["get_time"], ["get_weather"]]
        assert names == (expected if key != "conversations" else [["get_weather"]]), key


def _sharegpt_call() -> dict:
    """The same call as LLaMA-Factory's glaive_toolcall writes it."""
    return {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
            {"from": "observation", "value": '{"temperature": -3}'},
            {"from": "gpt", "value": "It is -3 degrees in Oslo."},
        ]
    }


def test_a_json_file_whose_top_level_tools_are_bad_or_rows_unclear_is_a_clear_422(client):
    cases = [
        (
            {"tools": [{"type": "function", "function": {"description": "?"}}], "data": ROWS},
            "The file's top-level tools[0].function.name is missing",
        ),
        (
            {"tools": [_tool("get_weather")], "train": ROWS, "test": ROWS},
            'found an object whose list fields are: "tools", "train", "test"',
        ),
        (
            {"tools": [_tool("get_weather")], "messages": ROWS[0]["messages"]},
            'The file is a single example (one object with a "messages" list)',
        ),
    ]
    for document, says in cases:
        response = _post(client, "calls.json", json.dumps(document).encode())
        assert response.status_code == 422, (document, response.text)
        assert says in response.json()["error"]["message"], response.json()
