"""The side-work queue's promises (dataset reports, merges, evaluations), on a real SQLite file
and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict
from datetime import timedelta

import pytest
from sqlmodel import select

from app import side_queue
from app.db import Database
from app.models import (
    Adapter,
    DatasetReport,
    Evaluation,
    HubImport,
    MergeRequest,
    ModelExport,
    SideWorkStatus,
    utcnow,
)
from app.settings import Settings
from tests.fakes import racers
from tests.fakes.jobs import MODEL, add_dataset, add_job

RACERS = 8
ROUNDS = 50


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")


def add_adapter(db: Database, settings: Settings) -> str:
    job = add_job(db, settings)
    with db.write() as s:
        s.add(Adapter(id=f"job-{job.id}", job_id=job.id or 0, name="a", base_model=MODEL))
    return f"job-{job.id}"


def add_side_work(db: Database, dataset_id: str, adapter_id: str, n: int) -> dict[str, int]:
    """One queued task of each kind, as the web process adds them."""
    with db.write() as s:
        report = DatasetReport(dataset_id=dataset_id, base_model=MODEL, max_seq_len=64 + n)
        merge = MergeRequest(adapter_id=adapter_id)
        hub_import = HubImport(hub_id=f"acme/set-{n}")
        s.add(report)
        s.add(merge)
        s.add(hub_import)
        export = ModelExport(adapter_id=adapter_id, kind="gguf", quantization="f16")
        s.add(export)
        evaluation = Evaluation(adapter_id=adapter_id)
        s.add(evaluation)
        s.flush()
        return {
            "dataset_report": report.id or 0,
            "merge": merge.id or 0,
            "hub_import": hub_import.id or 0,
            "export": export.id or 0,
            "evaluation": evaluation.id or 0,
        }


def test_eight_processes_racing_claim_each_side_task_exactly_once(any_db, settings):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS + 1, timeout=60)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=racers.claim_side_work_each_round,
            args=(any_db.url, f"racer-{i}", ROUNDS, barrier, results),
        )
        for i in range(RACERS)
    ]
    for p in processes:
        p.start()
    dataset_id = add_dataset(any_db, settings)
    adapter_id = add_adapter(any_db, settings)
    added, claims = [], defaultdict(list)
    try:
        for n in range(ROUNDS):
            added += add_side_work(any_db, dataset_id, adapter_id, n).items()
            barrier.wait()  # go
            barrier.wait()  # everyone has tried
            for _ in range(RACERS * len(side_queue.KINDS)):
                name, kind, task_id = results.get(timeout=30)
                if task_id is not None:
                    claims[(kind, task_id)].append(name)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in processes)
    assert sorted(claims) == sorted(added)
    assert {task: names for task, names in claims.items() if len(names) != 1} == {}
    with any_db.read() as s:
        for table in side_queue.KINDS.values():
            rows = s.exec(select(table)).all()
            assert {(r.status, r.attempt) for r in rows} == {(SideWorkStatus.running, 1)}


def test_a_side_task_whose_worker_died_is_requeued_then_failed_with_a_hint(db, settings):
    adapter_id = add_adapter(db, settings)
    task = add_side_work(db, add_dataset(db, settings), adapter_id, 0)["merge"]
    with db.write() as s:
        merge = s.get(MergeRequest, task)
        assert merge is not None
        merge.max_attempts = 2
        s.add(merge)
    first = side_queue.claim_next(db, "merge", "w1", lease_seconds=0.05)
    time.sleep(0.1)
    assert side_queue.requeue_expired(db) == {"merge": [task]}
    with db.read() as s:
        merge = s.get(MergeRequest, task)
        assert merge is not None
        assert (merge.status, merge.attempt, merge.worker_id) == (SideWorkStatus.queued, 1, None)
        assert "lost its worker" in (merge.notice or "")

    second = side_queue.claim_next(db, "merge", "w2", lease_seconds=0.05)
    assert first is not None and second is not None and second.attempt == first.attempt + 1
    time.sleep(0.1)
    side_queue.requeue_expired(db)
    with db.read() as s:
        merge = s.get(MergeRequest, task)
        assert merge is not None
    assert merge.status == SideWorkStatus.failed and merge.error_kind == "lost_worker"
    assert "used all 2 attempts" in (merge.error_message or "")
    assert "out of RAM" in (merge.error_hint or "")
    assert side_queue.claim_next(db, "merge", "w3", lease_seconds=60) is None


def test_a_stale_side_claim_cannot_write_anything(db, settings):
    adapter_id = add_adapter(db, settings)
    task = add_side_work(db, add_dataset(db, settings), adapter_id, 0)["merge"]
    stale = side_queue.claim_next(db, "merge", "paused", lease_seconds=0.05)
    assert stale is not None
    time.sleep(0.1)
    side_queue.requeue_expired(db)
    current = side_queue.claim_next(db, "merge", "other", lease_seconds=60)
    assert current is not None and current.attempt == stale.attempt + 1

    assert not side_queue.heartbeat(db, stale, 60)
    assert not side_queue.update_progress(db, stale, stage="saving")
    assert not side_queue.release_lost(db, stale, "was killed")
    assert not side_queue.finish(db, stale, SideWorkStatus.succeeded, output_dir="runs/x")
    with db.read() as s:
        merge = s.get(MergeRequest, task)
        assert merge is not None
    assert (merge.status, merge.attempt, merge.stage, merge.output_dir) == (
        SideWorkStatus.running,
        current.attempt,
        "",
        None,
    )
    assert side_queue.update_progress(db, current, stage="saving")
    assert side_queue.finish(db, current, SideWorkStatus.succeeded, output_dir="runs/x")


def test_asking_again_for_a_merge_whose_worker_died_never_returns_it_running(client, db, settings):
    adapter_id = add_adapter(db, settings)
    url = f"/api/adapters/{adapter_id}/merge"
    first = client.post(url).json()
    assert first["status"] == "queued"
    claim = side_queue.claim_next(db, "merge", "dies", lease_seconds=60)
    assert claim is not None and claim.task_id == first["id"]
    assert client.post(url).json()["status"] == "running"  # within its lease
    # The worker died: no heartbeat, and its lease ran out (set in the past rather than waited
    # for: a lease short enough to wait out could end before the request above on a busy machine).
    with db.write() as s:
        merge = s.get(MergeRequest, claim.task_id)
        assert merge is not None
        merge.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.add(merge)

    again = client.post(url).json()
    assert (again["id"], again["status"], again["attempt"]) == (first["id"], "queued", 1)
    assert "lost its worker" in again["notice"]


def test_a_merge_records_the_bytes_of_a_model_over_2_gib(any_db, settings):
    """A 8B model's merge writes 16 GB: its progress and size fit (PostgreSQL's integer did not)."""
    adapter_id = add_adapter(any_db, settings)
    task = add_side_work(any_db, add_dataset(any_db, settings), adapter_id, 0)["merge"]
    claim = side_queue.claim_next(any_db, "merge", "w", lease_seconds=60)
    assert claim is not None and claim.task_id == task
    size = 16 * 1024**3
    assert side_queue.update_progress(any_db, claim, progress_done=size // 2, progress_total=size)
    assert side_queue.finish(
        any_db, claim, SideWorkStatus.succeeded, progress_done=size, size_bytes=size
    )
    with any_db.read() as s:
        merge = s.get(MergeRequest, task)
        assert merge is not None
    assert (merge.progress_done, merge.progress_total, merge.size_bytes) == (size, size, size)


def test_a_stalled_task_fails_saying_how_far_it_got_in_its_own_units(any_db, settings):
    """What the side loop records for a task whose child it stopped on a stall: the export's
    kind, its stage and steps; a merge's bytes; a task that said nothing at all."""
    adapter_id = add_adapter(any_db, settings)
    add_side_work(any_db, add_dataset(any_db, settings), adapter_id, 0)
    gib = 1024**3
    said = {
        "export": {
            "stage": "converting to GGUF: 3.2 GB of about 8.1 GB written",
            "progress_done": 1,
            "progress_total": 4,
        },
        "merge": {"stage": "saving", "progress_done": 3 * gib, "progress_total": 8 * gib},
        "hub_import": {},
    }
    errors = {}
    for kind, fields in said.items():
        claim = side_queue.claim_next(any_db, kind, "w", lease_seconds=60)
        assert claim is not None
        if fields:
            assert side_queue.update_progress(any_db, claim, **fields)
        assert side_queue.stop_stalled(any_db, claim, 900)
        assert not side_queue.stop_stalled(any_db, claim, 900)  # fenced: it has ended
        with any_db.read() as s:
            task = s.get(claim.table, claim.task_id)
            assert task is not None and task.status == SideWorkStatus.failed
            assert task.error_kind == "stalled" and "(now 900)" in (task.error_hint or "")
            errors[kind] = task.error_message
    assert errors == {
        "export": "The GGUF export made no progress for 15 minutes (last: converting to GGUF: "
        "3.2 GB of about 8.1 GB written, 1 of 4 steps done) and was stopped.",
        "merge": "The merge made no progress for 15 minutes (last: saving, 3.0 GB of 8.0 GB "
        "written) and was stopped.",
        "hub_import": "The Hub import made no progress for 15 minutes (last: nothing reported "
        "yet) and was stopped.",
    }
