"""The dataset pages through a real HTTP client against the ASGI app and a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from bs4 import BeautifulSoup

from app.dataset_store import iter_rows
from app.models import Job, JobStatus
from app.services import datasets

HTML = {"accept": "text/html"}
XSS_ROWS = [
    {"prompt": "<script>alert(1)</script>", "completion": "<img src=x onerror=alert(1)>"},
    {"prompt": "fine", "completion": "also fine"},
    {"prompt": "no answer", "completion": ""},
]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


def upload(client, filename: str, content: bytes, **data) -> dict:
    response = client.post("/api/datasets", files={"file": (filename, content)}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def test_list_page_has_the_upload_form_and_the_datasets(client):
    empty = client.get("/datasets", headers=HTML).text
    assert 'class="upload" data-upload-url="/api/datasets"' in empty
    assert 'class="dropzone"' in empty and 'name="drop_bad_rows"' in empty
    assert 'name="column_prompt"' in empty and 'name="column_messages"' in empty
    assert 'name="substitutions"' in empty
    assert "No datasets yet" in empty

    upload(client, "qa.jsonl", jsonl(XSS_ROWS[:2]), name="<b>my</b> data")
    page = client.get("/datasets", headers=HTML).text
    assert "&lt;b&gt;my&lt;/b&gt; data" in page and "<b>my</b>" not in page
    assert "prompt/completion" in page and "badge-succeeded" in page


def test_user_data_is_rendered_as_text(client):
    body = upload(client, "x<script>.jsonl", jsonl(XSS_ROWS), name="<script>alert(2)</script>")
    page = client.get(body["url"], headers=HTML).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page


def test_detail_page_lists_problems_with_line_field_and_counts(client):
    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS))
    assert body["status"] == "invalid"
    page = client.get(body["url"], headers=HTML).text
    assert "No job can use this dataset yet" in page
    assert '<td class="num">3</td><td><code>completion</code></td>' in page
    assert '<code>empty_value</code></td><td class="num">1</td>' in page
    assert "Train on this" not in page  # an invalid dataset cannot be trained on
    assert "Re-import, dropping the 1 bad rows" in page
    assert page.count('class="preview-row"') == 2


def test_reimport_drops_bad_rows_without_a_new_upload(client):
    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS))
    response = client.post(f"/datasets/{body['id']}/reimport", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == body["url"]
    shown = client.get(f"/api/datasets/{body['id']}").json()
    assert (shown["status"], shown["valid"], shown["valid_rows"], shown["dropped_rows"]) == (
        "ready",
        True,
        2,
        1,
    )
    page = client.get(body["url"], headers=HTML).text
    assert f'href="/jobs/new?dataset_id={body["id"]}"' in page
    assert "<code>completion</code>" in page  # the dropped row's problem is still shown


def test_column_mapping_fields_of_the_upload_form(client):
    rows = [{"question": "Q?", "answer": "A."}, {"question": "R?", "answer": "B."}]
    body = upload(
        client, "qa.jsonl", jsonl(rows), column_prompt="question", column_completion="answer"
    )
    assert (body["format"], body["status"], body["column_mapping"]) == (
        "prompt_completion",
        "ready",
        {"prompt": "question", "completion": "answer"},
    )
    page = client.get(body["url"], headers=HTML).text
    assert "<code>question</code> → prompt" in page


def test_api_shows_format_rows_valid_errors_and_token_stats(client):
    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS))
    shown = client.get(f"/api/datasets/{body['id']}").json()
    assert shown["format"] == "prompt_completion" and shown["rows"] == 3
    assert shown["valid"] is False and shown["token_stats"] is None
    assert shown["errors"][0]["line"] == 3


def test_delete_is_refused_with_the_reason_while_a_job_uses_the_dataset(client, db):
    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS[:2]))
    with db.write() as s:
        s.add(Job(name="run", base_model="demo-tiny-llama", dataset_id=body["id"]))
    page = client.get(body["url"], headers=HTML).text
    assert "queued or running on this dataset" in page and "disabled" in page

    refused = client.post(f"/datasets/{body['id']}/delete", headers=HTML)
    assert refused.status_code == 409 and "queued or running" in refused.text

    with db.write() as s:
        job = s.get(Job, 1)
        job.status = JobStatus.succeeded
        s.add(job)
    refused = client.post(f"/datasets/{body['id']}/delete", headers=HTML)
    assert refused.status_code == 409 and "Delete those jobs first" in refused.text

    with db.write() as s:
        s.delete(s.get(Job, 1))
    deleted = client.post(f"/datasets/{body['id']}/delete", follow_redirects=False)
    assert deleted.status_code == 303 and deleted.headers["location"] == "/datasets"
    assert datasets.list_datasets(db) == []


def test_report_section_without_a_model_says_what_to_do(client):
    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS[:2]))
    partial = client.get(f"/partials/datasets/{body['id']}/report", headers=HTML)
    assert partial.status_code == 200 and 'id="dataset-report"' in partial.text
    assert "Register a base model" in partial.text and "<html" not in partial.text


def test_a_running_report_shows_the_rows_tokenised_so_far(client, db):
    from app import side_queue
    from app.models import BaseModelEntry, DatasetReport

    body = upload(client, "qa.jsonl", jsonl(XSS_ROWS[:2]))
    with db.write() as s:
        s.add(BaseModelEntry(name="m", source="/nowhere", is_local=True))
        s.add(DatasetReport(dataset_id=body["id"], base_model="m", max_seq_len=64))
    claim = side_queue.claim_next(db, "dataset_report", "w", lease_seconds=60)
    assert claim is not None
    side_queue.update_progress(db, claim, progress_done=1000, progress_total=20000)
    partial = client.get(f"/partials/datasets/{body['id']}/report", headers=HTML).text
    assert "A worker is tokenising the rows" in partial and "1000 of 20000 rows" in partial


def test_unknown_dataset_pages_are_404(client):
    assert client.get("/datasets/" + "0" * 32, headers=HTML).status_code == 404
    assert client.get("/datasets/..%2f..%2fetc", headers=HTML).status_code == 404
    assert client.post("/datasets/" + "0" * 32 + "/reimport").status_code == 404


def test_a_dataset_uploaded_with_drop_bad_rows_lists_them_as_left_out_without_suggesting_it(
    client,
):
    tool_call = (
        Path(__file__).parents[1] / "fixtures/datasets/sharegpt_tool_call.jsonl"
    ).read_bytes()
    body = upload(client, "tools.jsonl", tool_call, drop_bad_rows="on")
    assert body["status"] == "ready" and body["dropped_rows"] == 2
    page = client.get(body["url"], headers=HTML).text
    assert "Rows left out" in page and "calls the tool &#34;weather&#34;" in page
    assert "drop bad rows" not in page.lower()
    assert "dropping the" not in page  # no re-import button either


def test_template_placeholders_left_in_the_data_are_flagged_with_a_count_and_an_example(client):
    """LLaMA-Factory's identity.json expects {{name}} and {{author}} to be replaced first."""
    rows = [
        {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant."},
        {"instruction": "Who are you?", "input": "", "output": "I am a helpful assistant."},
        {"instruction": "Who made you?", "input": "", "output": "{{author}} built me, {{ name }}."},
    ]
    body = upload(client, "identity.jsonl", jsonl(rows))
    assert body["status"] == "ready"
    soup = BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
    notice = " ".join(soup.select_one("#placeholders").text.split())
    assert "2 rows still hold template placeholders ({{name}}, {{author}})" in notice
    assert "Line 1: Hello! I am {{name}}, an AI assistant." in notice

    clean = upload(client, "clean.jsonl", jsonl(rows[1:2] * 2))
    assert "placeholders" not in client.get(clean["url"], headers=HTML).text


IDENTITY_ROWS = [
    {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant."},
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, a helpful assistant."},
    {"instruction": "Who made you?", "input": "", "output": "{{author}} built me, {{ name }}."},
]


def _rows_of(settings, dataset_id: str) -> list[dict]:
    return list(iter_rows(settings.datasets_dir, dataset_id))


def test_placeholders_are_replaced_at_upload_with_the_substitutions_given(client, settings):
    """One `name = value` a line (the upload page's box): every row is trained with the values,
    the dataset page says what was replaced, and a re-import makes the same substitutions."""
    body = upload(
        client,
        "identity.jsonl",
        jsonl(IDENTITY_ROWS),
        substitutions="name = Kettlebot\n\n{{author}} = Acme Labs\n",
    )
    texts = [m["content"] for r in _rows_of(settings, body["id"]) for m in r["messages"]]
    assert "Hello! I am Kettlebot, an AI assistant." in texts
    assert "Acme Labs built me, Kettlebot." in texts
    assert not any("{{" in t for t in texts)
    soup = BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
    assert soup.select_one("#placeholders") is None
    replaced = " ".join(soup.select_one("#substitutions").text.split())
    assert "{{name}} → “Kettlebot” (3 times); {{author}} → “Acme Labs” (1 time)" in replaced

    reimported = client.post(f"/api/datasets/{body['id']}/reimport")
    assert reimported.status_code == 200, reimported.text
    again = [m["content"] for r in _rows_of(settings, body["id"]) for m in r["messages"]]
    assert again == texts


def test_substitutions_as_json_leave_other_placeholders_flagged(client, settings):
    body = upload(
        client, "identity.jsonl", jsonl(IDENTITY_ROWS), substitutions='{"author": "Acme"}'
    )
    texts = [m["content"] for r in _rows_of(settings, body["id"]) for m in r["messages"]]
    assert "Acme built me, {{ name }}." in texts
    notice = " ".join(
        BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
        .select_one("#placeholders")
        .text.split()
    )
    assert "3 rows still hold template placeholders ({{name}})" in notice


def test_bad_substitutions_are_a_400_saying_how_to_write_them(client):
    for given, says in [
        ("name Kettlebot", "Line 1 of substitutions has no '='"),
        ("my name = Kettlebot", "The name 'my name' is not a placeholder name"),
        ('{"name": 3}', "The value for name must be text"),
        ('["name"]', "The substitutions field must be a JSON object of name -> value"),
        ("{nope", "The substitutions field is not valid JSON"),
        ("name = " + "x" * 1001, "The value for name has 1001 characters; at most 1000"),
    ]:
        response = client.post(
            "/api/datasets",
            files={"file": ("identity.jsonl", jsonl(IDENTITY_ROWS))},
            data={"substitutions": given},
        )
        assert response.status_code == 400, (given, response.text)
        error = response.json()["error"]
        assert says in error["message"], (given, error)
        assert "name = Kettlebot" in error["hint"]
    assert client.get("/api/datasets").json() == []


def test_the_placeholders_notice_offers_a_reimport_with_the_values(client, settings):
    body = upload(client, "identity.jsonl", jsonl(IDENTITY_ROWS))
    soup = BeautifulSoup(client.get(body["url"], headers=HTML).text, "html.parser")
    form = soup.select_one("#placeholders form.replace-placeholders")
    assert form["action"] == f"/datasets/{body['id']}/reimport"
    assert form.textarea.text.splitlines() == ["name = ", "author = "]

    # One value given, one left empty: only the given one is replaced.
    done = client.post(
        form["action"], data={"substitutions": "name = Kettlebot\nauthor = "}, headers=HTML
    )
    assert done.status_code == 200 and done.url.path == f"/datasets/{body['id']}"
    texts = [m["content"] for r in _rows_of(settings, body["id"]) for m in r["messages"]]
    assert "{{author}} built me, Kettlebot." in texts
    soup = BeautifulSoup(done.text, "html.parser")
    assert "{{name}} → “Kettlebot” (3 times)" in " ".join(
        soup.select_one("#substitutions").text.split()
    )
    assert soup.select_one("#placeholders textarea").text.splitlines() == ["author = "]
    assert client.get(f"/api/datasets/{body['id']}").json()["status"] == "ready"

    refused = client.post(form["action"], data={"substitutions": "name Kettlebot"}, headers=HTML)
    assert refused.status_code == 400
    assert "Line 1 of substitutions has no &#39;=&#39;" in refused.text or (
        "Line 1 of substitutions has no '='" in refused.text
    )
