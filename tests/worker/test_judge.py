"""The evaluation report's judge against a small OpenAI-compatible server started by the test
(real HTTP, tests/fakes/judge.py): verdicts, position swapping, and a judge that is down, slow or
talks nonsense giving a per-row error while the rest of the report completes. Its key never
reaches the report."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from app import side_queue
from app.dataset_store import iter_rows
from app.models import Evaluation, SideWorkStatus
from app.services import evaluations
from app.train_config import TrainConfig
from tests.fakes.evaluated_demo import EvaluatedDemo, untrained_adapter
from tests.fakes.judge import FakeJudge, answers, asked, serving
from worker.evaluation import prompt_and_reference, prompt_text
from worker.judge import Judge, JudgeError

KEY = "judge-key-0123456789"


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    with serving() as server:
        yield server


def test_verdicts_and_what_a_bad_judge_says(fake_judge: FakeJudge):
    judge = Judge(fake_judge.url, "judge-model", "", KEY, timeout_seconds=1)
    assert judge.verdict("q?", "right", "right", "wrong") == "A"
    assert judge.verdict("q?", "right", "wrong", "right") == "B"
    assert judge.verdict("q?", "right", "same", "same") == "tie"
    assert fake_judge.keys[-1] == f"Bearer {KEY}"
    assert fake_judge.bodies[-1]["model"] == "judge-model"
    fake_judge.misbehave = {"answer slowly": "slow", "answer oddly": "nonsense"}
    fake_judge.misbehave["answer badly"] = "error"
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EvaluatedDemo]:
    found = untrained_adapter(tmp_path_factory.mktemp("judged") / "data")
    yield found
    found.db.dispose()


def test_each_pair_is_judged_both_ways_and_bad_verdicts_stay_on_their_row(
    demo: EvaluatedDemo, fake_judge: FakeJudge
):
    config = TrainConfig.model_validate(demo.job.config)
    rows = iter_rows(demo.settings, config.dataset_id, "eval", eval_fraction=config.eval_fraction)
    held_out = [prompt_text(p[0]) for p in map(prompt_and_reference, rows) if p is not None]
    # Four prompts asked once each (the fake judge misbehaves by prompt).
    chosen = [i for i, prompt in enumerate(held_out) if held_out.count(prompt) == 1][:4]
    assert len(chosen) == 4, held_out
    prompts = [held_out[i] for i in chosen]
    # The second prompt's verdicts time out, the third's are nonsense, the fourth's an HTTP error.
    fake_judge.misbehave = {prompts[1]: "slow", prompts[2]: "nonsense", prompts[3]: "error"}
    request = evaluations.EvaluationRequest(
        max_prompts=chosen[-1] + 1,
        judge=evaluations.JudgeRequest(url=fake_judge.url, model="judge-model", rubric="Be fair."),
    )
    queued = evaluations.request_evaluation(demo.db, demo.adapter.id, request)
    done = _run(
        demo,
        int(queued.id or 0),
        judge_api_key=SecretStr(KEY),
        judge_timeout_seconds=1.0,
    )
    assert done.status == SideWorkStatus.succeeded, done.error_message
    verdicts = [done.rows[i]["judge"] for i in chosen]
    assert [done.rows[i]["prompt"] for i in chosen] == prompts
    assert "adapter_score" in verdicts[0] and len(verdicts[0]["verdicts"]) == 2
    assert "within 1 s" in verdicts[1]["error"]
    assert "not A, B or tie" in verdicts[2]["error"]
    assert "HTTP 500" in verdicts[3]["error"]
    figures = done.judge_figures
    assert figures["errors"] == 3 and figures["model"] == "judge-model"
    assert figures["judged"] == len(done.rows) - 3
    judged = [r["judge"]["adapter_score"] for r in done.rows if "adapter_score" in r["judge"]]
    assert figures["adapter_win_rate"] == pytest.approx(sum(judged) / len(judged))
    # Both orders were asked for the judged pair: base first, then adapter first.
    questions = [b["messages"][-1]["content"] for b in fake_judge.bodies]
    row = done.rows[chosen[0]]
    both = [answers(q) for q in questions if asked(q) == prompts[0]]
    assert both == [
        (row["reference"], row["base_answer"], row["adapter_answer"]),
        (row["reference"], row["adapter_answer"], row["base_answer"]),
    ]
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
