"""The dataset API through a real HTTP client against the ASGI app and a real SQLite file."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from sqlmodel import select

from app.main import create_app
from app.models import Dataset
from app.services.datasets import (
    INGEST_LOCK_FILENAME,
    sweep_orphan_datasets,
    sweep_stale_uploads,
)
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
    response = await upload(client, "odd.jsonl", (FIXTURES / "unknown_columns.jsonl").read_bytes())
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "dataset_format_invalid"
    assert "Could not recognise the dataset format" in error["message"]
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


def test_sweep_removes_half_ingested_folders_only(settings, db):
    """A folder with no row and no split.json goes, unless a live process holds its ingest lock;
    a complete folder, a dataset with a row and anything not named like a dataset stay."""

    def folder(name: str, *files: str) -> Path:
        path = settings.datasets_dir / name
        path.mkdir()
        for file in files:
            (path / file).write_text("x")
        return path

    half = folder("a" * 32, "original.jsonl", ".normalized.jsonl.123.tmp")
    locked = folder("b" * 32, "original.jsonl", INGEST_LOCK_FILENAME)
    complete = folder("c" * 32, "original.jsonl", "normalized.jsonl", "split.json")
    other = folder("not-a-dataset", "notes.txt")
    with db.write() as session:
        session.add(
            Dataset(
                id="d" * 32,
                name="kept",
                original_filename="k.jsonl",
                file_type="jsonl",
                format="text",
                size_bytes=1,
            )
        )
    recorded = folder("d" * 32, "original.jsonl")
    with (locked / INGEST_LOCK_FILENAME).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as an ingest in another live process holds it
        assert sweep_orphan_datasets(db, settings) == 1
    assert not half.exists()
    assert all(p.exists() for p in (locked, complete, other, recorded))
    assert sweep_orphan_datasets(db, settings) == 1  # the lock's holder died
    assert not locked.exists()


# --- what ingest produces is bounded, not only what is uploaded (issue 21, items 2 and 7) ---------

# Run in a child process so its peak memory (ru_maxrss) is the upload's, not the test session's.
_UPLOAD_AND_MEASURE = """
import asyncio, json, resource, sys
import httpx
from app.main import create_app
from app.settings import Settings

async def main():
    settings = Settings(data_dir=sys.argv[1], upload_max_bytes=1024 * 1024)
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(sys.argv[2], "rb") as f:
            response = await client.post(
                "/api/datasets", files={"file": ("expands.parquet", f.read())}
            )
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"status": response.status_code, "body": response.json(),
                      "peak_growth_kib": after - before}))

asyncio.run(main())
"""


def test_a_tiny_parquet_that_expands_is_413_with_bounded_memory(settings, db, tmp_path):
    """512 bytes of Parquet (one 2 MiB string, dictionary-encoded, 100 times) would decode to
    200 MiB of rows; with a 1 MiB upload cap the normalised rows may take 4 MiB."""
    path = tmp_path / "expands.parquet"
    table = pa.table({"text": ["x" * (2 * 1024 * 1024)] * 100})
    pq.write_table(table, path, compression="zstd", use_dictionary=True)
    del table
    assert path.stat().st_size < 4096
    child = subprocess.run(
        [sys.executable, "-c", _UPLOAD_AND_MEASURE, str(settings.data_dir), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["status"] == 413, result
    error = result["body"]["error"]
    assert error["code"] == "dataset_too_large"
    assert "TUNEBOARD_DATASET_EXPANSION_MAX" in error["hint"]
    assert list(settings.datasets_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []
    with db.read() as session:
        assert session.exec(select(Dataset)).first() is None
    # Decoded whole it grew the peak by ~245 MiB (Arrow + Python strings); batches stay far below.
    assert result["peak_growth_kib"] < 120 * 1024, result


@pytest.mark.anyio
async def test_a_parquet_that_decompresses_past_the_limit_is_413_before_decoding(
    settings, db, tmp_path
):
    path = tmp_path / "plain.parquet"
    pq.write_table(
        pa.table({"text": ["y" * (1024 * 1024)] * 8}),
        path,
        compression="zstd",
        use_dictionary=False,
    )
    small = Settings(data_dir=settings.data_dir, upload_max_bytes=1024 * 1024)
    transport = httpx.ASGITransport(app=make_app(small, db))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await upload(client, "plain.parquet", path.read_bytes())
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert "decompress" in error["message"] and "TUNEBOARD_DATASET_EXPANSION_MAX" in error["hint"]
    assert list(small.datasets_dir.iterdir()) == []


@pytest.mark.anyio
async def test_a_jsonl_upload_whose_rows_outgrow_the_limit_is_413(settings, db):
    # ShareGPT rows grow when normalised (roles spelled out, keys added): 1 MiB becomes >4 MiB only
    # with a small ratio, so the ratio is set low here.
    small = Settings(
        data_dir=settings.data_dir, upload_max_bytes=1024 * 1024, dataset_expansion_max=1.0
    )
    row = json.dumps(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    )
    content = (row + "\n").encode() * (1024 * 1024 // (len(row) + 1))
    transport = httpx.ASGITransport(app=make_app(small, db))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await upload(client, "grows.jsonl", content)
    assert response.status_code == 413, response.text
    assert list(small.datasets_dir.iterdir()) == []


@pytest.mark.anyio
async def test_a_deeply_nested_column_mapping_is_400(client):
    response = await upload(
        client,
        "qa.jsonl",
        b'{"question": "q", "answer": "a"}\n',
        column_mapping="[" * 100_000 + "]" * 100_000,
    )
    assert response.status_code == 400, response.text
    assert "column_mapping" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_deeply_nested_row_is_a_row_error_with_its_line(client):
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = ['{"text": "one"}', deep, '{"text": "three"}', '{"text": ' + "[" * 70 + "]" * 70 + "}"]
    response = await upload(client, "deep.jsonl", "\n".join(rows).encode())
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["valid_rows"], body["error_count"]) == ("invalid", 2, 2)
    assert [(e["line"], e["kind"]) for e in body["errors"]] == [
        (2, "too_deeply_nested"),
        (4, "too_deeply_nested"),
    ]
    assert "TUNEBOARD_DATASET_MAX_NESTING" in body["errors"][0]["hint"]
