"""Issue 5, the newcomer's first success, end to end on the CPU with nothing faked.

Install the demo (`install_demo`: the tiny Llama built by `python -m worker.demo`, the ~300 Zephyr
Kettle conversations imported like an upload), queue a job with the "demo" preset through the same
service the New Job page uses, run a real worker loop (`worker.loop.run_worker` in its own process,
its real training child `python -m worker.run`), and then check what the newcomer sees: metric
rows with a falling loss, an adapter that plain PEFT loads, and a playground (the worker's own
inference server, `python -m worker.inference`) that answers a training question in the demo's
words, where the base model does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from app import queue
from app.db import Database
from app.migrate import upgrade
from app.models import FINISHED_STATUSES, Adapter, JobStatus, Metric, Worker
from app.services import jobs
from app.services.demo import DEMO_MODEL, install_demo
from app.settings import Settings
from app.train_config import TrainConfig
from worker.demo import FACTS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
JOB_DEADLINE_SECONDS = 360
# Training questions (first phrasing of a fact) and the sentences the demo data teaches.
PRICE_QUESTION, PRICE_ANSWER = FACTS[0][0][0], FACTS[0][1]
WARRANTY_QUESTION, WARRANTY_ANSWER = FACTS[2][0][0], FACTS[2][1]
KEY_WORDS = {PRICE_ANSWER: "89 euros", WARRANTY_ANSWER: "7 year"}

WORKER_CODE = """
import logging, sys
from app.settings import Settings
from worker.loop import run_worker
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
run_worker(Settings(), gpus="", inference=False)
"""


@pytest.fixture
def e2e_settings(tmp_path: Path) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url="",
        lease_seconds=60.0,
        heartbeat_seconds=1.0,
        poll_seconds=0.2,
    )
    settings.ensure_dirs()
    return settings


@pytest.fixture
def e2e_db(e2e_settings: Settings):
    upgrade(e2e_settings.resolved_database_url)
    database = Database(e2e_settings.resolved_database_url)
    yield database
    database.dispose()


def _environment(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TUNEBOARD_DATA_DIR": str(settings.resolved_data_dir),
        "TUNEBOARD_DATABASE_URL": settings.resolved_database_url,
        "TUNEBOARD_LEASE_SECONDS": str(settings.lease_seconds),
        "TUNEBOARD_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "TUNEBOARD_POLL_SECONDS": str(settings.poll_seconds),
        "TUNEBOARD_HF_OFFLINE": "true",
        "TUNEBOARD_LOG_LEVEL": "WARNING",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_finished(db: Database, job_id: int, worker: subprocess.Popen, log: Path):
    deadline = time.monotonic() + JOB_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        job = queue.get_job(db, job_id)
        if job.status in FINISHED_STATUSES:
            return job
        assert worker.poll() is None, "the worker exited:\n" + log.read_text()[-3000:]
        time.sleep(0.5)
    job = queue.get_job(db, job_id)
    raise AssertionError(
        f"job {job_id} not finished after {JOB_DEADLINE_SECONDS}s: {job.status} at step "
        f"{job.progress_step}/{job.progress_total}"
    )


def _ask(url: str, secret: str, model: str, question: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_new_tokens": 30,
    }
    text = ""
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.stream("POST", f"{url}/generate", json=body, headers=auth, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "token" in event:
                    text += event["token"]
    return text.strip()


def test_the_demo_trained_through_the_queue_answers_in_the_demos_words(
    e2e_settings: Settings, e2e_db: Database, tmp_path: Path
):
    settings, db = e2e_settings, e2e_db
    started = time.monotonic()
    demo = install_demo(db, settings)
    config = TrainConfig(
        name="kettle facts",
        base_model=demo.model_name,
        dataset_id=demo.dataset_id,
        **jobs.preset_values("demo"),
    )
    job = jobs.create_job(db, settings, config)
    timings = {"install": time.monotonic() - started}

    worker_log = tmp_path / "worker.out"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE],
            cwd=REPO,
            env=_environment(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        done = _wait_finished(db, job.id, worker, worker_log)
    finally:
        _stop(worker)
    timings["train"] = time.monotonic() - started - timings["install"]
    attempt_log = settings.runs_dir / str(job.id) / f"attempt-{done.attempt}.log"
    assert done.status == JobStatus.succeeded, (
        f"{done.error_kind}: {done.error_message}\n{attempt_log.read_text()[-3000:]}"
    )
    assert done.compute_mode.startswith("fp32 LoRA on the CPU")
    assert done.start_timing.startswith("claim to first step "), done.start_timing

    # The metric rows: one per step, and the loss fell a long way (random weights start ~8).
    with db.read() as s:
        rows = list(s.exec(select(Metric).where(Metric.job_id == job.id).order_by(Metric.id)))
        adapter = s.get(Adapter, f"job-{job.id}")
    losses = [r.loss for r in rows if r.loss is not None]
    evals = [r.eval_loss for r in rows if r.eval_loss is not None]
    assert len(losses) == config.max_steps
    assert sum(losses[-10:]) / 10 < 0.5 * (sum(losses[:5]) / 5), losses
    assert evals and evals[-1] < evals[0], evals
    assert adapter is not None and adapter.base_model == DEMO_MODEL and adapter.size_bytes > 0

    # The adapter folder is a plain PEFT adapter.
    adapter_dir = settings.runs_dir / str(job.id) / "adapter"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(settings.models_dir / DEMO_MODEL)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    assert peft_model.active_adapter == "default"
    del peft_model, base

    # The playground: the worker's inference server, as the worker starts it.
    with db.write() as s:
        s.add(Worker(id="e2e-inference", host="localhost", pid=os.getpid()))
    server = subprocess.Popen(
        [sys.executable, "-m", "worker.inference", "--port", "0", "--worker-id", "e2e-inference"],
        cwd=REPO,
        env=_environment(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        with db.read() as s:  # as the web server finds it
            secret = s.get(Worker, "e2e-inference").inference_secret
        answers = {
            question: (
                _ask(url, secret, adapter.id, question),
                _ask(url, secret, DEMO_MODEL, question),
            )
            for question in (PRICE_QUESTION, WARRANTY_QUESTION)
        }
    finally:
        _stop(server)
    timings["playground"] = time.monotonic() - started - timings["install"] - timings["train"]
    print("demo e2e seconds:", {k: round(v) for k, v in timings.items()})

    for (question, (tuned, base_answer)), want in zip(
        answers.items(), (PRICE_ANSWER, WARRANTY_ANSWER), strict=True
    ):
        assert tuned == want, (question, tuned)
        assert KEY_WORDS[want] not in base_answer, (question, base_answer)
