"""Hub imports over HTTP with the real worker path: POST /api/datasets/import queues side work, a
real `python -m worker.hub_import` child loads the split with `datasets.load_dataset` in offline
mode from a dataset cached locally in the `datasets` cache layout (tests cannot reach the Hub),
and the web ingests the rows as an upload (same format detection, errors by line, token report).
Bad inputs: an id not in the cache, a column mapping naming a missing column, an unknown split,
malformed requests."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app import side_queue
from app.models import BaseModelEntry, Dataset, DatasetReport, HubImport, utcnow
from app.services.datasets import hub
from app.settings import Settings
from tests.fakes.hub_cache import cache_hub_dataset
from tests.fakes.jobs import MODEL
from worker.loop import child_environment
from worker.side_work import run_in_child

ALPACA = {
    "instruction": ["Name a colour.", "Add 2 and 2.", "Say hi."],
    "input": ["", "", ""],
    "output": ["Blue.", "4", "Hi!"],
}


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", database_url="", hf_offline=True)
    s.ensure_dirs()
    return s


@pytest.fixture
def cached(settings):
    """Datasets in the data dir's datasets cache, as an earlier online import would leave them."""
    cache = settings.layout.hf_datasets_cache
    cache_hub_dataset(cache, "acme/alpaca-mini", {"train": ALPACA})
    cache_hub_dataset(
        cache,
        "acme/qa",
        {
            "train": {"question": ["Capital of France?", "2+2?"], "answer": ["Paris", "4"]},
            "test": {"question": ["Capital of Italy?"], "answer": ["Rome"]},
        },
    )
    bad = {**ALPACA, "output": ["Blue.", "", "Hi!"]}  # row 2 has no answer
    cache_hub_dataset(cache, "acme/holey", {"train": bad})


def run_worker(settings, db) -> None:
    """What a worker's side loop does: claim the queued import, run it in a real child."""
    claim = side_queue.claim_next(db, "hub_import", "test-worker", settings.lease_seconds)
    assert claim is not None
    log = settings.layout.side_work_log
    run_in_child(settings, db, claim, child_environment(settings, ""), log, threading.Event())


def imported(client, settings, db, body: dict) -> dict:
    response = client.post("/api/datasets/import", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    run_worker(settings, db)
    return client.get(f"/api/datasets/imports/{response.json()['id']}").json()


def test_a_cached_hub_dataset_imports_as_an_upload_would(client, settings, db, cached):
    with db.write() as session:  # a registered model: the new dataset gets a token report
        session.add(BaseModelEntry(name=MODEL, source=str(settings.models_dir), is_local=True))
    task = imported(client, settings, db, {"hub_id": "acme/alpaca-mini", "split": "train"})
    assert (task["status"], task["stage"], task["progress_done"]) == ("succeeded", "done", 3)
    assert task["config"] is None and task["url"] == f"/datasets/{task['dataset_id']}"
    dataset = client.get(f"/api/datasets/{task['dataset_id']}").json()
    assert (dataset["format"], dataset["status"], dataset["valid_rows"]) == ("alpaca", "ready", 3)
    assert dataset["name"] == "acme/alpaca-mini train"
    page = client.get(task["url"]).text
    assert "Name a colour." in page  # the preview shows the normalised rows
    with db.read() as session:
        reports = session.exec(select(DatasetReport)).all()
    assert [r.dataset_id for r in reports] == [task["dataset_id"]]
    # The rows file waited in tmp/ and became the dataset's original file.
    assert not settings.layout.hub_import_rows(task["id"]).exists()
    # Reading it again does not ingest it twice.
    again = client.get(f"/api/datasets/imports/{task['id']}").json()
    assert again["dataset_id"] == task["dataset_id"]
    assert len(client.get("/api/datasets").json()) == 1


def test_column_mapping_config_and_split_choose_what_is_imported(client, settings, db, cached):
    task = imported(
        client,
        settings,
        db,
        {
            "hub_id": "acme/qa",
            "config": "default",
            "split": "test",
            "column_mapping": {"prompt": "question", "completion": "answer"},
            "name": "qa test",
        },
    )
    assert task["stage"] == "done", task
    dataset = client.get(f"/api/datasets/{task['dataset_id']}").json()
    assert (dataset["format"], dataset["valid_rows"], dataset["name"]) == (
        "prompt_completion",
        1,
        "qa test",
    )
    assert dataset["column_mapping"] == {"prompt": "question", "completion": "answer"}


def test_bad_rows_are_reported_by_line_as_for_an_upload(client, settings, db, cached):
    task = imported(client, settings, db, {"hub_id": "acme/holey"})
    dataset = client.get(f"/api/datasets/{task['dataset_id']}").json()
    assert (dataset["status"], dataset["error_count"]) == ("invalid", 1)
    assert dataset["errors"][0]["line"] == 2 and dataset["errors"][0]["field"] == "output"
    dropped = imported(client, settings, db, {"hub_id": "acme/holey", "drop_bad_rows": True})
    dataset = client.get(f"/api/datasets/{dropped['dataset_id']}").json()
    assert (dataset["status"], dataset["valid_rows"], dataset["dropped_rows"]) == ("ready", 2, 1)


@pytest.mark.parametrize(
    ("body", "kind", "message", "hint"),
    [
        (
            {"hub_id": "acme/nowhere"},
            "not_cached",
            "acme/nowhere, split 'train' is not in the cache (TUNEBOARD_HF_OFFLINE is set",
            "Import it once with the Hub reachable",
        ),
        (
            {"hub_id": "acme/qa", "column_mapping": {"prompt": "query", "completion": "answer"}},
            "bad_column_mapping",
            "names 'query' (for prompt), which acme/qa, split 'train' does not have; its columns "
            "are: question, answer.",
            "Map each field to one of those columns",
        ),
        (
            {"hub_id": "acme/qa", "split": "validation"},
            "not_found",
            "Unknown split \"validation\". Should be one of ['train', 'test']",
            "Use a config and split the dataset has",
        ),
        (
            {"hub_id": "acme/qa", "config": "chat"},
            "not_found",
            "acme/qa, config 'chat', split 'train' was not found (TUNEBOARD_HF_OFFLINE is set",
            "leave config empty",
        ),
    ],
)
def test_what_cannot_be_imported_says_why(client, settings, db, cached, body, kind, message, hint):
    task = imported(client, settings, db, body)
    assert (task["status"], task["error_kind"]) == ("failed", kind), task
    assert message in task["error_message"]
    assert hint in task["error_hint"]
    assert task["dataset_id"] is None
    assert client.get("/api/datasets").json() == []


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"hub_id": "../etc/passwd"}, "hub_id"),
        ({"hub_id": "https://huggingface.co/datasets/acme/qa"}, "hub_id"),
        ({"hub_id": "acme/qa", "split": "train; rm -rf /"}, "split"),
        (
            {"hub_id": "acme/qa", "column_mapping": {"answer": "output"}},
            "not a field of any format",
        ),
        ({"hub_id": "acme/qa", "token": "hf_secret"}, "Extra inputs are not permitted"),
        ({}, "Field required"),
    ],
)
def test_malformed_requests_are_a_clear_422(client, db, body, said):
    response = client.post("/api/datasets/import", json=body)
    assert response.status_code == 422, response.text
    assert said in response.text
    with db.read() as session:
        assert session.exec(select(HubImport)).all() == []


def test_an_unknown_import_is_a_404(client, db):
    response = client.get("/api/datasets/imports/12345")
    assert response.status_code == 404
    assert "There is no Hub import 12345" in response.json()["error"]["message"]


def settle_fast(settings: Settings) -> Settings:
    """The same data dir, with the web app's settle task every 50 ms."""
    return settings.model_copy(update={"hub_import_settle_seconds": 0.05})


def wait_for_stage(db, import_id: int, stages: tuple[str, ...]) -> HubImport:
    """The import once its stage is one of `stages` (polled; the test's timeout bounds it)."""
    while True:
        with db.read() as session:
            task = session.get(HubImport, import_id)
        assert task is not None
        if task.stage in stages:
            return task
        time.sleep(0.05)


def test_an_import_nobody_reads_becomes_a_dataset(settings, db, cached):
    from app.main import create_app

    import_id = hub.request_import(db, hub.HubImportRequest(hub_id="acme/alpaca-mini")).id
    assert import_id is not None
    run_worker(settings, db)
    with TestClient(create_app(settle_fast(settings)), base_url="http://127.0.0.1"):
        task = wait_for_stage(db, import_id, ("done", "refused"))
    assert task.stage == "done" and task.dataset_id is not None
    assert task.lease_expires_at is None
    with db.read() as session:
        dataset = session.get(Dataset, task.dataset_id)
    assert dataset is not None and dataset.valid_rows == 3


def test_an_import_left_ingesting_by_a_dead_web_process_is_taken_back(settings, db, cached):
    from app.main import create_app

    ids = []
    for _ in range(3):
        import_id = hub.request_import(db, hub.HubImportRequest(hub_id="acme/alpaca-mini")).id
        run_worker(settings, db)
        ids.append(import_id)
    stale, gone, live = ids
    past, future = utcnow() - timedelta(seconds=1), utcnow() + timedelta(hours=1)
    with db.write() as session:  # as a web process killed mid-ingest leaves them
        for import_id, lease in ((stale, past), (gone, past), (live, future)):
            task = session.get(HubImport, import_id)
            assert task is not None
            task.stage, task.lease_expires_at = "ingesting", lease
            session.add(task)
    settings.layout.hub_import_rows(gone).unlink()  # moved by a web server of an earlier version
    # An import another web process is still ingesting is left to it.
    assert hub.settle_waiting(db, settings) == [stale, gone]
    with db.read() as session:
        task = session.get(HubImport, live)
    assert task is not None and task.stage == "ingesting"
    with db.read() as session:
        recovered, refused = session.get(HubImport, stale), session.get(HubImport, gone)
    assert recovered is not None and recovered.stage == "done" and recovered.dataset_id
    assert refused is not None and refused.stage == "refused"
    assert refused.ingest_error == (
        "The imported rows are gone from the data dir (the web server ingesting them stopped)."
    )
    assert refused.ingest_hint == "Import the dataset again."

    # The web app's task does the same on its own, once the lease has run out.
    with db.write() as session:
        task = session.get(HubImport, live)
        assert task is not None
        task.lease_expires_at = past
        session.add(task)
    with TestClient(create_app(settle_fast(settings)), base_url="http://127.0.0.1") as client:
        task = wait_for_stage(db, live, ("done", "refused"))
        shown = client.get(f"/api/datasets/imports/{live}").json()
    assert task.stage == "done" and shown["url"] == f"/datasets/{task.dataset_id}"
    assert len({recovered.dataset_id, task.dataset_id}) == 2
