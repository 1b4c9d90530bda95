"""The dataset API through a real HTTP client against the ASGI app and a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.services.datasets import sweep_stale_uploads
from app.settings import Settings

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(settings: Settings, db) -> FastAPI:
    return create_app(settings)


@pytest.fixture
async def client(settings, db):
    transport = httpx.ASGITransport(app=make_app(settings, db))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        yield c


def upload(client, name: str, content: bytes, **data):
    return client.post("/api/datasets", files={"file": (name, content)}, data=data)


@pytest.mark.anyio
async def test_upload_list_show_delete(client, settings):
    response = await upload(client, "alpaca.jsonl", (FIXTURES / "alpaca.jsonl").read_bytes())
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["status"], body["rows"], body["eval_rows"]) == (
        "alpaca",
        "ready",
        3,
        1,
    )
    folder = settings.datasets_dir / body["id"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "normalized.jsonl",
        "original.jsonl",
        "split.json",
    ]
    listed = (await client.get("/api/datasets")).json()
    assert [d["id"] for d in listed] == [body["id"]]
    shown = (await client.get(f"/api/datasets/{body['id']}")).json()
    assert shown["original_filename"] == "alpaca.jsonl"
    assert (await client.delete(f"/api/datasets/{body['id']}")).status_code == 204
    assert not folder.exists()
    missing = await client.get(f"/api/datasets/{body['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "dataset_not_found"


@pytest.mark.anyio
async def test_bad_rows_are_reported_with_lines(client):
    response = await upload(client, "mixed.jsonl", (FIXTURES / "mixed_types.jsonl").read_bytes())
    body = response.json()
    assert (body["status"], body["error_count"]) == ("invalid", 1)
    assert (body["errors"][0]["line"], body["errors"][0]["field"]) == (7, "output")
    dropped = await upload(
        client, "mixed.jsonl", (FIXTURES / "mixed_types.jsonl").read_bytes(), drop_bad_rows="true"
    )
    assert (dropped.json()["status"], dropped.json()["dropped_rows"]) == ("ready", 1)


@pytest.mark.anyio
async def test_column_mapping(client):
    response = await upload(
        client,
        "qa.jsonl",
        (FIXTURES / "qa.jsonl").read_bytes(),
        column_mapping=json.dumps({"prompt": "question", "completion": "answer"}),
    )
    assert response.json()["format"] == "prompt_completion"
    assert response.json()["column_mapping"] == {"prompt": "question", "completion": "answer"}
    broken = await upload(client, "qa.jsonl", b"{}", column_mapping="{not json")
    assert broken.status_code == 400
    assert "column_mapping" in broken.json()["error"]["message"]


@pytest.mark.anyio
async def test_unusable_file_is_422_and_nothing_is_kept(client, settings):
    response = await upload(client, "prefs.jsonl", (FIXTURES / "preference.jsonl").read_bytes())
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "dataset_format_invalid"
    assert "preference (DPO) data" in error["message"]
    assert error["hint"]
    assert list(settings.datasets_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name", ["model.pkl", "weights.bin", "x.pt", "a.zip", "page.html", "noext"]
)
async def test_other_file_types_are_415(client, name):
    response = await upload(client, name, b"whatever")
    assert response.status_code == 415
    assert ".jsonl, .json, .csv, .parquet" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_one_byte_over_the_cap_is_413_and_temp_removed(settings, db, tmp_path):
    small = Settings(data_dir=settings.data_dir, upload_max_bytes=100)
    transport = httpx.ASGITransport(app=make_app(small, db))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        at_cap = await upload(client, "t.jsonl", b'{"text": "' + b"x" * 87 + b'"}\n')
        assert at_cap.status_code == 201, at_cap.text
        over = await upload(client, "t.jsonl", b'{"text": "' + b"x" * 88 + b'"}\n')
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "upload_too_large"
    assert list(small.tmp_dir.iterdir()) == []


@pytest.mark.anyio
async def test_traversal_names_are_display_text_only(client, settings):
    response = await upload(client, "../../evil.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    body = response.json()
    assert body["original_filename"] == "evil.jsonl"
    assert (settings.datasets_dir / body["id"] / "original.jsonl").exists()
    for bad_id in ["..%2F..%2Fx", "%2e%2e", "0" * 31 + "g"]:
        assert (await client.get(f"/api/datasets/{bad_id}")).status_code == 404


def test_sweep_removes_stale_upload_temp_files(settings):
    stale = settings.tmp_dir / "upload-abc.part"
    stale.write_bytes(b"half an upload")
    other = settings.tmp_dir / "keep.txt"
    other.write_bytes(b"not ours")
    assert sweep_stale_uploads(settings) == 1
    assert not stale.exists() and other.exists()
