"""Token reports end to end: request through the API, a worker computes them with the real demo
tokenizer (the same `tokenize_row` training uses), the page and the API show the result."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from app.models import DatasetReport
from app.services import datasets, model_registry
from app.services.datasets import reports as dataset_reports
from worker.data import tokenize_row
from worker.dataset_report import TRUNCATION_RULE, histogram, run_pending_reports

HTML = {"accept": "text/html"}


@pytest.fixture
def demo_model(db, settings, demo_build):
    return model_registry.register_model(
        db, settings, str(demo_build["model_dir"]), "demo-tiny-llama"
    )


def upload(client, name: str, content: bytes, **data):
    response = client.post("/api/datasets", files={"file": (name, content)}, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def conversation(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def test_upload_requests_a_report_that_a_worker_computes(
    client, db, settings, demo_model, demo_build
):
    body = upload(client, "demo.jsonl", demo_build["dataset"].read_bytes())
    page = client.get(body["url"], headers=HTML).text
    assert "Waiting for a worker" in page and 'hx-trigger="every 2s"' in page
    assert client.get(f"/api/datasets/{body['id']}").json()["token_stats"] is None

    assert run_pending_reports(settings) == 1

    stats = client.get(f"/api/datasets/{body['id']}").json()["token_stats"]
    assert stats["base_model"] == "demo-tiny-llama" and stats["max_seq_len"] == 2048
    assert stats["rows"] + stats["eval_rows"] == body["valid_rows"]
    assert sum(b["count"] for b in stats["histogram"]) == stats["rows"]
    assert stats["lengths"]["p50"] <= stats["lengths"]["p95"] <= stats["lengths"]["max"]
    assert stats["over_max"]["rows"] == 0 and stats["tokens_per_epoch"] == stats["total_tokens"]
    assert 0 < stats["trained_tokens_per_epoch"] < stats["tokens_per_epoch"]
    assert stats["truncation_rule"] == TRUNCATION_RULE

    page = client.get(body["url"], headers=HTML).text
    assert 'class="histogram"' in page and 'hx-trigger="every 2s"' not in page
    assert '<mark class="trained">' in page


def test_the_workers_side_loop_computes_a_report_in_a_claimed_child(
    client, db, settings, demo_model, demo_build
):
    """The path `tuneboard worker` takes: claim, `python -m worker.dataset_report --task-id N
    --attempt A` under a renewed lease, the child records the result."""
    import time

    from worker.loop import child_environment
    from worker.side_work import run_side_work

    body = upload(client, "demo.jsonl", demo_build["dataset"].read_bytes())
    stopping = threading.Event()
    loop_settings = settings.model_copy(update={"poll_seconds": 0.1})
    side = threading.Thread(
        target=run_side_work,
        args=(
            loop_settings,
            db,
            stopping,
            child_environment(settings, ""),
            settings.data_dir / "side.log",
        ),
        daemon=True,
    )
    side.start()
    try:
        deadline = time.monotonic() + 300  # a bound for a busy machine, not a timing assertion
        while (report := dataset_reports.latest_report(db, body["id"])).status in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, report
            time.sleep(0.1)
    finally:
        stopping.set()
        side.join(timeout=300)
    assert (report.status, report.attempt, report.lease_expires_at) == ("succeeded", 1, None)
    rows = client.get(f"/api/datasets/{body['id']}").json()["token_stats"]["rows"]
    assert rows > 0
    # It counted the rows as it tokenised them (what the stall watchdog and the page read).
    assert report.progress_done == report.progress_total == rows


def test_numbers_match_the_training_tokenizer(db, settings, demo_model, demo_build):
    from transformers import AutoTokenizer

    dataset = datasets.import_local_file(db, settings, demo_build["dataset"], name="demo")
    report = dataset_reports.request_report(db, dataset, base_model=demo_model.name, max_seq_len=64)
    run_pending_reports(settings)
    result = dataset_reports.get_report(db, dataset.id, report.id).result

    tokenizer = AutoTokenizer.from_pretrained(demo_build["model_dir"])
    split = json.loads((settings.datasets_dir / dataset.id / "split.json").read_text())
    rows = [
        json.loads(line)
        for line in (settings.datasets_dir / dataset.id / "normalized.jsonl")
        .read_text()
        .splitlines()
    ]
    train = [r for r in rows if r["line"] not in split["eval_lines"]]
    whole = [tokenize_row(tokenizer, r, "assistant", 10**9) for r in train]
    cut = [tokenize_row(tokenizer, r, "assistant", 64) for r in train]
    assert result["total_tokens"] == sum(len(e) for e in whole)
    assert result["lengths"]["max"] == max(len(e) for e in whole)
    assert result["over_max"]["rows"] == sum(len(e) > 64 for e in whole) > 0
    assert result["over_max"]["dropped"] == sum(c is None for c in cut)
    assert result["over_max"]["truncated"] == sum(c is not None and c.truncated for c in cut)
    assert result["tokens_per_epoch"] == sum(len(c) for c in cut if c is not None)
    assert result["trained_tokens_per_epoch"] == sum(c.trained_tokens for c in cut if c is not None)
    # max_seq_len is a bin edge: every bin is wholly within or wholly over the limit
    assert 64 in [b["lo"] for b in result["histogram"]]
    assert (
        sum(b["count"] for b in result["histogram"] if b["lo"] >= 64) == result["over_max"]["rows"]
    )


def test_the_sample_shows_which_tokens_are_trained(db, settings, demo_model, tmp_path):
    rows = [conversation("What does <b>this</b> cost?", "It costs 89 euros.")] * 3
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = datasets.import_local_file(db, settings, path, name="chat")
    dataset_reports.request_report(db, dataset, base_model=demo_model.name)
    run_pending_reports(settings)
    sample = dataset_reports.latest_done_report(db, dataset.id).result["sample"]

    trained = "".join(s["text"] for s in sample["assistant"] if s["trained"])
    untrained = "".join(s["text"] for s in sample["assistant"] if not s["trained"])
    assert "89 euros" in trained and "cost?" in untrained and "cost?" not in trained
    assert all(s["trained"] for s in sample["all"])
    rendered = "".join(s["text"] for s in sample["assistant"])
    assert "".join(s["text"] for s in sample["all"]) == rendered
    assert "&lt;" not in rendered and "<b>this</b>" in rendered  # stored raw; escaped by the page


def report_at_64_tokens(db, settings, demo_model, path, rows: list[dict]):
    """Import `rows` from a file at `path`, compute their report at max length 64: (dataset,
    the report's result)."""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = datasets.import_local_file(db, settings, path, name=path.stem)
    dataset_reports.request_report(db, dataset, base_model=demo_model.name, max_seq_len=64)
    run_pending_reports(settings)
    return dataset, dataset_reports.latest_done_report(db, dataset.id).result


def test_a_row_with_nothing_trained_after_the_cut_is_counted_as_dropped(
    db, settings, demo_model, tmp_path
):
    long_question = " ".join(["kettle"] * 300)
    rows = [conversation(long_question, "Yes.")] * 3
    _, result = report_at_64_tokens(db, settings, demo_model, tmp_path / "long.jsonl", rows)
    assert result["rows"] == 2 and result["eval_rows"] == 1
    over = result["over_max"]
    assert (over["rows"], over["truncated"], over["dropped"], over["tokens_cut"]) == (2, 0, 2, 0)
    assert result["examples_per_epoch"] == 0 and result["tokens_per_epoch"] == 0


def test_long_plain_text_rows_are_reported_as_split_into_chunks_not_cut(
    client, db, settings, demo_model, tmp_path
):
    text = " ".join(f"The kettle number {i} boils water." for i in range(60))
    rows = [{"text": text}] * 3 + [{"text": "A short row."}]
    dataset, result = report_at_64_tokens(db, settings, demo_model, tmp_path / "book.jsonl", rows)

    over = result["over_max"]
    long_rows = over["rows"]
    assert long_rows >= 2 and over["split"] == long_rows
    assert (over["truncated"], over["dropped"], over["tokens_cut"]) == (0, 0, 0)
    assert over["chunks"] >= 4 * long_rows
    assert result["tokens_per_epoch"] == result["total_tokens"]  # nothing lost
    assert result["examples_per_epoch"] == over["chunks"] + result["rows"] - long_rows
    assert "Plain-text rows longer than the max length are split" in result["truncation_rule"]

    shown = client.get(f"/datasets/{dataset.id}", headers=HTML).text
    assert (
        f"{long_rows} plain-text rows split into {over['chunks']} chunks of at most 64 tokens "
        "(nothing lost)"
    ) in shown


def test_a_tokenizer_without_a_chat_template_offers_chatml(
    client, db, settings, demo_build, tmp_path
):
    import shutil

    model_dir = tmp_path / "no-template"
    shutil.copytree(demo_build["model_dir"], model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model_dir.glob("chat_template.*"):
        extra.unlink()
    model_registry.register_model(db, settings, str(model_dir), "plain-llama")

    body = upload(
        client,
        "chat.jsonl",
        b"".join((json.dumps(conversation(f"Q{i}?", f"A{i}.")) + "\n").encode() for i in range(4)),
    )
    run_pending_reports(settings)
    page = client.get(body["url"], headers=HTML).text
    assert "has no chat template" in page and "Use the ChatML template instead" in page

    response = client.post(
        f"/api/datasets/{body['id']}/report",
        json={"base_model": "plain-llama", "max_seq_len": 2048, "chat_template": "chatml"},
    )
    assert response.status_code == 202 and response.json()["status"] == "queued"
    run_pending_reports(settings)
    stats = client.get(f"/api/datasets/{body['id']}").json()["token_stats"]
    assert stats["chat_template"] == "chatml" and stats["rows"] == 3


def test_the_same_request_twice_gives_the_same_report(client, db, settings, demo_model, demo_build):
    body = upload(client, "demo.jsonl", demo_build["dataset"].read_bytes())
    ask = {"base_model": "demo-tiny-llama", "max_seq_len": 256, "train_on": "all"}
    first = client.post(f"/api/datasets/{body['id']}/report", json=ask).json()
    assert client.post(f"/api/datasets/{body['id']}/report", json=ask).json()["id"] == first["id"]
    run_pending_reports(settings)
    again = client.post(f"/api/datasets/{body['id']}/report", json=ask)
    assert again.status_code == 200 and again.json()["status"] == "succeeded"


def test_report_requests_are_validated(client, demo_model, demo_build):
    body = upload(client, "demo.jsonl", demo_build["dataset"].read_bytes())
    url = f"/api/datasets/{body['id']}/report"
    assert client.post(url, json={"base_model": "nope"}).status_code == 404
    assert (
        client.post(url, json={"base_model": "demo-tiny-llama", "max_seq_len": 1}).status_code
        == 422
    )
    bad = {"base_model": "demo-tiny-llama", "train_on": "everything"}
    assert client.post(url, json=bad).status_code == 422
    assert client.post(url, json={**bad, "train_on": "all", "x": 1}).status_code == 422


def test_deleting_a_dataset_deletes_its_reports(client, db, demo_model, demo_build):
    body = upload(client, "demo.jsonl", demo_build["dataset"].read_bytes())
    assert dataset_reports.latest_report(db, body["id"]) is not None
    assert client.delete(f"/api/datasets/{body['id']}").status_code == 204
    with db.read() as s:
        from sqlmodel import select

        assert list(s.exec(select(DatasetReport))) == []


@pytest.mark.parametrize(
    ("lengths", "max_len"), [([5, 10, 64, 65, 300], 64), ([1], 2048), ([0, 0], 8), ([7] * 50, 100)]
)
def test_histogram_counts_every_row_once_and_splits_at_the_max_length(lengths, max_len):
    bins = histogram(sorted(lengths), max_len)
    assert sum(b["count"] for b in bins) == len(lengths)
    assert all(b["lo"] < b["hi"] for b in bins) and bins[0]["lo"] == 0
    assert all(a["hi"] == b["lo"] for a, b in itertools.pairwise(bins))
    over = sum(b["count"] for b in bins if b["lo"] >= max_len)
    assert over == sum(length > max_len for length in lengths)
