"""Issue 19, the evaluation report: after the demo job, with no further click, a real worker's
side loop evaluates the adapter against its base on the held-out rows, and the adapter wins.

The trained and evaluated demo is shared (`evaluated_demo`, once a session); the tests that run
more evaluations add their own rows to its database and leave the first report as it is.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete
from sqlmodel import col

from app import side_queue
from app.dataset_store import iter_rows
from app.main import create_app
from app.models import Evaluation, SideWorkStatus, utcnow
from app.train_config import TrainConfig
from tests.fakes.evaluated_demo import REPO, EvaluatedDemo, worker_environment
from tests.worker.test_loop import wait_for
from worker.evaluation import prompt_and_reference
from worker.side_work import run_side_work

# The first test to ask for `evaluated_demo` trains it: room for a busy CPU.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(autouse=True)
def only_the_first_report_stays(evaluated_demo):
    """Each test's re-runs go when it ends: the shared demo's latest report stays the first."""
    yield
    with evaluated_demo.db.write() as s:
        s.connection().execute(delete(Evaluation).where(col(Evaluation.id) != 1))


def first_report(demo: EvaluatedDemo) -> Evaluation:
    with demo.db.read() as s:
        found = s.get(Evaluation, 1)
    assert found is not None
    return found


def held_out_prompts(demo: EvaluatedDemo) -> int:
    config = TrainConfig.model_validate(demo.job.config)
    rows = iter_rows(demo.settings, config.dataset_id, "eval", eval_fraction=config.eval_fraction)
    return sum(prompt_and_reference(row) is not None for row in rows)


def test_after_the_demo_job_the_adapter_beats_its_base_on_the_held_out_rows(evaluated_demo):
    evaluation = first_report(evaluated_demo)
    assert evaluation.status == SideWorkStatus.succeeded, (
        evaluation.error_message,
        evaluation.error_hint,
    )
    assert evaluation.adapter_id == evaluated_demo.adapter.id and evaluation.attempt == 1
    base, tuned = evaluation.base_figures, evaluation.adapter_figures
    assert tuned["eval_loss"] < base["eval_loss"] and tuned["perplexity"] < base["perplexity"]
    for score in ("exact_match", "token_f1", "rouge_l"):
        assert tuned[score] >= base[score], (score, base, tuned)
    assert tuned["rouge_l"] > base["rouge_l"] and tuned["token_f1"] > base["token_f1"]
    # Side by side: every held-out prompt (fewer than the default 50), with the reference.
    prompts = held_out_prompts(evaluated_demo)
    assert 0 < prompts < 50 and len(evaluation.rows) == prompts == tuned["prompts"]
    for row in evaluation.rows:
        assert row["prompt"] and row["reference"]
        assert set(row) >= {"base_answer", "adapter_answer", "base_scores", "adapter_scores"}
    assert all(r["base_answer"] != r["reference"] for r in evaluation.rows)
    assert evaluation.progress_done == evaluation.progress_total > 0


@pytest.fixture
def api(evaluated_demo):
    app = create_app(evaluated_demo.settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def test_the_api_gives_the_report_and_queues_a_rerun(evaluated_demo, api):
    adapter_id = evaluated_demo.adapter.id
    report = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert report["status"] == "succeeded" and report["complete"] is True
    for side in ("base", "adapter"):
        assert set(report[side]) >= {
            "eval_loss",
            "perplexity",
            "exact_match",
            "token_f1",
            "rouge_l",
        }
    assert report["adapter"]["eval_loss"] < report["base"]["eval_loss"]
    row = report["rows"][0]
    assert set(row) >= {"prompt", "reference", "base_answer", "adapter_answer"}

    rerun = api.post(f"/api/adapters/{adapter_id}/evaluation", json={"max_prompts": 2})
    assert rerun.status_code == 202 and rerun.json()["status"] == "queued"
    again = api.post(f"/api/adapters/{adapter_id}/evaluation")
    assert again.status_code == 202 and again.json()["id"] == rerun.json()["id"]
    # Queued is not a report: the figures shown stay the earlier complete report's.
    queued = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert queued["complete"] is False and queued["report_evaluation_id"] == report["id"]
    assert queued["base"] == report["base"]
    cancelled = api.delete(f"/api/adapters/{adapter_id}/evaluation").json()
    assert cancelled["status"] == "failed" and cancelled["error"]["kind"] == "cancelled"
    assert cancelled["report_evaluation_id"] == report["id"]
    kept = _row(evaluated_demo, cancelled["id"])
    assert kept.rows == [] and kept.base_figures == {} and kept.adapter_figures == {}

    bad = api.post(f"/api/adapters/{adapter_id}/evaluation", json={"max_prompts": -1})
    assert bad.status_code == 422
    missing = api.get("/api/adapters/job-999/evaluation")
    assert missing.status_code == 404 and "no adapter" in missing.text


def _claim_rerun(demo: EvaluatedDemo, api, **body: object) -> side_queue.SideClaim:
    """A re-run asked for through the API and claimed as a worker would."""
    queued = api.post(f"/api/adapters/{demo.adapter.id}/evaluation", json=body).json()
    claim = side_queue.claim_next(demo.db, "evaluation", "test-worker", 60, queued["id"])
    assert claim is not None
    return claim


def _start_child(demo: EvaluatedDemo, claim: side_queue.SideClaim) -> subprocess.Popen:
    command = [sys.executable, "-m", "worker.evaluation"]
    command += ["--task-id", str(claim.task_id), "--attempt", str(claim.attempt)]
    return subprocess.Popen(command, cwd=REPO, env=worker_environment(demo.settings))


def _wait(predicate, what: str):
    return wait_for(predicate, timeout=300, what=what)


def _row(demo: EvaluatedDemo, task_id: int) -> Evaluation:
    with demo.db.read() as s:
        row = s.get(Evaluation, task_id)
    assert row is not None
    return row


def test_a_killed_evaluation_is_never_complete_and_a_restart_finishes_it(evaluated_demo, api):
    demo, adapter_id = evaluated_demo, evaluated_demo.adapter.id
    claim = _claim_rerun(demo, api, max_prompts=3)
    child = _start_child(demo, claim)
    try:
        _wait(lambda: len(_row(demo, claim.task_id).rows) >= 1, "a first answered prompt")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    half = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert half["status"] == "running" and half["complete"] is False
    assert half["report_evaluation_id"] != claim.task_id  # the earlier complete report is shown
    partial = _row(demo, claim.task_id)
    assert partial.base_figures == {} and partial.adapter_figures == {} and partial.rows

    # Its worker died too: the lease expires, any worker requeues it and runs it again.
    with demo.db.write() as s:
        row = s.get(Evaluation, claim.task_id)
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.add(row)
    stopping = threading.Event()
    side = threading.Thread(
        target=run_side_work,
        args=(
            demo.settings,
            demo.db,
            stopping,
            worker_environment(demo.settings),
            demo.settings.layout.side_work_log,
            "restarted-worker",
        ),
    )
    side.start()
    try:
        done = _wait(
            lambda: (
                (r := _row(demo, claim.task_id)).status != SideWorkStatus.running
                and r.status != SideWorkStatus.queued
                and r
            ),
            "the restarted evaluation",
        )
    finally:
        stopping.set()
        side.join()
    assert done.status == SideWorkStatus.succeeded and done.attempt == 2, done.error_message
    assert len(done.rows) == 3 and done.adapter_figures["prompts"] == 3
    report = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert report["complete"] is True and len(report["rows"]) == 3


def test_a_cancelled_running_evaluation_keeps_nothing(evaluated_demo, api):
    demo, adapter_id = evaluated_demo, evaluated_demo.adapter.id
    claim = _claim_rerun(demo, api, max_prompts=5)
    child = _start_child(demo, claim)
    try:
        _wait(lambda: _row(demo, claim.task_id).progress_done >= 1, "progress")
        asked = api.delete(f"/api/adapters/{adapter_id}/evaluation").json()
        assert asked["status"] == "running"
        assert child.wait(timeout=300) == 0
    finally:
        if child.poll() is None:
            child.kill()
    report = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert report["status"] == "failed" and report["complete"] is False
    assert report["error"]["kind"] == "cancelled" and "cancelled" in report["error"]["message"]
    assert report["report_evaluation_id"] != claim.task_id
    kept = _row(demo, claim.task_id)
    assert kept.rows == [] and kept.base_figures == {} and kept.adapter_figures == {}


def test_an_evaluation_whose_dataset_is_gone_fails_with_a_message(evaluated_demo, api):
    from worker.evaluation import run_claimed_evaluation

    demo, adapter_id = evaluated_demo, evaluated_demo.adapter.id
    claim = _claim_rerun(demo, api)
    rows = demo.settings.layout.dataset_dir(demo.job.dataset_id) / "normalized.jsonl"
    moved = rows.with_suffix(".away")
    rows.rename(moved)
    try:
        assert run_claimed_evaluation(demo.settings, demo.db, claim)
    finally:
        moved.rename(rows)
    report = api.get(f"/api/adapters/{adapter_id}/evaluation").json()
    assert report["status"] == "failed" and report["error"]["kind"] == "dataset_deleted"
    assert "dataset" in report["error"]["message"] and report["error"]["hint"]
    assert report["report_evaluation_id"] != claim.task_id and _row(demo, claim.task_id).rows == []


def test_an_evaluation_waits_while_training_holds_the_gpu_and_says_so(
    evaluated_demo, api, tmp_path
):
    from worker.gpu_lock import GpuLocks
    from worker.side_work import GPU_BUSY_NOTICE

    demo, adapter_id = evaluated_demo, evaluated_demo.adapter.id
    locks_dir = tmp_path / "gpu-locks"
    settings = demo.settings.model_copy(update={"gpu_lock_dir": locks_dir})
    training = GpuLocks([0], locks_dir, role="compute")  # what a training attempt on GPU 0 holds
    assert training.try_acquire()
    queued = api.post(f"/api/adapters/{adapter_id}/evaluation", json={"max_prompts": 1}).json()
    stopping = threading.Event()
    env = {**worker_environment(demo.settings), "CUDA_VISIBLE_DEVICES": "0"}
    env["TUNEBOARD_GPU_LOCK_DIR"] = str(locks_dir)
    side = threading.Thread(
        target=run_side_work,
        args=(settings, demo.db, stopping, env, settings.layout.side_work_log, "gpu-0-worker"),
    )
    side.start()
    try:
        waiting = _wait(
            lambda: (r := _row(demo, queued["id"])).notice == GPU_BUSY_NOTICE and r,
            "the waiting notice",
        )
        assert waiting.status == SideWorkStatus.queued and waiting.attempt == 0
        page = api.get(f"/adapters/{adapter_id}/evaluation").text
        assert "a training job is using it" in page
        training.release()  # the training attempt ends: the evaluation runs
        _wait(lambda: _row(demo, queued["id"]).status == SideWorkStatus.running, "the claim")
        # It holds GPU 0's compute lock now: the next training attempt waits for it.
        assert not GpuLocks([0], locks_dir, role="compute").try_acquire()
        done = _wait(
            lambda: (
                (r := _row(demo, queued["id"])).status
                in (SideWorkStatus.succeeded, SideWorkStatus.failed)
                and r
            ),
            "the evaluation",
        )
    finally:
        training.release()
        stopping.set()
        side.join()
    assert done.status == SideWorkStatus.succeeded, done.error_message
