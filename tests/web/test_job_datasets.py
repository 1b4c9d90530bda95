"""Jobs of several datasets over HTTP: `datasets: [{id, weight}]` in POST /api/jobs and in the
New job form, what job creation refuses (unknown ids, bad weights, mixed shapes), the job page's
mix table, and a dataset that a job mixes in cannot be deleted. Old configs without `datasets`
still load and queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from app import queue
from app.models import BaseModelEntry, Job
from app.train_config import TrainConfig
from tests.fakes.jobs import MODEL

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


def upload(client, name: str, fixture: str) -> dict:
    content = (FIXTURES / fixture).read_bytes()
    response = client.post("/api/datasets", files={"file": (name, content)})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def model(db, settings):
    folder = settings.models_dir / MODEL
    folder.mkdir(parents=True)
    with db.write() as session:
        session.add(BaseModelEntry(name=MODEL, source=str(folder), is_local=True, is_demo=True))
    return MODEL


@pytest.fixture
def sft_pair(client, model):
    return upload(client, "a.jsonl", "alpaca.jsonl"), upload(client, "s.jsonl", "sharegpt.jsonl")


def test_a_job_of_two_datasets_is_queued_with_its_weights(client, sft_pair, model, db):
    alpaca, sharegpt = sft_pair
    response = client.post(
        "/api/jobs",
        json={
            "base_model": model,
            "datasets": [{"id": alpaca["id"], "weight": 1}, {"id": sharegpt["id"], "weight": 3}],
        },
    )
    assert response.status_code == 201, response.text
    job = response.json()
    # dataset_id is the first of them; the config keeps the weights.
    assert job["dataset_id"] == alpaca["id"]
    assert job["config"]["datasets"] == [
        {"id": alpaca["id"], "weight": 1.0},
        {"id": sharegpt["id"], "weight": 3.0},
    ]
    page = BeautifulSoup(client.get(f"/jobs/{job['id']}").text, "html.parser")
    rows = page.select("section.dataset-mix tbody tr")
    assert [r["data-dataset"] for r in rows] == [alpaca["id"], sharegpt["id"]]
    assert [r.find_all("td")[2].get_text() for r in rows] == ["25%", "75%"]
    assert "Rows and tokens appear when the job starts" in page.select_one(".dataset-mix").text


def test_the_job_page_shows_what_the_worker_drew(client, sft_pair, model, settings):
    alpaca, sharegpt = sft_pair
    shares = [{"id": alpaca["id"], "weight": 1}, {"id": sharegpt["id"], "weight": 1}]
    job = client.post("/api/jobs", json={"base_model": model, "datasets": shares}).json()
    settings.layout.run_dir(job["id"]).mkdir(parents=True)
    record = {
        "datasets": [
            {**shares[0], "train_rows": 3, "eval_rows": 1, "drawn_rows": 4},
            {**shares[1], "train_rows": 5, "eval_rows": 1, "drawn_rows": 4},
        ]
    }
    record["datasets"][0] |= {"drawn_tokens": 120, "eval_tokens": 30}
    record["datasets"][1] |= {"drawn_tokens": 200, "eval_tokens": 50}
    settings.layout.run_mix(job["id"]).write_text(json.dumps(record))
    page = BeautifulSoup(client.get(f"/jobs/{job['id']}").text, "html.parser")
    cells = [
        [td.get_text(" ", strip=True) for td in row.find_all("td")]
        for row in page.select("section.dataset-mix tbody tr")
    ]
    assert cells == [
        [alpaca["name"], "1", "50%", "4 of 3", "120", "1", "30"],
        [sharegpt["name"], "1", "50%", "4 of 5", "200", "1", "50"],
    ]


@pytest.mark.parametrize(
    ("shares", "said"),
    [
        ([{"id": "f" * 32, "weight": 1}], "there is no dataset " + "f" * 32),
        ([{"weight": 1}], "Field required"),
        ([{"id": "../etc/passwd", "weight": 1}], "should match pattern"),
        ([{"id": "FIRST", "weight": 0}], "greater than 0"),
        ([{"id": "FIRST", "weight": -2}], "greater than 0"),
        ([{"id": "FIRST", "weight": "lots"}], "valid number"),
        ([{"id": "FIRST", "weight": 1}, {"id": "FIRST", "weight": 2}], "lists a dataset twice"),
        ([], "at least 1 item"),
    ],
)
def test_bad_datasets_are_a_clear_422(client, sft_pair, model, shares, said):
    alpaca, _ = sft_pair
    for share in shares:
        if share.get("id") == "FIRST":
            share["id"] = alpaca["id"]
    if shares and shares[0].get("id") == "f" * 32:
        shares.insert(0, {"id": alpaca["id"], "weight": 1})
    response = client.post("/api/jobs", json={"base_model": model, "datasets": shares})
    assert response.status_code == 422, response.text
    assert said in response.text


def test_dataset_id_must_be_the_first_of_datasets(client, sft_pair, model):
    alpaca, sharegpt = sft_pair
    response = client.post(
        "/api/jobs",
        json={
            "base_model": model,
            "dataset_id": sharegpt["id"],
            "datasets": [{"id": alpaca["id"]}, {"id": sharegpt["id"]}],
        },
    )
    assert response.status_code == 422
    assert "leave dataset_id out" in response.text


def test_sft_examples_and_preference_pairs_do_not_mix(client, sft_pair, model):
    alpaca, _ = sft_pair
    pairs = upload(client, "p.jsonl", "trl_preference.jsonl")
    for method in ("sft", "dpo"):
        response = client.post(
            "/api/jobs",
            json={
                "base_model": model,
                "method": method,
                "datasets": [{"id": alpaca["id"]}, {"id": pairs["id"]}],
            },
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert "holds SFT examples" in error["message"] and "preference pairs" in error["message"]
        assert "one job trains on one shape" in error["message"]
        assert "Mix SFT datasets in an sft job" in error["hint"]


def test_the_new_job_form_adds_datasets_with_weights(client, sft_pair, model):
    alpaca, sharegpt = sft_pair
    page = BeautifulSoup(client.get("/jobs/new").text, "html.parser")
    # One blank row to add a dataset (app.js adds more), every usable dataset offered.
    options = [o["value"] for o in page.select("select[name='datasets-1-id'] option")]
    assert options == ["", alpaca["id"], sharegpt["id"]]
    form = {
        "name": "mixed",
        "base_model": model,
        "dataset_id": alpaca["id"],
        "dataset_weight": "2",
        "datasets-1-id": sharegpt["id"],
        "datasets-1-weight": "0.5",
        "datasets-2-id": "",
        "datasets-2-weight": "1",
    }
    response = client.post("/jobs/new", data=form, follow_redirects=False)
    assert response.status_code == 303, response.text
    job_id = int(response.headers["location"].rsplit("/", 1)[1])
    config = client.get(f"/api/jobs/{job_id}").json()["config"]
    assert config["datasets"] == [
        {"id": alpaca["id"], "weight": 2.0},
        {"id": sharegpt["id"], "weight": 0.5},
    ]
    # Left blank, the rows add nothing: a job of one dataset.
    single = client.post(
        "/jobs/new", data={**form, "datasets-1-id": ""}, follow_redirects=False
    ).headers["location"]
    assert client.get(f"/api/{single.lstrip('/')}").json()["config"]["datasets"] is None


def test_the_form_says_what_is_wrong_with_a_weight_and_keeps_the_rows(client, sft_pair, model):
    alpaca, sharegpt = sft_pair
    form = {
        "base_model": model,
        "dataset_id": alpaca["id"],
        "datasets-1-id": sharegpt["id"],
        "datasets-1-weight": "-1",
    }
    response = client.post("/jobs/new", data=form)
    assert response.status_code == 422
    page = BeautifulSoup(response.text, "html.parser")
    errors = [e.get_text() for e in page.select(".dataset-mix .field-error")]
    assert errors == ["datasets.1.weight: Input should be greater than 0"]
    kept = page.select_one("select[name='datasets-1-id'] option[selected]")
    assert kept is not None and kept["value"] == sharegpt["id"]
    assert page.select_one("input[name='datasets-1-weight']")["value"] == "-1"


def test_a_dataset_mixed_into_a_job_cannot_be_deleted(client, sft_pair, model):
    alpaca, sharegpt = sft_pair
    shares = [{"id": alpaca["id"]}, {"id": sharegpt["id"]}]
    job = client.post("/api/jobs", json={"base_model": model, "datasets": shares}).json()
    refused = client.delete(f"/api/datasets/{sharegpt['id']}")
    assert refused.status_code == 409
    assert f"job(s) {job['id']} are queued or running" in refused.json()["error"]["message"]


def test_an_old_config_without_datasets_still_loads_and_runs_alone(db, sft_pair, model, client):
    alpaca, _ = sft_pair
    old = {"name": "old", "base_model": model, "dataset_id": alpaca["id"], "max_steps": 5}
    config = TrainConfig.model_validate(old)
    assert config.datasets is None
    assert [(s.id, s.weight) for s in config.dataset_shares] == [(alpaca["id"], 1.0)]
    job = queue.enqueue(db, config)
    with db.write() as session:  # a job stored before `datasets` existed
        row = session.get(Job, job.id)
        row.config = old
        session.add(row)
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    assert BeautifulSoup(page.text, "html.parser").select("section.dataset-mix") == []
