"""The evaluation report's judge against a small OpenAI-compatible server started by the test
(real HTTP): verdicts, position swapping, and a judge that is down, slow or talks nonsense giving
a per-row error while the rest of the report completes. Its key never reaches the report."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from app import side_queue
from app.models import Evaluation, SideWorkStatus
from app.services import evaluations
from tests.fakes.evaluated_demo import EvaluatedDemo
from worker.judge import Judge, JudgeError

KEY = "judge-key-0123456789"


class FakeJudge(ThreadingHTTPServer):
    """Prefers the answer that equals the reference; misbehaves for prompts that say so."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.keys: list[str] = []
        self.bodies: list[dict] = []
        self.misbehave: dict[str, str] = {}  # a word of the prompt -> slow | nonsense | error

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.keys.append(self.headers.get("Authorization", ""))
        self.server.bodies.append(body)
        question = body["messages"][-1]["content"]
        for word, how in self.server.misbehave.items():
            if word in question:
                if how == "slow":
                    time.sleep(3)
                if how == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                if how == "nonsense":
                    return self._reply("I like turtles")
        reference = question.split("Reference answer:\n")[1].split("\n\nAnswer A:")[0]
        first = question.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        second = question.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
        if first == second:
            return self._reply("tie")
        return self._reply("A" if first == reference else "B" if second == reference else "tie")

    def _reply(self, text: str) -> None:
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_verdicts_and_what_a_bad_judge_says(fake_judge: FakeJudge):
    judge = Judge(fake_judge.url, "judge-model", "", KEY, timeout_seconds=1)
    assert judge.verdict("q?", "right", "right", "wrong") == "A"
    assert judge.verdict("q?", "right", "wrong", "right") == "B"
    assert judge.verdict("q?", "right", "same", "same") == "tie"
    assert fake_judge.keys[-1] == f"Bearer {KEY}"
    assert fake_judge.bodies[-1]["model"] == "judge-model"
    fake_judge.misbehave = {"slowly": "slow", "oddly": "nonsense", "badly": "error"}
    with pytest.raises(JudgeError, match="within 1 s"):
        judge.verdict("answer slowly", "r", "a", "b")
    with pytest.raises(JudgeError, match=r"turtles.*not A, B or tie"):
        judge.verdict("answer oddly", "r", "a", "b")
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge.verdict("answer badly", "r", "a", "b")
    down = Judge("http://127.0.0.1:9/v1", "judge-model", timeout_seconds=1)
    with pytest.raises(JudgeError, match="unreachable"):
        down.verdict("q", "r", "a", "b")


def _run(demo: EvaluatedDemo, evaluation_id: int, **settings: object) -> Evaluation:
    from worker.evaluation import run_claimed_evaluation

    claim = side_queue.claim_next(demo.db, "evaluation", "judge-test", 60, evaluation_id)
    assert claim is not None
    worker_settings = demo.settings.model_copy(update=settings)
    assert run_claimed_evaluation(worker_settings, demo.db, claim)
    with demo.db.read() as s:
        done = s.get(Evaluation, evaluation_id)
    assert done is not None
    return done


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_each_pair_is_judged_both_ways_and_bad_verdicts_stay_on_their_row(
    evaluated_demo: EvaluatedDemo, fake_judge: FakeJudge
):
    demo = evaluated_demo
    first = demo.db.read
    with first() as s:
        report = s.get(Evaluation, 1)
    assert report is not None and report.status == SideWorkStatus.succeeded
    prompts = [row["prompt"] for row in report.rows[:4]]
    # The second prompt's verdicts time out, the third's are nonsense, the fourth's an HTTP error.
    fake_judge.misbehave = {prompts[1]: "slow", prompts[2]: "nonsense", prompts[3]: "error"}
    request = evaluations.EvaluationRequest(
        max_prompts=4,
        judge=evaluations.JudgeRequest(url=fake_judge.url, model="judge-model", rubric="Be fair."),
    )
    asked = evaluations.request_evaluation(demo.db, demo.adapter.id, request)
    done = _run(
        demo,
        int(asked.id or 0),
        judge_api_key=SecretStr(KEY),
        judge_timeout_seconds=1.0,
    )
    assert done.status == SideWorkStatus.succeeded, done.error_message
    verdicts = [row["judge"] for row in done.rows]
    assert "adapter_score" in verdicts[0] and len(verdicts[0]["verdicts"]) == 2
    assert "within 1 s" in verdicts[1]["error"]
    assert "not A, B or tie" in verdicts[2]["error"]
    assert "HTTP 500" in verdicts[3]["error"]
    figures = done.judge_figures
    assert figures["judged"] == 1 and figures["errors"] == 3 and figures["model"] == "judge-model"
    assert figures["adapter_win_rate"] == verdicts[0]["adapter_score"]
    # Both orders were asked for the judged pair: base first, then adapter first.
    asked_first = [b for b in fake_judge.bodies if prompts[0] in b["messages"][-1]["content"]]
    assert len(asked_first) == 2
    a_then_b = [b["messages"][-1]["content"] for b in asked_first]
    row = done.rows[0]
    assert a_then_b[0].index(row["base_answer"]) < a_then_b[0].index("Answer B:")
    assert a_then_b[1].index(row["adapter_answer"]) < a_then_b[1].index("Answer B:")
    # The key went to the judge, and nowhere else.
    assert set(fake_judge.keys) == {f"Bearer {KEY}"}
    with demo.db.read() as s:
        stored = s.get(Evaluation, done.id)
    assert KEY not in json.dumps(stored.model_dump(mode="json"))
    assert KEY not in json.dumps(evaluations.report(demo.db, demo.adapter.id), default=str)
    assert (
        KEY not in demo.settings.layout.side_work_log.read_text(errors="replace")
        if (demo.settings.layout.side_work_log.exists())
        else True
    )
