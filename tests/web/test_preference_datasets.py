"""Preference datasets through the real API: each shape people have is uploaded, detected as
preference pairs that suit DPO and ORPO, bad pairs are reported by line, and a job whose method
does not suit its dataset is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from app.models import BaseModelEntry
from tests.fakes.jobs import MODEL

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"
HTML = {"accept": "text/html"}


def upload(client, name: str, content: bytes, **data):
    response = client.post("/api/datasets", files={"file": (name, content)}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize(
    ("fixture", "detected", "pairs"),
    [
        ("trl_preference.jsonl", "preference", 3),
        ("trl_preference_chat.jsonl", "preference", 2),
        ("lf_alpaca_preference.json", "alpaca_preference", 3),
        ("lf_sharegpt_preference.json", "sharegpt_preference", 2),
        ("hh_rlhf.jsonl", "hh_preference", 3),
    ],
)
def test_each_preference_shape_is_detected_and_suits_dpo_and_orpo(
    client, settings, fixture, detected, pairs
):
    body = upload(client, fixture, (FIXTURES / fixture).read_bytes())
    assert (body["format"], body["status"], body["valid_rows"]) == (detected, "ready", pairs)
    assert body["methods"] == ["dpo", "orpo"]
    listed = {d["id"]: d for d in client.get("/api/datasets").json()}
    assert listed[body["id"]]["methods"] == ["dpo", "orpo"]
    assert client.get(f"/api/datasets/{body['id']}").json()["methods"] == ["dpo", "orpo"]

    rows = (settings.datasets_dir / body["id"] / "normalized.jsonl").read_text().splitlines()
    for row in map(json.loads, rows):
        assert set(row) == {"line", "prompt", "chosen", "rejected"}
        assert row["prompt"][-1]["role"] == "user"
        assert {m["role"] for m in row["chosen"] + row["rejected"]} == {"assistant"}

    page = BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
    assert "dpo, orpo" in page.select_one("dd.methods").text
    assert page.select(".msg-chosen") and page.select(".msg-rejected")


def test_sft_datasets_say_they_suit_sft(client):
    body = upload(client, "alpaca.jsonl", (FIXTURES / "alpaca.jsonl").read_bytes())
    assert (body["format"], body["methods"]) == ("alpaca", ["sft"])


def test_the_shared_prefix_of_hh_transcripts_is_the_prompt(client, settings):
    body = upload(client, "hh.jsonl", (FIXTURES / "hh_rlhf.jsonl").read_bytes())
    second = (settings.datasets_dir / body["id"] / "normalized.jsonl").read_text().splitlines()[1]
    assert json.loads(second) == {
        "line": 2,
        "prompt": [
            {"role": "user", "content": "Can you help me with my homework?"},
            {"role": "assistant", "content": "Of course. What subject is it?"},
            {"role": "user", "content": "Fractions. What is 1/2 + 1/3?"},
        ],
        "chosen": [{"role": "assistant", "content": "1/2 + 1/3 = 3/6 + 2/6 = 5/6."}],
        "rejected": [{"role": "assistant", "content": "2/5."}],
    }


def test_bad_pairs_are_reported_by_line_and_field(client):
    fixture = (FIXTURES / "preference_bad_rows.jsonl").read_bytes()
    body = upload(client, "bad.jsonl", fixture)
    assert (body["format"], body["status"], body["valid_rows"]) == ("preference", "invalid", 1)
    found = [(e["line"], e["field"], e["kind"]) for e in body["errors"]]
    assert found == [
        (2, "rejected", "missing_field"),
        (3, "rejected", "identical_answers"),
        (4, "prompt", "empty_prompt"),
        (5, "chosen", "wrong_type"),
    ]
    assert all(e["message"] for e in body["errors"])
    dropped = upload(client, "bad.jsonl", fixture, drop_bad_rows="true")
    assert (dropped["status"], dropped["valid_rows"], dropped["dropped_rows"]) == ("ready", 1, 4)


def test_a_side_that_is_not_an_answer_or_a_transcript_without_turns_is_a_bad_row(client):
    rows = [
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}], "rejected": "No."},
        {"prompt": "Hi", "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": None},
    ]
    body = upload(client, "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    found = [(e["line"], e["field"], e["kind"]) for e in body["errors"]]
    assert found == [(1, "chosen", "not_an_answer"), (2, "rejected", "wrong_type")]

    transcripts = [{"chosen": "Just text.", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"}]
    body = upload(client, "hh.jsonl", "".join(json.dumps(r) + "\n" for r in transcripts).encode())
    assert [(e["field"], e["kind"]) for e in body["errors"]] == [("chosen", "not_a_transcript")]


def test_column_mapping_names_the_preference_columns(client, settings):
    rows = [
        {"question": "2 + 2?", "good": "4", "bad": "5"},
        {"question": "Capital of Italy?", "good": "Rome.", "bad": "Milan."},
    ]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    body = upload(client, "qa.jsonl", content, column_mapping=json.dumps(mapping))
    assert (body["format"], body["status"], body["methods"]) == (
        "preference",
        "ready",
        ["dpo", "orpo"],
    )
    # The same file mapped to prompt/completion trains with SFT on the good answers.
    sft = upload(
        client,
        "qa.jsonl",
        content,
        column_mapping=json.dumps({"prompt": "question", "completion": "good"}),
    )
    assert (sft["format"], sft["methods"]) == ("prompt_completion", ["sft"])


@pytest.fixture
def model(db, settings):
    folder = settings.models_dir / MODEL
    folder.mkdir(parents=True)
    with db.write() as session:
        session.add(BaseModelEntry(name=MODEL, source=str(folder), is_local=True, is_demo=True))
    return MODEL


def test_a_job_method_must_suit_its_dataset(client, model):
    pairs = upload(client, "p.jsonl", (FIXTURES / "trl_preference.jsonl").read_bytes())
    sft = upload(client, "a.jsonl", (FIXTURES / "alpaca.jsonl").read_bytes())

    refused = client.post("/api/jobs", json={"dataset_id": pairs["id"], "base_model": model})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "holds preference pairs" in error["message"] and "method sft" in error["message"]
    assert "dpo or orpo" in error["hint"]

    refused = client.post(
        "/api/jobs", json={"dataset_id": sft["id"], "base_model": model, "method": "dpo"}
    )
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "holds SFT examples" in error["message"] and "method dpo" in error["message"]
    assert "choose method sft" in error["hint"]

    for dataset_id, method in ((pairs["id"], "dpo"), (pairs["id"], "orpo"), (sft["id"], "sft")):
        accepted = client.post(
            "/api/jobs", json={"dataset_id": dataset_id, "base_model": model, "method": method}
        )
        assert accepted.status_code == 201, accepted.text
