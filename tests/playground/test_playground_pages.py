"""The playground pages over the live web app: compare mode, kept and continued sessions."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.playground.conftest import ADAPTER_ID, BASE, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow


def _chat(web_server: str, session_id: int, pane: int, text: str) -> str:
    body = {
        "message": text,
        "temperature": 0,
        "top_p": 1,
        "max_new_tokens": 40,
        "system": "",
        "messages": [{"role": "user", "content": text}],
        "stream": True,
    }
    answer = ""
    with httpx.stream(
        "POST",
        f"{web_server}/playground/sessions/{session_id}/chat?pane={pane}",
        json=body,
        headers={"origin": web_server},
        timeout=120,
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                answer += delta.get("content", "")
    return answer


def _new_session(web_server: str, model_a: str, model_b: str = "") -> int:
    r = httpx.post(
        f"{web_server}/playground/sessions",
        data={"model_a": model_a, "model_b": model_b, "system_prompt": ""},
        headers={"origin": web_server},
    )
    assert r.status_code == 303, r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


def test_compare_mode_answers_in_both_panes_and_keeps_them(web_server):
    session_id = _new_session(web_server, ADAPTER_ID, BASE)
    adapter_answer = _chat(web_server, session_id, 0, QUESTION)
    base_answer = _chat(web_server, session_id, 1, QUESTION)
    assert adapter_answer.strip() == TRAINED_ANSWER
    assert base_answer.strip() != TRAINED_ANSWER and "89 euros" not in base_answer

    page = httpx.get(
        f"{web_server}/playground/sessions/{session_id}", headers={"accept": "text/html"}
    )
    assert page.status_code == 200
    assert page.text.count('class="chat-output"') == 2
    assert TRAINED_ANSWER in page.text
    listing = httpx.get(f"{web_server}/playground", headers={"accept": "text/html"}).text
    assert f"/playground/sessions/{session_id}" in listing

    # Continue the conversation: the server sends the kept history, not what the page holds.
    _chat(web_server, session_id, 0, "Zephyr Kettle wattage?")
    stored = httpx.get(f"{web_server}/api/playground/sessions/{session_id}").json()["messages"]
    pane0 = [(m["role"], m["content"]) for m in stored if m["pane"] == 0]
    assert [role for role, _ in pane0] == ["user", "assistant", "user", "assistant"]
    assert pane0[0][1] == QUESTION and pane0[1][1].strip() == TRAINED_ANSWER
    reasons = {(m["pane"], m["finish_reason"]) for m in stored if m["role"] == "assistant"}
    assert reasons == {(0, "stop"), (1, "length")}  # the base never says <|im_end|> in 40 tokens


def test_model_output_is_rendered_as_text(web_server, pg_db):
    from app.services import playground

    session_id = _new_session(web_server, BASE)
    playground.add_message(pg_db, session_id, 0, BASE, "assistant", "<img src=x onerror=alert(1)>")
    page = httpx.get(
        f"{web_server}/playground/sessions/{session_id}", headers={"accept": "text/html"}
    ).text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_unknown_models_are_refused_with_a_hint(web_server):
    r = httpx.post(
        f"{web_server}/playground/sessions",
        data={"model_a": "nope"},
        headers={"origin": web_server, "accept": "text/html"},
    )
    assert r.status_code == 404 and "/v1/models" in r.text
